// Host interface of the CUDA kernels of the fused KD loss (csrc/losses.h). Plain C++:
// no CUDA or PyTorch header, so that the pybind11 module that exposes it builds with the
// host compiler, and PyTorch's CPU-only wheel (which lacks its CUDA headers) can be
// built against. Buffers are device pointers allocated by the caller (PyTorch's caching
// allocator), the stream is the caller's current stream.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../losses.h"

namespace kdfast {
namespace cuda {

enum class LogitType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct FusedLossArgs {
  const void* student;  // [rows, cols], contiguous
  LogitType student_type;
  const void* teacher;  // [rows, cols], contiguous
  LogitType teacher_type;
  const int64_t* target;     // [rows] or null
  const float* difficulty;   // [rows] or null (per-sample difficulty)
  int64_t rows, cols;
  LossConfig config;
  float* loss;               // [1]: the loss
  void* grad_student;        // [rows, cols] of student_type, or null
  void* grad_teacher;        // [rows, cols] of teacher_type, or null
  void* workspace;           // fused_loss_workspace_bytes(...) bytes
  int device;                // the CUDA device of all the buffers
  void* stream;              // cudaStream_t on that device
};

// Bytes of device workspace fused_loss needs for these sizes and terms on `device`.
size_t fused_loss_workspace_bytes(int64_t rows, int64_t cols, const LossConfig& config, int device);

// Launches the kernels on args.stream; throws std::runtime_error naming the step whose
// launch failed (every launch is checked).
void fused_loss(const FusedLossArgs& args);

}  // namespace cuda
}  // namespace kdfast
