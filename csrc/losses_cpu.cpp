// Fused CPU kernels of every kdfast loss (the generic loss of losses.h): one pass over
// each row computes its loss terms and writes dL/ds (and dL/dt when asked), in parallel
// over rows. A row is upcast once into thread-local float buffers, so all arithmetic runs
// in fp32 on cache-resident data; the only B×C outputs are the gradients themselves.
// The intra-class (column) correlation needs statistics across rows: two extra passes
// accumulate them per fixed chunk of rows (so the result does not depend on the number
// of threads), before the row pass uses them.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "losses.h"

namespace kdfast {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// exp(x) for float, branch-free so that loops over it vectorize (with -fno-trapping-math):
// Cephes' range reduction and degree-6 polynomial, within 1e-7 relative of exp; exact 0
// below the float range, inf above. A NaN propagates through the polynomial.
inline __attribute__((always_inline)) float vexp(float x) {
  constexpr float hi = 88.3762626647949f, lo = -87.3365447505531f;
  float xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
  const float r = xc - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  float out = p * scale;
  out = x < lo ? 0.0f : out;
  return x > hi ? kInf : out;
}

// A std::vector-like buffer of trivially copyable T whose memory comes from PyTorch's CPU
// allocator, so that allocation profilers (and the benchmarks' peak-memory figures) count
// the kernels' scratch too. Contents start uninitialized unless assigned.
template <typename T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(int64_t n) { resize(n); }
  void resize(int64_t n) {
    storage_ = at::empty({n * static_cast<int64_t>(sizeof(T))}, at::TensorOptions().dtype(at::kByte));
    data_ = reinterpret_cast<T*>(storage_.data_ptr());
  }
  void assign(int64_t n, T value) {
    resize(n);
    std::fill(data_, data_ + n, value);
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  T& operator[](int64_t i) { return data_[i]; }
  const T& operator[](int64_t i) const { return data_[i]; }

 private:
  at::Tensor storage_;
  T* data_ = nullptr;
};

// Per-thread buffers for one row at a time (allocated once per parallel task).
struct RowScratch {
  Buffer<float> s, t, p, q, softmax1, grad, out, tilde_p, tilde_q;
  // Spearman terms: sort keys and orders, soft ranks in sorted order, teacher ranks in
  // original order, the PAV stack.
  Buffer<uint64_t> items, items_tmp;
  Buffer<int32_t> order;
  Buffer<float> teacher_ranks, u_sorted, grad_z;
  Buffer<double> ranks, z_sorted;
  Buffer<int64_t> block_start;
  Buffer<int32_t> block_of;
  Buffer<double> block_a, block_b;

  RowScratch(int64_t n, bool spearman)
      : s(n), t(n), p(n), q(n), softmax1(n), grad(n), out(n), tilde_p(n), tilde_q(n) {
    if (spearman) {
      items.resize(n), items_tmp.resize(n), order.resize(n), ranks.resize(n), teacher_ranks.resize(n);
      u_sorted.resize(n), z_sorted.resize(n);
      grad_z.resize(n);
      block_start.resize(n), block_of.resize(n), block_a.resize(n), block_b.resize(n);
    }
  }
};

// Rows up to this length are sorted by comparison instead of by radix.
constexpr int64_t kComparisonSortMax = 64;

// Stable LSD radix sort (8-bit digits) of x into ascending order. Returns the sorted
// items, each one 64-bit word: the order-preserving key of x_i (ascending_key of x_i + 0,
// so that −0 and +0 get one key, as they compare equal) above the index i.
const uint64_t* radix_sort(const float* x, int64_t n, RowScratch& w) {
  uint64_t* items = w.items.data();
  uint64_t* items_tmp = w.items_tmp.data();
  if (n <= kComparisonSortMax) {
    // Short rows: the four 256-bucket passes would cost more than the row. The items are
    // distinct (the index is in the low bits), so any comparison sort of them gives the
    // stable radix sort's exact order.
    for (int64_t i = 0; i < n; ++i) {
      items[i] = (static_cast<uint64_t>(ascending_key(x[i] + 0.0f)) << 32) | static_cast<uint32_t>(i);
    }
    std::sort(items, items + n);
    return items;
  }
  uint32_t histogram[4][256] = {};
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t key = ascending_key(x[i] + 0.0f);
    items[i] = (static_cast<uint64_t>(key) << 32) | static_cast<uint32_t>(i);
    ++histogram[0][key & 255u];
    ++histogram[1][(key >> 8) & 255u];
    ++histogram[2][(key >> 16) & 255u];
    ++histogram[3][key >> 24];
  }
  for (int digit = 0; digit < 4; ++digit) {
    uint32_t* counts = histogram[digit];
    if (*std::max_element(counts, counts + 256) == static_cast<uint32_t>(n)) continue;  // one bucket: no-op pass
    uint32_t offset = 0;
    for (int bucket = 0; bucket < 256; ++bucket) {
      const uint32_t c = counts[bucket];
      counts[bucket] = offset;
      offset += c;
    }
    const int shift = 32 + 8 * digit;
#pragma GCC unroll 4
    for (int64_t i = 0; i < n; ++i) {
      const uint64_t item = items[i];
      items_tmp[counts[(item >> shift) & 255u]++] = item;
    }
    std::swap(items, items_tmp);
  }
  return items;
}

inline int32_t item_index(uint64_t item) { return static_cast<int32_t>(item & 0xffffffffu); }
inline uint32_t item_key(uint64_t item) { return static_cast<uint32_t>(item >> 32); }

// The intra-class term's per-column correlations (as gradient coefficients, see
// Correlation), with the centered means they use; one entry per class.
struct ColumnStats {
  Buffer<float> mean_p, mean_q, cross, self_p, self_q;
  float loss = 0.0f;  // column_coef · (1 − mean ρ)
};

// Upcasts a row of logits into `x` (an aligned buffer) and returns its max.
template <typename in_t>
float upcast_row(const in_t* in, int64_t n, float* x) {
  float max = -kInf;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = static_cast<float>(in[j]);
    max = x[j] > max ? x[j] : max;
  }
  return max;
}

