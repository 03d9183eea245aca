// Pool-adjacent-violators (PAV) for one row: the decreasing isotonic regression behind
// soft ranks and soft sorts (Blondel, Teboul, Berthet, Djolonga: "Fast Differentiable
// Sorting and Ranking", ICML 2020). Shared by the isotonic operator, the fused CPU loss
// kernels and the CUDA kernels (where one thread runs it for a row), so it is written
// for host and device, on raw pointers, without allocation.
//
// For a row of length n, with y and w, the solution v is non-increasing and solves
//   l2: argmin_{v_1 >= ... >= v_n} 1/2 ||v - (y - w)||^2
//   kl: argmin_{v_1 >= ... >= v_n} <exp(y - v), 1> + <exp(w), v>
// It is piecewise constant: on each block B of consecutive indices it equals
//   l2: mean(y_B - w_B)          kl: logsumexp(y_B) - logsumexp(w_B).
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define KDFAST_HD __host__ __device__ __forceinline__
#else
#define KDFAST_HD inline
#endif

namespace kdfast {

// log(exp(a) + exp(b)) without overflow; exact for infinities and NaN-propagating.
KDFAST_HD double log_add_exp(double a, double b) {
  if (a != a || b != b) return a + b;  // NaN
  const double hi = a > b ? a : b;
  const double lo = a > b ? b : a;
  if (lo == -INFINITY || hi == INFINITY) return hi;
  return hi + log1p(exp(lo - hi));
}

// The blocks of a PAV solution, kept as a stack: block k covers [start[k], start[k+1])
// (the last one ends at n). `a` and `b` accumulate in double: sum and count for l2,
// log-sum-exps for kl. value(k) is the block's solution. Two blocks violate the
// decreasing order when the earlier one's value does not exceed the later one's; for l2
// the means are compared by cross-multiplication (counts are positive), so no division
// runs per merge.
template <bool kKL>
struct PavBlocks {
  int64_t* start;
  double* a;
  double* b;
  int64_t count = 0;

  KDFAST_HD int64_t end(int64_t block, int64_t n) const { return block + 1 < count ? start[block + 1] : n; }
  KDFAST_HD double value(int64_t block) const { return kKL ? a[block] - b[block] : a[block] / b[block]; }
};

// Runs PAV over y(k), w(k) for k in [0, n) and leaves the blocks in `blocks`. O(n).
// Adjacent blocks end strictly decreasing; rounded to a narrower type their values are
// non-increasing (rounding is monotone), and neighbours that round to the same value
// give the same output as one pooled block.
template <bool kKL, typename YFn, typename WFn>
KDFAST_HD void pav(int64_t n, YFn y, WFn w, PavBlocks<kKL>& blocks) {
  int64_t count = 0;  // blocks on the stack
  for (int64_t i = 0; i < n; ++i) {
    // The newest block stays in registers while it absorbs the stack's top blocks that
    // violate the decreasing order; then it is pushed.
    int64_t start = i;
    double a, b;
    if constexpr (kKL) {
      a = static_cast<double>(y(i));
      b = static_cast<double>(w(i));
    } else {
      a = static_cast<double>(y(i)) - static_cast<double>(w(i));
      b = 1.0;
    }
    while (count > 0) {
      const double top_a = blocks.a[count - 1], top_b = blocks.b[count - 1];
      const bool violates = kKL ? top_a - top_b <= a - b : top_a * b <= a * top_b;
      if (!violates) break;
      if constexpr (kKL) {
        a = log_add_exp(top_a, a);
        b = log_add_exp(top_b, b);
      } else {
        a += top_a;
        b += top_b;
      }
      start = blocks.start[--count];
    }
    blocks.start[count] = start;
    blocks.a[count] = a;
    blocks.b[count] = b;
    ++count;
  }
  blocks.count = count;
}

}  // namespace kdfast
