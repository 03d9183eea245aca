// CUDA kernels of the fused KD loss (the generic loss of csrc/losses.h): the same math
// as csrc/losses_cpu.cpp. The row kernel holds rows of up to 2048 classes in registers
// (8 to 32 lanes of a warp per row up to 512 classes, a block per row beyond) and reads
// each input once; longer rows take a block each and two reads whatever the terms (a first
// pass gathering every statistic, then the gradients'), plus three with DKD's terms (the
// non-target maxima, their normalizers, NCKD: five reads in all).
//
// DKD (tckd_coef, nckd_coef) is a compile-time switch of the row kernel (fused_row's DKD,
// chosen per launch from the config): the instances without it are the code they were.
// Logit standardization (standardize) is one step around the whole pipeline (section 3b):
// the rows z-scored once into fp32 workspace rows, steps 1–3 unchanged on them (so the
// column statistics, the Spearman sorts and ranks, the rectification, the entropy
// difficulty and both row layouts see the standardized rows, dense or sparse teacher),
// then the standardization's gradient and CE on the raw logits; the kernels of the
// unstandardized path are untouched by it.
//
// The steps, all on the caller's stream:
//   1. (column term)   per-row softmax statistics, then per-column moments over fixed
//                      chunks of rows, reduced in a fixed order (deterministic);
//   2. (Spearman term) per chunk of rows (bounded workspace: spearman_chunk_rows), then
//                      step 3 on that chunk. C ≤ kSpearmanBlockSortMax (8192): one block
//                      per row sorts the teacher row in shared memory (cub::BlockRadixSort,
//                      16-bit keys for half inputs) into its average ranks, one sorts the
//                      student row into θ = ẑ/ε (column-major); pool-adjacent-violators run
//                      one thread per row, 32 rows per block; one block per row then forms
//                      the soft ranks, ρ_S and dρ_S/ds. Longer rows: a segmented radix sort
//                      (CUB) of the chunk's rows, then one block per row (PAV by one
//                      thread, the row's arrays in the workspace);
//   3. the row kernel: KL, CE, Pearson, difficulty, the Spearman and column shares, and
//      the gradients, rounded once to the logits' dtype (one algorithm, fused_row, over
//      the resident and the chunked layouts); with the column term it takes each row's
//      normalizers from step 1, so p and q are bit-identical to the column statistics'
//      (a constant column centers to exactly zero);
//   4. the loss: a fixed-order sum of the per-row losses (and of the column correlations).
//
// Audit (what the interpreter-free reading checked; tests/test_gpu_path.py has a GPU test
// per past defect):
// * Barriers: block_sum / block_argmax (block_sum also at the Spearman kernels' block shapes, and
//   block_exclusive_segment_scan) start with __syncthreads() before writing their scratch,
//   so back-to-back reductions never overwrite what a lagging warp still reads; every
//   thread sums the warp partials in the same order (bit-identical totals). Every branch
//   or return that skips a barrier depends only on block-uniform values (the config, the
//   row's target, reduced totals, block_count read after a barrier, the row's z_scale),
//   and the long rows' Spearman kernel's returns come back to its row loop's
//   __syncthreads().
// * Row kernel, resident layout: the shuffles of a row's reductions span the whole warp
//   (rows of 8 or 16 lanes share one), so no lane may leave or branch around them: every
//   reduction is under a kernel-uniform condition (coefficients, gradient flags), what is
//   per row (a missing target, the difficulty, the rectification) only selects values,
//   and rows past the last stay in with zero classes (no load, no store). No shared
//   memory in the warp layouts; the block layout uses block_sum/block_argmax as below.
//   A thread stores only the classes it loaded, of its own row; vector accesses only when
//   C % 8 == 0 and every buffer is 16-byte aligned (checked on the host), so a run never
//   crosses a row's end. The rectified teacher's gradient is stored in place with the
//   two exchanged values computed per row (no scatter between threads).
// * Chunked layout: one block per row, two reads of it. Without the column term the online
//   first pass keeps per-thread running maxima, double sums and (row Pearson term) Welford
//   moments of e_s, e_t, all in the thread's registers (no thread reads another's), merged
//   after block_argmax by rescaling: the sums by block_sum, the moments by block_merge (a
//   lane-ordered shuffle butterfly, then the warps in order through the scratch between the
//   same two barriers as block_sum): fixed orders, bit-repeatable. The Pearson gradient's
//   <p, g> comes in closed form from the moments. With the column term the first pass takes
//   step 1's normalizers and reads exact p, q. Either way the store is the second read. A
//   thread loads and stores only its own runs of kVector classes (vector accesses under the
//   same condition as the resident layout), at addresses formed per run from the launch's
//   arrays and the row's int64 offset; the pass directions are compile-time (first forward,
//   store backward). The two copies of the row (column term or not) are chosen by a
//   kernel-uniform flag, so every thread of a block takes the same barriers.
// * Spearman chunks: each chunk's kernels take pointers offset by first·cols (int64) and
//   the chunk's row count R, so sort offsets stay under 2^31; the chunk's ρ_S and dρ_S/ds
//   are written before the chunk's row kernel reads them (same stream) and rewritten only
//   by the next chunk's kernels, which the stream orders after it.
// * Spearman, C ≤ 8192 (section 2b): every row's workspace is its own: row-major slices
//   row·C .. row·C + C − 1 (int64) and column-major slots k·R + row (int64, k < C), so no
//   two blocks (or PAV threads) touch one address. Shared memory: the sort's storage is
//   reused (a union) only after the __syncthreads() that follows BlockRadixSort::Sort, the
//   reductions' scratch only after a barrier; the teacher's average rank of a tie group is
//   written once (by its last position) and read after a barrier. Positions past C (the
//   bucket's padding) carry the largest key and indices ≥ C: the sort is stable, so the
//   first C sorted positions are exactly the row's C columns, a permutation of 0..C−1
//   (every bit pattern, NaN included, has a key), and every scatter through them (the
//   teacher's ranks, dρ_S/ds) stays in the row. The PAV thread overwrites θ in place: step
//   k writes slot ≤ k after θ_k was read, and reads ahead only slots > k; the block starts
//   it writes are positions in 0..k, so the finish kernel's flags stay in its C-entry
//   array. The finish kernel replaces each PAV block's sum of θ − w by its mean of g (one writer
//   per block, its last position) after a barrier that follows every read of the sums, and
//   reads the means after another barrier (global writes are visible within the block).
// * Rows: one block per row elsewhere, row offsets row·cols in int64, element loops in int64; the
//   scatters through the sort orders and the rectification's swap are permutations of
//   0..cols−1 whatever the values (CUB sorts every bit pattern, NaN included), so no block
//   writes outside its row. Grids of the per-row Spearman kernels: R ≤ B blocks; PAV:
//   ⌈R / 32⌉. Grids: 1-D x ≤ 2^31 − 1 (checked), the column kernels' y is
//   at most 64 chunks.
// * Teacher reads: every kernel reads the teacher only through its accessor
//   (DenseTeacherRows / SparseTeacherRows, section 0), one template per kernel for both. A
//   sparse teacher's reads stay in its row's k entries (at row·k, int64) and fill, whatever
//   its indices hold (out of range, duplicated: the accessor's comment); it is never
//   written (no race) and no B×C copy of it exists; the workspace and every write are the
//   dense path's. The rebuilt floats are its dense fp32 row's and every sum runs in the
//   dense path's order, so it gives bit for bit what that dense row gives
//   (tests/test_sparse_cuda.py compares the two on a GPU).
// * Terms are switched on by their coefficients, never by the value of a weight (a NaN
//   difficulty times 0 would otherwise read unallocated Spearman buffers).
// * Workspace: 256-byte aligned regions, rank rows a multiple of 16 bytes; every region is
//   written before it is read (the PAV slots a row's finish kernel reads, 0..count − 1, were
//   all written by its PAV thread). Bounded at any B (fused_loss_cuda.h: the Spearman
//   chunks' bound), except with logit standardization, whose standardized rows and
//   gradients take 8 B per logit and 4 more per gradient (section 3b). Shared memory:
//   static only, under the 48 KiB that needs no opt-in (largest: the 1024-thread teacher
//   sort of float rows, 45 KB).
// * DKD (fused_row): its three passes are three more each() over the row (the resident
//   layouts' registers, the chunked layout's runs: the reads, bounds and offsets of its first
//   pass), each reduction (maxima, then sums) under the compile-time DKD, so every lane of a
//   warp and every thread of a block reaches them; what is per row (a missing target)
//   selects values only, and the target's class is loaded only when in 0..C−1 (else class
//   0 of the row, whose loss and gradients are NaN anyway). The gradients are the store's
//   existing per-class expressions plus terms of the thread's own class: no new memory
//   access but the target's logit (s_row[y], t_row.load(y): the row's own).
// * Standardization (section 3b): its kernels' own argument is written there.
// * Streams: every launch and both CUB sorts run on the caller's stream; no atomics, so
//   results repeat bit for bit (block scans and sums in a fixed order).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cub/block/block_radix_sort.cuh>
#include <cub/block/block_scan.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "fused_loss_cuda.h"

namespace kdfast {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Rows per chunk of the column moments, as on the CPU: a fixed function of B.
int64_t column_chunk_rows(int64_t rows) { return std::max<int64_t>(16, (rows + 63) / 64); }

void check(cudaError_t status, const char* step) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("kdfast CUDA fused loss: ") + step + " failed: " + cudaGetErrorString(status));
  }
}

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Sums N values over a block of THREADS threads (kThreads unless a kernel has its own
// block shape); every thread gets the totals. Fixed order: deterministic.
template <int THREADS = kThreads, typename T, int N>
__device__ __forceinline__ void block_sum(T (&v)[N], T* scratch) {
#pragma unroll
  for (int k = 0; k < N; ++k) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // a previous reduction may still be reading the scratch
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) scratch[warp * N + k] = v[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    T total = 0;
    for (int w = 0; w < THREADS / 32; ++w) total += scratch[w * N + k];
    v[k] = total;
  }
}

// Maximum over the block (NaN ignored, as on the CPU), with the first index reaching it.
__device__ __forceinline__ void block_argmax(float& value, int64_t& index, float* fscratch, int64_t* iscratch) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, value, offset);
    const int64_t other_index = __shfl_xor_sync(0xffffffffu, index, offset);
    if (other > value || (other == value && other_index < index)) {
      value = other;
      index = other_index;
    }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();
  if (lane == 0) {
    fscratch[warp] = value;
    iscratch[warp] = index;
  }
  __syncthreads();
  value = fscratch[0];
  index = iscratch[0];
  for (int w = 1; w < kWarps; ++w) {
    if (fscratch[w] > value || (fscratch[w] == value && iscratch[w] < index)) {
      value = fscratch[w];
      index = iscratch[w];
    }
  }
}

struct Scratch {
  double d[kWarps * 5];
  float f[kWarps * 4];
  int64_t i[kWarps];
};

constexpr int kVector = 8;  // classes per run: 16 bytes of a half type, 32 of float

// kVector classes from j0 on as floats: one or two 16-byte loads when `vector` (then the
// run is whole: C % kVector == 0), else masked scalar loads (0 past the row's end).
template <typename T>
__device__ __forceinline__ void load_run(const T* row, int64_t j0, int64_t cols, bool vector, float (&out)[kVector]) {
  if (vector && j0 + kVector <= cols) {
    if constexpr (sizeof(T) == 2) {
      const uint4 raw = *reinterpret_cast<const uint4*>(row + j0);
      const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int w = 0; w < kVector; ++w) out[w] = to_float(h[w]);
    } else {
      const float4 a = reinterpret_cast<const float4*>(row + j0)[0], b = reinterpret_cast<const float4*>(row + j0)[1];
      out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
    }
  } else {
#pragma unroll
    for (int w = 0; w < kVector; ++w) out[w] = j0 + w < cols ? to_float(row[j0 + w]) : 0.0f;
  }
}

// ---------------------------------------------------------------------------------
// 0. Reading the teacher.
//
// Every read of the teacher, in every kernel, goes through one of two accessors, so that
// each kernel is one template for both kinds of teacher (csrc/losses_cpu.cpp's
// DenseTeacherRows / SparseTeacherRows on the CPU):
// * DenseTeacherRows<T>: the logits [B, C] of type T (fp32, fp16, bf16);
// * SparseTeacherRows: a cached teacher (kdfast.sparse_teacher): k fp32 logits per row at
//   k int32 classes (ascending and distinct, as SparseTeacher.kernel_arguments gives them)
//   and one fp32 fill logit per row for the other C − k classes. It describes the dense
//   row t[c] = values[p] where indices[p] == c, else fill, which is rebuilt where a kernel
//   reads it and never stored (no B×C teacher, no workspace holding it).
// view(row, offset) (offset = row·C: where a dense row starts) gives the row's view:
//   load(j)                      class j's logit as float;
//   run(j0, cols, vector, out)   kVector classes from j0 as floats, 0 past the row's end (the
//                                row kernel's runs: load_run's 16-byte vector loads for a
//                                dense teacher, unchanged; one search and a walk for a sparse);
//   gather<N>(j0, cols, out)     N classes from j0 in value_type, masked past the row's end
//                                (the in-block sorts' items, j0 + N ≤ 65536: their 16-bit
//                                keys read a half teacher's own bits).
// load(row, col, element) reads one class without a view (element = row·C + col: where a
// dense teacher has it; the column kernels, the sorts' keys). On the host, rows_from(first,
// cols) gives the accessor of the rows from `first` on (the Spearman chunks'), and
// aligned16() whether the row kernel may use vector loads.
template <typename T>
struct DenseTeacherRows {
  using value_type = T;
  using grad_type = T;  // the teacher's gradient, when it has one
  static constexpr bool kSparse = false;
  const T* logits;  // [B, C]

  struct Row {
    const T* logits;  // the row's C logits
    __device__ __forceinline__ float load(int64_t j) const { return to_float(logits[j]); }
    __device__ __forceinline__ void run(int64_t j0, int64_t cols, bool vector, float (&out)[kVector]) const {
      load_run(logits, j0, cols, vector, out);
    }
    template <int N>
    __device__ __forceinline__ void gather(int j0, int64_t cols, T (&out)[N]) const {
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int p = j0 + i;
        out[i] = p < cols ? logits[p] : T();
      }
    }
  };
  __device__ __forceinline__ Row view(int64_t, int64_t offset) const { return {logits + offset}; }
  __device__ __forceinline__ float load(int64_t, int64_t, int64_t element) const { return to_float(logits[element]); }
  DenseTeacherRows rows_from(int64_t first, int64_t cols) const { return {logits + first * cols}; }
  bool aligned16() const { return reinterpret_cast<uintptr_t>(logits) % 16 == 0; }
};

// The sparse teacher's lookup. Class c of a row is values[p] for p = lower_bound(indices,
// c) (the first position whose index is ≥ c) when p < k and indices[p] == c, else the
// fill. Why no access leaves the row's k entries, whatever the indices hold (out of range,
// duplicated, unsorted — the operator trusts the caller's order and range and checks
// neither, so that it costs no device sync):
// * lower_bound is branch-free: base starts at the row's first entry with n = k ≥ 1
//   (fused_loss checks 1 ≤ k ≤ C) and each step either keeps base and shrinks n, or moves
//   base by half = n/2 < n and shrinks n by half, so base + n ≤ indices + k throughout and
//   every read, base[half] and the final base[0], is an entry of the row (n ≥ 1 at the
//   end); the result is in 0..k. Its ⌈log2 k⌉ steps depend on k alone (no divergence).
// * values[p] and indices[p] are read only under p < k; an index that is out of range
//   (negative, or ≥ C) is never equal to a class c in 0..C−1 that a kernel asks for, so it
//   is simply never matched; indices are only compared, never used as addresses.
// * gather searches once per run of N classes: p = lower_bound(j0), then class c takes
//   entry p when p < k and indices[p] == c, and p moves past it (so p stays in 0..k). For
//   ascending distinct indices p is lower_bound(c) at every class (indices[p] ≥ c, and
//   after a match indices[p + 1] > c), so a run's classes equal load()'s, out-of-range
//   indices included (negative ones sort first, ones ≥ C last); for duplicated or unsorted
//   indices only which entry (or the fill) a class gets may differ, never the bounds.
//   (Of the walks tried, this one spilled in no layout; stepping p while indices[p] < c
//   took the 2-run resident layout to 152 registers on sm_80, and stepping it once made the
//   chunked one spill on sm_90.)
// * Offsets: a row's entries start at row·k in int64 (B·k may pass 2^31); k ≤ C < 2^31
//   fits the int32 positions.
// * Nothing is written: the accessor only reads values, indices and fill, so no two
//   threads race on it (every thread may read any row's entries).
struct SparseTeacherRows {
  using value_type = float;
  using grad_type = float;  // never written: a sparse teacher has no gradient (fused_loss refuses it)
  static constexpr bool kSparse = true;
  const float* values;     // [B, k]
  const int32_t* indices;  // [B, k]: ascending, distinct, in 0..C−1 (not relied on for safety)
  const float* fill;       // [B]
  int64_t k;