// Logit standardization of one upcast row, in place: x_j ← (x_j − mean)·a with
// a = 1/(std + 1e-7) and the unbiased std (moments in double). Returns what the gradient
// needs and the new max. A constant row becomes zeros.
struct Standardization {
  float scale = 1.0f;          // a
  double inv_std_dof = 0.0;    // 1/((n − 1)·std), 0 for a constant row (std's gradient taken as 0)
};

inline float standardize_row(float* x, int64_t n, Standardization* out) {
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += x[j];
  const double mean = sum / static_cast<double>(n);
  double squares = 0.0;
#pragma omp simd reduction(+ : squares)
  for (int64_t j = 0; j < n; ++j) squares += (x[j] - mean) * (x[j] - mean);
  const double std = std::sqrt(squares / static_cast<double>(n - 1));
  const double scale = 1.0 / (std + kStandardizeEps);
  float max = -kInf;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < n; ++j) {
    x[j] = static_cast<float>((x[j] - mean) * scale);
    max = x[j] > max ? x[j] : max;
  }
  out->scale = static_cast<float>(scale);
  out->inv_std_dof = std > 0.0 ? 1.0 / (static_cast<double>(n - 1) * std) : 0.0;
  return max;
}

// The gradient through standardize_row: g holds dL/dz for z the standardized row, and
// becomes dL/dx = a·(g − ḡ) − z·<g, z>/((n − 1)·std).
inline void standardize_backward(const float* z, int64_t n, const Standardization& st, float* g) {
  double g_sum = 0.0, gz = 0.0;
#pragma omp simd reduction(+ : g_sum, gz)
  for (int64_t j = 0; j < n; ++j) {
    g_sum += g[j];
    gz += static_cast<double>(g[j]) * z[j];
  }
  const double g_mean = g_sum / static_cast<double>(n), factor = gz * st.inv_std_dof;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) g[j] = static_cast<float>(st.scale * (g[j] - g_mean) - z[j] * factor);
}

// Where the kernels read teacher row i from, as fp32 into an aligned buffer (returning
// its max, as upcast_row does). Both kinds give the same float row to everything after:
// the KL, correlations, ranks and rectification never see which one it was.
template <typename t_t>
struct DenseTeacherRows {
  const t_t* logits;  // [B, C]
  int64_t n;
  float upcast(int64_t row, float* out) const { return upcast_row(logits + row * n, n, out); }
};

// A sparse (cached) teacher: k logits per row at k distinct classes, and one fill logit
// for the other C − k classes (kdfast.sparse_teacher). The row is rebuilt in the thread's
// scratch buffer, so no dense B×C teacher exists; the indices are range-checked by the
// operator before any row is built.
struct SparseTeacherRows {
  const float* values;    // [B, k]
  const int32_t* indices;  // [B, k]
  const float* fill;      // [B]
  int64_t k, n;
  float upcast(int64_t row, float* out) const {
    std::fill(out, out + n, fill[row]);
    const float* v = values + row * k;
    const int32_t* c = indices + row * k;
    for (int64_t j = 0; j < k; ++j) out[c[j]] = v[j];
    return upcast_row(out, n, out);  // the max by the dense path's own loop
  }
};

// exp((x_j − max)·it) of an upcast student row s and teacher row t (aligned buffers) into
// p and q, and their sums, in one loop (the two exps interleave). The row kernel and the
// column statistics both compute a row pair's probabilities with it (then scaled by
// 1/sum), so the same logits give bit-identical probabilities in both, wherever the rows
// lie in memory: a constant column then centers to exactly zero, and its correlation's
// 1/1e-8 gradient factor multiplies an exact 0 rather than rounding.
struct RowSums {
  float s, t;
};
inline RowSums exp_rows(const float* s, const float* t, int64_t n, float s_max, float t_max, float it, float* p,
                        float* q) {
  float s_sum = 0.0f, t_sum = 0.0f;
#pragma omp simd reduction(+ : s_sum, t_sum)
  for (int64_t j = 0; j < n; ++j) {
    p[j] = vexp((s[j] - s_max) * it);
    q[j] = vexp((t[j] - t_max) * it);
    s_sum += p[j];
    t_sum += q[j];
  }
  return {s_sum, t_sum};
}

// A student and teacher row's probabilities softmax(x·it) into p and q, through the same
// steps as the row kernel (s, t: upcast scratch).
template <typename s_t, typename Teacher>
void row_probabilities(const s_t* s_in, const Teacher& teacher, int64_t row, int64_t n, float it, bool standardize,
                       float* s, float* t, float* p, float* q) {
  float s_max = upcast_row(s_in, n, s), t_max = teacher.upcast(row, t);
  if (standardize) {  // as the row kernel does (same steps, same bits)
    Standardization unused;
    s_max = standardize_row(s, n, &unused);
    t_max = standardize_row(t, n, &unused);
  }
  const RowSums sums = exp_rows(s, t, n, s_max, t_max, it, p, q);
  const float s_inv_sum = 1.0f / sums.s, t_inv_sum = 1.0f / sums.t;
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    p[j] *= s_inv_sum;
    q[j] *= t_inv_sum;
  }
}

// Rows per chunk of the column statistics: a fixed function of B, so the summation order
// (and the result) does not depend on the number of threads. Each chunk keeps 5 doubles
// per class; at least 64 rows per chunk bounds that at 10/64 of the gradient's size.
int64_t column_chunk_rows(int64_t rows) { return std::max<int64_t>(64, (rows + 63) / 64); }

