// kdfast._C_cuda: the CUDA kernels' launchers, bound with pybind11 on raw device pointers
// (Python integers) so that this module needs neither PyTorch's CUDA headers nor a CUDA
// build of PyTorch to compile. kdfast/fused.py registers it as the CUDA implementation of
// torch.ops.kdfast.fused_kd_loss.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "fused_loss_cuda.h"

namespace py = pybind11;
using kdfast::LossConfig;

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "kdfast CUDA kernels (launchers on device pointers)";
  py::class_<LossConfig>(m, "LossConfig")
      .def(py::init<>())
      .def_readwrite("inv_temperature", &LossConfig::inv_temperature)
      .def_readwrite("kl_coef", &LossConfig::kl_coef)
      .def_readwrite("ce_coef", &LossConfig::ce_coef)
      .def_readwrite("pearson_coef", &LossConfig::pearson_coef)
      .def_readwrite("spearman_coef", &LossConfig::spearman_coef)
      .def_readwrite("column_coef", &LossConfig::column_coef)
      .def_readwrite("rank_strength", &LossConfig::rank_strength)
      .def_readwrite("difficulty_mode", &LossConfig::difficulty_mode)
      .def_readwrite("difficulty_value", &LossConfig::difficulty_value)
      .def_readwrite("rectify", &LossConfig::rectify)
      .def_readwrite("student_grad", &LossConfig::student_grad)
      .def_readwrite("teacher_grad", &LossConfig::teacher_grad)
      .def_readwrite("tckd_coef", &LossConfig::tckd_coef)
      .def_readwrite("nckd_coef", &LossConfig::nckd_coef)
      .def_readwrite("standardize", &LossConfig::standardize);
  py::class_<kdfast::cuda::SpearmanPlan>(m, "SpearmanPlan")
      .def_readonly("block_sort", &kdfast::cuda::SpearmanPlan::block_sort)
      .def_readonly("threads", &kdfast::cuda::SpearmanPlan::threads)
      .def_readonly("items", &kdfast::cuda::SpearmanPlan::items)
      .def_readonly("finish_threads", &kdfast::cuda::SpearmanPlan::finish_threads)
      .def_readonly("finish_items", &kdfast::cuda::SpearmanPlan::finish_items);
  m.def("plan_spearman", &kdfast::cuda::plan_spearman, py::arg("cols"));
  m.def("spearman_chunk_rows", &kdfast::cuda::spearman_chunk_rows, py::arg("rows"), py::arg("cols"));
  m.attr("SPEARMAN_BLOCK_SORT_MAX") = kdfast::cuda::kSpearmanBlockSortMax;
  m.attr("SPEARMAN_CHUNK_LOGITS") = kdfast::cuda::kSpearmanChunkLogits;
  m.attr("RANK_ROW_BYTES") = kdfast::cuda::kRankRowBytes;
  m.def("cuda_runtime_version", &kdfast::cuda::cuda_runtime_version);
  m.def("cuda_driver_version", &kdfast::cuda::cuda_driver_version);
  m.def("fused_loss_workspace_bytes", &kdfast::cuda::fused_loss_workspace_bytes, py::arg("rows"), py::arg("cols"),
        py::arg("config"), py::arg("device"));
  // A sparse teacher (kdfast.sparse_teacher): `teacher` its values [rows, teacher_k] (float32),
  // teacher_indices [rows, teacher_k] (int32) and teacher_fill [rows] (float32) device
  // pointers; all three 0 for a dense teacher.
  m.def(
      "fused_loss",
      [](uintptr_t student, int student_type, uintptr_t teacher, int teacher_type, uintptr_t target,
         uintptr_t difficulty, int64_t rows, int64_t cols, const LossConfig& config, uintptr_t loss,
         uintptr_t grad_student, uintptr_t grad_teacher, uintptr_t workspace, int device, uintptr_t stream,
         uintptr_t teacher_indices, uintptr_t teacher_fill, int64_t teacher_k) {
        kdfast::cuda::FusedLossArgs args{};
        args.student = reinterpret_cast<const void*>(student);
        args.student_type = static_cast<kdfast::cuda::LogitType>(student_type);
        args.teacher = reinterpret_cast<const void*>(teacher);
        args.teacher_type = static_cast<kdfast::cuda::LogitType>(teacher_type);
        args.teacher_indices = reinterpret_cast<const int32_t*>(teacher_indices);
        args.teacher_fill = reinterpret_cast<const float*>(teacher_fill);
        args.teacher_k = teacher_k;
        args.target = reinterpret_cast<const int64_t*>(target);
        args.difficulty = reinterpret_cast<const float*>(difficulty);
        args.rows = rows;
        args.cols = cols;
        args.config = config;
        args.loss = reinterpret_cast<float*>(loss);
        args.grad_student = reinterpret_cast<void*>(grad_student);
        args.grad_teacher = reinterpret_cast<void*>(grad_teacher);
        args.workspace = reinterpret_cast<void*>(workspace);
        args.device = device;
        args.stream = reinterpret_cast<void*>(stream);
        kdfast::cuda::fused_loss(args);
      },
      py::call_guard<py::gil_scoped_release>(), py::arg("student"), py::arg("student_type"), py::arg("teacher"),
      py::arg("teacher_type"), py::arg("target"), py::arg("difficulty"), py::arg("rows"), py::arg("cols"),
      py::arg("config"), py::arg("loss"), py::arg("grad_student"), py::arg("grad_teacher"), py::arg("workspace"),
      py::arg("device"), py::arg("stream"), py::arg("teacher_indices") = 0, py::arg("teacher_fill") = 0,
      py::arg("teacher_k") = 0);
}