  struct Row {
    const float* values;     // the row's k logits
    const int32_t* indices;  // their classes
    int32_t k;
    float fill;
    __device__ __forceinline__ int32_t lower_bound(int64_t c) const {
      const int32_t* base = indices;
      for (int32_t n = k; n > 1;) {
        const int32_t half = n >> 1;
        base = base[half] < c ? base + half : base;
        n -= half;
      }
      return static_cast<int32_t>(base - indices) + (base[0] < c ? 1 : 0);
    }
    __device__ __forceinline__ float load(int64_t j) const {
      const int32_t p = lower_bound(j);
      return p < k && indices[p] == j ? values[p] : fill;
    }
    template <int N>
    __device__ __forceinline__ void gather(int64_t j0, int64_t cols, float (&out)[N]) const {
      if (j0 >= cols) {  // wholly past the row's end (the resident layout's last runs): no search
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = 0.0f;
        return;
      }
      int32_t p = lower_bound(j0);
#pragma unroll
      for (int i = 0; i < N; ++i) {
        const int64_t c = j0 + i;
        const bool hit = p < k && indices[p] == c;
        out[i] = c < cols ? (hit ? values[p] : fill) : 0.0f;
        p += hit ? 1 : 0;
      }
    }
    __device__ __forceinline__ void run(int64_t j0, int64_t cols, bool, float (&out)[kVector]) const {
      gather(j0, cols, out);
    }
  };
  __device__ __forceinline__ Row view(int64_t row, int64_t) const {
    return {values + row * k, indices + row * k, static_cast<int32_t>(k), fill[row]};
  }
  __device__ __forceinline__ float load(int64_t row, int64_t col, int64_t) const { return view(row, 0).load(col); }
  SparseTeacherRows rows_from(int64_t first, int64_t) const {
    return {values + first * k, indices + first * k, fill + first, k};
  }
  bool aligned16() const { return true; }  // never read by vector loads
};

// ---------------------------------------------------------------------------------
// 1. Column statistics (the intra-class term).

struct SoftmaxStats {
  float max, log_sum;
};

// The teacher's classes through its row view (one row per block, the view's reads stay in
// the row: see SparseTeacherRows); one writer per row of stats (thread 0).
template <typename s_t, typename Teacher>
__global__ void __launch_bounds__(kThreads) row_softmax_stats_kernel(const s_t* student, Teacher teacher,
                                                                     int64_t cols, float it, SoftmaxStats* stats) {
  __shared__ Scratch scratch;
  const int64_t row = blockIdx.x;
  const s_t* s = student + row * cols;
  const auto t = teacher.view(row, row * cols);
  float s_max = -INFINITY, t_max = -INFINITY;
  int64_t unused_s = 0, unused_t = 0;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const float a = to_float(s[j]), b = t.load(j);
    s_max = a > s_max ? a : s_max;
    t_max = b > t_max ? b : t_max;
  }
  block_argmax(s_max, unused_s, scratch.f, scratch.i);
  block_argmax(t_max, unused_t, scratch.f, scratch.i);
  float sums[2] = {0.0f, 0.0f};
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    sums[0] += expf((to_float(s[j]) - s_max) * it);
    sums[1] += expf((t.load(j) - t_max) * it);
  }
  block_sum(sums, scratch.f);
  if (threadIdx.x == 0) {
    stats[2 * row] = {s_max, logf(sums[0])};
    stats[2 * row + 1] = {t_max, logf(sums[1])};
  }
}

// One thread per column, one blockIdx.y per chunk of rows. pass 0: Σ (p − p_0), Σ (q − q_0)
// (shifted by row 0, so that a constant column centers to exactly zero); pass 1: centered
// Σ ab, Σ aa, Σ bb with the means found by pass 0. The teacher through teacher.load(i, j,
// ·) (i < rows, j < cols): row i's own entries only (SparseTeacherRows).
template <typename s_t, typename Teacher>
__global__ void __launch_bounds__(kThreads) column_moments_kernel(const s_t* student, Teacher teacher, int64_t rows,
                                                                  int64_t cols, float it, const SoftmaxStats* stats,
                                                                  int64_t chunk, int pass, const float* means,
                                                                  double* partial) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= cols) return;
  auto prob = [&](float x, SoftmaxStats st) { return expf((x - st.max) * it - st.log_sum); };
  const int64_t first = static_cast<int64_t>(blockIdx.y) * chunk;
  const int64_t last = first + chunk < rows ? first + chunk : rows;
  double* out = partial + static_cast<int64_t>(blockIdx.y) * 3 * cols;
  if (pass == 0) {
    const float p0 = prob(to_float(student[j]), stats[0]), q0 = prob(teacher.load(0, j, j), stats[1]);
    double sp = 0.0, sq = 0.0;
    for (int64_t i = first; i < last; ++i) {
      sp += prob(to_float(student[i * cols + j]), stats[2 * i]) - p0;
      sq += prob(teacher.load(i, j, i * cols + j), stats[2 * i + 1]) - q0;
    }
    out[j] = sp;
    out[cols + j] = sq;
  } else {
    const float mean_p = means[j], mean_q = means[cols + j];
    double ab = 0.0, aa = 0.0, bb = 0.0;
    for (int64_t i = first; i < last; ++i) {
      const double a = prob(to_float(student[i * cols + j]), stats[2 * i]) - mean_p;
      const double b = prob(teacher.load(i, j, i * cols + j), stats[2 * i + 1]) - mean_q;
      ab += a * b;
      aa += a * a;
      bb += b * b;
    }
    out[j] = ab;
    out[cols + j] = aa;
    out[2 * cols + j] = bb;
  }
}

// Reduces the chunks' partials in order. pass 0 writes the column means; pass 1 the
// correlation's gradient coefficients and ρ per column (the teacher's row 0 through
// teacher.load(0, j, j), j < cols).
struct ColumnStats {
  float *mean_p, *mean_q, *cross, *self_p, *self_q;
  double* rho;
};

template <typename s_t, typename Teacher>
__global__ void __launch_bounds__(kThreads) column_finalize_kernel(const s_t* student, Teacher teacher,
                                                                   int64_t rows, int64_t cols, float it,
                                                                   const SoftmaxStats* stats, int64_t chunks, int pass,
                                                                   const double* partial, ColumnStats columns) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= cols) return;
  double sums[3] = {0.0, 0.0, 0.0};
  for (int64_t c = 0; c < chunks; ++c) {
    for (int k = 0; k < (pass == 0 ? 2 : 3); ++k) sums[k] += partial[(c * 3 + k) * cols + j];
  }
  if (pass == 0) {
    const float p0 = expf((to_float(student[j]) - stats[0].max) * it - stats[0].log_sum);
    const float q0 = expf((teacher.load(0, j, j) - stats[1].max) * it - stats[1].log_sum);
    columns.mean_p[j] = static_cast<float>(p0 + sums[0] / static_cast<double>(rows));
    columns.mean_q[j] = static_cast<float>(q0 + sums[1] / static_cast<double>(rows));
  } else {
    const Correlation corr = correlation(sums[0], sums[1], sums[2]);
    columns.cross[j] = corr.cross;
    columns.self_p[j] = corr.self_a;
    columns.self_q[j] = corr.self_b;
    columns.rho[j] = corr.rho;
  }
}

// ---------------------------------------------------------------------------------
// 2. The Spearman term.

// The segmented sorts' keys: the chunk's logits as floats, the teacher's through
// teacher.load(row, col, e) (a sparse teacher's rebuilt row: the sort keys are the
// workspace the dense path already fills, nothing more). Element e < rows·cols is row
// e / cols < rows, class e − row·cols < cols: every read is of that row (SparseTeacherRows:
// its own entries), every write at e or at offsets[row ≤ rows].
template <typename s_t, typename Teacher>
__global__ void __launch_bounds__(kThreads) prepare_sort_kernel(const s_t* student, Teacher teacher, int64_t rows,
                                                                int64_t cols, float* s_keys, float* t_keys,
                                                                int32_t* iota, int32_t* offsets) {
  const int64_t total = rows * cols;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    s_keys[e] = to_float(student[e]);
    const int64_t row = e / cols;
    t_keys[e] = teacher.load(row, e - row * cols, e);
    iota[e] = static_cast<int32_t>(e % cols);
    if (e % cols == 0) offsets[e / cols] = static_cast<int32_t>(e);
  }
  if (blockIdx.x == 0 && threadIdx.x == 0) offsets[rows] = static_cast<int32_t>(total);
}

// The per-row arrays of the Spearman kernel (rows longer than kSpearmanBlockSortMax): in
// the block's slice of the workspace.
struct RankRow {
  double* ranks;       // θ = ẑ/ε in the student's descending order, then the soft ranks, then g
  double* block_a;     // PAV stack
  double* block_b;
  int64_t* block_start;
  float* u;            // teacher average ranks in the student's descending order
  float* t_rank;       // teacher average ranks in original order
  int32_t* group;      // start of each sorted teacher element's tie group
};
// Bytes between two rows' arrays in the workspace, a multiple of 16 so that every row's
// doubles stay aligned.
__host__ __device__ inline size_t rank_row_stride(int64_t cols) { return (cols * kRankRowBytes + 15) / 16 * 16; }

__device__ RankRow rank_row(char* base, int64_t cols) {
  RankRow r;
  r.ranks = reinterpret_cast<double*>(base);
  r.block_a = r.ranks + cols;
  r.block_b = r.block_a + cols;
  r.block_start = reinterpret_cast<int64_t*>(r.block_b + cols);
  r.u = reinterpret_cast<float*>(r.block_start + cols);
  r.t_rank = r.u + cols;
  r.group = reinterpret_cast<int32_t*>(r.t_rank + cols);
  return r;
}

struct MaxOp {
  __device__ int32_t operator()(int32_t a, int32_t b) const { return a > b ? a : b; }
};

// Running maximum over a row processed tile by tile (for the tie groups' starts).
struct RunningMax {
  int32_t running = 0;
  __device__ int32_t operator()(int32_t tile_max) {
    const int32_t before = running;
    running = tile_max > running ? tile_max : running;
    return before;
  }
};

// One block per row: ρ_S of the standardized student row against the teacher's average
// ranks, and (when grad_rho is given) dρ_S/ds into grad_rho (float, original order).
template <typename s_t>
__device__ void spearman_row(int64_t row, const s_t* student, int64_t cols, float strength, const float* t_sorted,
                             const int32_t* t_order, const int32_t* s_order, RankRow r, Scratch& scratch,
                             typename cub::BlockScan<int32_t, kThreads>::TempStorage& scan_storage,
                             int64_t& block_count, double* rho_out, float* grad_rho) {
  using BlockScan = cub::BlockScan<int32_t, kThreads>;
  const s_t* s = student + row * cols;
  const float* ts = t_sorted + row * cols;
  const int32_t* to = t_order + row * cols;
  const int32_t* so = s_order + row * cols;  // ascending
  const double inv_n = 1.0 / static_cast<double>(cols);

  // Standardization: mean and population variance, centered on the first element.
  const double s0 = to_float(s[0]);
  double moments[1] = {0.0};
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) moments[0] += to_float(s[j]) - s0;
  block_sum(moments, scratch.d);
  const double mean_shift = moments[0] * inv_n;
  double variance[1] = {0.0};
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const double x = (to_float(s[j]) - s0) - mean_shift;
    variance[0] += x * x;
  }
  block_sum(variance, scratch.d);
  const bool varying = variance[0] > 0.0;
  const double z_scale = varying ? 1.0 / sqrt(variance[0] * inv_n) : 0.0;
  auto z_of = [&](int64_t k) {  // ẑ of the k-th largest student logit
    return ((to_float(s[so[cols - 1 - k]]) - s0) - mean_shift) * z_scale;
  };

  // Teacher average ranks: the start of each tie group by a running-max scan, tile by tile.
  RunningMax prefix;
  for (int64_t base = 0; base < cols; base += kThreads) {
    const int64_t k = base + threadIdx.x;
    const int32_t start = (k < cols && (k == 0 || ts[k] != ts[k - 1])) ? static_cast<int32_t>(k) : 0;
    int32_t group_start;
    BlockScan(scan_storage).InclusiveScan(start, group_start, MaxOp(), prefix);
    __syncthreads();
    if (k < cols) r.group[k] = group_start;
  }
  __syncthreads();
  // The last element of each group writes the group's average rank (1-based) at the
  // group's start; then every element reads it.
  for (int64_t k = threadIdx.x; k < cols; k += kThreads) {
    if (k == cols - 1 || ts[k + 1] != ts[k]) r.t_rank[r.group[k]] = 0.5f * static_cast<float>(r.group[k] + k) + 1.0f;
  }
  __syncthreads();
  for (int64_t k = threadIdx.x; k < cols; k += kThreads) r.u[k] = r.t_rank[r.group[k]];
  __syncthreads();
  for (int64_t k = threadIdx.x; k < cols; k += kThreads) r.t_rank[to[k]] = r.u[k];
  __syncthreads();
  const double inv_strength = 1.0 / static_cast<double>(strength);
  for (int64_t k = threadIdx.x; k < cols; k += kThreads) {
    r.u[k] = r.t_rank[so[cols - 1 - k]];
    r.ranks[k] = z_of(k) * inv_strength;
  }
  __syncthreads();

  // Soft ranks: PAV is sequential, one thread runs it on the row; the others then
  // subtract each block's value in parallel over blocks.
  if (threadIdx.x == 0) {
    PavBlocks<false> blocks{r.block_start, r.block_a, r.block_b};
    pav<false>(cols, [&](int64_t k) { return r.ranks[k]; },
               [&](int64_t k) { return static_cast<double>(cols - k); }, blocks);
    block_count = blocks.count;
  }
  __syncthreads();
  const PavBlocks<false> blocks{r.block_start, r.block_a, r.block_b, block_count};
  for (int64_t b = threadIdx.x; b < blocks.count; b += kThreads) {
    const double value = blocks.value(b);
    for (int64_t k = blocks.start[b]; k < blocks.end(b, cols); ++k) r.ranks[k] -= value;
  }
  __syncthreads();

  // Pearson correlation of the soft ranks with the teacher ranks.
  const double r0 = r.ranks[0], u0 = r.u[0];
  double shifts[2] = {0.0, 0.0};
  for (int64_t k = threadIdx.x; k < cols; k += kThreads) {
    shifts[0] += r.ranks[k] - r0;
    shifts[1] += r.u[k] - u0;
  }
  block_sum(shifts, scratch.d);
  const double r_mean = r0 + shifts[0] * inv_n, u_mean = u0 + shifts[1] * inv_n;
  double m[3] = {0.0, 0.0, 0.0};
  for (int64_t k = threadIdx.x; k < cols; k += kThreads) {
    const double a = r.ranks[k] - r_mean, b = r.u[k] - u_mean;
    m[0] += a * b;
    m[1] += a * a;
    m[2] += b * b;
  }
  block_sum(m, scratch.d);
  const Correlation corr = correlation(m[0], m[1], m[2]);
  if (threadIdx.x == 0) rho_out[row] = corr.rho;
  if (grad_rho == nullptr) return;  // uniform across the block
  float* grad = grad_rho + row * cols;
  if (!varying) {
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) grad[j] = 0.0f;
    return;
  }
  // Backward: through the correlation, the soft rank (g minus its block mean, / ε) and
  // the standardization.
  __syncthreads();
  for (int64_t k = threadIdx.x; k < cols; k += kThreads) {
    r.ranks[k] = corr.cross * (r.u[k] - u_mean) - corr.self_a * (r.ranks[k] - r_mean);
  }
  __syncthreads();
  for (int64_t b = threadIdx.x; b < blocks.count; b += kThreads) {
    const int64_t begin = blocks.start[b], end = blocks.end(b, cols);
    double sum = 0.0;
    for (int64_t k = begin; k < end; ++k) sum += r.ranks[k];
    const double mean = sum / static_cast<double>(end - begin);
    for (int64_t k = begin; k < end; ++k) r.ranks[k] = (r.ranks[k] - mean) * inv_strength;
  }
  __syncthreads();
  double g[2] = {0.0, 0.0};
  for (int64_t k = threadIdx.x; k < cols; k += kThreads) {
    g[0] += r.ranks[k];
    g[1] += r.ranks[k] * z_of(k);
  }
  block_sum(g, scratch.d);
  const double g_mean = g[0] * inv_n, gz_mean = g[1] * inv_n;
  for (int64_t k = threadIdx.x; k < cols; k += kThreads) {
    grad[so[cols - 1 - k]] = static_cast<float>((r.ranks[k] - g_mean - z_of(k) * gz_mean) * z_scale);
  }
}

// Rows are taken in turn by a grid of at most a few blocks per multiprocessor, so that
// the rank arrays need workspace for the resident blocks only.
template <typename s_t>
__global__ void __launch_bounds__(kThreads, 1) spearman_kernel(const s_t* student, int64_t rows, int64_t cols,
                                                               float strength, const float* t_sorted,
                                                               const int32_t* t_order, const int32_t* s_order,
                                                               char* global_rows, double* rho_out, float* grad_rho) {
  __shared__ Scratch scratch;
  __shared__ typename cub::BlockScan<int32_t, kThreads>::TempStorage scan_storage;
  __shared__ int64_t block_count;
  const RankRow r = rank_row(global_rows + blockIdx.x * rank_row_stride(cols), cols);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    __syncthreads();  // the previous row's arrays are no longer read
    spearman_row(row, student, cols, strength, t_sorted, t_order, s_order, r, scratch, scan_storage, block_count,
                 rho_out, grad_rho);
  }
}

// ---------------------------------------------------------------------------------
// 2b. The Spearman term for rows of up to kSpearmanBlockSortMax classes: three kernels per
// chunk of R rows, the rows sorted in shared memory (plan_spearman: THREADS × ITEMS ≥ C).
//   spearman_teacher_kernel   one block per row: the teacher's average ranks (original
//                             order) into t_rank, row-major;
//   spearman_student_kernel   one block per row: θ = ẑ/ε in the student's descending order
//                             into theta, column-major (θ_k of row r at k·R + r), the order
//                             into order, row-major, the standardization into stats;
//   spearman_pav_kernel       one thread per row, 32 rows per block: pool-adjacent-violators
//                             on θ − (C, ..., 1), the blocks' sums of θ − w in place and their
//                             starts column-major (the 32 rows' accesses coalesce);
//   spearman_finish_kernel    one block per row: the soft ranks, ρ_S and dρ_S/ds (its own
//                             block shape: plan_spearman's finish_threads × finish_items).
// The math and its double sums are spearman_row's (and csrc/losses_cpu.cpp's).