// The intra-class term needs, per class c, the correlation of p_:,c with q_:,c over the
// batch. One pass over the logits: each fixed chunk of rows updates, row by row and
// vectorized across classes, Welford's running means and co-moments of a = p − p_0 and
// b = q − q_0 (shifted by row 0, so that a constant column centers to exactly zero);
// then the chunks are merged in order with Chan et al.'s pairwise update.
template <typename s_t, typename Teacher>
ColumnStats column_stats(const s_t* student, const Teacher& teacher, int64_t rows, int64_t n, const LossConfig& cfg) {
  const float it = cfg.inv_temperature;
  const int64_t chunk = column_chunk_rows(rows);
  const int64_t chunks = (rows + chunk - 1) / chunk;
  Buffer<float> p0(n), q0(n), s0(n), t0(n);
  row_probabilities(student, teacher, 0, n, it, cfg.standardize, s0.data(), t0.data(), p0.data(), q0.data());
  // Per chunk: mean_a, mean_b, Σ (a−ā)(b−b̄), Σ (a−ā)², Σ (b−b̄)², each over its rows.
  Buffer<double> moments;
  moments.assign(chunks * 5 * n, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    Buffer<float> pe(n), qe(n), se(n), te(n);
    for (int64_t c = first; c < last; ++c) {
      double* mean_a = moments.data() + c * 5 * n;
      double* mean_b = mean_a + n;
      double* ab = mean_b + n;
      double* aa = ab + n;
      double* bb = aa + n;
      int64_t count = 0;
      for (int64_t i = c * chunk; i < std::min(rows, (c + 1) * chunk); ++i) {
        row_probabilities(student + i * n, teacher, i, n, it, cfg.standardize, se.data(), te.data(), pe.data(),
                          qe.data());
        const double inv_count = 1.0 / static_cast<double>(++count);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          const double a = pe[j] - p0[j], b = qe[j] - q0[j];
          const double da = a - mean_a[j], db = b - mean_b[j];
          mean_a[j] += da * inv_count;
          mean_b[j] += db * inv_count;
          ab[j] += da * (b - mean_b[j]);
          aa[j] += da * (a - mean_a[j]);
          bb[j] += db * (b - mean_b[j]);
        }
      }
    }
  });
  ColumnStats stats;
  for (Buffer<float>* column : {&stats.mean_p, &stats.mean_q, &stats.cross, &stats.self_p, &stats.self_q}) {
    column->resize(n);
  }
  double rho_sum = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    double count = 0.0, mean_a = 0.0, mean_b = 0.0, ab = 0.0, aa = 0.0, bb = 0.0;
    for (int64_t c = 0; c < chunks; ++c) {
      const double* m = moments.data() + c * 5 * n;
      const double rows_c = static_cast<double>(std::min(rows, (c + 1) * chunk) - c * chunk);
      const double total = count + rows_c;
      const double da = m[j] - mean_a, db = m[n + j] - mean_b;
      const double weight = count * rows_c / total;
      ab += m[2 * n + j] + da * db * weight;
      aa += m[3 * n + j] + da * da * weight;
      bb += m[4 * n + j] + db * db * weight;
      mean_a += da * rows_c / total;
      mean_b += db * rows_c / total;
      count = total;
    }
    stats.mean_p[j] = static_cast<float>(p0[j] + mean_a);
    stats.mean_q[j] = static_cast<float>(q0[j] + mean_b);
    const Correlation corr = correlation(ab, aa, bb);
    stats.cross[j] = corr.cross;
    stats.self_p[j] = corr.self_a;
    stats.self_q[j] = corr.self_b;
    rho_sum += corr.rho;
  }
  stats.loss = static_cast<float>(cfg.column_coef * (1.0 - rho_sum / static_cast<double>(n)));
  return stats;
}

