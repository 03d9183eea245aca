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
// log-sum-exps for kl. value(k) is the block's solution.
template <bool kKL>
struct PavBlocks {
  int64_t* start;
  double* a;
  double* b;
  int64_t count = 0;

  KDFAST_HD int64_t end(int64_t block, int64_t n) const { return block + 1 < count ? start[block + 1] : n; }
  KDFAST_HD double value(int64_t block) const { return kKL ? a[block] - b[block] : a[block] / b[block]; }
  // Whether block `lower` (earlier) does not exceed block `upper` (later), i.e. whether the
  // pair violates the decreasing order and must be pooled. For l2 the means are compared
  // by cross-multiplication (counts are positive), so no division runs per merge.
  KDFAST_HD bool violates(int64_t lower, int64_t upper) const {
    return kKL ? a[lower] - b[lower] <= a[upper] - b[upper] : a[lower] * b[upper] <= a[upper] * b[lower];
  }
};

// Runs PAV over y(k), w(k) for k in [0, n) and leaves the blocks in `blocks`. O(n).
// Adjacent blocks end strictly decreasing; rounded to a narrower type their values are
// non-increasing (rounding is monotone), and neighbours that round to the same value
// give the same output as one pooled block.
template <bool kKL, typename YFn, typename WFn>
KDFAST_HD void pav(int64_t n, YFn y, WFn w, PavBlocks<kKL>& blocks) {
  int64_t top = -1;  // index of the last block on the stack
  for (int64_t i = 0; i < n; ++i) {
    ++top;
    blocks.start[top] = i;
    if constexpr (kKL) {
      blocks.a[top] = static_cast<double>(y(i));
      blocks.b[top] = static_cast<double>(w(i));
    } else {
      blocks.a[top] = static_cast<double>(y(i)) - static_cast<double>(w(i));
      blocks.b[top] = 1.0;
    }
    while (top > 0 && blocks.violates(top - 1, top)) {
      if constexpr (kKL) {
        blocks.a[top - 1] = log_add_exp(blocks.a[top - 1], blocks.a[top]);
        blocks.b[top - 1] = log_add_exp(blocks.b[top - 1], blocks.b[top]);
      } else {
        blocks.a[top - 1] += blocks.a[top];
        blocks.b[top - 1] += blocks.b[top];
      }
      --top;
    }
  }
  blocks.count = top + 1;
}

}  // namespace kdfast