// Sort keys whose unsigned order is the logits' order (csrc/losses.h's ascending_key; −0
// and +0 one key, NaN by bit pattern beyond ±inf): 16 bits for half inputs (half the radix
// passes), 32 for float.
template <typename T>
struct RankKey;
template <>
struct RankKey<float> {
  using type = uint32_t;
  static constexpr type kPad = 0xffffffffu;
  // −0 → +0 on the bits, not by x + 0.0f: the CPU's x + 0 keeps a NaN's sign and payload,
  // while the GPU's add returns its one canonical NaN, which would merge NaNs the CPU ranks
  // apart and move a negative NaN from below −inf to above +inf.
  __device__ static type of(float x) {
    uint32_t bits = __float_as_uint(x);
    if (bits == 0x80000000u) bits = 0;
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  }
};
__device__ __forceinline__ uint16_t ascending_key16(uint16_t bits) {
  if (bits == 0x8000u) bits = 0;  // −0 → +0
  return static_cast<uint16_t>((bits & 0x8000u) ? ~bits : (bits | 0x8000u));
}
template <>
struct RankKey<__half> {
  using type = uint16_t;
  static constexpr type kPad = 0xffffu;
  __device__ static type of(__half x) { return ascending_key16(__half_as_ushort(x)); }
};
template <>
struct RankKey<__nv_bfloat16> {
  using type = uint16_t;
  static constexpr type kPad = 0xffffu;
  __device__ static type of(__nv_bfloat16 x) { return ascending_key16(__bfloat16_as_ushort(x)); }
};

// The row's standardization, as spearman_row: ẑ_j = ((s_j − s0) − mean_shift) · z_scale.
struct Standardization {
  double s0, mean_shift, z_scale;  // z_scale = 0 for a constant row
  __device__ double z(float x) const { return ((x - s0) - mean_shift) * z_scale; }
};

// The teacher's items through its row view: gather reads the row's own entries only
// (SparseTeacherRows), one search and a walk per thread's ITEMS consecutive positions; a
// sparse teacher's fp32 logits take the 32-bit keys of a dense fp32 teacher, so its ranks
// are the dense row's.
template <typename Teacher, int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS, 1) spearman_teacher_kernel(Teacher teacher, int64_t cols, float* t_rank) {
  using Value = typename Teacher::value_type;
  using Key = typename RankKey<Value>::type;
  using Sort = cub::BlockRadixSort<Key, THREADS, ITEMS, uint16_t>;
  using Scan = cub::BlockScan<int32_t, THREADS>;
  constexpr int kCapacity = THREADS * ITEMS;
  static_assert(kCapacity <= 65536, "uint16_t positions");
  __shared__ union {
    typename Sort::TempStorage sort;
    struct {
      typename Scan::TempStorage scan;
      float average[kCapacity];  // a tie group's average rank at the group's first position
      Key first[THREADS];        // each thread's first and last sorted keys
      Key last[THREADS];
    } ranks;
  } shared;
  const int64_t row = blockIdx.x;
  // Blocked arrangement: thread i holds positions i·ITEMS .. i·ITEMS + ITEMS − 1. Past the
  // row's end, the largest key (after every real one: the sort is stable and their
  // positions come last).
  Value logits[ITEMS];
  teacher.view(row, row * cols).gather(static_cast<int>(threadIdx.x) * ITEMS, cols, logits);
  Key keys[ITEMS];
  uint16_t index[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int p = threadIdx.x * ITEMS + i;
    keys[i] = p < cols ? RankKey<Value>::of(logits[i]) : RankKey<Value>::kPad;
    index[i] = static_cast<uint16_t>(p);
  }
  Sort(shared.sort).Sort(keys, index);  // ascending, stable: index[i] is a permutation of 0..capacity−1
  __syncthreads();  // the sort's storage becomes the ranks' arrays
  shared.ranks.first[threadIdx.x] = keys[0];
  shared.ranks.last[threadIdx.x] = keys[ITEMS - 1];
  __syncthreads();
  // Tie groups are runs of equal keys (the CPU's item_key equality): the start of each
  // position's group by a running maximum of the starts.
  int32_t start[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int p = threadIdx.x * ITEMS + i;
    const Key before = i > 0 ? keys[i - 1] : (threadIdx.x > 0 ? shared.ranks.last[threadIdx.x - 1] : keys[0]);
    start[i] = (p == 0 || before != keys[i]) ? p : 0;
  }
  Scan(shared.ranks.scan).InclusiveScan(start, start, MaxOp());
  // The last position of each group writes the group's average rank (1-based) at the
  // group's start (one writer per group); then every position reads it.
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int p = threadIdx.x * ITEMS + i;
    const Key after = i + 1 < ITEMS ? keys[i + 1]
                                    : (threadIdx.x + 1 < THREADS ? shared.ranks.first[threadIdx.x + 1] : keys[i]);
    if (p < cols && (p == cols - 1 || after != keys[i])) {
      shared.ranks.average[start[i]] = 0.5f * static_cast<float>(start[i] + p) + 1.0f;
    }
  }
  __syncthreads();
  float* out = t_rank + row * cols;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    if (threadIdx.x * ITEMS + i < cols) out[index[i]] = shared.ranks.average[start[i]];
  }
}

template <typename s_t, int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS, 1) spearman_student_kernel(const s_t* student, int64_t rows, int64_t cols,
                                                                   float strength, double* theta, int32_t* order,
                                                                   Standardization* stats) {
  using Key = typename RankKey<s_t>::type;
  using Sort = cub::BlockRadixSort<Key, THREADS, ITEMS, uint16_t>;
  constexpr int kCapacity = THREADS * ITEMS;
  static_assert(kCapacity <= 65536, "uint16_t positions");
  __shared__ union {
    typename Sort::TempStorage sort;
    double sums[THREADS / 32];
  } shared;
  const int64_t row = blockIdx.x;
  const s_t* s = student + row * cols;
  const double inv_n = 1.0 / static_cast<double>(cols);
  // Standardization: mean and population variance, centered on the first element.
  const double s0 = to_float(s[0]);
  float x[ITEMS];
  double moments[1] = {0.0};
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int p = threadIdx.x * ITEMS + i;
    x[i] = p < cols ? to_float(s[p]) : 0.0f;
    if (p < cols) moments[0] += x[i] - s0;
  }
  block_sum<THREADS>(moments, shared.sums);
  const double mean_shift = moments[0] * inv_n;
  double variance[1] = {0.0};
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const double d = (x[i] - s0) - mean_shift;
    if (threadIdx.x * ITEMS + i < cols) variance[0] += d * d;
  }
  block_sum<THREADS>(variance, shared.sums);
  const bool varying = variance[0] > 0.0;
  const Standardization z{s0, mean_shift, varying ? 1.0 / sqrt(variance[0] * inv_n) : 0.0};
  if (threadIdx.x == 0) stats[row] = z;

  Key keys[ITEMS];
  uint16_t index[ITEMS];
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int p = threadIdx.x * ITEMS + i;
    keys[i] = p < cols ? RankKey<s_t>::of(s[p]) : RankKey<s_t>::kPad;
    index[i] = static_cast<uint16_t>(p);
  }
  __syncthreads();  // the reductions' scratch becomes the sort's storage
  Sort(shared.sort).Sort(keys, index);
  // Descending position k = C − 1 − (ascending position), as the CPU: ties in reverse
  // column order. θ column-major (the PAV kernel's lanes are rows), the order row-major.
  const double inv_strength = 1.0 / static_cast<double>(strength);
  int32_t* row_order = order + row * cols;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int p = threadIdx.x * ITEMS + i;
    if (p < cols) {
      const int64_t k = cols - 1 - p;
      theta[k * rows + row] = __dmul_rn(z.z(to_float(s[index[i]])), inv_strength);
      row_order[k] = index[i];
    }
  }
}

// Pool-adjacent-violators (csrc/pav.h's l2 case, the same merges and double sums) on
// θ − (C, C−1, ..., 1), one thread per row. A block's count is the distance between its
// start and the next block's (exact in double), so the stack holds each block's start and
// sum only; the top block stays in registers. The sums overwrite θ in place: step k writes
// slot count ≤ k, after θ_k was read, and θ is read ahead by kAhead slots at most.
constexpr int kPavRows = 32;
__global__ void __launch_bounds__(kPavRows) spearman_pav_kernel(int64_t rows, int64_t cols, double* theta,
                                                                int32_t* block_start, int32_t* block_count) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kPavRows + threadIdx.x;
  if (row >= rows) return;  // no barrier, no shuffle in this kernel
  double* sum = theta + row;  // slot k at k·rows
  int32_t* first = block_start + row;
  constexpr int kAhead = 8;
  double ahead[kAhead];
#pragma unroll
  for (int i = 0; i < kAhead; ++i) ahead[i] = i < cols ? sum[i * rows] : 0.0;
  int32_t count = 0;  // blocks on the stack
  double top_a = 0.0;  // the stack's top block (valid when count > 0)
  int32_t top_start = 0;
  for (int64_t base = 0; base < cols; base += kAhead) {
    double current[kAhead];
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {
      current[i] = ahead[i];
      const int64_t next = base + kAhead + i;
      ahead[i] = next < cols ? sum[next * rows] : 0.0;
    }
#pragma unroll
    for (int i = 0; i < kAhead; ++i) {
      const int32_t k = static_cast<int32_t>(base + i);
      if (k >= cols) break;
      double a = current[i] - static_cast<double>(cols - k);
      int32_t start = k;
      while (count > 0) {
        const double b = static_cast<double>(k + 1 - start), top_b = static_cast<double>(start - top_start);
        if (!(top_a * b <= a * top_b)) break;
        a += top_a;
        start = top_start;
        if (--count > 0) {
          top_a = sum[static_cast<int64_t>(count - 1) * rows];
          top_start = first[static_cast<int64_t>(count - 1) * rows];
        }
      }
      sum[static_cast<int64_t>(count) * rows] = a;
      first[static_cast<int64_t>(count) * rows] = start;
      top_a = a;
      top_start = start;
      ++count;
    }
  }
  block_count[row] = count;
}

// A segmented sum's running state: sums restart at heads (the PAV blocks' first positions).
struct SegmentSum {
  double sum;
  int32_t head;
};
__device__ __forceinline__ SegmentSum combine(const SegmentSum& a, const SegmentSum& b) {
  return {b.head ? b.sum : a.sum + b.sum, a.head | b.head};
}

// The exclusive segmented scan of one value per thread over a block of THREADS threads:
// shuffles within each warp, then each thread folds the totals of the warps before its own
// in warp order (shared scratch of THREADS / 32 entries). Fixed order: deterministic.
// Thread 0 gets {0, 0}, which combine leaves unchanged. Starts with a barrier (the scratch
// may be another reduction's).
template <int THREADS>
__device__ __forceinline__ SegmentSum block_exclusive_segment_scan(SegmentSum x, SegmentSum* scratch) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const SegmentSum other{__shfl_up_sync(0xffffffffu, x.sum, offset), __shfl_up_sync(0xffffffffu, x.head, offset)};
    if (lane >= offset) x = combine(other, x);
  }
  SegmentSum before{__shfl_up_sync(0xffffffffu, x.sum, 1), __shfl_up_sync(0xffffffffu, x.head, 1)};
  if (lane == 0) before = {0.0, 0};
  __syncthreads();
  if (lane == 31) scratch[warp] = x;
  __syncthreads();
  SegmentSum carried{0.0, 0};
  for (int w = 0; w < warp; ++w) carried = combine(carried, scratch[w]);
  return combine(carried, before);
}

template <typename s_t, int THREADS, int ITEMS>
__global__ void __launch_bounds__(THREADS, 1) spearman_finish_kernel(
    const s_t* student, int64_t rows, int64_t cols, float strength, const int32_t* order, const float* t_rank,
    double* block_sums, const int32_t* block_start, const int32_t* block_count, const Standardization* stats,
    double* rho_out, float* grad_rho) {
  constexpr int kCapacity = THREADS * ITEMS;
  static_assert(ITEMS % 8 == 0, "a thread's block-start flags are the bytes of 64-bit words");
  constexpr int kWords = ITEMS / 8;
  using Scan = cub::BlockScan<int32_t, THREADS>;
  __shared__ union {
    typename Scan::TempStorage scan;
    SegmentSum segments[THREADS / 32];
    double sums[THREADS / 32 * 3];
  } shared;
  __shared__ __align__(8) uint8_t head[kCapacity];  // 1 at the first position of each PAV block but the first
  __shared__ double origin[2];         // the soft rank and the teacher rank at k = 0
  const int64_t row = blockIdx.x;
  const s_t* s = student + row * cols;
  const int32_t* row_order = order + row * cols;
  const float* ranks_t = t_rank + row * cols;
  double* sums = block_sums + row;  // slot b at b·rows: block b's sum of θ − w, later its mean of g
  const int32_t* starts = block_start + row;
  const int32_t count = block_count[row];
  const Standardization z = stats[row];
  const double inv_n = 1.0 / static_cast<double>(cols);
  const double inv_strength = 1.0 / static_cast<double>(strength);
  const int first = threadIdx.x * ITEMS;  // this thread's positions: first .. first + ITEMS − 1
  auto z_at = [&](int k) { return z.z(to_float(s[row_order[k]])); };  // ẑ of the k-th largest logit

  // Each position's PAV block: flags at the blocks' starts (each in 1..C−1, written by the
  // PAV kernel), then a running count.
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) head[first + i] = 0;
  __syncthreads();
  for (int32_t b = 1 + threadIdx.x; b < count; b += THREADS) head[starts[static_cast<int64_t>(b) * rows]] = 1;
  __syncthreads();
  // Byte i % 8 of flags[i / 8]: position first + i starts a block (words: the compiler kept
  // eight separate flags, and spilled them, at 1024 threads).
  uint64_t flags[kWords];
  int32_t local = 0;
#pragma unroll
  for (int w = 0; w < kWords; ++w) {
    flags[w] = reinterpret_cast<const uint64_t*>(head)[threadIdx.x * kWords + w];
    local += __popcll(flags[w]);
  }
  auto starts_block = [&](int i) { return ((flags[i / 8] >> (8 * (i % 8))) & 1u) != 0; };
  int32_t blocks_before;  // blocks starting before this thread's positions (but block 0)
  Scan(shared.scan).ExclusiveSum(local, blocks_before);
  auto block_of = [&](int i) {
    int32_t b = blocks_before + __popcll(flags[i / 8] & ((2ull << (8 * (i % 8))) - 1u));
#pragma unroll
    for (int w = 0; w < i / 8; ++w) b += __popcll(flags[w]);
    return b;
  };

  // Soft ranks θ_k − (block value), θ as the student kernel computed it (bit for bit); the
  // teacher ranks in the student's descending order are read where needed (u_at).
  auto u_at = [&](int k) { return ranks_t[row_order[k]]; };
  double rank[ITEMS];
  {
    int32_t current = -1;
    double value = 0.0;
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      const int k = first + i;
      rank[i] = 0.0;
      if (k < cols) {
        const int32_t b = block_of(i);
        if (b != current) {
          current = b;
          const int64_t at = static_cast<int64_t>(b) * rows;
          const int32_t end = b + 1 < count ? starts[at + rows] : static_cast<int32_t>(cols);
          value = sums[at] / static_cast<double>(end - starts[at]);
        }
        const int32_t j = row_order[k];
        rank[i] = __dmul_rn(z.z(to_float(s[j])), inv_strength) - value;
      }
    }
  }
  if (threadIdx.x == 0) {
    origin[0] = rank[0];
    origin[1] = u_at(0);
  }
  __syncthreads();

  // Pearson correlation of the soft ranks with the teacher ranks.
  const double r0 = origin[0], u0 = origin[1];
  double shifts[2] = {0.0, 0.0};
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    if (first + i < cols) {
      shifts[0] += rank[i] - r0;
      shifts[1] += u_at(first + i) - u0;
    }
  }
  block_sum<THREADS>(shifts, shared.sums);
  const double r_mean = r0 + shifts[0] * inv_n, u_mean = u0 + shifts[1] * inv_n;
  double m[3] = {0.0, 0.0, 0.0};
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    if (first + i < cols) {
      const double a = rank[i] - r_mean, b = u_at(first + i) - u_mean;
      m[0] += a * b;
      m[1] += a * a;
      m[2] += b * b;
    }
  }
  block_sum<THREADS>(m, shared.sums);
  const Correlation corr = correlation(m[0], m[1], m[2]);
  if (threadIdx.x == 0) rho_out[row] = corr.rho;
  if (grad_rho == nullptr) return;  // uniform across the block
  float* grad = grad_rho + row * cols;
  if (z.z_scale == 0.0) {  // a constant row (uniform across the block)
#pragma unroll
    for (int i = 0; i < ITEMS; ++i) {
      if (first + i < cols) grad[row_order[first + i]] = 0.0f;
    }
    return;
  }
  // Backward: through the correlation; through the soft rank (g minus its block's mean,
  // / ε), each block's sum by a segmented scan (a thread's items in order, the threads by
  // one block-wide scan of their aggregates, restarting at the blocks' first positions);
  // through the standardization.
  SegmentSum aggregate{0.0, 0};
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int k = first + i;
    rank[i] = k < cols ? corr.cross * (u_at(k) - u_mean) - corr.self_a * (rank[i] - r_mean) : 0.0;
    aggregate = combine(aggregate, {rank[i], (k == 0 || starts_block(i)) ? 1 : 0});
  }
  // The running sum of the PAV block open at this thread's first position.
  const SegmentSum carried = block_exclusive_segment_scan<THREADS>(aggregate, shared.segments);
  // The last position of each block replaces the block's sum of θ − w (every read of it was
  // before the reductions' barriers) by the block's mean of g; after a barrier, every
  // position of the block reads it.
  double running = carried.sum;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int k = first + i;
    running = (k == 0 || starts_block(i)) ? rank[i] : running + rank[i];
    if (k < cols && (k == cols - 1 || head[k + 1])) {
      const int64_t at = static_cast<int64_t>(block_of(i)) * rows;
      sums[at] = running / static_cast<double>(k + 1 - starts[at]);
    }
  }
  __syncthreads();
  double gz[2] = {0.0, 0.0};
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    if (first + i < cols) {
      rank[i] = (rank[i] - sums[static_cast<int64_t>(block_of(i)) * rows]) * inv_strength;
      gz[0] += rank[i];
      gz[1] += rank[i] * z_at(first + i);
    }
  }
  block_sum<THREADS>(gz, shared.sums);
  const double g_mean = gz[0] * inv_n, gz_mean = gz[1] * inv_n;