// The soft Spearman correlation of one row (standardized student logits s against the
// teacher t's average ranks), and, when `grad_coef` ≠ 0, grad_coef · dρ_S/ds into
// w.grad_z (original order). Works in the student's descending order k, so that every
// loop after the sorts runs over contiguous buffers. The standardized logits, θ = ẑ/ε and
// the soft ranks are kept in double: θ − (n, ..., 1) has magnitude ~n, and in float the
// rounding would move pool-adjacent-violators' merge decisions (and with them the
// piecewise-constant gradient) away from the exact ones.
double spearman_row(const float* s, const float* t, int64_t n, float strength, float grad_coef, RowScratch& w) {
  const double inv_n = 1.0 / static_cast<double>(n);
  // Standardize, centering on the first element so that a constant row is exactly zero.
  const double s0 = s[0];
  double shift_sum = 0.0;
#pragma omp simd reduction(+ : shift_sum)
  for (int64_t j = 0; j < n; ++j) shift_sum += s[j] - s0;
  const double mean_shift = shift_sum * inv_n;
  double variance = 0.0;
#pragma omp simd reduction(+ : variance)
  for (int64_t j = 0; j < n; ++j) {
    const double x = (s[j] - s0) - mean_shift;
    variance += x * x;
  }
  variance *= inv_n;
  const bool varying = variance > 0.0;
  const double std_dev = varying ? std::sqrt(variance) : 1.0;
  const double z_scale = varying ? 1.0 / std_dev : 0.0;  // a constant row standardizes to zeros

  // Sort descending (standardization keeps the order of s).
  int32_t* order = w.order.data();
  const uint64_t* sorted = radix_sort(s, n, w);
  for (int64_t k = 0; k < n; ++k) order[k] = item_index(sorted[n - 1 - k]);
  // The teacher's hard ranks, ties (equal keys) sharing their average rank.
  sorted = radix_sort(t, n, w);
  float* t_ranks = w.teacher_ranks.data();
  for (int64_t k = 0; k < n;) {
    int64_t end = k + 1;
    while (end < n && item_key(sorted[end]) == item_key(sorted[k])) ++end;
    const float average = 0.5f * static_cast<float>(k + 1 + end);
    for (int64_t m = k; m < end; ++m) t_ranks[item_index(sorted[m])] = average;
    k = end;
  }
  float* u = w.u_sorted.data();  // teacher ranks in the student's descending order
  double* z = w.z_sorted.data();
  double* ranks = w.ranks.data();  // θ = ẑ/ε in descending order, then the soft ranks
  const double inv_strength = 1.0 / static_cast<double>(strength);
  for (int64_t k = 0; k < n; ++k) {
    const int32_t j = order[k];
    u[k] = t_ranks[j];
    z[k] = ((s[j] - s0) - mean_shift) * z_scale;
    ranks[k] = z[k] * inv_strength;
  }
  // Soft ranks: pool-adjacent-violators on θ − (n, n−1, ..., 1), rank = θ − block value.
  PavBlocks<false> blocks{w.block_start.data(), w.block_a.data(), w.block_b.data()};
  pav<false>(n, [&](int64_t k) { return ranks[k]; }, [&](int64_t k) { return static_cast<double>(n - k); }, blocks);
  // Each element's block, without a data-dependent branch (blocks are mostly 1–3 long):
  // flags at block starts, then a running count.
  int32_t* block_of = w.block_of.data();
  double* block_value = w.block_b.data();  // the counts are no longer needed: values in place
  std::fill(block_of, block_of + n, 0);
  for (int64_t b = 1; b < blocks.count; ++b) block_of[blocks.start[b]] = 1;
  for (int64_t k = 1; k < n; ++k) block_of[k] += block_of[k - 1];
  for (int64_t b = 0; b < blocks.count; ++b) block_value[b] = blocks.value(b);
  for (int64_t k = 0; k < n; ++k) ranks[k] -= block_value[block_of[k]];

  // Pearson correlation of the soft ranks with the teacher ranks, from sums shifted by
  // the first element (in double; a constant row gives exactly zero spread).
  const double r0 = ranks[0], u0 = u[0];
  double sr = 0.0, su = 0.0, srr = 0.0, suu = 0.0, sru = 0.0;
#pragma omp simd reduction(+ : sr, su, srr, suu, sru)
  for (int64_t k = 0; k < n; ++k) {
    const double a = ranks[k] - r0, b = u[k] - u0;
    sr += a;
    su += b;
    srr += a * a;
    suu += b * b;
    sru += a * b;
  }
  const double r_mean = r0 + sr * inv_n, u_mean = u0 + su * inv_n;
  const Correlation corr = correlation(sru - sr * su * inv_n, srr - sr * sr * inv_n, suu - su * su * inv_n);
  if (grad_coef == 0.0f) return corr.rho;

  // Backward through the Pearson correlation and the soft rank's vector-Jacobian product
  // (g minus its block mean, / ε), block by block; then the standardization, scattered
  // back to the original order.
  float* grad_z = w.grad_z.data();
  if (!varying) {
    std::fill(grad_z, grad_z + n, 0.0f);
    return corr.rho;
  }
  double* g = w.ranks.data();  // reuses the ranks' buffer, in place
  double* prefix = w.block_a.data();  // Σ g over [0, k), then each block's mean of g
  double running = 0.0;
  for (int64_t k = 0; k < n; ++k) {
    g[k] = grad_coef * (corr.cross * (u[k] - u_mean) - corr.self_a * (g[k] - r_mean));
    prefix[k] = running;
    running += g[k];
  }
  double* block_mean = w.block_b.data();
  for (int64_t b = 0; b < blocks.count; ++b) {
    const int64_t begin = blocks.start[b], end = blocks.end(b, n);
    block_mean[b] = ((end < n ? prefix[end] : running) - prefix[begin]) / static_cast<double>(end - begin);
  }
  double g_sum = 0.0, gz_sum = 0.0;
#pragma omp simd reduction(+ : g_sum, gz_sum)
  for (int64_t k = 0; k < n; ++k) {
    g[k] = (g[k] - block_mean[block_of[k]]) * inv_strength;
    g_sum += g[k];
    gz_sum += g[k] * z[k];
  }
  const double g_mean = g_sum * inv_n, gz_mean = gz_sum * inv_n;
  for (int64_t k = 0; k < n; ++k) grad_z[order[k]] = static_cast<float>((g[k] - g_mean - z[k] * gz_mean) * z_scale);
  return corr.rho;
}

// One row of the generic loss: returns ℓ_i and writes grad_scale-scaled gradients of ℓ_i
// (plus the column term's share of this row, already scaled) into gs / gt.
template <typename s_t, typename t_t, typename Teacher>
float fused_row(const s_t* s_in, const Teacher& teacher, int64_t row, int64_t n, int64_t target, float difficulty,
                const LossConfig& cfg, const ColumnStats* columns, float grad_scale, RowScratch& w, s_t* gs,
                t_t* gt) {
  float* s = w.s.data();
  float* t = w.t.data();
  float* p = w.p.data();
  float* q = w.q.data();
  const float it = cfg.inv_temperature;
  const float inv_n = 1.0f / static_cast<float>(n);
  const bool has_target = target >= 0 && target < n;
  const bool dkd = cfg.tckd_coef != 0.0f || cfg.nckd_coef != 0.0f;
  if ((cfg.ce_coef != 0.0f || cfg.rectify || dkd) && !has_target) {
    // Only reachable when the caller skipped the range check (a compiled graph asserts
    // it on the device): NaN everywhere rather than an out-of-bounds read.
    constexpr float nan = std::numeric_limits<float>::quiet_NaN();
    if (cfg.student_grad) std::fill(gs, gs + n, static_cast<s_t>(nan));
    if (cfg.teacher_grad) std::fill(gt, gt + n, static_cast<t_t>(nan));
    return nan;
  }

  float s_max = upcast_row(s_in, n, s), t_max = teacher.upcast(row, t);
  // CE sees the raw student logits: its softmax at τ = 1 is taken before any standardization.
  float* softmax1 = w.softmax1.data();
  float ce_loss = 0.0f;
  if (cfg.ce_coef != 0.0f) {
    float sum1 = 0.0f;
#pragma omp simd reduction(+ : sum1)
    for (int64_t j = 0; j < n; ++j) {
      softmax1[j] = vexp(s[j] - s_max);
      sum1 += softmax1[j];
    }
    const float inv_sum1 = 1.0f / sum1;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) softmax1[j] *= inv_sum1;
    ce_loss = cfg.ce_coef * (std::log(sum1) + s_max - s[target]);
  }
  Standardization s_standard, t_standard;
  if (cfg.standardize) {
    s_max = standardize_row(s, n, &s_standard);
    t_max = standardize_row(t, n, &t_standard);
  }
  // DR-KD rectification: the teacher's (first) max logit and the target's logit trade
  // places; the max, the softmax normalizer and everything else of the row are unchanged.
  int64_t t_argmax = 0;
  if (cfg.rectify) {
    while (t_argmax + 1 < n && !(t[t_argmax] == t_max)) ++t_argmax;
  }
  const bool swapped = cfg.rectify && t_argmax != target;
  if (swapped) std::swap(t[t_argmax], t[target]);

  const RowSums sums = exp_rows(s, t, n, s_max, t_max, it, p, q);
  const float s_sum = sums.s, t_sum = sums.t;
  const float s_log_sum = std::log(s_sum), t_log_sum = std::log(t_sum);
  const float s_inv_sum = 1.0f / s_sum, t_inv_sum = 1.0f / t_sum;
  // log q_j − log p_j, from the logits: finite whenever the logits are, even where the
  // probabilities underflow (so q_j = 0 contributes 0 · finite to the KL).
  // In double: the teacher's KL gradient q_j·(log q_j − log p_j − KL) cancels where q
  // concentrates, so both terms need more than float precision.
  // The logs too: at τ = 100 a float log's rounding alone, times τ², moved the loss of two
  // nearly equal rows by 6e-4.
  const double log_sum_difference = std::log(static_cast<double>(s_sum)) - std::log(static_cast<double>(t_sum));
  auto log_ratio = [&](int64_t j) {
    return (static_cast<double>(t[j] - t_max) - static_cast<double>(s[j] - s_max)) * it + log_sum_difference;
  };
  float p_shift = 0.0f, q_shift = 0.0f;
  const float p0 = p[0] * s_inv_sum, q0 = q[0] * t_inv_sum;
