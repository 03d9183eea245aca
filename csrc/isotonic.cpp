// Pool-adjacent-violators (PAV) isotonic regression, the core of soft ranks and soft
// sorts (Blondel, Teboul, Berthet, Djolonga: "Fast Differentiable Sorting and Ranking",
// ICML 2020). Every row of a [B, n] batch is solved independently, in parallel over rows.
//
// For each row, with y and w of length n, the solution v is non-increasing and solves
//   l2: argmin_{v_1 >= ... >= v_n} 1/2 ||v - (y - w)||^2
//   kl: argmin_{v_1 >= ... >= v_n} <exp(y - v), 1> + <exp(w), v>
// It is piecewise constant: on each block B of consecutive indices it equals
//   l2: mean(y_B - w_B)          kl: logsumexp(y_B) - logsumexp(w_B).
//
// Adjacent blocks of the returned solution are strictly decreasing (equal neighbours are
// always merged, in the output precision), so the vector-Jacobian product recovers the
// blocks exactly from runs of equal values; no block structure has to be stored.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
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

// log(exp(a) + exp(b)) without overflow; exact for infinities and NaN-propagating.
inline double log_add_exp(double a, double b) {
  if (std::isnan(a) || std::isnan(b)) return std::numeric_limits<double>::quiet_NaN();
  const double hi = std::max(a, b);
  const double lo = std::min(a, b);
  if (lo == -std::numeric_limits<double>::infinity() ||
      hi == std::numeric_limits<double>::infinity()) {
    return hi;
  }
  return hi + std::log1p(std::exp(lo - hi));
}

// Rows per parallel task: enough elements that a task amortizes its scheduling.
int64_t grain_rows(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// Block statistics kept on the PAV stack. `a` and `b` accumulate in double (sum and
// count for l2, log-sum-exps for kl); `value` is the block's solution rounded to the
// output type, and merging decisions compare rounded values so that the strict
// decrease between blocks holds in the output precision.
template <typename scalar_t>
struct BlockStack {
  std::vector<int64_t> start;
  std::vector<double> a, b;
  std::vector<scalar_t> value;

  explicit BlockStack(int64_t n) : start(n), a(n), b(n), value(n) {}
};

template <typename scalar_t, bool kKL>
void pav_row(const scalar_t* y, const scalar_t* w, scalar_t* sol, int64_t n,
             BlockStack<scalar_t>& stack) {
  int64_t top = -1;  // index of the last block on the stack
  for (int64_t i = 0; i < n; ++i) {
    ++top;
    stack.start[top] = i;
    if constexpr (kKL) {
      stack.a[top] = static_cast<double>(y[i]);
      stack.b[top] = static_cast<double>(w[i]);
      stack.value[top] = static_cast<scalar_t>(stack.a[top] - stack.b[top]);
    } else {
      stack.a[top] = static_cast<double>(y[i]) - static_cast<double>(w[i]);
      stack.b[top] = 1.0;
      stack.value[top] = static_cast<scalar_t>(stack.a[top]);
    }
    // The solution must be non-increasing: pool the last two blocks while they are not.
    while (top > 0 && stack.value[top - 1] <= stack.value[top]) {
      if constexpr (kKL) {
        stack.a[top - 1] = log_add_exp(stack.a[top - 1], stack.a[top]);
        stack.b[top - 1] = log_add_exp(stack.b[top - 1], stack.b[top]);
        stack.value[top - 1] = static_cast<scalar_t>(stack.a[top - 1] - stack.b[top - 1]);
      } else {
        stack.a[top - 1] += stack.a[top];
        stack.b[top - 1] += stack.b[top];
        stack.value[top - 1] = static_cast<scalar_t>(stack.a[top - 1] / stack.b[top - 1]);
      }
      --top;
    }
  }
  for (int64_t block = 0; block <= top; ++block) {
    const int64_t end = block < top ? stack.start[block + 1] : n;
    std::fill(sol + stack.start[block], sol + end, stack.value[block]);
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
      BlockStack<scalar_t> stack(n);
      for (int64_t r = first; r < last; ++r) {
        const int64_t offset = r * n;
        if (kl) {
          pav_row<scalar_t, true>(y_ptr + offset, w_ptr + offset, sol_ptr + offset, n, stack);
        } else {
          pav_row<scalar_t, false>(y_ptr + offset, w_ptr + offset, sol_ptr + offset, n, stack);
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