#pragma unroll
  for (int i = 0; i < ITEMS; ++i) {
    const int k = first + i;
    if (k < cols) grad[row_order[k]] = static_cast<float>((rank[i] - g_mean - z_at(k) * gz_mean) * z.z_scale);
  }
}

// ---------------------------------------------------------------------------------
// 3. The row kernel: one row algorithm (fused_row) over two layouts of the row.
//
// * Resident (C ≤ kMaxResidentClasses): GROUP threads per row — 8, 16 or 32 lanes of a
//   warp (several rows per block, reductions by shuffles only, no barrier) or the whole
//   block — each holding VECTORS runs of kVector consecutive classes in registers. Each
//   input is read once (16-byte vector loads when every row starts 16-byte aligned, i.e.
//   C % 8 == 0 and aligned buffers; masked scalar loads otherwise), every later pass
//   runs over registers, and the gradient is written once with vector stores.
// * Chunked (longer rows): one block per row, read twice whatever the terms (the second
//   read from L2 where the row stays, from HBM at large C): a first pass for every
//   statistic, then the gradients' store.
// Rows past the last one (the last block of a resident layout) keep their lanes in every
// shuffle with zero classes: they load, store and write nothing.

struct RowInputs {
  const int64_t* target;
  const float* difficulty;
  const double* spearman_rho;  // [rows] or null
  const float* spearman_grad;  // [rows, cols] or null
  ColumnStats columns;         // valid when column_coef != 0
  const SoftmaxStats* softmax_stats;  // [rows, 2] the normalizers the column statistics used
  float* row_loss;
};

constexpr int64_t kMaxResidentClasses = 2048;

// Sums and maxima over the threads of a row. GROUP == 32: the row has `width` (8, 16 or
// 32, set at launch) aligned lanes of a warp, reduced by a butterfly of xor shuffles
// (every lane gets bit-identical totals: each addition pairs the same two operands in
// every lane); the whole warp takes part, so callers reach these only under
// kernel-uniform conditions. GROUP == kThreads: block reductions.
template <int GROUP>
struct RowGroup {
  static_assert(GROUP == kThreads || GROUP == 32, "unsupported group");
  int width;
  template <typename T, int N>
  __device__ void sum(T (&v)[N], Scratch& scratch) const {
    if constexpr (GROUP == kThreads) {
      if constexpr (sizeof(T) == sizeof(double)) {
        block_sum(v, scratch.d);
      } else {
        block_sum(v, scratch.f);
      }
    } else {
#pragma unroll
      for (int k = 0; k < N; ++k) {
#pragma unroll
        for (int offset = width / 2; offset > 0; offset >>= 1) v[k] += __shfl_xor_sync(0xffffffffu, v[k], offset);
      }
    }
  }
  // The student's maximum and the teacher's maximum with its first index (NaN ignored).
  __device__ void maxima(float& s_max, float& t_max, int64_t& t_arg, Scratch& scratch) const {
    if constexpr (GROUP == kThreads) {
      int64_t unused = 0;
      block_argmax(s_max, unused, scratch.f, scratch.i);
      block_argmax(t_max, t_arg, scratch.f, scratch.i);
    } else {
      for (int offset = width / 2; offset > 0; offset >>= 1) {
        s_max = fmaxf(s_max, __shfl_xor_sync(0xffffffffu, s_max, offset));
        const float other = __shfl_xor_sync(0xffffffffu, t_max, offset);
        const int64_t other_index = __shfl_xor_sync(0xffffffffu, t_arg, offset);
        if (other > t_max || (other == t_max && other_index < t_arg)) {
          t_max = other;
          t_arg = other_index;
        }
      }
    }
  }
};

template <typename T>
__device__ __forceinline__ void store_run(T* row, int64_t j0, int64_t cols, bool vector, const float (&v)[kVector]) {
  if (vector && j0 + kVector <= cols) {
    if constexpr (sizeof(T) == 2) {
      uint4 raw;
      T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int w = 0; w < kVector; ++w) h[w] = from_float<T>(v[w]);
      *reinterpret_cast<uint4*>(row + j0) = raw;
    } else {
      reinterpret_cast<float4*>(row + j0)[0] = make_float4(v[0], v[1], v[2], v[3]);
      reinterpret_cast<float4*>(row + j0)[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
  } else {
#pragma unroll
    for (int w = 0; w < kVector; ++w) {
      if (j0 + w < cols) row[j0 + w] = from_float<T>(v[w]);
    }
  }
}

// How the rectification (DR-KD) moves the teacher: the values at its argmax and at the
// target trade places, so the gradient at original position t_arg is the rectified one at
// target and vice versa (fixed values, computed once per row: no scatter).
struct Swap {
  bool on = false;
  int64_t t_arg = 0, target = 0;
  float at_t_arg = 0.0f, at_target = 0.0f;  // rectified values there (raw logits, then gradients)
  __device__ float apply(int64_t j, float value) const {
    return !on ? value : (j == t_arg ? at_t_arg : (j == target ? at_target : value));
  }
};

// Stores the gradients of the run of kVector classes from j0 on, whose centered logits are
// s and t: gradient_s(j, s, t, extra_j) (extra: a float row read alongside, or zeros) and
// gradient_t(j, s, t). A run's classes past the row's end take the row's last class as
// their index (the gradients read per-column statistics at j, which hold C entries); the
// store drops them. (Branch-free: a per-class condition here took the block-resident
// layout from 124 to 154 registers on sm_90, one block per SM instead of two.)
template <typename s_t, typename t_t, typename FS, typename FT>
__device__ __forceinline__ void store_run_gradients(s_t* gs_row, t_t* gt_row, const float* extra_row, int64_t j0,
                                                    int64_t cols, bool vector, const float (&s)[kVector],
                                                    const float (&t)[kVector], FS& gradient_s, FT& gradient_t) {
  auto in_row = [&](int64_t j) { return j < cols ? j : cols - 1; };
  float out[kVector];
  if (gs_row != nullptr) {
    float extra[kVector] = {};
    if (extra_row != nullptr) load_run(extra_row, j0, cols, vector, extra);
#pragma unroll
    for (int w = 0; w < kVector; ++w) out[w] = gradient_s(in_row(j0 + w), s[w], t[w], extra[w]);
    store_run(gs_row, j0, cols, vector, out);
  }
  if (gt_row != nullptr) {
#pragma unroll
    for (int w = 0; w < kVector; ++w) out[w] = gradient_t(in_row(j0 + w), s[w], t[w]);
    store_run(gt_row, j0, cols, vector, out);
  }
}

// The resident layout: lane `lane` of the row's `group` threads holds classes
// (v·group + lane)·kVector + w, v < VECTORS, w < kVector (a warp covers 32·kVector
// consecutive classes per v, so loads coalesce).
template <int VECTORS>
struct ResidentRow {
  static constexpr bool kStreamed = false;  // every pass runs over registers
  float s[VECTORS][kVector], t[VECTORS][kVector];  // the logits, then minus their row max
  int64_t cols;
  int group, lane;
  bool vector;

  __device__ int64_t first(int v) const { return (static_cast<int64_t>(v) * group + lane) * kVector; }

  // t_row: the teacher's row view (DenseTeacherRows::Row: load_run as the student; or
  // SparseTeacherRows::Row: a search and a walk per run, in the row's entries only).
  template <typename s_t, typename TeacherRow>
  __device__ void load(const s_t* s_row, const TeacherRow& t_row) {
#pragma unroll
    for (int v = 0; v < VECTORS; ++v) {
      load_run(s_row, first(v), cols, vector, s[v]);
      t_row.run(first(v), cols, vector, t[v]);
    }
  }
  // f(j, student, teacher) for every class of the row this thread holds.
  template <typename F>
  __device__ void each(F&& f) const {
#pragma unroll
    for (int v = 0; v < VECTORS; ++v) {
#pragma unroll
      for (int w = 0; w < kVector; ++w) {
        if (first(v) + w < cols) f(first(v) + w, s[v][w], t[v][w]);
      }
    }
  }
  template <typename F>
  __device__ void each_raw(F&& f) const {  // before center(): the logits themselves
    each(f);
  }
  __device__ void center(float s_max, float t_max, const Swap& swap) {
#pragma unroll
    for (int v = 0; v < VECTORS; ++v) {
#pragma unroll
      for (int w = 0; w < kVector; ++w) {
        s[v][w] -= s_max;
        t[v][w] = swap.apply(first(v) + w, t[v][w]) - t_max;
      }
    }
  }
  template <typename s_t, typename t_t, typename FS, typename FT>
  __device__ void store(s_t* gs_row, t_t* gt_row, const float* extra_row, FS&& gradient_s, FT&& gradient_t) const {
#pragma unroll
    for (int v = 0; v < VECTORS; ++v) {
      if (first(v) < cols) {
        store_run_gradients(gs_row, gt_row, extra_row, first(v), cols, vector, s[v], t[v], gradient_s, gradient_t);
      }
    }
  }
};

// The value of x, opaque to the optimizer: addresses formed from it inside a loop stay
// there (a run's few integer adds) instead of being hoisted into registers held by the
// whole loop.
__device__ __forceinline__ int64_t opaque_offset(int64_t x) {
  asm volatile("" : "+l"(x));
  return x;
}

// Welford statistics of e_s = exp((s − m_s)·it) and e_t = exp((t − m_t)·it) over a set of
// classes (m: running maxima): the count, the means, the sums of squared deviations and the
// co-moment Σ(e_s − μ_s)(e_t − μ_t). The chunked layout's online pass keeps one per thread
// (private: registers only) for the row Pearson term.
struct Moments {
  double n = 0.0, mean_s = 0.0, mean_t = 0.0, m2_s = 0.0, m2_t = 0.0, co = 0.0;
  // A raised maximum scales every earlier e by c (c_s·c_t on the co-moment).
  __device__ __forceinline__ void rescale_s(double c) {
    mean_s *= c;
    m2_s *= c * c;
    co *= c;
  }
  __device__ __forceinline__ void rescale_t(double c) {
    mean_t *= c;
    m2_t *= c * c;
    co *= c;
  }
  // Appends b's classes (Chan, Golub & LeVeque): with δ = μ_b − μ_a, N = n_a + n_b,
  // μ += δ·n_b/N, M2 = M2_a + M2_b + δ²·n_a·n_b/N, C = C_a + C_b + δ_s·δ_t·n_a·n_b/N. One
  // division; every term of M2 is ≥ 0 (no cancellation whether the e are near 1 or near 0).
  // Empty statistics are zeros: merging into them returns b's bit for bit.
  __device__ __forceinline__ void merge(const Moments& b) {
    const double total = n + b.n;
    const double share = total > 0.0 ? b.n / total : 0.0;
    const double ds = b.mean_s - mean_s, dt = b.mean_t - mean_t, weight = n * share;
    mean_s += ds * share;
    mean_t += dt * share;
    m2_s += b.m2_s + ds * ds * weight;
    m2_t += b.m2_t + dt * dt * weight;
    co += b.co + ds * dt * weight;
    n = total;
  }
};

// Field by field (a select of whole structs went through local memory).
__device__ __forceinline__ Moments select(bool first, const Moments& a, const Moments& b) {
  Moments m;
  m.n = first ? a.n : b.n;
  m.mean_s = first ? a.mean_s : b.mean_s;
  m.mean_t = first ? a.mean_t : b.mean_t;
  m.m2_s = first ? a.m2_s : b.m2_s;
  m.m2_t = first ? a.m2_t : b.m2_t;
  m.co = first ? a.co : b.co;
  return m;
}

// Merges every thread's statistics in a fixed order (deterministic, bit-identical in every
// thread): within a warp by a butterfly whose every step merges the lower lane's group with
// the higher's (both partners compute the same merge of the same operands), then the warps'
// results in order through the scratch, behind a barrier as block_sum (the next reduction
// starts with its own barrier before writing the scratch). Block-uniform call sites only.
__device__ __forceinline__ void block_merge(Moments& m, Scratch& scratch) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    Moments other;
    other.n = __shfl_xor_sync(0xffffffffu, m.n, offset);
    other.mean_s = __shfl_xor_sync(0xffffffffu, m.mean_s, offset);
    other.mean_t = __shfl_xor_sync(0xffffffffu, m.mean_t, offset);
    other.m2_s = __shfl_xor_sync(0xffffffffu, m.m2_s, offset);
    other.m2_t = __shfl_xor_sync(0xffffffffu, m.m2_t, offset);
    other.co = __shfl_xor_sync(0xffffffffu, m.co, offset);
    const bool upper = (lane & offset) != 0;
    Moments low = select(upper, other, m);
    low.merge(select(upper, m, other));
    m = low;
  }
  __syncthreads();  // a previous reduction may still be reading the scratch
  if (lane == 0) {
    double* d = scratch.d + warp * 5;
    d[0] = m.mean_s, d[1] = m.mean_t, d[2] = m.m2_s, d[3] = m.m2_t, d[4] = m.co;
    scratch.i[warp] = static_cast<int64_t>(m.n);  // a count: exact
  }
  __syncthreads();
  auto warp_moments = [&](int w) {
    const double* d = scratch.d + w * 5;
    Moments b;
    b.n = static_cast<double>(scratch.i[w]);
    b.mean_s = d[0], b.mean_t = d[1], b.m2_s = d[2], b.m2_t = d[3], b.co = d[4];
    return b;
  };
  m = warp_moments(0);
  for (int w = 1; w < kWarps; ++w) m.merge(warp_moments(w));
}

// The chunked layout: one block per row, every pass reading the row again; the first
// pass gathers what the resident layout takes in several passes over registers, so every
// loss reads the row twice (the first pass, then the gradients' store):
// * without the column term, the online pass (online_statistics): maxima, first argmax,
//   normalizers, KL, entropy and (row Pearson term) the moments of e_s, e_t, merged over the
//   block once the maxima are known; the Pearson gradient's <p, g> then comes in closed
//   form from the moments (fused_row);
// * with the column term the row's normalizers come from the row softmax statistics kernel
//   (step 1) before this kernel runs, so the first pass (fused_row) takes exact p and q:
//   KL, entropy, the CE normalizer, the row Pearson sums and the column term's share of
//   <p, g>, <q, g>.
// Thread x reads runs of kVector consecutive classes, run k·kThreads + x in step k (a
// warp's 32 runs are 32·kVector consecutive classes: 16-byte loads coalesce), with vector
// loads and stores when `vector` (as the resident layout). Passes alternate direction —
// the first forward, the next from the row's end — so each starts on the classes the one
// before read last, the likeliest still in L2.
template <typename s_t, typename Teacher>
struct ChunkedRow {
  using t_t = typename Teacher::grad_type;
  static constexpr bool kStreamed = true;
  // The launch's arrays (kernel parameters) and the row's offset in them: a pass forms its
  // row addresses per run from these (opaque_offset), so that the loops hold one offset and
  // not five row pointers (they held 128 registers and spilled). The teacher's row view is
  // formed per run too (a dense one from the offset; a sparse one from the row: its entries
  // at row·k, int64).
  const s_t* student;
  Teacher teacher;
  s_t* grad_student;
  t_t* grad_teacher;
  const float* rank_grad;  // dρ_S/ds of the launch's rows, or null
  int64_t base;            // row · cols
  int64_t row;
  int64_t cols;
  bool vector;
  float s_max = 0.0f, t_max = 0.0f;
  Swap swap;

  // The row a run's teacher view is formed from: a sparse view's addresses from an opaque
  // row (as `at` below), not hoisted into registers the loop would hold (hoisted, they
  // spilled on sm_90); a dense view ignores it.
  __device__ __forceinline__ int64_t view_row() const {
    if constexpr (Teacher::kSparse) {
      return opaque_offset(row);
    } else {
      return row;
    }
  }
  // f(at, j0, s, t) for each of this thread's runs (at: the row's offset, opaque; s, t: raw
  // logits, zeros past the row's end), from the row's end when BACKWARD (a compile-time direction: the first pass runs
  // forward, the store backward). Steps count in int: C < 2^31, so fewer than 2^20.
  template <bool BACKWARD, typename F>
  __device__ void runs(F&& f) const {
    constexpr int64_t kStep = static_cast<int64_t>(kThreads) * kVector;
    const int steps = static_cast<int>((cols + kStep - 1) / kStep);
    int64_t j0 = static_cast<int64_t>(threadIdx.x) * kVector + (BACKWARD ? (steps - 1) * kStep : 0);
    for (int k = 0; k < steps; ++k, j0 += BACKWARD ? -kStep : kStep) {
      if (j0 >= cols) continue;
      const int64_t at = opaque_offset(base);
      float s[kVector], t[kVector];
      load_run(student + at, j0, cols, vector, s);
      teacher.view(view_row(), at).run(j0, cols, vector, t);
      f(at, j0, s, t);
    }
  }
  // The run's logits minus the row maxima, the rectified teacher in place.
  __device__ void center_run(int64_t j0, float (&s)[kVector], float (&t)[kVector]) const {
#pragma unroll
    for (int w = 0; w < kVector; ++w) {
      s[w] -= s_max;
      t[w] = swap.apply(j0 + w, t[w]) - t_max;
    }
  }