#pragma omp simd reduction(+ : p_shift, q_shift)
  for (int64_t j = 0; j < n; ++j) {
    p[j] *= s_inv_sum;
    q[j] *= t_inv_sum;
    p_shift += p[j] - p0;
    q_shift += q[j] - q0;
  }
  double kl = 0.0, entropy = 0.0;
  if (cfg.kl_coef != 0.0f) {
    // q_j = 0 (a −inf teacher logit, or underflow) adds nothing, never 0·(−inf).
#pragma omp simd reduction(+ : kl)
    for (int64_t j = 0; j < n; ++j) kl += q[j] > 0.0f ? q[j] * log_ratio(j) : 0.0;
  }
  if (cfg.difficulty_mode == kDifficultyEntropy) {
#pragma omp simd reduction(+ : entropy)
    for (int64_t j = 0; j < n; ++j) entropy -= q[j] > 0.0f ? q[j] * ((t[j] - t_max) * it - t_log_sum) : 0.0f;
  }

  float loss = ce_loss;
  // KL ≥ 0; rounding can take a near-zero row below it at a large τ (the gradient below
  // keeps the unclamped kl, as every backend does).
  if (cfg.kl_coef != 0.0f) loss += cfg.kl_coef * static_cast<float>(kl < 0.0 ? 0.0 : kl);  // NaN stays NaN

  // DKD. The non-target distributions p̃, q̃ are softmaxes of their own logits (relative to
  // the non-target maximum), so they stay exact when the target holds all but an
  // underflowing sliver of the mass (a logit gap beyond ~87·τ), and every log comes from
  // logits: log P, log(1 − P) = log Σ_{j≠y} e^{z_j} − log Σ_j e^{z_j}, in double.
  double log_p_target = 0.0, log_q_target = 0.0, log_p_rest = 0.0, log_q_rest = 0.0, q_rest = 0.0, nckd = 0.0;
  double rest_shift = 0.0;  // log Σ_{j≠y} e^{(s_j − s_rest_max)·it} − the teacher's
  float s_rest_max = -kInf, t_rest_max = -kInf;
  float* tilde_p = w.tilde_p.data();
  float* tilde_q = w.tilde_q.data();
  // log q̃_j − log p̃_j, from the logits.
  auto rest_ratio = [&](int64_t j) {
    return (static_cast<double>(t[j] - t_rest_max) - static_cast<double>(s[j] - s_rest_max)) * it + rest_shift;
  };
  if (dkd) {
#pragma omp simd reduction(max : s_rest_max, t_rest_max)
    for (int64_t j = 0; j < n; ++j) {
      s_rest_max = std::max(s_rest_max, j != target ? s[j] : -kInf);
      t_rest_max = std::max(t_rest_max, j != target ? t[j] : -kInf);
    }
    const double s_log_total = std::log(static_cast<double>(s_sum)), t_log_total = std::log(static_cast<double>(t_sum));
    // log Σ_{j≠y} e^{(x_j − x_rest_max)·it} of one side. When the non-target maximum is
    // within kReuseGap/it of the row maximum (always, unless the target dominates), the
    // non-target softmax is the row's, renormalized: p̃_j = p_j / Σ_{j≠y} p_j, the sum of
    // positive terms without cancellation; its largest entry is then ≥ e^{−kReuseGap}/C,
    // far inside float's normal range, and entries that underflow in p but not in a
    // softmax of their own are below e^{−87} relative to it (nothing a float sum keeps).
    // Otherwise its own exps, relative to the non-target maximum (exact however large the gap).
    constexpr float kReuseGap = 40.0f;
    auto non_target_softmax = [&](const float* x, const float* probs, float x_max, float x_rest_max,
                                  double log_total, float* tilde) -> double {
      if ((x_rest_max - x_max) * it > -kReuseGap) {
        float rest = 0.0f;
#pragma omp simd reduction(+ : rest)
        for (int64_t j = 0; j < n; ++j) rest += j != target ? probs[j] : 0.0f;
        const float inv_rest = 1.0f / rest;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) tilde[j] = j != target ? probs[j] * inv_rest : 0.0f;
        return std::log(static_cast<double>(rest)) + log_total - static_cast<double>(x_rest_max - x_max) * it;
      }
      float rest = 0.0f;
#pragma omp simd reduction(+ : rest)
      for (int64_t j = 0; j < n; ++j) {
        tilde[j] = j != target ? vexp((x[j] - x_rest_max) * it) : 0.0f;
        rest += tilde[j];
      }
      const float inv_rest = 1.0f / rest;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) tilde[j] *= inv_rest;
      return std::log(static_cast<double>(rest));
    };
    const double s_rest_log = non_target_softmax(s, p, s_max, s_rest_max, s_log_total, tilde_p);
    const double t_rest_log = non_target_softmax(t, q, t_max, t_rest_max, t_log_total, tilde_q);
    log_p_target = static_cast<double>(s[target] - s_max) * it - s_log_total;
    log_q_target = static_cast<double>(t[target] - t_max) * it - t_log_total;
    log_p_rest = static_cast<double>(s_rest_max - s_max) * it + s_rest_log - s_log_total;
    log_q_rest = static_cast<double>(t_rest_max - t_max) * it + t_rest_log - t_log_total;
    q_rest = std::exp(log_q_rest);
    const double q_target = std::exp(log_q_target);
    // TCKD: KL of the two-class splits; a zero-probability side adds 0 (never 0·∞).
    double tckd = 0.0;
    if (q_target > 0.0) tckd += q_target * (log_q_target - log_p_target);
    if (q_rest > 0.0) tckd += q_rest * (log_q_rest - log_p_rest);
    // NCKD = Σ_{j≠y} q̃_j (log q̃_j − log p̃_j).
    rest_shift = s_rest_log - t_rest_log;
