// The fused KD loss shared by the CPU and CUDA kernels: its configuration and the small
// formulas both devices evaluate the same way.
//
// Every public kdfast loss is one setting of a single generic loss over logits s, t [B, C]:
//
//   L = (1/B) Σ_i ℓ_i  +  column_coef · (1 − (1/C) Σ_c ρ(p_:,c, q_:,c))
//   ℓ_i = kl_coef·KL(q_i ‖ p_i) + ce_coef·CE(s_i, y_i)
//         + pearson_coef·(1 − d_i)·(1 − ρ(p_i, q_i)) + spearman_coef·d_i·(1 − ρ_S,i)
//         + tckd_coef·KL(b̂_i ‖ b_i) + nckd_coef·KL(q̃_i ‖ p̃_i)
//
// with p = softmax(s/τ), q = softmax(t/τ) (t rectified first when `rectify`), d_i the
// per-sample difficulty, ρ_S,i the soft Spearman correlation of the standardized student
// row against the teacher's average ranks. The caller folds τ² into the coefficients.
// A kernel computes L and, in the same pass over each row, dL/ds and dL/dt.
//
// DKD: b = [p_y, 1 − p_y], p̃ the softmax over the classes other than y. With
// `standardize`, p and q (and the ranks, the rectification) come from the rows z-scored,
// (x − mean)/(std + 1e-7) with the unbiased std; CE keeps the raw student logits.
#pragma once

#include <cstdint>
#include <cstring>

#include "pav.h"

namespace kdfast {

// Denominator floor of the Pearson correlation ρ(a, b) = <a−ā, b−b̄> / max(‖a−ā‖‖b−b̄‖, 1e-8).
constexpr double kPearsonEps = 1e-8;

// Where the per-sample difficulty d_i comes from.
enum DifficultyMode : int64_t {
  kDifficultyConstant = 0,   // d_i = difficulty_value
  kDifficultyEntropy = 1,    // d_i = H(q_i) / log C
  kDifficultyPerSample = 2,  // d_i = difficulty[i]
};

struct LossConfig {
  float inv_temperature;
  float kl_coef, ce_coef, pearson_coef, spearman_coef, column_coef;
  float rank_strength;  // ε of the Spearman soft ranks
  int64_t difficulty_mode;
  float difficulty_value;
  bool rectify;
  bool student_grad, teacher_grad;
  // DKD's terms (need a target): tckd_coef·KL(b̂‖b) on the target / non-target split and
  // nckd_coef·KL(q̃‖p̃) on the non-target classes renormalized.
  float tckd_coef = 0.0f, nckd_coef = 0.0f;
  // Logit standardization: every term but CE sees each row as (x − mean)/(std + 1e-7).
  bool standardize = false;
};

// Logit standardization's ε, added to the unbiased standard deviation (the authors' code).
constexpr double kStandardizeEps = 1e-7;

// A Pearson correlation from centered moments <a,b>, <a,a>, <b,b> (accumulated in double:
// near ρ = 1 the loss term 1 − ρ is ill-conditioned), with the coefficients of its
// gradient:  ∂ρ/∂a = cross·(b − b̄) − self_a·(a − ā),  ∂ρ/∂b = cross·(a − ā) − self_b·(b − b̄).
// Below the floor (a constant vector) ρ = <a,b>/1e-8 and the norms carry no gradient.
struct Correlation {
  double rho;
  float cross, self_a, self_b;
};

KDFAST_HD Correlation correlation(double ab, double aa, double bb) {
  const double norm = sqrt(aa) * sqrt(bb);
  if (norm > kPearsonEps) {
    const double rho = ab / norm;
    return {rho, static_cast<float>(1.0 / norm), static_cast<float>(rho / aa), static_cast<float>(rho / bb)};
  }
  return {ab / kPearsonEps, static_cast<float>(1.0 / kPearsonEps), 0.0f, 0.0f};
}

// An unsigned key whose integer order is the order of the floats (-0 just before +0,
// NaN after +inf): what a radix sort sorts.
KDFAST_HD uint32_t ascending_key(float x) {
  uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

}  // namespace kdfast