  // One read of the row for its maxima, the teacher's first argmax, the softmax normalizers
  // (at τ, and at 1 for CE), the unrectified KL and teacher entropy, and (`moments`: a row
  // Pearson term) the Welford statistics of e_s, e_t. Each thread keeps running maxima over
  // its classes and its sums over exp((x − its max)·it) in double, rescaled (by a double
  // exp, at most once per run, a few times per thread) when a run raises its max; with
  // e_j = exp((t_j − m)·it) over the teacher's running max m it folds in
  // W = Σ e_j (t_j − s_j)·it and V = Σ e_j (t_j − m)·it (V' = r·(V + T·(m − m')·it) when m
  // becomes m' and r = exp((m − m')·it)). The moments take each run whole: the run's own
  // count, means, M2 and co-moment in double from its fp32 e, merged by Moments::merge
  // (one division per run), after the rescale by the run's raised maxima. The block then
  // takes the maxima, every thread rescales its sums and moments to them (private
  // registers), the sums are reduced by block_sum and the moments by block_merge:
  // KL = W/T + (s_max − t_max)·it + log S − log T and H = log T − V/T. Masked classes
  // (−inf) are classes with e = 0 (they count in the moments' n); a thread whose classes
  // are all −inf contributes nothing (e = 0 by selection, never exp(−inf − (−inf)) = NaN);
  // e_j = 0 contributes no W or V term (never 0·inf); NaN and +inf logits make the row NaN,
  // as in the resident layout (a NaN is never dropped: a thread's NaN sums are kept when its
  // running max is still −inf).
  // streamed: KL, entropy, S, T (S, T in double, at the row maxima).
  __device__ void online_statistics(const LossConfig& cfg, bool moments_on, float& s_max_out, float& t_max_out,
                                    int64_t& t_arg_out, float (&sums)[3], double (&streamed)[4], Moments& moments,
                                    Scratch& scratch) const {
    const float it = cfg.inv_temperature;
    const bool ce = cfg.ce_coef != 0.0f;
    double s_sum = 0.0, s_sum1 = 0.0, t_sum = 0.0, weighted = 0.0, spread = 0.0;
    float s_run = -INFINITY, t_run = -INFINITY;
    int64_t arg = cols;
    runs<false>([&](int64_t, int64_t j0, float (&run_s)[kVector], float (&run_t)[kVector]) {
      // The run's maxima first (NaN ignored; the first index of the teacher's), so the
      // running sums rescale at most once per run.
      float s_top = -INFINITY, t_top = -INFINITY;
      int64_t t_first = cols;
#pragma unroll
      for (int w = 0; w < kVector; ++w) {
        if (j0 + w < cols) {
          s_top = fmaxf(s_top, run_s[w]);
          if (run_t[w] > t_top) {  // strictly greater: the first index of the max stays
            t_top = run_t[w];
            t_first = j0 + w;
          }
        }
      }
      if (s_top > s_run) {
        if (s_run > -INFINITY) {
          const double rescale = exp((static_cast<double>(s_run) - s_top) * it);
          s_sum *= rescale;
          s_sum1 *= exp(static_cast<double>(s_run) - s_top);
          if (moments_on) moments.rescale_s(rescale);
        }
        s_run = s_top;
      }
      if (t_top > t_run) {
        if (t_run > -INFINITY) {
          const double shift = (static_cast<double>(t_run) - t_top) * it, rescale = exp(shift);
          spread = rescale * (spread + t_sum * shift);
          weighted *= rescale;
          t_sum *= rescale;
          if (moments_on) moments.rescale_t(rescale);
        }
        t_run = t_top;
        arg = t_first;
      }
      // The run's e over the running maxima, in place of its logits.
      const int valid = cols - j0 < kVector ? static_cast<int>(cols - j0) : kVector;
      double run_sum_s = 0.0, run_sum_t = 0.0;
#pragma unroll
      for (int w = 0; w < kVector; ++w) {
        const float a = run_s[w], b = run_t[w];
        float e_s = 0.0f, e_t = 0.0f;
        if (w < valid) {
          e_s = a == -INFINITY ? 0.0f : expf((a - s_run) * it);
          if (ce) s_sum1 += a == -INFINITY ? 0.0f : expf(a - s_run);
          e_t = b == -INFINITY ? 0.0f : expf((b - t_run) * it);
          if (e_t > 0.0f) {
            weighted += e_t * ((static_cast<double>(b) - a) * it);
            spread += e_t * static_cast<double>((b - t_run) * it);
          }
          run_sum_s += e_s;
          run_sum_t += e_t;
        }
        run_s[w] = e_s;
        run_t[w] = e_t;
      }
      s_sum += run_sum_s;
      t_sum += run_sum_t;
      if (moments_on) {
        Moments run;
        run.n = valid;
        const double inv_valid = valid == kVector ? 1.0 / kVector : 1.0 / valid;
        run.mean_s = run_sum_s * inv_valid;
        run.mean_t = run_sum_t * inv_valid;
#pragma unroll
        for (int w = 0; w < kVector; ++w) {
          if (w < valid) {
            const double ds = run_s[w] - run.mean_s, dt = run_t[w] - run.mean_t;
            run.m2_s += ds * ds;
            run.m2_t += dt * dt;
            run.co += ds * dt;
          }
        }
        moments.merge(run);
      }
    });
    float s_top = s_run, t_top = t_run;
    int64_t unused = 0, t_arg = arg;
    block_argmax(s_top, unused, scratch.f, scratch.i);
    block_argmax(t_top, t_arg, scratch.f, scratch.i);
    // S, S at τ = 1, T, W, V over the row's maxima (a thread whose max is still −inf keeps
    // its sums: zeros, or NaN from a NaN logit).
    double totals[5] = {s_sum, s_sum1, t_sum, weighted, spread};
    if (s_run > -INFINITY) {
      const double rescale = exp((static_cast<double>(s_run) - s_top) * it);
      totals[0] = s_sum * rescale;
      totals[1] = ce ? s_sum1 * exp(static_cast<double>(s_run) - s_top) : 0.0;
      if (moments_on) moments.rescale_s(rescale);
    }
    if (t_run > -INFINITY) {
      const double shift = (static_cast<double>(t_run) - t_top) * it, rescale = exp(shift);
      totals[2] = t_sum * rescale;
      totals[3] = weighted * rescale;
      totals[4] = rescale * (spread + t_sum * shift);
      if (moments_on) moments.rescale_t(rescale);
    }
    block_sum(totals, scratch.d);
    if (moments_on) block_merge(moments, scratch);
    s_max_out = s_top;
    t_max_out = t_top;
    t_arg_out = t_arg;
    sums[0] = static_cast<float>(totals[0]);
    sums[1] = static_cast<float>(totals[2]);
    sums[2] = static_cast<float>(totals[1]);
    const double log_t = log(totals[2]);
    streamed[0] = totals[3] / totals[2] + (static_cast<double>(s_top) - t_top) * it + log(totals[0]) - log_t;
    streamed[1] = log_t - totals[4] / totals[2];
    streamed[2] = totals[0];
    streamed[3] = totals[2];
  }

  template <typename A, typename B>
  __device__ void load(A, B) {}
  // f(j, student, teacher) for every class of the row this thread reads, centered (a
  // first pass: forward).
  template <typename F>
  __device__ void each(F&& f) const {
    runs<false>([&](int64_t, int64_t j0, float (&s)[kVector], float (&t)[kVector]) {
      center_run(j0, s, t);
#pragma unroll
      for (int w = 0; w < kVector; ++w) {
        if (j0 + w < cols) f(j0 + w, s[w], t[w]);
      }
    });
  }
  __device__ void center(float s_max_, float t_max_, const Swap& swap_) {
    s_max = s_max_;
    t_max = t_max_;
    swap = swap_;
  }
  template <typename FS, typename FT>
  // The rows given are null or this row of grad_student, grad_teacher, rank_grad: their
  // addresses are formed per run from the launch's arrays.
  __device__ void store(s_t* gs_row, t_t* gt_row, const float* extra_row, FS&& gradient_s, FT&& gradient_t) const {
    const bool student_out = gs_row != nullptr, teacher_out = gt_row != nullptr, extra_in = extra_row != nullptr;
    runs<true>([&](int64_t at, int64_t j0, float (&s)[kVector], float (&t)[kVector]) {  // the last pass: backward
      center_run(j0, s, t);
      store_run_gradients(student_out ? grad_student + at : nullptr, teacher_out ? grad_teacher + at : nullptr,
                          extra_in ? rank_grad + at : nullptr, j0, cols, vector, s, t, gradient_s, gradient_t);
    });
  }
};

// Which of the column term and the rectification an instance of fused_row serves. The
// resident layouts take both as the config says; the chunked layout compiles the row twice,
// with the column term (and no rectification: fused_loss refuses the pair) and without it,
// and picks one per kernel (block-uniform), so that neither copy holds the other's
// registers (one copy of both held 128 registers and spilled).
enum RowTerms : int { kTermsByConfig = 0, kColumnTerm = 1, kNoColumnTerm = 2 };