#pragma omp simd reduction(+ : nckd)
    for (int64_t j = 0; j < n; ++j) nckd += tilde_q[j] > 0.0f ? tilde_q[j] * rest_ratio(j) : 0.0;
    loss += cfg.tckd_coef * static_cast<float>(tckd) + cfg.nckd_coef * static_cast<float>(nckd < 0.0 ? 0.0 : nckd);
  }

  float d = cfg.difficulty_value;
  if (cfg.difficulty_mode == kDifficultyEntropy) {
    d = static_cast<float>(std::min(1.0, std::max(0.0, entropy / std::log(static_cast<double>(n)))));
  } else if (cfg.difficulty_mode == kDifficultyPerSample) {
    d = difficulty;
  }

  const float p_mean = p0 + p_shift * inv_n, q_mean = q0 + q_shift * inv_n;
  // The terms are on by their coefficient, not by the value of their weight: a NaN or inf
  // difficulty times a zero coefficient must not switch on a term that was never prepared.
  const float pearson_weight = cfg.pearson_coef != 0.0f ? cfg.pearson_coef * (1.0f - d) : 0.0f;
  Correlation row_corr{0.0f, 0.0f, 0.0f, 0.0f};
  if (pearson_weight != 0.0f) {
    // Moments in double: near ρ = 1 the loss term 1 − ρ is ill-conditioned, and float
    // sums would leave it with an error of an ulp of ρ.
    double ab = 0.0, aa = 0.0, bb = 0.0;
#pragma omp simd reduction(+ : ab, aa, bb)
    for (int64_t j = 0; j < n; ++j) {
      const double a = p[j] - p_mean, b = q[j] - q_mean;
      ab += a * b;
      aa += a * a;
      bb += b * b;
    }
    row_corr = correlation(ab, aa, bb);
    loss += pearson_weight * static_cast<float>(1.0 - row_corr.rho);
  }

  const float spearman_weight = cfg.spearman_coef != 0.0f ? cfg.spearman_coef * d : 0.0f;
  const bool spearman_grad = spearman_weight != 0.0f && cfg.student_grad;
  if (spearman_weight != 0.0f) {
    const double rho_s = spearman_row(s, t, n, cfg.rank_strength, spearman_grad ? -spearman_weight * grad_scale : 0.0f, w);
    loss += spearman_weight * static_cast<float>(1.0 - rho_s);
  }
  if (!cfg.student_grad && !cfg.teacher_grad) return loss;

  // Gradients. The KL part in closed form: (p − q)/τ for the student, (q/τ)(log q − log p
  // − KL) for the teacher. The correlations give g = dℓ/dp (or dℓ/dq), which goes
  // through the softmax as (p/τ)(g − <p, g>).
  const float pearson_grad = -pearson_weight * grad_scale;
  const float column_grad = columns ? -cfg.column_coef * inv_n : 0.0f;
  const bool correlations = pearson_weight != 0.0f || columns;
  const float kl_grad = cfg.kl_coef * grad_scale * it;
  float* g = w.grad.data();
  // One side's dℓ/dx into `out`, for x = s (mine = p, other = q) or x = t (mine = q, other = p).
  auto side_gradient = [&](const float* mine, const float* other, float mine_mean, float other_mean,
                           float row_self, const float* column_mine_mean, const float* column_other_mean,
                           const float* column_self, float* out) {
    float mg = 0.0f;
    if (correlations) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        g[j] = pearson_grad * (row_corr.cross * (other[j] - other_mean) - row_self * (mine[j] - mine_mean));
      }
      if (columns) {
        const float* cross = columns->cross.data();
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) {
          g[j] += column_grad * (cross[j] * (other[j] - column_other_mean[j]) -
                                 column_self[j] * (mine[j] - column_mine_mean[j]));
        }
      }
