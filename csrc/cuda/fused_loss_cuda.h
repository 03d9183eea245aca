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
  const void* teacher;  // [rows, cols], contiguous; a sparse teacher's values: [rows, teacher_k] float32
  LogitType teacher_type;
  // A sparse (cached) teacher, or null, null, 0 for a dense one (the contract of
  // kdfast.sparse_teacher.SparseTeacher.kernel_arguments): row i's classes
  // teacher_indices[i, :] (int32, ascending and distinct; an index out of 0..cols−1 never
  // matches a class, and no index is ever used as an address) hold the logits teacher[i, :],
  // every other class teacher_fill[i]. 1 ≤ teacher_k ≤ cols; no teacher gradient. The
  // kernels rebuild each row where they read it: no dense teacher is stored, and the
  // workspace is the dense teacher's (fused_loss_workspace_bytes does not depend on it).
  const int32_t* teacher_indices;  // [rows, teacher_k], contiguous, or null
  const float* teacher_fill;       // [rows], or null
  int64_t teacher_k;
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

// How the Spearman steps run for rows of C classes. Pure host arithmetic, tested on
// machines without a GPU (tests/test_gpu_path.py).
// * C ≤ kSpearmanBlockSortMax: each row is sorted inside one block of `threads` threads
//   holding `items` logits each (cub::BlockRadixSort in static shared memory, under the
//   48 KiB that needs no opt-in), the smallest of 128, 256, 512, 1024 threads × 8 that
//   holds the row; pool-adjacent-violators run one thread per row; the soft ranks, ρ_S and
//   dρ_S/ds one block per row of `finish_threads` × `finish_items` (the sorts' bucket, but
//   256 × 32 instead of 1024 × 8: at 1024 threads' 64 registers it spilled 24 B, at 256
//   it takes 233 registers and none; one row per SM either way).
// * Longer rows: CUB's segmented radix sort of the chunk's rows in global memory, then one
//   256-thread block per row (pool-adjacent-violators by one thread), the row's rank arrays
//   (kRankRowBytes per logit) in the workspace.
constexpr int64_t kSpearmanBlockSortMax = 8192;
constexpr int kSpearmanItems = 8;
constexpr size_t kRankRowBytes = 3 * sizeof(double) + sizeof(int64_t) + 2 * sizeof(float) + sizeof(int32_t);

struct SpearmanPlan {
  bool block_sort;     // C ≤ kSpearmanBlockSortMax: rows sorted in shared memory
  int threads;         // threads per block of the per-row kernels (the sorts)
  int items;           // logits per thread of the sorts (block_sort only)
  int finish_threads;  // threads per block of the finish kernel (block_sort only)
  int finish_items;    // logits per thread of the finish kernel (block_sort only)
};

constexpr SpearmanPlan plan_spearman(int64_t cols) {
  if (cols > kSpearmanBlockSortMax) return {false, 256, 0, 0, 0};
  int threads = 128;
  while (static_cast<int64_t>(threads) * kSpearmanItems < cols) threads *= 2;
  const int finish_threads = threads == 1024 ? 256 : threads;
  return {true, threads, kSpearmanItems, finish_threads, threads * kSpearmanItems / finish_threads};
}

// The Spearman steps run on chunks of rows, so that their workspace is bounded at any B:
// as many rows as keep a chunk at kSpearmanChunkLogits logits (at least one row). Every
// chunk is a full pipeline (sorts, ranks, the row kernel on its rows), the chunks in turn
// on the caller's stream. Workspace of a chunk of R rows, besides 256-byte alignment
// (fused_loss_workspace_bytes adds the other terms' regions):
// * C ≤ kSpearmanBlockSortMax: 20 B per logit (the teacher's ranks and the student's
//   order, 4 B each; θ, then the PAV sums, 8 B; the PAV starts, 4 B), 4 more with the
//   student's gradient, and 36 B per row: at most 24 · 2^24 + 36 · 2^24 B = 960 MiB (at
//   C = 1), 24 · 2^24 + 36 · 2^18 B ≈ 0.4 GiB for C ≥ 64;
// * longer rows: 32 B per logit (sort keys, sorted keys, the iota and both orders, the
//   gradient), CUB's temporary storage (~8 B per logit: its alternate buffers), and a rank
//   row of kRankRowBytes = 44 B per logit for each of at most min(R, 2 · SMs) blocks, so
//   at most (32 + 8 + 44) · 2^24 B ≈ 1.3 GiB for C ≤ 2^24; a longer row is a chunk of its
//   own, ~84 B per logit of that row.
constexpr int64_t kSpearmanChunkLogits = int64_t{1} << 24;

constexpr int64_t spearman_chunk_rows(int64_t rows, int64_t cols) {
  const int64_t fit = kSpearmanChunkLogits / cols;
  return fit < 1 ? 1 : (fit < rows ? fit : rows);
}

// CUDA versions as 1000·major + 10·minor: the runtime this module was built with (linked
// statically), and the newest the installed driver supports (0 without a driver).
int cuda_runtime_version();
int cuda_driver_version();

// Bytes of device workspace fused_loss needs for these sizes and terms on `device`. With
// a Spearman term its Spearman part is one chunk's (spearman_chunk_rows above): at most
// ~1 GiB for C ≤ kSpearmanBlockSortMax and ~1.3 GiB for longer rows up to 2^24 classes,
// whatever B; the other terms add O(B + C) (the row losses, the column statistics).
// Logit standardization (config.standardize) adds B·C·(8 + 4 per gradient) bytes: the
// standardized student and teacher rows and the gradients through them, in fp32.
size_t fused_loss_workspace_bytes(int64_t rows, int64_t cols, const LossConfig& config, int device);

// Launches the kernels on args.stream; throws std::runtime_error naming the step whose
// launch failed (every launch is checked), or, before any device call, naming what is
// wrong with the sizes or the sparse teacher's arguments.
void fused_loss(const FusedLossArgs& args);

}  // namespace cuda
}  // namespace kdfast