// The loss of one row and its gradients. Every reduction sits under a condition that is
// uniform across the kernel (the config's coefficients and gradient flags); what differs
// per row (a missing target, the difficulty, the rectification) only selects values.
// t_row is the teacher's row view (DenseTeacherRows or SparseTeacherRows::Row): every
// teacher logit below, the layouts' loads and the single classes (0, the target, the
// argmax, all in 0..C−1), comes through it, so the rectification swaps the rebuilt row's
// first maximum with the target in both layouts.
// DKD: whether the row has DKD's terms, a compile-time switch (the launch picks the instance
// from the config), so that the instances without them are the code they were (same
// registers) and those with them hold DKD's state only where it is used.
template <bool DKD, int TERMS, int GROUP, typename Row, typename s_t, typename TeacherRow, typename t_t>
__device__ void fused_row(Row& r, RowGroup<GROUP> reduce, int64_t row, bool active, bool leader, const s_t* s_row,
                          const TeacherRow& t_row, const LossConfig& cfg, float grad_scale, const RowInputs& in,
                          s_t* gs_row, t_t* gt_row, Scratch& scratch) {
  const int64_t cols = r.cols;
  const float it = cfg.inv_temperature;
  const double inv_n = 1.0 / static_cast<double>(cols);
  r.load(s_row, t_row);
  const bool columns = TERMS == kTermsByConfig ? cfg.column_coef != 0.0f : TERMS == kColumnTerm;
  const bool rectify = TERMS != kColumnTerm && cfg.rectify;

  // Maxima; the teacher's first argmax for DR-KD's rectification. The chunked layout also
  // takes the normalizers, KL, the entropy and the row Pearson moments in this read
  // (online_statistics), or with the column term takes the maxima of step 1 and reads the
  // row once below with exact p and q.
  float s_max = -INFINITY, t_max = -INFINITY;
  int64_t t_arg = cols;
  float sums[3] = {0.0f, 0.0f, 0.0f};  // softmax normalizers at τ, and of the CE term at 1
  double streamed[4] = {0.0, 0.0, 0.0, 0.0};  // chunked: KL of the unrectified teacher, its entropy, S, T
  Moments moments;                            // chunked, no column term: of e_s, e_t over the row maxima
  if constexpr (Row::kStreamed) {
    if (columns) {
      // Step 1's maxima (NaN ignored, as block_argmax): with its log-sums, the p and q of
      // the column statistics bit for bit. No argmax: the rectification never comes with
      // the column term (fused_loss refuses it).
      s_max = in.softmax_stats[2 * row].max;
      t_max = in.softmax_stats[2 * row + 1].max;
    } else {
      r.online_statistics(cfg, cfg.pearson_coef != 0.0f, s_max, t_max, t_arg, sums, streamed, moments, scratch);
    }
  } else {
    r.each_raw([&](int64_t j, float a, float b) {
      s_max = fmaxf(s_max, a);
      if (b > t_max || (b == t_max && j < t_arg)) {
        t_max = b;
        t_arg = j;
      }
    });
    reduce.maxima(s_max, t_max, t_arg, scratch);
  }
  if (t_arg >= cols) t_arg = 0;  // an all-NaN row
  const int64_t target = active && in.target ? in.target[row] : -1;
  const bool has_target = target >= 0 && target < cols;
  constexpr bool dkd = DKD;  // the launch sets it from cfg.tckd_coef, cfg.nckd_coef
  const bool invalid = (cfg.ce_coef != 0.0f || cfg.rectify || dkd) && !has_target;  // its loss and gradients are NaN
  Swap swap;
  swap.on = rectify && has_target && t_arg != target;
  if (swap.on) {  // the rectified teacher: the argmax and the target trade places
    swap.t_arg = t_arg;
    swap.target = target;
    swap.at_t_arg = t_row.load(target);
    swap.at_target = t_row.load(t_arg);
  }
  r.center(s_max, t_max, swap);

  if constexpr (!Row::kStreamed) {
    r.each([&](int64_t, float s, float t) {
      sums[0] += expf(s * it);
      sums[1] += expf(t * it);
      if (cfg.ce_coef != 0.0f) sums[2] += expf(s);
    });
    reduce.sum(sums, scratch);
  }
  float s_log_sum = logf(sums[0]), t_log_sum = logf(sums[1]);
  // The logs' difference in double: at τ = 100 a float log's rounding alone, times τ²,
  // moves the loss of two nearly equal rows by ~6e-4.
  double log_sum_difference = log(static_cast<double>(sums[0])) - log(static_cast<double>(sums[1]));
  if (columns && active) {
    // The column statistics computed this row's p and q from the row statistics kernel's
    // normalizers: the row takes the very same ones (the maxima are exact, so equal), or a
    // constant column's p − mean_p would be rounding, times the 1/1e-8 floor of its
    // correlation.
    s_log_sum = in.softmax_stats[2 * row].log_sum;
    t_log_sum = in.softmax_stats[2 * row + 1].log_sum;
    log_sum_difference = static_cast<double>(s_log_sum) - static_cast<double>(t_log_sum);
  }
  auto p_of = [&](float s) { return expf(s * it - s_log_sum); };
  auto q_of = [&](float t) { return expf(t * it - t_log_sum); };
  auto log_ratio = [&](float s, float t) {  // log q − log p
    return (static_cast<double>(t) - static_cast<double>(s)) * it + log_sum_difference;
  };

  // The column term's share of the correlations' g = dℓ/dp (student) and dℓ/dq (teacher),
  // as the gradients take it (a constant column's p − mean_p is exactly 0).
  const float column_grad = columns ? static_cast<float>(-cfg.column_coef * inv_n) : 0.0f;
  const ColumnStats& col = in.columns;
  auto column_g_s = [&](int64_t j, float p, float q) {
    return column_grad * (col.cross[j] * (q - col.mean_q[j]) - col.self_p[j] * (p - col.mean_p[j]));
  };
  auto column_g_t = [&](int64_t j, float p, float q) {
    return column_grad * (col.cross[j] * (p - col.mean_p[j]) - col.self_q[j] * (q - col.mean_q[j]));
  };

  const bool kl_term = cfg.kl_coef != 0.0f;
  double kl = 0.0, entropy = 0.0;
  float p_mean = 0.0f, q_mean = 0.0f;
  // Chunked: Σa, Σb, Σab, Σa², Σb² for a = p − p_0, b = q − q_0 (column term), and
  // <p, g_column_s>, <q, g_column_t>.
  double shifted[5] = {0.0, 0.0, 0.0, 0.0, 0.0};
  double column_dots[2] = {0.0, 0.0};
  if constexpr (Row::kStreamed) {
    if (columns) {
      // The first read of the row (the rectification is off here): KL and the entropy from
      // the exact p, q (as the resident layout), the CE normalizer at τ = 1 over the exact
      // max, the row Pearson sums shifted by p_0, q_0 (double from the float p, q: a
      // constant row stays exactly zero) and the column term's share of the dots.
      const bool pearson = cfg.pearson_coef != 0.0f, ce = cfg.ce_coef != 0.0f;
      const double p0 = p_of(to_float(s_row[0]) - s_max), q0 = q_of(t_row.load(0) - t_max);
      double acc[3] = {0.0, 0.0, 0.0};  // KL, entropy, Σ exp(s − s_max)
      r.each([&](int64_t j, float s, float t) {
        const float p = p_of(s), q = q_of(t);
        if (kl_term && q > 0.0f) acc[0] += q * log_ratio(s, t);  // q = 0: no term (0·−inf would be NaN)
        if (q > 0.0f) acc[1] -= q * (t * it - t_log_sum);
        if (ce) acc[2] += expf(s);
        if (cfg.student_grad) column_dots[0] += p * column_g_s(j, p, q);
        if (cfg.teacher_grad) column_dots[1] += q * column_g_t(j, p, q);
        if (pearson) {
          const double a = p - p0, b = q - q0;
          shifted[0] += a;
          shifted[1] += b;
          shifted[2] += a * b;
          shifted[3] += a * a;
          shifted[4] += b * b;
        }
      });
      reduce.sum(acc, scratch);
      if (cfg.student_grad || cfg.teacher_grad) reduce.sum(column_dots, scratch);
      if (pearson) reduce.sum(shifted, scratch);
      kl = acc[0];
      entropy = acc[1];
      sums[2] = static_cast<float>(acc[2]);
    } else {
      // The rectification moves q between columns a = t_arg and b = target only: KL gains
      // (q_a − q_b)(s_a − s_b)·it; the entropy does not change.
      kl = streamed[0];
      entropy = streamed[1];
      if (swap.on) {
        const double q_a = q_of(0.0f), q_b = q_of(swap.at_t_arg - t_max);
        kl += (q_a - q_b) * (static_cast<double>(to_float(s_row[t_arg])) - to_float(s_row[target])) * it;
      }
    }
  } else {
    double acc[4] = {0.0, 0.0, 0.0, 0.0};  // KL, entropy, Σ p, Σ q
    r.each([&](int64_t, float s, float t) {
      const float p = p_of(s), q = q_of(t);
      if (kl_term && q > 0.0f) acc[0] += q * log_ratio(s, t);  // q = 0: no term (0·−inf would be NaN)
      if (q > 0.0f) acc[1] -= q * (t * it - t_log_sum);
      acc[2] += p;
      acc[3] += q;
    });
    reduce.sum(acc, scratch);
    kl = acc[0];
    entropy = acc[1];
    // A constant row's mean is exactly its value (a double sum of C equal floats is exact),
    // so it centers to exactly zero.
    p_mean = static_cast<float>(acc[2] * inv_n);
    q_mean = static_cast<float>(acc[3] * inv_n);
  }

  double loss = 0.0;
  if (cfg.kl_coef != 0.0f) loss += cfg.kl_coef * (kl < 0.0 ? 0.0 : kl);  // KL ≥ 0 despite rounding; NaN stays
  if (cfg.ce_coef != 0.0f && has_target) loss += cfg.ce_coef * (logf(sums[2]) + s_max - to_float(s_row[target]));

  // DKD (csrc/losses_cpu.cpp's fused_row, the same formulas): the non-target softmaxes p̃,
  // q̃ over their own maxima (exact when the target holds all but an underflowing sliver of
  // the mass), every log from logits, in double. Three passes over the row under the
  // kernel-uniform `dkd` (over registers in the resident layouts; three more reads of the
  // row in the chunked one): the non-target maxima, their normalizers, NCKD. Values are
  // the centered (and rectified) logits the layouts hand to each(); the target's class is
  // read only when the row has one (y: an address-safe class otherwise, the row is NaN).
  // Every reduction is under `dkd` (kernel-uniform); a missing target only selects values.
  float s_rest_max = -INFINITY, t_rest_max = -INFINITY;  // centered: (max over j ≠ y) − row max
  float s_rest_log = 0.0f, t_rest_log = 0.0f;            // log Σ_{j≠y} e^{(x_j − x_rest_max)·it}
  double rest_shift = 0.0, nckd = 0.0;
  double log_p_target = 0.0, log_q_target = 0.0, log_p_rest = 0.0, log_q_rest = 0.0;
  auto rest_ratio = [&](float s, float t) {  // log q̃_j − log p̃_j
    return (static_cast<double>(t - t_rest_max) - static_cast<double>(s - s_rest_max)) * it + rest_shift;
  };
  auto tilde_p_of = [&](float s) { return expf((s - s_rest_max) * it - s_rest_log); };
  auto tilde_q_of = [&](float t) { return expf((t - t_rest_max) * it - t_rest_log); };
  if (dkd) {
    r.each([&](int64_t j, float s, float t) {
      if (j != target) {  // NaN ignored, as the CPU's comparisons
        s_rest_max = s > s_rest_max ? s : s_rest_max;
        t_rest_max = t > t_rest_max ? t : t_rest_max;
      }
    });
    int64_t unused_arg = 0;
    reduce.maxima(s_rest_max, t_rest_max, unused_arg, scratch);
    double rest[2] = {0.0, 0.0};
    r.each([&](int64_t j, float s, float t) {
      if (j != target) {
        rest[0] += expf((s - s_rest_max) * it);
        rest[1] += expf((t - t_rest_max) * it);
      }
    });
    reduce.sum(rest, scratch);
    const double s_rest_log_d = log(rest[0]), t_rest_log_d = log(rest[1]);
    s_rest_log = static_cast<float>(s_rest_log_d);
    t_rest_log = static_cast<float>(t_rest_log_d);
    rest_shift = s_rest_log_d - t_rest_log_d;
    double nckd_sum[1] = {0.0};
    r.each([&](int64_t j, float s, float t) {
      if (j != target) {
        const float tq = tilde_q_of(t);
        if (tq > 0.0f) nckd_sum[0] += tq * rest_ratio(s, t);
      }
    });
    reduce.sum(nckd_sum, scratch);
    nckd = nckd_sum[0];
    // The normalizers over all classes (the column term's are step 1's).
    const double s_log_total = columns ? static_cast<double>(s_log_sum) : log(static_cast<double>(sums[0]));
    const double t_log_total = columns ? static_cast<double>(t_log_sum) : log(static_cast<double>(sums[1]));
    const int64_t y = has_target ? target : 0;
    const float s_y = to_float(s_row[y]) - s_max;
    const float t_y = (swap.on ? swap.at_target : t_row.load(y)) - t_max;  // the rectified teacher at y
    log_p_target = static_cast<double>(s_y) * it - s_log_total;
    log_q_target = static_cast<double>(t_y) * it - t_log_total;
    log_p_rest = static_cast<double>(s_rest_max) * it + s_rest_log_d - s_log_total;
    log_q_rest = static_cast<double>(t_rest_max) * it + t_rest_log_d - t_log_total;
    const double q_target = exp(log_q_target), q_rest = exp(log_q_rest);
    double tckd = 0.0;  // a zero-probability side adds 0 (never 0·∞)
    if (q_target > 0.0) tckd += q_target * (log_q_target - log_p_target);
    if (q_rest > 0.0) tckd += q_rest * (log_q_rest - log_p_rest);
    loss += cfg.tckd_coef * tckd + cfg.nckd_coef * (nckd < 0.0 ? 0.0 : nckd);
  }

  float d = cfg.difficulty_value;
  if (cfg.difficulty_mode == kDifficultyEntropy) {
    d = static_cast<float>(fmin(1.0, fmax(0.0, entropy / log(static_cast<double>(cols)))));
  } else if (cfg.difficulty_mode == kDifficultyPerSample && active) {
    d = in.difficulty[row];
  }
  // The terms are on by their coefficient, not by the value of their weight: a NaN or inf
  // difficulty times a zero coefficient must not read buffers that were never allocated.
  const float pearson_weight = cfg.pearson_coef != 0.0f ? cfg.pearson_coef * (1.0f - d) : 0.0f;
  Correlation row_corr{0.0, 0.0f, 0.0f, 0.0f};
  // Chunked: the row term's <p, g_student>, <q, g_teacher> in closed form (no read).
  double row_dots[2] = {0.0, 0.0};
  if (cfg.pearson_coef != 0.0f) {
    double m[3] = {0.0, 0.0, 0.0};
    // Chunked: Σp(q − q_mean), Σp(p − p_mean), Σq(p − p_mean), Σq(q − q_mean) over the float
    // p, q and the float means the gradient uses; g_student = pearson_grad·(cross·(q −
    // q_mean) − self_a·(p − p_mean)) makes <p, g_student> = pearson_grad·(cross·[0] −
    // self_a·[1]), and <q, g_teacher> = pearson_grad·(cross·[2] − self_b·[3]).
    double centered[4] = {0.0, 0.0, 0.0, 0.0};
    if constexpr (Row::kStreamed) {
      if (columns) {
        // The moments about the float means the gradient uses, from the first read's sums:
        // Σ(p − p̄)(q − q̄) = Σab − d_q Σa − d_p Σb + C d_p d_q with d = p̄ − p_0 (as the
        // Triton kernel's chunked layout). With the float p, q in the sums, the dots'
        // moments are exact too: Σp(q − q̄) = Σ(a + p_0)(b − d_q) = Σab − d_q Σa + p_0 Σb −
        // C p_0 d_q, and so on (a constant row's are exactly 0: b = 0, d_q = 0).
        const double p0 = p_of(to_float(s_row[0]) - s_max), q0 = q_of(t_row.load(0) - t_max);
        p_mean = static_cast<float>(p0 + shifted[0] * inv_n);
        q_mean = static_cast<float>(q0 + shifted[1] * inv_n);
        const double d_p = p_mean - p0, d_q = q_mean - q0, n = static_cast<double>(cols);
        m[0] = shifted[2] - d_q * shifted[0] - d_p * shifted[1] + n * d_p * d_q;
        m[1] = fmax(shifted[3] - 2.0 * d_p * shifted[0] + n * d_p * d_p, 0.0);
        m[2] = fmax(shifted[4] - 2.0 * d_q * shifted[1] + n * d_q * d_q, 0.0);
        centered[0] = shifted[2] - d_q * shifted[0] + p0 * (shifted[1] - n * d_q);
        centered[1] = shifted[3] + (p0 - d_p) * shifted[0] - n * p0 * d_p;
        centered[2] = shifted[2] - d_p * shifted[1] + q0 * (shifted[0] - n * d_p);
        centered[3] = shifted[4] + (q0 - d_q) * shifted[1] - n * q0 * d_q;
      } else {
        // From the online moments of e_s, e_t (over the row maxima). The rectification
        // permutes the teacher: μ_t and M2_t stay, the co-moment changes at a = t_arg and
        // b = target only, by −(e_s[a] − e_s[b])(e_t[a] − e_t[b]). In p-space (p = e_s/S,
        // q = e_t/T): Σ(p − p̄)(q − q̄) = C_st/(S·T), Σ(p − p̄)² = M2_s/S², Σ(q − q̄)² =
        // M2_t/T² (correlation's 1e-8 floor is a p-space bound).
        double co = moments.co;
        if (swap.on) {
          auto e_s = [&](int64_t j) { return static_cast<double>(expf((to_float(s_row[j]) - s_max) * it)); };
          auto e_t = [&](int64_t j) { return static_cast<double>(expf((t_row.load(j) - t_max) * it)); };
          co -= (e_s(t_arg) - e_s(target)) * (e_t(t_arg) - e_t(target));
        }
        const double inv_s = 1.0 / streamed[2], inv_t = 1.0 / streamed[3];
        m[0] = co * inv_s * inv_t;
        m[1] = moments.m2_s * inv_s * inv_s;
        m[2] = moments.m2_t * inv_t * inv_t;
        // The means as p_of computes p: p_of(s) = expf(s·it − s_log_sum) and p̄ = μ_s/S, so
        // p_mean = expf(log μ_s − s_log_sum). A constant row has μ_s = 1 exactly and logf(1)
        // = 0, so p_mean == p_of(0), every p − p_mean is exactly 0 (as the resident layout's
        // double mean of C equal floats).
        p_mean = expf(logf(static_cast<float>(moments.mean_s)) - s_log_sum);
        q_mean = expf(logf(static_cast<float>(moments.mean_t)) - t_log_sum);
        // Σp(q − q_mean) = Σ(p − p̄)(q − q̄) + Σp·(q̄ − q_mean) with Σp = 1, q̄ = 1/C: the
        // float mean's rounding; none for a constant row (M2 = 0 exactly: its q − q_mean
        // are exactly 0).
        const double p_off = m[1] != 0.0 ? inv_n - p_mean : 0.0, q_off = m[2] != 0.0 ? inv_n - q_mean : 0.0;
        centered[0] = m[0] + q_off;
        centered[1] = m[1] + p_off;
        centered[2] = m[0] + p_off;
        centered[3] = m[2] + q_off;
      }
    } else {
      r.each([&](int64_t, float s, float t) {
        const double a = p_of(s) - p_mean, b = q_of(t) - q_mean;
        m[0] += a * b;
        m[1] += a * a;
        m[2] += b * b;
      });
      reduce.sum(m, scratch);
    }
    if (pearson_weight != 0.0f) {
      row_corr = correlation(m[0], m[1], m[2]);
      loss += pearson_weight * (1.0 - row_corr.rho);
      if constexpr (Row::kStreamed) {
        const float pearson_grad = -pearson_weight * grad_scale;  // as the gradients' below
        row_dots[0] = pearson_grad * (row_corr.cross * centered[0] - row_corr.self_a * centered[1]);
        row_dots[1] = pearson_grad * (row_corr.cross * centered[2] - row_corr.self_b * centered[3]);
      }
    }
  }
  const float spearman_weight = cfg.spearman_coef != 0.0f ? cfg.spearman_coef * d : 0.0f;
  if (spearman_weight != 0.0f && active) loss += spearman_weight * (1.0 - in.spearman_rho[row]);
  if (leader && active) in.row_loss[row] = invalid ? NAN : static_cast<float>(loss);
  if (!cfg.student_grad && !cfg.teacher_grad) return;

  // Gradients: (p/τ)(g − <p, g>) for g = dℓ/dp from the correlations, the KL part in
  // closed form; the same for the teacher with the roles swapped.
  const float pearson_grad = -pearson_weight * grad_scale;
  const float kl_grad = cfg.kl_coef * grad_scale * it;
  const float ce_grad = cfg.ce_coef * grad_scale;
  const float inv_sum1 = cfg.ce_coef != 0.0f ? 1.0f / sums[2] : 0.0f;
  const float spearman_grad = -spearman_weight * grad_scale;
  auto g_student = [&](int64_t j, float p, float q) {
    float g = pearson_grad * (row_corr.cross * (q - q_mean) - row_corr.self_a * (p - p_mean));
    if (columns) g += column_g_s(j, p, q);
    return g;
  };
  auto g_teacher = [&](int64_t j, float p, float q) {
    float g = pearson_grad * (row_corr.cross * (p - p_mean) - row_corr.self_b * (q - q_mean));
    if (columns) g += column_g_t(j, p, q);
    return g;
  };
  const bool correlations = cfg.pearson_coef != 0.0f || columns;
  float dots[2] = {0.0f, 0.0f};  // <p, g_student>, <q, g_teacher>
  if constexpr (Row::kStreamed) {
    // No read: the row term's in closed form, the column term's from the first read.
    dots[0] = static_cast<float>(row_dots[0] + column_dots[0]);
    dots[1] = static_cast<float>(row_dots[1] + column_dots[1]);
  } else if (correlations) {
    r.each([&](int64_t j, float s, float t) {
      const float p = p_of(s), q = q_of(t);
      if (cfg.student_grad) dots[0] += p * g_student(j, p, q);
      if (cfg.teacher_grad) dots[1] += q * g_teacher(j, p, q);
    });
    reduce.sum(dots, scratch);
  }
  // DKD's gradients (the CPU kernel's comment block), each side's dℓ/dz before the factor
  // τ⁻¹·coefficients: student TCKD (P − Q) at y, p̃_j (Q − P) elsewhere, NCKD p̃_j − q̃_j
  // off y; teacher TCKD ℓ_b·Q·(1 − Q) at y, −ℓ_b·Q·(1 − Q)·q̃_j elsewhere, with ℓ_b =
  // log(Q/(1−Q)) − log(P/(1−P)) and Q·(1 − Q) from logs; NCKD q̃_j (log q̃_j − log p̃_j −
  // NCKD) off y. Zero when `dkd` is off (the scalars below are then all 0).
  const float tckd_grad = cfg.tckd_coef * grad_scale * it, nckd_grad = cfg.nckd_coef * grad_scale * it;
  const float target_gap = dkd ? static_cast<float>(exp(log_q_target) - exp(log_p_target)) : 0.0f;
  float binary_grad = 0.0f;
  if (dkd) {
    const double q_mass = exp(log_q_target) * exp(log_q_rest);
    binary_grad = q_mass > 0.0 ? static_cast<float>((log_q_target - log_q_rest - log_p_target + log_p_rest) * q_mass) *
                                     tckd_grad
                               : 0.0f;
  }
  auto gradient_s = [&](int64_t j, float s, float t, float rank_grad) {
    const float p = p_of(s), q = q_of(t);
    float v = kl_grad * (p - q);
    if (correlations) v += it * p * (g_student(j, p, q) - dots[0]);
    if (ce_grad != 0.0f) v += ce_grad * (expf(s) * inv_sum1 - (j == target ? 1.0f : 0.0f));
    if (spearman_grad != 0.0f) v += spearman_grad * rank_grad;
    if (dkd) {
      const float tp = tilde_p_of(s), tq = tilde_q_of(t);
      v += j == target ? -tckd_grad * target_gap : tckd_grad * tp * target_gap + nckd_grad * (tp - tq);
    }
    return invalid ? NAN : v;
  };
  auto rectified_gradient_t = [&](int64_t j, float s, float t) {
    const float p = p_of(s), q = q_of(t);
    // (Chunked: the KL switch from kl_grad = kl_coef·grad_scale·it, zero when kl_coef is (or
    // underflowing, where the term is 0 anyway), a value the store holds anyway: a separate
    // flag was the one predicate its loop spilled.)
    const bool kl_on = Row::kStreamed ? kl_grad != 0.0f : kl_term;
    float v = kl_on && q > 0.0f ? kl_grad * q * static_cast<float>(log_ratio(s, t) - kl) : 0.0f;
    if (correlations) v += it * q * (g_teacher(j, p, q) - dots[1]);
    if (dkd) {
      if (j == target) {
        v += binary_grad;
      } else {
        const float tq = tilde_q_of(t);
        v -= binary_grad * tq;
        if (tq > 0.0f) v += nckd_grad * tq * static_cast<float>(rest_ratio(s, t) - nckd);
      }
    }
    return v;
  };
  if (swap.on && cfg.teacher_grad) {
    // Original position t_arg receives the rectified gradient at target (where the
    // teacher's maximum went) and the reverse: both computed here from the logits.
    const float at_target = rectified_gradient_t(target, to_float(s_row[target]) - s_max, swap.at_target - t_max);
    const float at_t_arg = rectified_gradient_t(t_arg, to_float(s_row[t_arg]) - s_max, swap.at_t_arg - t_max);
    swap.at_t_arg = at_target;
    swap.at_target = at_t_arg;
  }
  auto gradient_t = [&](int64_t j, float s, float t) {
    return invalid ? NAN : swap.apply(j, rectified_gradient_t(j, s, t));
  };
  r.store(cfg.student_grad && active ? gs_row : nullptr, cfg.teacher_grad && active ? gt_row : nullptr,
          spearman_grad != 0.0f && active && in.spearman_grad ? in.spearman_grad + row * cols : nullptr, gradient_s, gradient_t);
}