#pragma omp simd reduction(+ : mg)
      for (int64_t j = 0; j < n; ++j) mg += mine[j] * g[j];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] += it * mine[j] * (g[j] - mg);
    }
  };
  const float* col_mean_p = columns ? columns->mean_p.data() : nullptr;
  const float* col_mean_q = columns ? columns->mean_q.data() : nullptr;
  // DKD's gradients, each side's dℓ/dz (z = x/τ) before the factor τ⁻¹·coefficients:
  //   student: TCKD (P − Q) at y, p̃_j (Q − P) elsewhere; NCKD p̃_j − q̃_j off y;
  //   teacher: TCKD ℓ_b·Q·(1 − Q) at y, −ℓ_b·Q·(1 − Q)·q̃_j elsewhere, with
  //   ℓ_b = log(Q/(1−Q)) − log(P/(1−P)); NCKD q̃_j (log q̃_j − log p̃_j − NCKD) off y.
  const float tckd_grad = cfg.tckd_coef * grad_scale * it, nckd_grad = cfg.nckd_coef * grad_scale * it;
  const float target_gap = dkd ? static_cast<float>(std::exp(log_q_target) - std::exp(log_p_target)) : 0.0f;
  float* out = w.out.data();  // one side's gradient at a time (s and t still hold the rows)
  if (cfg.teacher_grad) {
    // Without a KL term, or where q_j = 0 (a −inf teacher logit), the KL part is zero: computed,
    // it would be 0·(±inf) = NaN for −inf logits.
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      out[j] = kl_grad != 0.0f && q[j] > 0.0f ? kl_grad * q[j] * static_cast<float>(log_ratio(j) - kl) : 0.0f;
    }
    side_gradient(q, p, q_mean, p_mean, row_corr.self_b, col_mean_q, col_mean_p,
                  columns ? columns->self_q.data() : nullptr, out);
    if (dkd) {
      // Q·(1 − Q) from logs (either factor may be tiny); ℓ_b is finite wherever both are > 0.
      const double q_target = std::exp(log_q_target), q_mass = q_target * q_rest;
      const float binary_grad =
          q_mass > 0.0 ? static_cast<float>((log_q_target - log_q_rest - log_p_target + log_p_rest) * q_mass) * tckd_grad
                       : 0.0f;
      for (int64_t j = 0; j < n; ++j) {
        if (j == target) {
          out[j] += binary_grad;
        } else {
          out[j] -= binary_grad * tilde_q[j];
          if (tilde_q[j] > 0.0f) out[j] += nckd_grad * tilde_q[j] * static_cast<float>(rest_ratio(j) - nckd);
        }
      }
    }
    if (cfg.standardize) standardize_backward(t, n, t_standard, out);
    if (swapped) std::swap(out[t_argmax], out[target]);  // back to the unrectified positions
    for (int64_t j = 0; j < n; ++j) gt[j] = static_cast<t_t>(out[j]);
  }
  if (cfg.student_grad) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) out[j] = kl_grad * (p[j] - q[j]);
    side_gradient(p, q, p_mean, q_mean, row_corr.self_a, col_mean_p, col_mean_q,
                  columns ? columns->self_p.data() : nullptr, out);
    if (spearman_grad) {
      const float* grad_z = w.grad_z.data();
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] += grad_z[j];
    }
    if (dkd) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        out[j] += j == target ? -tckd_grad * target_gap
                              : tckd_grad * tilde_p[j] * target_gap + nckd_grad * (tilde_p[j] - tilde_q[j]);
      }
    }
    if (cfg.standardize) standardize_backward(s, n, s_standard, out);
    if (cfg.ce_coef != 0.0f) {  // on the raw logits, after the standardization's chain rule
      const float ce_grad = cfg.ce_coef * grad_scale;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) out[j] += ce_grad * softmax1[j];
      out[target] -= ce_grad;
    }
    for (int64_t j = 0; j < n; ++j) gs[j] = static_cast<s_t>(out[j]);
  }
  return loss;
}

// Calls f with a value of the C++ type of the logits' dtype (float, Half or BFloat16).
template <typename F>
void dispatch_logits(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK(false, "kdfast fused loss: logits must be float32, float16 or bfloat16, got ", dtype);
  }
}

