// The isotonic-regression operators behind the reference backend's soft ranks and soft
// sorts: every row of a [B, n] batch is solved by pool-adjacent-violators (pav.h),
// independently and in parallel over rows.
//
// The vector-Jacobian product recovers the blocks from runs of equal values of the
// solution, so no block structure has to be stored: adjacent blocks are strictly
// decreasing. (Two neighbours whose means differ by less than an ulp of the output type
// round to the same value; the VJP then treats them as one pooled block, which moves the
// returned values by less than that ulp.)
#include <torch/extension.h>

#include "pav.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

namespace kdfast {
namespace {

bool is_kl(const std::string& regularization) {
  TORCH_CHECK(regularization == "l2" || regularization == "kl",
              "isotonic: regularization must be 'l2' or 'kl', got '", regularization, "'");
  return regularization == "kl";
}

// Rows per parallel task: enough elements that a task amortizes its scheduling.
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// Scratch for the PAV stack of one row, reused across the rows of a parallel task.
struct PavScratch {
  std::vector<int64_t> start;
  std::vector<double> a, b;

  explicit PavScratch(int64_t n) : start(n), a(n), b(n) {}
  template <bool kKL>
  PavBlocks<kKL> blocks() { return {start.data(), a.data(), b.data()}; }
};

template <typename scalar_t, bool kKL>
void pav_row(const scalar_t* y, const scalar_t* w, scalar_t* sol, int64_t n, PavScratch& scratch) {
  PavBlocks<kKL> blocks = scratch.blocks<kKL>();
  pav<kKL>(n, [&](int64_t i) { return y[i]; }, [&](int64_t i) { return w[i]; }, blocks);
  for (int64_t block = 0; block < blocks.count; ++block) {
    std::fill(sol + blocks.start[block], sol + blocks.end(block, n), static_cast<scalar_t>(blocks.value(block)));
  }
}

// Vector-Jacobian product of the solution of one row with respect to y:
//   l2: on each block, mean(g_B) for every element of the block;
//   kl: on each block, softmax(s_B) * sum(g_B), where s is the vector whose block
//       log-sum-exp the solution depends on (y for a soft rank, w for a soft sort).
template <typename scalar_t, bool kKL>
void pav_vjp_row(const scalar_t* sol, const scalar_t* s, const scalar_t* g, scalar_t* out,
                 int64_t n) {
  int64_t begin = 0;
  while (begin < n) {
    int64_t end = begin + 1;
    // Runs of identical values are exactly the blocks (see the file comment).
    while (end < n && sol[end] == sol[begin]) ++end;
    double g_sum = 0.0;
    for (int64_t i = begin; i < end; ++i) g_sum += static_cast<double>(g[i]);
    if constexpr (kKL) {
      double s_max = -std::numeric_limits<double>::infinity();
      for (int64_t i = begin; i < end; ++i) s_max = std::max(s_max, static_cast<double>(s[i]));
      double normalizer = 0.0;
      for (int64_t i = begin; i < end; ++i) normalizer += std::exp(static_cast<double>(s[i]) - s_max);
      for (int64_t i = begin; i < end; ++i) {
        out[i] = static_cast<scalar_t>(std::exp(static_cast<double>(s[i]) - s_max) / normalizer * g_sum);
      }
    } else {
      const scalar_t mean = static_cast<scalar_t>(g_sum / static_cast<double>(end - begin));
      std::fill(out + begin, out + end, mean);
    }
    begin = end;
  }
}

void check_rows(const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 2, "isotonic: '", name, "' must be a 2-D [B, n] tensor, got ", t.dim(), " dims");
  TORCH_CHECK(t.device().is_cpu(), "isotonic: '", name, "' must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "isotonic: '", name, "' must be float32 or float64 (upcast fp16/bf16 first), got ",
              t.scalar_type());
}

void check_same(const char* name, const at::Tensor& t, const at::Tensor& ref) {
  check_rows(name, t);
  TORCH_CHECK(t.sizes() == ref.sizes(), "isotonic: '", name, "' must have shape ", ref.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "isotonic: '", name, "' must have dtype ",
              ref.scalar_type(), ", got ", t.scalar_type());
}

at::Tensor isotonic_cpu(const at::Tensor& y_in, const at::Tensor& w_in, c10::string_view regularization) {
  check_rows("y", y_in);
  check_same("w", w_in, y_in);
  const bool kl = is_kl(std::string(regularization));
  const at::Tensor y = y_in.contiguous();
  const at::Tensor w = w_in.contiguous();
  at::Tensor sol = at::empty_like(y);
  const int64_t rows = y.size(0);
  const int64_t n = y.size(1);
  if (rows == 0 || n == 0) return sol;
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "kdfast_isotonic", [&] {
    const scalar_t* y_ptr = y.data_ptr<scalar_t>();
    const scalar_t* w_ptr = w.data_ptr<scalar_t>();
    scalar_t* sol_ptr = sol.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t first, int64_t last) {
      PavScratch scratch(n);
      for (int64_t r = first; r < last; ++r) {
        const int64_t offset = r * n;
        if (kl) {
          pav_row<scalar_t, true>(y_ptr + offset, w_ptr + offset, sol_ptr + offset, n, scratch);
        } else {
          pav_row<scalar_t, false>(y_ptr + offset, w_ptr + offset, sol_ptr + offset, n, scratch);
        }
      }
    });
  });
  return sol;
}

at::Tensor isotonic_vjp_cpu(const at::Tensor& sol_in, const at::Tensor& s_in, const at::Tensor& grad_in,
                            c10::string_view regularization) {
  check_rows("sol", sol_in);
  check_same("s", s_in, sol_in);
  check_same("grad", grad_in, sol_in);
  const bool kl = is_kl(std::string(regularization));
  const at::Tensor sol = sol_in.contiguous();
  const at::Tensor s = s_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor out = at::empty_like(sol);
  const int64_t rows = sol.size(0);
  const int64_t n = sol.size(1);
  if (rows == 0 || n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(sol.scalar_type(), "kdfast_isotonic_vjp", [&] {
    const scalar_t* sol_ptr = sol.data_ptr<scalar_t>();
    const scalar_t* s_ptr = s.data_ptr<scalar_t>();
    const scalar_t* grad_ptr = grad.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(n), [&](int64_t first, int64_t last) {
      for (int64_t r = first; r < last; ++r) {
        const int64_t offset = r * n;
        if (kl) {
          pav_vjp_row<scalar_t, true>(sol_ptr + offset, s_ptr + offset, grad_ptr + offset, out_ptr + offset, n);
        } else {
          pav_vjp_row<scalar_t, false>(sol_ptr + offset, s_ptr + offset, grad_ptr + offset, out_ptr + offset, n);
        }
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  m.def("isotonic(Tensor y, Tensor w, str regularization) -> Tensor");
  m.def("isotonic_vjp(Tensor sol, Tensor s, Tensor grad, str regularization) -> Tensor");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) {
  m.impl("isotonic", &isotonic_cpu);
  m.impl("isotonic_vjp", &isotonic_vjp_cpu);
}

}  // namespace kdfast