// GROUP == 32: the resident layout with `group` (8, 16, 32) lanes of a warp per row;
// GROUP == kThreads: a block per row, resident (VECTORS > 0) or chunked (VECTORS == 0).
// `vector`: every row of every buffer starts 16-byte aligned (a sparse teacher is never
// read by vector loads: it takes no part in the condition).
// Teacher: DenseTeacherRows<t_t> or SparseTeacherRows. The teacher's reads stay in row
// `(active ? row : 0)`'s own entries (its view: the row's C logits at row·C, or its k
// entries at row·k, int64, and its fill), whatever the indices hold (SparseTeacherRows);
// the writes are those of the dense path. A sparse teacher has no gradient: its
// instantiations take grad_teacher and teacher_grad as null and false at compile time, so
// the teacher's gradient code is not even compiled into them (fused_loss also refuses
// the combination).
// DKD: the row has DKD's terms (fused_row; the launch picks it from the config).
template <int GROUP, int VECTORS, bool DKD, typename s_t, typename Teacher>
__global__ void __launch_bounds__(kThreads) fused_row_kernel(const s_t* student, Teacher teacher, int64_t rows,
                                                             int64_t cols, LossConfig cfg, float grad_scale,
                                                             RowInputs in, s_t* grad_student,
                                                             typename Teacher::grad_type* grad_teacher, int group,
                                                             bool vector) {
  using t_t = typename Teacher::grad_type;
  __shared__ Scratch scratch;
  if constexpr (Teacher::kSparse) {
    grad_teacher = nullptr;
    cfg.teacher_grad = false;
  }
  if constexpr (GROUP == kThreads) group = kThreads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / group) + threadIdx.x / group;
  const int lane = static_cast<int>(threadIdx.x % group);
  const RowGroup<GROUP> row_group{group};
  const bool active = row < rows;
  const int64_t base = (active ? row : 0) * cols;  // int64: B·C may pass 2^31
  const s_t* s_row = student + base;
  const auto t_row = teacher.view(active ? row : 0, base);
  s_t* gs_row = grad_student ? grad_student + base : nullptr;
  t_t* gt_row = grad_teacher ? grad_teacher + base : nullptr;
  if constexpr (VECTORS == 0) {
    static_assert(GROUP == kThreads, "the chunked layout takes a block per row");
    ChunkedRow<s_t, Teacher> r{student, teacher, grad_student, grad_teacher, in.spearman_grad, base, active ? row : 0,
                               cols, vector};
    if (cfg.column_coef != 0.0f) {  // kernel-uniform
      fused_row<DKD, kColumnTerm>(r, row_group, row, active, lane == 0, s_row, t_row, cfg, grad_scale, in, gs_row, gt_row,
                             scratch);
    } else {
      fused_row<DKD, kNoColumnTerm>(r, row_group, row, active, lane == 0, s_row, t_row, cfg, grad_scale, in, gs_row,
                               gt_row, scratch);
    }
  } else {
    ResidentRow<VECTORS> r;
    r.cols = active ? cols : 0;
    r.group = group;
    r.lane = lane;
    r.vector = vector;
    fused_row<DKD, kTermsByConfig>(r, row_group, row, active, lane == 0, s_row, t_row, cfg, grad_scale, in, gs_row, gt_row, scratch);
  }
}

// ---------------------------------------------------------------------------------
// 3b. Logit standardization (cfg.standardize): every term but CE sees each row z-scored,
// (x − mean)/(std + 1e-7) with the unbiased std, moments in double (csrc/losses_cpu.cpp's
// standardize_row / standardize_backward). One generic path for every kernel: the rows
// are standardized once into fp32 rows in the workspace (standardize_rows_kernel), and
// the whole pipeline of steps 1–3 — column statistics, Spearman sorts and ranks, the row
// kernel in every layout, dense or sparse teacher alike — runs unchanged on them (a
// float student and a DenseTeacherRows<float> teacher: instantiations that exist anyway),
// without its CE term and writing fp32 gradients dL/dz into the workspace; then
// standardize_backward_kernel takes each row's gradient back through the standardization,
// dL/dx = a·(g − ḡ) − z·<g, z>/((n − 1)·std) (0 for a constant row), adds CE on the raw
// student logits (its loss into the row's loss, its gradient after the chain rule) and
// rounds once to the logits' dtypes. So rectification, the Spearman ranks, the entropy
// difficulty and the column statistics all see the standardized rows, as on the CPU.
// Costs: two fp32 B×C rows (and one per gradient) of workspace; the standardization reads
// each input row three times (sum, squares, the write), the backward reads z and g twice
// and the raw student twice more with CE (max, normalizer; then the store).
// Races/bounds: one block per row (grid = B ≤ 2^31 − 1, checked), row offsets row·C in
// int64, element loops j = threadIdx.x, + kThreads, < C: every block reads and writes only
// its own row of each buffer (the teacher through its accessor: the row's own entries,
// SparseTeacherRows), and thread 0 alone writes the row's scalars (stats[row],
// row_loss[row]); block_sum/block_argmax begin with a barrier before reusing the scratch,
// and every branch around them is block-uniform (the config, null-ness of the buffers, the
// row's target). row_loss[row] was written by the row kernel earlier on the same stream.

// What the gradient of a row's standardization needs (Standardization on the CPU).
struct RowStandardization {
  double inv_std_dof_s, inv_std_dof_t;  // 1/((n − 1)·std), 0 for a constant row
  float scale_s, scale_t;               // a = 1/(std + 1e-7)
};

template <typename s_t, typename Teacher>
__global__ void __launch_bounds__(kThreads) standardize_rows_kernel(const s_t* student, Teacher teacher, int64_t cols,
                                                                    float* z_s, float* z_t,
                                                                    RowStandardization* stats) {
  __shared__ Scratch scratch;
  const int64_t row = blockIdx.x;
  const int64_t base = row * cols;  // int64: B·C may pass 2^31
  const s_t* s = student + base;
  const auto t = teacher.view(row, base);
  const double n = static_cast<double>(cols);
  double sums[2] = {0.0, 0.0};
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    sums[0] += to_float(s[j]);
    sums[1] += t.load(j);
  }
  block_sum(sums, scratch.d);
  const double mean_s = sums[0] / n, mean_t = sums[1] / n;
  double squares[2] = {0.0, 0.0};
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const double a = to_float(s[j]) - mean_s, b = t.load(j) - mean_t;
    squares[0] += a * a;
    squares[1] += b * b;
  }
  block_sum(squares, scratch.d);
  const double std_s = sqrt(squares[0] / (n - 1.0)), std_t = sqrt(squares[1] / (n - 1.0));
  const double scale_s = 1.0 / (std_s + kStandardizeEps), scale_t = 1.0 / (std_t + kStandardizeEps);
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    z_s[base + j] = static_cast<float>((to_float(s[j]) - mean_s) * scale_s);
    z_t[base + j] = static_cast<float>((t.load(j) - mean_t) * scale_t);
  }
  if (threadIdx.x == 0) {
    stats[row] = {std_s > 0.0 ? 1.0 / ((n - 1.0) * std_s) : 0.0, std_t > 0.0 ? 1.0 / ((n - 1.0) * std_t) : 0.0,
                  static_cast<float>(scale_s), static_cast<float>(scale_t)};
  }
}

// One side's dL/dx from g = dL/dz (fp32, the row kernel's) and z, the block's totals
// <1, g> and <g, z> in double; `extra(j)` adds what comes after the chain rule (CE).
template <typename T, typename F>
__device__ __forceinline__ void standardize_backward_row(const float* z, const float* g, int64_t cols, float scale,
                                                         double inv_std_dof, bool invalid, Scratch& scratch, T* out,
                                                         F&& extra) {
  double sums[2] = {0.0, 0.0};
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    sums[0] += g[j];
    sums[1] += static_cast<double>(g[j]) * z[j];
  }
  block_sum(sums, scratch.d);
  const double g_mean = sums[0] / static_cast<double>(cols), factor = sums[1] * inv_std_dof;
  for (int64_t j = threadIdx.x; j < cols; j += kThreads) {
    const float v = static_cast<float>(scale * (g[j] - g_mean) - z[j] * factor) + extra(j);
    out[j] = from_float<T>(invalid ? NAN : v);
  }
}

template <typename s_t, typename t_t>
__global__ void __launch_bounds__(kThreads) standardize_backward_kernel(
    const s_t* student, const float* z_s, const float* z_t, const float* g_s, const float* g_t,
    const RowStandardization* stats, const int64_t* target, int64_t cols, float ce_coef, float grad_scale,
    float* row_loss, s_t* grad_student, t_t* grad_teacher) {
  __shared__ Scratch scratch;
  const int64_t row = blockIdx.x;
  const int64_t base = row * cols;  // int64
  const s_t* s = student + base;
  const RowStandardization st = stats[row];
  const int64_t y = target ? target[row] : -1;
  const bool has_target = y >= 0 && y < cols;
  const bool ce = ce_coef != 0.0f;
  const bool invalid = ce && !has_target;  // (the row kernel's own terms set their NaN themselves)
  // CE on the raw student logits: the max, the normalizer at τ = 1 (block-uniform under ce).
  float s_max = -INFINITY, inv_sum1 = 0.0f;
  if (ce) {
    int64_t unused = 0;
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) s_max = fmaxf(s_max, to_float(s[j]));
    block_argmax(s_max, unused, scratch.f, scratch.i);
    float sum1[1] = {0.0f};
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) sum1[0] += expf(to_float(s[j]) - s_max);
    block_sum(sum1, scratch.f);
    inv_sum1 = 1.0f / sum1[0];
    if (threadIdx.x == 0) {
      row_loss[row] = invalid ? NAN : row_loss[row] + ce_coef * (logf(sum1[0]) + s_max - to_float(s[y]));
    }
  }
  const float ce_grad = ce_coef * grad_scale;
  if (grad_student != nullptr) {
    standardize_backward_row(z_s + base, g_s + base, cols, st.scale_s, st.inv_std_dof_s, invalid, scratch,
                             grad_student + base, [&](int64_t j) {
                               return ce ? ce_grad * (expf(to_float(s[j]) - s_max) * inv_sum1 - (j == y ? 1.0f : 0.0f))
                                         : 0.0f;
                             });
  }
  if (grad_teacher != nullptr) {
    standardize_backward_row(z_t + base, g_t + base, cols, st.scale_t, st.inv_std_dof_t, invalid, scratch,
                             grad_teacher + base, [](int64_t) { return 0.0f; });
  }
}

// 4. The loss: Σ row losses / B + column_coef · (1 − Σ ρ_c / C), in a fixed order.
__global__ void __launch_bounds__(kThreads) finalize_loss_kernel(const float* row_loss, int64_t rows,
                                                                 const double* column_rho, int64_t cols,
                                                                 float column_coef, float* loss) {
  __shared__ Scratch scratch;
  double sums[2] = {0.0, 0.0};
  for (int64_t i = threadIdx.x; i < rows; i += kThreads) sums[0] += row_loss[i];
  if (column_rho != nullptr) {
    for (int64_t j = threadIdx.x; j < cols; j += kThreads) sums[1] += column_rho[j];
  }
  block_sum(sums, scratch.d);
  if (threadIdx.x == 0) {
    double total = sums[0] / static_cast<double>(rows);
    if (column_rho != nullptr) total += column_coef * (1.0 - sums[1] / static_cast<double>(cols));
    *loss = static_cast<float>(total);
  }
}

// ---------------------------------------------------------------------------------
// Workspace layout and launches.

size_t align_up(size_t bytes) { return (bytes + 255) / 256 * 256; }

static_assert(plan_spearman(kSpearmanBlockSortMax + 1).threads == kThreads, "the long rows' Spearman kernel");

struct Layout {
  size_t row_loss = 0, stats = 0, partial = 0, column_floats = 0, column_rho = 0;
  // The Spearman steps, rows of up to kSpearmanBlockSortMax classes (fused_loss_cuda.h).
  size_t t_rank = 0, order = 0, theta = 0, block_start = 0, block_count = 0, standardization = 0;
  // The Spearman steps, longer rows.
  size_t s_keys = 0, t_keys = 0, s_sorted = 0, t_sorted = 0, iota = 0, s_order = 0, t_order = 0, offsets = 0;
  size_t sort_temp = 0, sort_temp_bytes = 0, rank_rows = 0;
  size_t rho = 0, grad_rho = 0;
  // Logit standardization (section 3b): the standardized rows, the gradients dL/dz, the
  // rows' RowStandardization.
  size_t z_s = 0, z_t = 0, g_s = 0, g_t = 0, standardized = 0;
  size_t total = 0;
  int64_t chunk = 0, chunks = 0, spearman_grid = 0;
  int64_t spearman_rows = 0;  // rows per Spearman chunk (spearman_chunk_rows: its workspace holds that many)
  SpearmanPlan spearman{};
};

// The Spearman steps of a chunk of n rows of C ≤ kSpearmanBlockSortMax classes (teacher
// ranks, student sort, PAV, finish), THREADS threads per row in the sorts and the plan's
// finish_threads in the finish (plan_spearman). Grids: n ≤ spearman_chunk_rows ≤ 2^24
// blocks for the per-row kernels, ⌈n / 32⌉ for PAV.
template <int THREADS, typename s_t, typename Teacher>
void launch_spearman_rows(const s_t* student, const Teacher& teacher, int64_t n, int64_t cols, float strength, char* ws,
                          const Layout& l, double* rho, float* grad_rho, cudaStream_t stream) {
  constexpr int kItems = kSpearmanItems;
  constexpr SpearmanPlan kPlan = plan_spearman(int64_t{THREADS} * kItems);
  static_assert(kPlan.threads == THREADS && kPlan.items == kItems, "a bucket of plan_spearman");
  constexpr int kFinishThreads = kPlan.finish_threads, kFinishItems = kPlan.finish_items;
  float* t_rank = reinterpret_cast<float*>(ws + l.t_rank);
  int32_t* order = reinterpret_cast<int32_t*>(ws + l.order);
  double* theta = reinterpret_cast<double*>(ws + l.theta);
  int32_t* block_start = reinterpret_cast<int32_t*>(ws + l.block_start);
  int32_t* block_count = reinterpret_cast<int32_t*>(ws + l.block_count);
  auto* standardization = reinterpret_cast<Standardization*>(ws + l.standardization);
  const auto blocks = static_cast<unsigned>(n);
  spearman_teacher_kernel<Teacher, THREADS, kItems><<<blocks, THREADS, 0, stream>>>(teacher, cols, t_rank);
  check(cudaGetLastError(), "the Spearman teacher ranks");
  spearman_student_kernel<s_t, THREADS, kItems><<<blocks, THREADS, 0, stream>>>(student, n, cols, strength, theta,
                                                                                order, standardization);
  check(cudaGetLastError(), "the Spearman student sort");
  spearman_pav_kernel<<<static_cast<unsigned>((n + kPavRows - 1) / kPavRows), kPavRows, 0, stream>>>(
      n, cols, theta, block_start, block_count);
  check(cudaGetLastError(), "the Spearman pool-adjacent-violators");
  spearman_finish_kernel<s_t, kFinishThreads, kFinishItems><<<blocks, kFinishThreads, 0, stream>>>(
      student, n, cols, strength, order, t_rank, theta, block_start, block_count, standardization, rho, grad_rho);
  check(cudaGetLastError(), "the Spearman correlations");
}

// The Spearman steps of a chunk of n longer rows: CUB's segmented sorts of the chunk
// (n · C ≤ max(kSpearmanChunkLogits, C) < 2^31 logits: int offsets), then one block per row.
template <typename s_t, typename Teacher>
void launch_spearman_long_rows(const s_t* student, const Teacher& teacher, int64_t n, int64_t cols, float strength,
                               char* ws, const Layout& l, double* rho, float* grad_rho, cudaStream_t stream) {
  float* s_keys = reinterpret_cast<float*>(ws + l.s_keys);
  float* t_keys = reinterpret_cast<float*>(ws + l.t_keys);
  float* s_sorted = reinterpret_cast<float*>(ws + l.s_sorted);
  float* t_sorted = reinterpret_cast<float*>(ws + l.t_sorted);
  int32_t* iota = reinterpret_cast<int32_t*>(ws + l.iota);
  int32_t* s_order = reinterpret_cast<int32_t*>(ws + l.s_order);
  int32_t* t_order = reinterpret_cast<int32_t*>(ws + l.t_order);
  int32_t* offsets = reinterpret_cast<int32_t*>(ws + l.offsets);
  const int64_t elements = n * cols;  // ≤ max(kSpearmanChunkLogits, C) < 2^31
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((elements + kThreads - 1) / kThreads, 65535));
  prepare_sort_kernel<<<blocks, kThreads, 0, stream>>>(student, teacher, n, cols, s_keys, t_keys, iota, offsets);
  check(cudaGetLastError(), "preparing the row sorts");
  size_t temp_bytes = l.sort_temp_bytes;
  for (int side = 0; side < 2; ++side) {
    check(cub::DeviceSegmentedRadixSort::SortPairs(ws + l.sort_temp, temp_bytes, side ? t_keys : s_keys,
                                                   side ? t_sorted : s_sorted, iota, side ? t_order : s_order,
                                                   static_cast<int>(elements), static_cast<int>(n), offsets,
                                                   offsets + 1, 0, 32, stream),
          "the segmented row sort");
  }
  const unsigned spearman_blocks = static_cast<unsigned>(std::min<int64_t>(l.spearman_grid, n));
  spearman_kernel<s_t><<<spearman_blocks, kThreads, 0, stream>>>(student, n, cols, strength, t_sorted, t_order,
                                                                  s_order, ws + l.rank_rows, rho, grad_rho);
  check(cudaGetLastError(), "the Spearman kernel");
}