void check_logits(const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2, "kdfast fused loss: ", name, " must be a 2-D [B, C] tensor, got ", x.dim(), " dims");
  TORCH_CHECK(x.device().is_cpu(), "kdfast fused loss (cpu): ", name, " must be a CPU tensor, got ", x.device());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "kdfast fused loss: ", name, " must be float32, float16 or bfloat16, got ", dtype);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_kd_loss_cpu(
    const at::Tensor& student_in, const at::Tensor& teacher_in, const c10::optional<at::Tensor>& target_in,
    const c10::optional<at::Tensor>& difficulty_in, double temperature, double kl_coef, double ce_coef,
    double pearson_coef, double spearman_coef, double column_coef, double rank_strength, int64_t difficulty_mode,
    double difficulty_value, bool rectify, bool student_grad, bool teacher_grad,
    const c10::optional<at::Tensor>& teacher_indices_in, const c10::optional<at::Tensor>& teacher_fill_in,
    double tckd_coef, double nckd_coef, bool standardize) {
  check_logits("student", student_in);
  check_logits("teacher", teacher_in);
  const bool sparse = teacher_indices_in.has_value();
  if (sparse) {
    // A sparse teacher: `teacher` holds each row's k logits (fp32), `teacher_indices` their
    // classes (int32), `teacher_fill` the logit of every other class.
    TORCH_CHECK(teacher_fill_in.has_value(), "kdfast fused loss: a sparse teacher needs teacher_fill");
    const at::Tensor& indices = *teacher_indices_in;
    const at::Tensor& fill = *teacher_fill_in;
    TORCH_CHECK(teacher_in.scalar_type() == at::kFloat && indices.scalar_type() == at::kInt &&
                    fill.scalar_type() == at::kFloat,
                "kdfast fused loss: a sparse teacher is float32 values, int32 teacher_indices and float32 "
                "teacher_fill, got ", teacher_in.scalar_type(), ", ", indices.scalar_type(), ", ", fill.scalar_type());
    TORCH_CHECK(indices.device().is_cpu() && fill.device().is_cpu(),
                "kdfast fused loss (cpu): teacher_indices and teacher_fill must be CPU tensors");
    TORCH_CHECK(teacher_in.size(0) == student_in.size(0) && teacher_in.size(1) >= 1 &&
                    teacher_in.size(1) <= student_in.size(1) && indices.sizes() == teacher_in.sizes() &&
                    fill.dim() == 1 && fill.size(0) == student_in.size(0),
                "kdfast fused loss: a sparse teacher needs values and teacher_indices [B, k] with 1 <= k <= C and "
                "teacher_fill [B] for student ", student_in.sizes(), ", got ", teacher_in.sizes(), ", ",
                indices.sizes(), ", ", fill.sizes());
    TORCH_CHECK(!teacher_grad, "kdfast fused loss: a sparse teacher has no gradient (teacher_grad must be False)");
    if (indices.numel() > 0) {
      TORCH_CHECK(indices.min().item<int32_t>() >= 0 && indices.max().item<int64_t>() < student_in.size(1),
                  "kdfast fused loss: teacher_indices must be in [0, C=", student_in.size(1), ")");
    }
  } else {
    TORCH_CHECK(student_in.sizes() == teacher_in.sizes(), "kdfast fused loss: teacher must have shape ",
                student_in.sizes(), ", got ", teacher_in.sizes());
  }
  // 100 is kdfast._checks.MAX_TEMPERATURE: beyond it fp32 loses the KD loss to cancellation.
  TORCH_CHECK(temperature > 0 && temperature <= 100 && rank_strength > 0,
              "kdfast fused loss: temperature must be in (0, 100] and rank_strength > 0, got ", temperature, " and ",
              rank_strength);
  TORCH_CHECK(!(rectify && column_coef != 0), "kdfast fused loss: rectification does not combine with the column term");
  const int64_t rows = student_in.size(0), n = student_in.size(1);
  TORCH_CHECK(rows > 0 && n > 0, "kdfast fused loss: empty logits");
  const at::Tensor student = student_in.contiguous(), teacher = teacher_in.contiguous();

  at::Tensor target;
  if (target_in.has_value()) {
    target = target_in->to(at::kLong).contiguous();
    TORCH_CHECK(target.dim() == 1 && target.size(0) == rows, "kdfast fused loss: target must have shape [B]");
  }
  const bool dkd = tckd_coef != 0 || nckd_coef != 0;
  TORCH_CHECK(!(ce_coef != 0 || rectify || dkd) || target.defined(),
              "kdfast fused loss: the CE and DKD terms and rectification need a target");
  TORCH_CHECK(!(dkd || standardize) || n >= 2,
              "kdfast fused loss: the DKD terms and logit standardization need at least 2 classes, got ", n);
  at::Tensor difficulty;
  if (difficulty_mode == kDifficultyPerSample) {
    TORCH_CHECK(difficulty_in.has_value(), "kdfast fused loss: per-sample difficulty needs the difficulty tensor");
    difficulty = difficulty_in->to(at::kFloat).contiguous();
    TORCH_CHECK(difficulty.dim() == 1 && difficulty.size(0) == rows, "kdfast fused loss: difficulty must have shape [B]");
  }

  LossConfig cfg{static_cast<float>(1.0 / temperature), static_cast<float>(kl_coef), static_cast<float>(ce_coef),
                 static_cast<float>(pearson_coef), static_cast<float>(spearman_coef),
                 static_cast<float>(column_coef), static_cast<float>(rank_strength), difficulty_mode,
                 static_cast<float>(difficulty_value), rectify, student_grad, teacher_grad};
  cfg.tckd_coef = static_cast<float>(tckd_coef);
  cfg.nckd_coef = static_cast<float>(nckd_coef);
  cfg.standardize = standardize;
  at::Tensor grad_student = student_grad ? at::empty_like(student) : at::empty({0}, student.options());
  at::Tensor grad_teacher = teacher_grad ? at::empty_like(teacher) : at::empty({0}, teacher.options());
  Buffer<float> row_loss(rows);
  const bool spearman = spearman_coef != 0;
  const int64_t* target_ptr = target.defined() ? target.data_ptr<int64_t>() : nullptr;
  const float* difficulty_ptr = difficulty.defined() ? difficulty.data_ptr<float>() : nullptr;
  float column_loss = 0.0f;

  // The row pass over a teacher source (dense logits of type t_t, or sparse rows).
  auto run_rows = [&](auto student_tag, const auto& teacher_rows, auto* gt_ptr) {
    using s_t = decltype(student_tag);
    using t_t = std::remove_pointer_t<decltype(gt_ptr)>;
    const s_t* s_ptr = student.data_ptr<s_t>();
    s_t* gs_ptr = student_grad ? grad_student.data_ptr<s_t>() : nullptr;
    ColumnStats columns;
    if (column_coef != 0) {
      columns = column_stats(s_ptr, teacher_rows, rows, n, cfg);
      column_loss = columns.loss;
    }
    const ColumnStats* column_ptr = column_coef != 0 ? &columns : nullptr;
    const float grad_scale = 1.0f / static_cast<float>(rows);
    // Rows per task: enough work to amortize a task (a sort makes a row costlier).
    const int64_t grain = std::max<int64_t>(1, (spearman ? 2048 : 16384) / n);
    at::parallel_for(0, rows, grain, [&](int64_t first, int64_t last) {
      RowScratch scratch(n, spearman);
      for (int64_t i = first; i < last; ++i) {
        row_loss[i] = fused_row<s_t, t_t>(
            s_ptr + i * n, teacher_rows, i, n, target_ptr ? target_ptr[i] : -1,
            difficulty_ptr ? difficulty_ptr[i] : 0.0f, cfg, column_ptr, grad_scale, scratch,
            gs_ptr ? gs_ptr + i * n : nullptr, gt_ptr ? gt_ptr + i * n : nullptr);
      }
    });
  };
  dispatch_logits(student.scalar_type(), [&](auto student_tag) {
    if (sparse) {
      const at::Tensor indices = teacher_indices_in->contiguous(), fill = teacher_fill_in->contiguous();
      const SparseTeacherRows teacher_rows{teacher.data_ptr<float>(), indices.data_ptr<int32_t>(),
                                           fill.data_ptr<float>(), teacher.size(1), n};
      run_rows(student_tag, teacher_rows, static_cast<float*>(nullptr));
      return;
    }
    dispatch_logits(teacher.scalar_type(), [&](auto teacher_tag) {
      using t_t = decltype(teacher_tag);
      const DenseTeacherRows<t_t> teacher_rows{teacher.data_ptr<t_t>(), n};
      run_rows(student_tag, teacher_rows, teacher_grad ? grad_teacher.data_ptr<t_t>() : static_cast<t_t*>(nullptr));
    });
  });
  // A fixed summation order: the loss does not depend on the number of threads.
  double total = 0.0;
  for (int64_t i = 0; i < rows; ++i) total += row_loss[i];
  const float loss = static_cast<float>(total / static_cast<double>(rows)) + column_loss;
  return {at::scalar_tensor(loss, student.options().dtype(at::kFloat)), grad_student, grad_teacher};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  m.def(
      "fused_kd_loss(Tensor student, Tensor teacher, Tensor? target, Tensor? difficulty, float temperature, "
      "float kl_coef, float ce_coef, float pearson_coef, float spearman_coef, float column_coef, "
      "float rank_strength, int difficulty_mode, float difficulty_value, bool rectify, bool student_grad, "
      "bool teacher_grad, Tensor? teacher_indices=None, Tensor? teacher_fill=None, float tckd_coef=0.0, "
      "float nckd_coef=0.0, bool standardize=False) "
      "-> (Tensor loss, Tensor grad_student, Tensor grad_teacher)");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("fused_kd_loss", &fused_kd_loss_cpu); }

}  // namespace kdfast
