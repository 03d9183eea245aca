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

// Where the Spearman kernel keeps a row's rank arrays (kRankRowBytes per logit): in dynamic
// shared memory when that, plus the kernel's static shared memory, fits the device's
// per-block opt-in limit and kMaxSharedRankBytes; else in the row's slice of the global
// workspace. Beyond 48 KiB in all (static + dynamic) a launch needs the opt-in attribute,
// set to the dynamic bytes: a limit that ignored the static part made C ≈ 1080–1117
// launch with "invalid argument". Pure host arithmetic, tested on machines without a GPU.
constexpr size_t kRankRowBytes = 3 * sizeof(double) + sizeof(int64_t) + 2 * sizeof(float) + sizeof(int32_t);
constexpr size_t kMaxSharedRankBytes = 96 * 1024;
constexpr size_t kDefaultSharedLimit = 48 * 1024;

struct RankRowsPlan {
  bool in_shared;        // the rank arrays live in dynamic shared memory
  size_t dynamic_bytes;  // dynamic shared memory of the launch
  bool opt_in;           // static + dynamic > 48 KiB: cudaFuncAttributeMaxDynamicSharedMemorySize needed
};

inline RankRowsPlan plan_rank_rows(int64_t cols, size_t static_bytes, size_t optin_bytes) {
  const size_t bytes = static_cast<size_t>(cols) * kRankRowBytes;
  const bool in_shared = bytes <= kMaxSharedRankBytes && static_bytes + bytes <= optin_bytes;
  const size_t dynamic = in_shared ? bytes : 0;
  return {in_shared, dynamic, static_bytes + dynamic > kDefaultSharedLimit};
}

// CUDA versions as 1000·major + 10·minor: the runtime this module was built with (linked
// statically), and the newest the installed driver supports (0 without a driver).
int cuda_runtime_version();
int cuda_driver_version();

// Bytes of device workspace fused_loss needs for these sizes and terms on `device`.
size_t fused_loss_workspace_bytes(int64_t rows, int64_t cols, const LossConfig& config, int device);

// Launches the kernels on args.stream; throws std::runtime_error naming the step whose
// launch failed (every launch is checked).
void fused_loss(const FusedLossArgs& args);

}  // namespace cuda
}  // namespace kdfast