Layout layout(int64_t rows, int64_t cols, const LossConfig& cfg, int device) {
  Layout l;
  int multiprocessors = 0;
  check(cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device), "reading the device");
  size_t at = 0;
  auto take = [&](size_t bytes) {
    const size_t offset = at;
    at += align_up(bytes);
    return offset;
  };
  l.row_loss = take(rows * sizeof(float));
  if (cfg.column_coef != 0.0f) {
    l.chunk = column_chunk_rows(rows);
    l.chunks = (rows + l.chunk - 1) / l.chunk;
    l.stats = take(2 * rows * sizeof(SoftmaxStats));
    l.partial = take(static_cast<size_t>(l.chunks) * 3 * cols * sizeof(double));
    l.column_floats = take(5 * cols * sizeof(float));
    l.column_rho = take(cols * sizeof(double));
  }
  if (cfg.spearman_coef != 0.0f) {
    // The Spearman steps run on chunks of rows, so their workspace is bounded whatever B
    // (fused_loss_cuda.h: spearman_chunk_rows and the bound).
    l.spearman = plan_spearman(cols);
    l.spearman_rows = spearman_chunk_rows(rows, cols);
    const size_t elements = static_cast<size_t>(l.spearman_rows) * static_cast<size_t>(cols);
    if (l.spearman.block_sort) {
      l.t_rank = take(elements * sizeof(float));
      l.order = take(elements * sizeof(int32_t));
      l.theta = take(elements * sizeof(double));
      l.block_start = take(elements * sizeof(int32_t));
      l.block_count = take(l.spearman_rows * sizeof(int32_t));
      l.standardization = take(l.spearman_rows * sizeof(Standardization));
    } else {
      l.s_keys = take(elements * sizeof(float));
      l.t_keys = take(elements * sizeof(float));
      l.s_sorted = take(elements * sizeof(float));
      l.t_sorted = take(elements * sizeof(float));
      l.iota = take(elements * sizeof(int32_t));
      l.s_order = take(elements * sizeof(int32_t));
      l.t_order = take(elements * sizeof(int32_t));
      l.offsets = take((l.spearman_rows + 1) * sizeof(int32_t));
      size_t temp = 0;
      check(cub::DeviceSegmentedRadixSort::SortPairs(nullptr, temp, static_cast<const float*>(nullptr),
                                                     static_cast<float*>(nullptr), static_cast<const int32_t*>(nullptr),
                                                     static_cast<int32_t*>(nullptr), static_cast<int>(elements),
                                                     static_cast<int>(l.spearman_rows),
                                                     static_cast<const int32_t*>(nullptr),
                                                     static_cast<const int32_t*>(nullptr)),
            "sizing the segmented sort");
      l.sort_temp_bytes = temp;
      l.sort_temp = take(temp);
      l.spearman_grid = std::min<int64_t>(l.spearman_rows, 2 * multiprocessors);
      l.rank_rows = take(l.spearman_grid * rank_row_stride(cols));
    }
    l.rho = take(l.spearman_rows * sizeof(double));
    if (cfg.student_grad) l.grad_rho = take(elements * sizeof(float));
  }
  if (cfg.standardize) {
    const size_t elements = static_cast<size_t>(rows) * static_cast<size_t>(cols);
    l.z_s = take(elements * sizeof(float));
    l.z_t = take(elements * sizeof(float));
    if (cfg.student_grad) l.g_s = take(elements * sizeof(float));
    if (cfg.teacher_grad) l.g_t = take(elements * sizeof(float));
    l.standardized = take(rows * sizeof(RowStandardization));
  }
  l.total = at;
  return l;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// The row kernel's layout by C: the resident layouts hold a row in registers (GROUP
// threads × VECTORS runs of kVector classes), the smallest that fits; longer rows take the
// chunked layout. Grids: ⌈B / rows per block⌉ ≤ B ≤ 2^31 − 1 blocks (check_sizes).
template <typename s_t, typename Teacher>
void launch_row_kernel(const s_t* student, const Teacher& teacher, int64_t rows, int64_t cols, const LossConfig& cfg,
                       float grad_scale, const RowInputs& in, s_t* grad_student,
                       typename Teacher::grad_type* grad_teacher, cudaStream_t stream) {
  // Vector loads and stores need every row of every buffer read or written by runs to
  // start 16-byte aligned: C a multiple of kVector (8 · 2 bytes, 8 · 4 bytes) and the
  // buffers aligned (the workspace's regions are 256-byte aligned).
  const bool vector = cols % kVector == 0 && aligned16(student) && teacher.aligned16() &&
                      aligned16(grad_student) && aligned16(grad_teacher) && aligned16(in.spearman_grad);
  auto go = [&](auto kernel, int group) {
    const int64_t rows_per_block = kThreads / group;
    const auto blocks = static_cast<unsigned>((rows + rows_per_block - 1) / rows_per_block);
    kernel<<<blocks, kThreads, 0, stream>>>(student, teacher, rows, cols, cfg, grad_scale, in, grad_student,
                                            grad_teacher, group, vector);
  };
  auto by_layout = [&](auto dkd_tag) {
    constexpr bool kDkd = decltype(dkd_tag)::value;
    if (cols <= 32 * kVector) {  // 8, 16 or 32 lanes per row: the fewest that hold it
      go(fused_row_kernel<32, 1, kDkd, s_t, Teacher>, cols <= 8 * kVector ? 8 : (cols <= 16 * kVector ? 16 : 32));
    } else if (cols <= 32 * 2 * kVector) {
      go(fused_row_kernel<32, 2, kDkd, s_t, Teacher>, 32);
    } else if (cols <= kMaxResidentClasses) {
      static_assert(kThreads * kVector == kMaxResidentClasses, "the largest resident layout");
      go(fused_row_kernel<kThreads, 1, kDkd, s_t, Teacher>, kThreads);
    } else {
      go(fused_row_kernel<kThreads, 0, kDkd, s_t, Teacher>, kThreads);
    }
  };
  if (cfg.tckd_coef != 0.0f || cfg.nckd_coef != 0.0f) {
    by_layout(std::true_type{});
  } else {
    by_layout(std::false_type{});
  }
}

// Teacher: the accessor of the teacher's rows (DenseTeacherRows<t_t> or SparseTeacherRows).
// Steps 1–3, then (finalize) step 4; returns the column correlations' array (or null) for
// a caller that finalizes itself (the standardized path, section 3b).
template <typename s_t, typename Teacher>
double* launch(const FusedLossArgs& a, const Layout& l, const Teacher& teacher, bool finalize = true) {
  using t_t = typename Teacher::grad_type;
  const LossConfig& cfg = a.config;
  char* ws = static_cast<char*>(a.workspace);
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const s_t* student = static_cast<const s_t*>(a.student);
  const int64_t rows = a.rows, cols = a.cols;
  const unsigned column_blocks = static_cast<unsigned>((cols + kThreads - 1) / kThreads);

  RowInputs in{a.target, a.difficulty, nullptr, nullptr, {}, nullptr, reinterpret_cast<float*>(ws + l.row_loss)};
  double* column_rho = nullptr;
  if (cfg.column_coef != 0.0f) {
    auto* stats = reinterpret_cast<SoftmaxStats*>(ws + l.stats);
    auto* partial = reinterpret_cast<double*>(ws + l.partial);
    float* floats = reinterpret_cast<float*>(ws + l.column_floats);
    column_rho = reinterpret_cast<double*>(ws + l.column_rho);
    in.columns = {floats, floats + cols, floats + 2 * cols, floats + 3 * cols, floats + 4 * cols, column_rho};
    in.softmax_stats = stats;
    row_softmax_stats_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(student, teacher, cols,
                                                                                    cfg.inv_temperature, stats);
    check(cudaGetLastError(), "row softmax statistics");
    for (int pass = 0; pass < 2; ++pass) {
      const dim3 grid(column_blocks, static_cast<unsigned>(l.chunks));
      column_moments_kernel<<<grid, kThreads, 0, stream>>>(student, teacher, rows, cols, cfg.inv_temperature, stats,
                                                           l.chunk, pass, floats, partial);
      check(cudaGetLastError(), "column moments");
      column_finalize_kernel<<<column_blocks, kThreads, 0, stream>>>(student, teacher, rows, cols,
                                                                     cfg.inv_temperature, stats, l.chunks, pass,
                                                                     partial, in.columns);
      check(cudaGetLastError(), "column statistics");
    }
  }
  s_t* grad_student = static_cast<s_t*>(a.grad_student);
  t_t* grad_teacher = static_cast<t_t*>(a.grad_teacher);
  const float grad_scale = 1.0f / static_cast<float>(rows);
  if (cfg.spearman_coef == 0.0f) {
    launch_row_kernel(student, teacher, rows, cols, cfg, grad_scale, in, grad_student, grad_teacher, stream);
    check(cudaGetLastError(), "the row kernel");
  }
  // With a Spearman term: per chunk of l.spearman_rows rows, the Spearman steps and the row
  // kernel on those rows (the row kernel reads the chunk's ρ_S and dρ_S/ds).
  for (int64_t first = 0; cfg.spearman_coef != 0.0f && first < rows; first += l.spearman_rows) {
    const int64_t n = std::min<int64_t>(l.spearman_rows, rows - first);
    const int64_t at = first * cols;  // int64: B·C may pass 2^31
    const s_t* chunk_student = student + at;
    const Teacher chunk_teacher = teacher.rows_from(first, cols);
    double* rho = reinterpret_cast<double*>(ws + l.rho);
    float* grad_rho = cfg.student_grad ? reinterpret_cast<float*>(ws + l.grad_rho) : nullptr;
    if (l.spearman.block_sort) {
      switch (l.spearman.threads) {
        case 128: launch_spearman_rows<128>(chunk_student, chunk_teacher, n, cols, cfg.rank_strength, ws, l, rho,
                                            grad_rho, stream); break;
        case 256: launch_spearman_rows<256>(chunk_student, chunk_teacher, n, cols, cfg.rank_strength, ws, l, rho,
                                            grad_rho, stream); break;
        case 512: launch_spearman_rows<512>(chunk_student, chunk_teacher, n, cols, cfg.rank_strength, ws, l, rho,
                                            grad_rho, stream); break;
        case 1024: launch_spearman_rows<1024>(chunk_student, chunk_teacher, n, cols, cfg.rank_strength, ws, l, rho,
                                              grad_rho, stream); break;
        default: throw std::runtime_error("kdfast CUDA fused loss: no Spearman kernels for this plan");
      }
    } else {
      launch_spearman_long_rows(chunk_student, chunk_teacher, n, cols, cfg.rank_strength, ws, l, rho, grad_rho,
                                stream);
    }
    RowInputs chunk_in = in;
    chunk_in.target = in.target ? in.target + first : nullptr;
    chunk_in.difficulty = in.difficulty ? in.difficulty + first : nullptr;
    chunk_in.softmax_stats = in.softmax_stats ? in.softmax_stats + 2 * first : nullptr;
    chunk_in.row_loss = in.row_loss + first;
    chunk_in.spearman_rho = rho;
    chunk_in.spearman_grad = grad_rho;
    launch_row_kernel(chunk_student, chunk_teacher, n, cols, cfg, grad_scale, chunk_in,
                      grad_student ? grad_student + at : nullptr, grad_teacher ? grad_teacher + at : nullptr, stream);
    check(cudaGetLastError(), "the row kernel");
  }
  if (finalize) {
    finalize_loss_kernel<<<1, kThreads, 0, stream>>>(in.row_loss, rows, column_rho, cols, cfg.column_coef, a.loss);
    check(cudaGetLastError(), "the loss reduction");
  }
  return column_rho;
}

// Logit standardization (section 3b): the rows standardized into the workspace, steps 1–3
// on them (a float student, a dense float teacher, no CE, fp32 gradients dL/dz into the
// workspace), the standardization's backward with CE on the raw logits, then step 4.
// The inner pipeline's workspace regions are the layout's own (l holds both).
template <typename s_t, typename Teacher>
void launch_standardized(const FusedLossArgs& a, const Layout& l, const Teacher& teacher) {
  using t_t = typename Teacher::grad_type;
  const LossConfig& cfg = a.config;
  char* ws = static_cast<char*>(a.workspace);
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  const int64_t rows = a.rows, cols = a.cols;
  float* z_s = reinterpret_cast<float*>(ws + l.z_s);
  float* z_t = reinterpret_cast<float*>(ws + l.z_t);
  auto* stats = reinterpret_cast<RowStandardization*>(ws + l.standardized);
  const s_t* student = static_cast<const s_t*>(a.student);
  standardize_rows_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(student, teacher, cols, z_s, z_t,
                                                                                 stats);
  check(cudaGetLastError(), "the logit standardization");
  s_t* grad_student = cfg.student_grad ? static_cast<s_t*>(a.grad_student) : nullptr;
  t_t* grad_teacher = cfg.teacher_grad ? static_cast<t_t*>(a.grad_teacher) : nullptr;
  float* g_s = grad_student ? reinterpret_cast<float*>(ws + l.g_s) : nullptr;
  float* g_t = grad_teacher ? reinterpret_cast<float*>(ws + l.g_t) : nullptr;
  FusedLossArgs inner = a;
  inner.student = z_s;
  inner.student_type = LogitType::kFloat32;
  inner.teacher = z_t;
  inner.teacher_type = LogitType::kFloat32;
  inner.teacher_indices = nullptr;
  inner.teacher_fill = nullptr;
  inner.teacher_k = 0;
  inner.config.ce_coef = 0.0f;  // on the raw logits, below
  inner.config.standardize = false;
  inner.config.student_grad = g_s != nullptr;
  inner.config.teacher_grad = g_t != nullptr;
  inner.grad_student = g_s;
  inner.grad_teacher = g_t;
  double* column_rho = launch<float>(inner, l, DenseTeacherRows<float>{z_t}, false);
  const float grad_scale = 1.0f / static_cast<float>(rows);
  float* row_loss = reinterpret_cast<float*>(ws + l.row_loss);
  standardize_backward_kernel<<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
      student, z_s, z_t, g_s, g_t, stats, a.target, cols, cfg.ce_coef, grad_scale, row_loss, grad_student,
      grad_teacher);
  check(cudaGetLastError(), "the logit standardization's gradient");
  finalize_loss_kernel<<<1, kThreads, 0, stream>>>(row_loss, rows, column_rho, cols, cfg.column_coef, a.loss);
  check(cudaGetLastError(), "the loss reduction");
}

template <typename F>
void dispatch(LogitType type, F&& f) {
  switch (type) {
    case LogitType::kFloat32: return f(float{});
    case LogitType::kFloat16: return f(__half{});
    case LogitType::kBFloat16: return f(__nv_bfloat16{});
  }
  throw std::runtime_error("kdfast CUDA fused loss: unknown logit dtype code");
}

}  // namespace

int cuda_runtime_version() { return CUDART_VERSION; }

int cuda_driver_version() {
  int version = 0;
  if (cudaDriverGetVersion(&version) != cudaSuccess) return 0;
  return version;
}

namespace {
// The sizes every entry point accepts: one block per row (a 1-D grid of at most 2^31 − 1).
// CUB's segmented sort counts items and offsets in int: each Spearman pass sorts at most
// max(kSpearmanChunkLogits, C) < 2^31 logits.
void check_sizes(int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) throw std::runtime_error("kdfast CUDA fused loss: empty logits");
  if (rows > 2147483647 || cols > 2147483647) {
    throw std::runtime_error("kdfast CUDA fused loss: at most 2^31 - 1 rows and 2^31 - 1 classes");
  }
}

// A sparse teacher's arguments (the kernels' bounds rest on 1 ≤ k ≤ C: SparseTeacherRows).
// Host-only, before any device call.
void check_sparse_teacher(const FusedLossArgs& a) {
  const char* where = "kdfast CUDA fused loss: ";
  if (a.teacher_indices == nullptr) {
    if (a.teacher_fill != nullptr || a.teacher_k != 0) {
      throw std::runtime_error(std::string(where) + "teacher_fill and teacher_k are for a sparse teacher only "
                               "(teacher_indices is null)");
    }
    return;
  }
  if (a.teacher_fill == nullptr) throw std::runtime_error(std::string(where) + "a sparse teacher needs teacher_fill");
  if (a.teacher_type != LogitType::kFloat32) {
    throw std::runtime_error(std::string(where) + "a sparse teacher's values must be float32");
  }
  if (a.teacher_k < 1 || a.teacher_k > a.cols) {
    throw std::runtime_error(std::string(where) + "a sparse teacher needs 1 <= k <= C, got k=" +
                             std::to_string(a.teacher_k) + " for C=" + std::to_string(a.cols));
  }
  if (a.config.teacher_grad || a.grad_teacher != nullptr) {
    throw std::runtime_error(std::string(where) + "a sparse teacher has no gradient (teacher_grad must be false)");
  }
}
}  // namespace

// The Spearman steps' part is bounded at any B (fused_loss_cuda.h: spearman_chunk_rows).
size_t fused_loss_workspace_bytes(int64_t rows, int64_t cols, const LossConfig& config, int device) {
  check_sizes(rows, cols);
  check(cudaSetDevice(device), "selecting the tensors' device");
  return layout(rows, cols, config, device).total;
}

void fused_loss(const FusedLossArgs& args) {
  check_sizes(args.rows, args.cols);
  check_sparse_teacher(args);
  // The chunked row layout takes the column term's rows without an argmax (as every
  // entry point already refuses the combination).
  if (args.config.rectify && args.config.column_coef != 0.0f) {
    throw std::runtime_error("kdfast CUDA fused loss: rectification does not combine with the column term");
  }
  const bool dkd = args.config.tckd_coef != 0.0f || args.config.nckd_coef != 0.0f;
  if ((dkd || args.config.standardize) && args.cols < 2) {
    throw std::runtime_error("kdfast CUDA fused loss: the DKD terms and logit standardization need at least 2 "
                             "classes, got " + std::to_string(args.cols));
  }
  if (dkd && args.target == nullptr) throw std::runtime_error("kdfast CUDA fused loss: the DKD terms need a target");
  // This module links the CUDA runtime statically; selecting the device makes that
  // device's primary context (PyTorch's too) current. The Python caller runs this inside
  // torch.cuda.device(...), which restores PyTorch's current device afterwards.
  check(cudaSetDevice(args.device), "selecting the tensors' device");
  const Layout l = layout(args.rows, args.cols, args.config, args.device);
  const bool standardize = args.config.standardize;
  auto run = [&](auto s_tag, const auto& teacher) {
    using s_t = decltype(s_tag);
    if (standardize) {
      launch_standardized<s_t>(args, l, teacher);
    } else {
      launch<s_t>(args, l, teacher);
    }
  };
  if (args.teacher_indices != nullptr) {
    const SparseTeacherRows teacher{static_cast<const float*>(args.teacher), args.teacher_indices, args.teacher_fill,
                                    args.teacher_k};
    dispatch(args.student_type, [&](auto s_tag) { run(s_tag, teacher); });
    return;
  }
  dispatch(args.student_type, [&](auto s_tag) {
    dispatch(args.teacher_type, [&](auto t_tag) {
      using t_t = decltype(t_tag);
      run(s_tag, DenseTeacherRows<t_t>{static_cast<const t_t*>(args.teacher)});
    });
  });
}

}  // namespace cuda
}  // namespace kdfast
