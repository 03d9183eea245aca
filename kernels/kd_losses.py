"""Triton kernels of kdfast's fused KD loss, their launcher, and its torch operator.

The same generic loss as the C++ and CUDA kernels (csrc/losses.h)::

    L = (1/B) Σ_i [kl·KL_i + ce·CE_i + pearson·(1−d_i)(1−ρ_i) + spearman·d_i·(1−ρ_S,i)
                   + tckd·KL(b̂_i‖b_i) + nckd·KL(q̃_i‖p̃_i)]
        + column·(1 − (1/C) Σ_c ρ(p_:,c, q_:,c))

computed with its gradients in one pass per row: every public loss is a setting of it
(kdfast.fused.losses_for maps them; its autograd Function saves the gradients and only
scales them in backward). DKD's terms (``HAS_DKD``): b = [p_y, 1 − p_y] and p̃ the softmax
over the classes other than the target y, each non-target mass a sum (or log-sum-exp) of
its own classes, never 1 − p_y. Logit standardization (``STANDARDIZE``): every term but
CE sees each row, student and teacher, as (x − mean)/(std + 1e-7) (unbiased std, moments
in fp64), the rectification, the ranks and the entropy difficulty included; CE keeps the
raw student logits, its gradient added after the standardization's chain rule
dL/dx = a·(g − ḡ) − z·<g, z>/((C − 1)·std). The pieces:

* ``_fused_row_kernel``: KL, CE, Pearson, the per-sample difficulty, DR-KD's rectification
  (a swap of two columns), the shares of the Spearman and column terms, and the gradients,
  each rounded once, in one of two layouts (``launch_config``): *resident* (C ≤ 8192, or
  ≤ 4096 with two correlation terms), up to 16 rows per program held in registers, each
  input read once, with 128-bit vector loads when C is a multiple of 8 (C is a constexpr);
  *chunked* (longer rows), one row per program, an online softmax over chunks of 4096
  columns that also takes KL, the entropy and the row Pearson term's moments, then the
  gradient's pass: every loss reads a row twice (the column term's statistics need two
  reads of the batch of their own first, the Spearman term its sorts). DKD's non-target
  statistics are taken in the same passes (an online softmax over the classes other than
  y, NCKD as the KL's online sum); only a rectified teacher (no public loss combines it
  with DKD) costs one more pass, after its argmax is known. Standardization: the resident
  layout takes each row's moments in registers (no extra read); the chunked one reads the
  rows' statistics from ``_standardize_kernel`` (one more read of each input, before the
  softmax) and, with a gradient, takes <g, 1> and <g, z> in one more pass before the
  gradient's: four reads of each input instead of two.
* ``_standardize_kernel`` (STANDARDIZE in the chunked layout, or with the column or
  Spearman terms): each row's mean, a = 1/(std + 1e-7) and 1/((C − 1)·std) in fp64, by
  chunks merged pairwise (exactly the two-pass moments when the row is one chunk), which
  every later kernel reads, so that all of them standardize a row into the same floats;
  for the Spearman terms also the standardized rows themselves (fp32), which the Spearman
  kernels rank and sort in place of the logits.
* The intra-class term's column statistics, over fixed chunks of rows (deterministic), as
  shifted sums in one pass finished with a few [C]-sized PyTorch operations: in the
  resident layout ``_column_partials_kernel`` (one read of each input, which also writes
  the rows' softmax statistics the row kernel then uses); for long rows
  ``_softmax_stats_kernel`` then ``_column_moments_kernel``.
* The Spearman terms (C ≤ 8192), after ``torch.sort`` of both rows:
  ``_spearman_prepare_kernel`` (one program per row: the standardized student, the
  teacher's average ranks by scans over its tie groups, θ = ẑ/ε column-major),
  ``_pav_kernel`` (pool-adjacent-violators, 32 rows per one-warp program, a row per
  thread, no barrier), ``_spearman_finish_kernel`` (one program per row: the soft ranks,
  ρ_S, and the backward through the soft ranks and the standardization with prefix sums),
  writing ρ_S and dρ_S/ds for the row kernel.
* Sparse (cached) teachers (``teacher_indices``: kdfast.sparse_teacher): a row's k logits
  at sorted int32 classes and one fill logit for the other classes. Every kernel reads the
  teacher through ``_teacher_tile``, which rebuilds the row where it is read (a binary
  search of each column in the row's k indices, then its value or the fill), so no dense
  B×C teacher exists and every later operation sees the dense row's very floats: the
  results are bitwise those of the dense row. A kernel is compiled sparse when its
  ``t_idx_ptr`` is int32 (``SPARSE``, a constexpr of that pointer's type, so that the
  parameter lists that sm_90 compile harnesses type one by one gain only pointers and
  integers; a dense launch passes an fp32 placeholder, ``TeacherRows``). The Spearman
  terms take a sparse teacher's average ranks from its k values (``_sparse_teacher_ranks``,
  [B, k] sort and searchsorted) into the rank workspace a dense teacher's sort fills. With
  standardization the rebuilt row is what is standardized (and a Spearman term ranks the
  dense standardized rows ``_standardize_kernel`` wrote).
* The flags DKD and standardization add to kernels that sm_90 compile harnesses type
  argument by argument follow ``SPARSE``: ``HAS_DKD`` is the row kernel's ``dkd_ptr`` being
  fp64 (a [B, 2] output of each row's TCKD and NCKD), ``STANDARDIZE`` a kernel's
  ``standard_ptr`` being fp64 (the [B, 6] row statistics); fp32 placeholders otherwise.

Floats are runtime arguments (no recompilation per temperature); flags, block sizes and
the row kernel's C are constexpr (one compile per C). Layouts and warps come from
heuristics on C, which also hold under Triton's interpreter (TRITON_INTERPRET=1), where
the tests run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
import triton
import triton.language as tl

from kdfast._checks import check_fused_arguments
from kdfast.kernels.launch import on_device_of

#: Longest row the Spearman kernels take (one program holds the row).
MAX_SPEARMAN_CLASSES = 8192
#: Rows per program of the pool-adjacent-violators kernel: one warp, a row per thread.
PAV_ROWS = 32
#: Longest row the row kernel holds in registers (the resident layout, one read of each
#: input); longer rows go through the chunked layout. Up to 4096 for every loss; up to 8192
#: for a loss with at most one correlation term (at 8192 × 16 elements per thread, CMKD's
#: and DIST's two terms spill 24–444 B on sm_90: benchmarks/results/gpu_static.csv).
MAX_RESIDENT_CLASSES = 4096
MAX_RESIDENT_CLASSES_ONE_TERM = 8192
#: Elements of a resident program's [ROWS, BLOCK] tile: short rows are packed ROWS to a
#: program until it holds about this many (8 per thread at 8 warps).
RESIDENT_TILE = 2048
#: Widest row whose column statistics take one read (``_column_partials_kernel``): its five
#: fp64 column sums cost 40 B per column, 160 B per thread at 1024 classes and 8 warps (at
#: 8192 and 16 warps they spilled 3.8 KB on sm_90).
MAX_COLUMN_PARTIALS_CLASSES = 1024
#: Widest chunk of a row the chunked layout holds at once.
MAX_ROW_BLOCK = 4096
#: Most classes a row may have: column offsets within a row are 32-bit (row offsets are
#: 64-bit), and a chunk's offsets reach C + MAX_ROW_BLOCK.
MAX_CLASSES = 2**31 - 1 - MAX_ROW_BLOCK
PEARSON_EPS = 1e-8
#: Logit standardization's ε, added to the unbiased standard deviation (csrc/losses.h).
STANDARDIZE_EPS = 1e-7
DIFFICULTY_CONSTANT, DIFFICULTY_ENTROPY, DIFFICULTY_PER_SAMPLE = 0, 1, 2

_forced_block = None


@contextlib.contextmanager
def forced_block_size(block: int):
    """Run the row kernel with chunks of ``block`` columns (tests use it to force the chunked
    path on short rows)."""
    global _forced_block
    previous, _forced_block = _forced_block, block
    try:
        yield
    finally:
        _forced_block = previous


def spearman_warps(classes: int) -> int:
    """Warps of the Spearman kernel for rows of ``classes`` logits (the whole row in one program)."""
    return max(1, min(16, triton.next_power_of_2(classes) // 256))


@dataclasses.dataclass(frozen=True)
class RowLayout:
    """How the row kernel covers a [B, C] batch: programs of ``rows`` rows and ``block``
    columns, ``warps`` warps each; ``resident`` when a program holds its whole rows."""

    block: int
    rows: int
    warps: int
    resident: bool


def launch_config(classes: int, correlation_terms: int = 0) -> RowLayout:
    """The row kernel's layout for rows of ``classes`` logits, for a loss with
    ``correlation_terms`` of the Pearson, column and Spearman terms: up to
    MAX_RESIDENT_CLASSES (MAX_RESIDENT_CLASSES_ONE_TERM with at most one such term) the
    whole row in registers, short rows packed several to a program (about RESIDENT_TILE
    elements); longer rows in chunks of MAX_ROW_BLOCK, one row per program. Warps so that
    each thread holds about 8 elements of a tile (16 at C = 8192)."""
    widest = MAX_RESIDENT_CLASSES_ONE_TERM if correlation_terms <= 1 else MAX_RESIDENT_CLASSES
    if _forced_block:
        block, rows = _forced_block, 1
    elif classes <= widest:
        block = triton.next_power_of_2(classes)
        rows = max(1, min(16, RESIDENT_TILE // block))
    else:
        block, rows = MAX_ROW_BLOCK, 1
    return RowLayout(block, rows, max(1, min(16, rows * block // 256)), classes <= block)


def chunk_config(classes: int) -> tuple[int, int]:
    """(BLOCK, num_warps) of the one-row-per-program softmax statistics kernel."""
    block = _forced_block or min(triton.next_power_of_2(classes), MAX_ROW_BLOCK)
    return block, max(1, min(16, block // 256))


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def _correlation(ab, aa, bb):
    """ρ = <a,b>/max(‖a‖‖b‖, 1e-8) from centered moments, and the coefficients of its
    gradient: ∂ρ/∂a = cross·(b − b̄) − self_a·(a − ā) (and symmetrically for b)."""
    norm = tl.sqrt(aa) * tl.sqrt(bb)
    above = norm > 1e-8
    safe = tl.where(above, norm, 1e-8)
    rho = ab / safe
    cross = 1.0 / safe
    self_a = tl.where(above, rho / tl.where(aa > 0, aa, 1.0), 0.0)
    self_b = tl.where(above, rho / tl.where(bb > 0, bb, 1.0), 0.0)
    return rho, cross, self_a, self_b


@triton.jit
def _softmax_step(running_max, running_sum, x, inv_tau):
    """Folds a [ROWS, BLOCK] tile x into per-row running maxima and Σ exp((x − max)/τ);
    returns them and the tile's exp((x − max)/τ) (the resident path reuses it). A tile (or a
    row so far) of only −inf contributes nothing, instead of exp(−inf − (−inf)) = NaN."""
    new_max = tl.maximum(running_max, tl.max(x, 1))
    finite = new_max > -float("inf")
    safe_max = tl.where(finite, new_max, 0.0)
    rescale = tl.where(running_max > -float("inf"), tl.exp((running_max - safe_max) * inv_tau), 0.0)
    e = tl.exp((x - safe_max[:, None]) * inv_tau)
    return new_max, running_sum * rescale + tl.sum(e, 1), e


@triton.jit
def _online_kl_step(running_max, running_sum, new_max, e, weighted, centered, s, t, inv_tau):
    """The chunked layout's KL and entropy in its first pass, before the max and the sum are
    known. With e_j = exp((t_j − m)/τ) over the running max m and T = Σ e_j, it folds a tile
    into W = Σ e_j (t_j − s_j)/τ (fp64) and V = Σ e_j (t_j − m)/τ; at the end
    KL = W/T + (s_max − t_max)/τ + log S − log T and H = log T − V/T. It takes the running
    max and sum from before ``_softmax_step`` folded in the tile, and that step's new max
    and exponentials e. Where e_j = 0 (a −inf
    teacher logit, or underflow) the term is 0, never 0·(±inf)."""
    safe_max = tl.where(new_max > -float("inf"), new_max, 0.0)
    seen = running_max > -float("inf")
    rescale = tl.where(seen, tl.exp((running_max - safe_max) * inv_tau), 0.0)
    present = e > 0.0
    gap = (t.to(tl.float64) - s.to(tl.float64)) * inv_tau
    weighted = weighted * rescale + tl.sum(tl.where(present, e.to(tl.float64) * gap, 0.0), 1)
    shifted = tl.where(seen, rescale * (centered + running_sum * (running_max - safe_max) * inv_tau), 0.0)
    centered = shifted + tl.sum(tl.where(present, e * (t - safe_max[:, None]) * inv_tau, 0.0), 1)
    return weighted, centered


@triton.jit
def _rescale(old_max, new_max, inv_tau):
    """exp((old − new)/τ) in fp64: the factor that moves exponentials taken over a running
    max ``old_max`` onto ``new_max`` (0 while nothing finite was seen: those were all 0)."""
    safe_max = tl.where(new_max > -float("inf"), new_max, 0.0)
    gap = (old_max.to(tl.float64) - safe_max.to(tl.float64)) * inv_tau
    return tl.where(old_max > -float("inf"), tl.exp(gap), 0.0)


@triton.jit
def _online_moments_step(sum_s, sum_t, square_s, square_t, cross, s_scale, t_scale, e_s, e_t):
    """The chunked layout's row Pearson moments in its first pass: plain fp64 sums
    (Σe_s, Σe_t, Σe_s², Σe_t², Σe_s·e_t) of the exponentials over each row's running max,
    rescaled when a max moves (every earlier e_s is multiplied by ``s_scale``, e_t by
    ``t_scale``). Centered at the end (Q − A²/C): in fp64 this loses fewer digits than the
    fp32 exponentials themselves carry, near-uniform rows included, and a constant row
    (every e = 1) gives exactly 0."""
    es = e_s.to(tl.float64)
    et = e_t.to(tl.float64)
    sum_s = sum_s * s_scale + tl.sum(es, 1)
    sum_t = sum_t * t_scale + tl.sum(et, 1)
    square_s = square_s * (s_scale * s_scale) + tl.sum(es * es, 1)
    square_t = square_t * (t_scale * t_scale) + tl.sum(et * et, 1)
    cross = cross * (s_scale * t_scale) + tl.sum(es * et, 1)
    return sum_s, sum_t, square_s, square_t, cross


@triton.jit
def _chunk_start(step, C: tl.constexpr, BLOCK: tl.constexpr, BACKWARD: tl.constexpr):
    """The first column of a chunked pass's step-th chunk. The passes after the first
    alternate direction (backward, forward, …), so each starts on the chunks the pass before
    read last, the likeliest still in L2 (the bytes model still counts them from HBM)."""
    if BACKWARD:
        return ((C + BLOCK - 1) // BLOCK - 1 - step) * BLOCK
    return step * BLOCK


@triton.jit
def _probability(x, x_max, log_sum, inv_tau):
    """softmax(x/τ) from a row's max and log-normalizer: the one formula of every kernel
    that feeds the column statistics or consumes them (their p − mean_p must be exactly 0
    in a constant column, so both sides must round alike)."""
    return tl.exp((x - x_max) * inv_tau - log_sum)


@triton.jit
def _standard_scales(m2, n):
    """A row's standardization from Σ(x − mean)² (fp64) over its n logits: a = 1/(std + 1e-7)
    with the unbiased std, and 1/((n − 1)·std), 0 for a constant row (whose std passes no
    gradient), both fp64 — csrc/losses_cpu.cpp's standardize_row. (The literals take the
    fp64 type of their operand from the exact Python value.)"""
    std = tl.sqrt(m2 / (n - 1))
    scale = 1.0 / (std + 1e-7)
    varying = std > 0.0
    dof = tl.where(varying, 1.0 / ((n - 1) * tl.where(varying, std, 1.0)), 0.0)
    return scale, dof


@triton.jit
def _row_moments(x, mask, x0, n):
    """A resident [ROWS, BLOCK] tile's per-row mean and Σ(x − mean)² in fp64, in one pass over
    the registers: d = x − x_0 (``x0``: each row's first logit; exact in fp64), mean =
    x_0 + Σd/n, Σ(x − mean)² = Σd² − (Σd)²/n. (Not standardize_row's two passes: those keep
    an fp64 copy of the tile live across a reduction, 16 registers a side at 8 elements per
    thread. The shift by a logit of the row bounds the cancellation: (x_0 − mean)² <=
    (n − 1)·var, so Σd² = Σ(x − mean)² + n(x_0 − mean)² <= (n + 1)·Σ(x − mean)², and the
    fp64 rounding of the sums, at most ~n·2^-53 of Σd², stays below 1e-8 of Σ(x − mean)²
    for n <= 8192, the widest resident row. A constant row: every d = 0, mean = x_0 and
    Σ = 0 exactly.) Lanes outside ``mask`` count nothing: x_0 there."""
    d = tl.where(mask, x, x0[:, None]).to(tl.float64) - x0.to(tl.float64)[:, None]
    d_sum = tl.sum(d, 1)
    squares = tl.maximum(tl.sum(d * d, 1) - d_sum * d_sum / n, 0.0)
    return x0.to(tl.float64) + d_sum / n, squares


@triton.jit
def _moments_step(count, mean, m2, x, mask):
    """Folds a chunk of rows (``mask``: its real lanes, at least one per row) into their
    running count, mean and Σ(x − mean)² (fp64): the chunk's own two-pass moments, merged by
    Chan et al.'s pairwise update. From count = 0 the result is exactly the chunk's two-pass
    moments (share = 1, no cross term), so a one-chunk row gets _row_moments' formulas."""
    x64 = tl.where(mask, x.to(tl.float64), 0.0)
    chunk_count = tl.sum(mask.to(tl.float64), 1)
    chunk_mean = tl.sum(x64, 1) / chunk_count
    centered = tl.where(mask, x64 - chunk_mean[:, None], 0.0)
    chunk_m2 = tl.sum(centered * centered, 1)
    total = count + chunk_count
    share = chunk_count / total
    delta = chunk_mean - mean
    return total, mean + delta * share, m2 + chunk_m2 + delta * delta * count * share


@triton.jit
def _standardized(x, mean, scale):
    """(x − mean)·a in fp64, rounded once to fp32 (standardize_row's expression). Elementwise
    from the row's fp64 statistics, so every kernel that holds them turns a logit into the
    same float (a constant row into exact zeros)."""
    return ((x.to(tl.float64) - mean) * scale).to(tl.float32)


@triton.jit
def _load_standard(standard_ptr, rows, row_mask):
    """The [B, 6] fp64 statistics ``_standardize_kernel`` wrote for ``rows`` (int64): the
    student's mean, a, 1/((C − 1)·std), then the teacher's; loads at rows·6 + k only where
    ``row_mask`` holds."""
    base = standard_ptr + rows * 6
    return (tl.load(base, mask=row_mask, other=0.0), tl.load(base + 1, mask=row_mask, other=1.0),
            tl.load(base + 2, mask=row_mask, other=0.0), tl.load(base + 3, mask=row_mask, other=0.0),
            tl.load(base + 4, mask=row_mask, other=1.0), tl.load(base + 5, mask=row_mask, other=0.0))


@triton.jit
def _standardize_sums(v, z, mask):
    """A tile's share of <g, 1> and <g, z> per row (fp64), for the standardization's chain
    rule; lanes outside ``mask`` add nothing (z is −inf or anything there)."""
    v64 = tl.where(mask, v, 0.0).to(tl.float64)
    return tl.sum(v64, 1), tl.sum(v64 * tl.where(mask, z, 0.0).to(tl.float64), 1)


@triton.jit
def _standardize_gradient(v, z, scale, g_sum, gz, dof, n):
    """dL/dx = a·(g − ḡ) − z·<g, z>/((n − 1)·std) of a tile from g = dL/dz (``v``), the row's
    sums (_standardize_sums) and statistics, in fp64 rounded once (standardize_backward's;
    a itself rounded to fp32 first, as that kernel keeps it). Where std = 0, dof = 0: the
    second term is 0."""
    g_mean = g_sum / n
    factor = gz * dof
    a = scale.to(tl.float32).to(tl.float64)
    return (a[:, None] * (v.to(tl.float64) - g_mean[:, None]) - z.to(tl.float64) * factor[:, None]).to(tl.float32)


@triton.jit
def _rest_step(s_rest_max, s_rest_sum, t_rest_max, t_rest_sum, weighted, s, t, rest, inv_tau):
    """Folds a tile into DKD's non-target statistics: running maxima and Σ exp((x − max)/τ)
    over the lanes ``rest`` (real columns other than the target) of the student and the
    teacher, and NCKD's online sum W = Σ ẽ_j (t_j − s_j)/τ over the teacher's (fp64,
    _online_kl_step's): at the end NCKD = W/T̃ + (s̃_max − t̃_max)/τ + log S̃ − log T̃."""
    new_s_max, s_rest_sum, _ = _softmax_step(s_rest_max, s_rest_sum, tl.where(rest, s, -float("inf")), inv_tau)
    new_t_max, new_t_sum, e_t = _softmax_step(t_rest_max, t_rest_sum, tl.where(rest, t, -float("inf")), inv_tau)
    weighted, _ = _online_kl_step(t_rest_max, t_rest_sum, new_t_max, e_t, weighted, tl.zeros_like(t_rest_sum), s, t,
                                  inv_tau)
    return new_s_max, s_rest_sum, new_t_max, new_t_sum, weighted


@triton.jit
def _dkd_terms(s_y, t_y, s_max, t_max, s_log, t_log, s_rest_max, s_rest_sum, t_rest_max, t_rest_sum, inv_tau):
    """DKD's per-row logs (fp64, from logits: exact where a probability underflows) and TCKD:
    log P = (s_y − s_max)/τ − log S, log(1 − P) = (s̃_max − s_max)/τ + log S̃ − log S (the
    non-target mass summed, never 1 − P), the same for the teacher, and
    TCKD = Q (log Q − log P) + (1 − Q)(log(1 − Q) − log(1 − P)), a side of zero mass adding 0.
    ``s_log``, ``t_log``: the fp64 log-normalizers. Returns (log P, log Q, log(1 − P),
    log(1 − Q), TCKD, log S̃ − log T̃)."""
    s_rest_log = tl.log(s_rest_sum.to(tl.float64))
    t_rest_log = tl.log(t_rest_sum.to(tl.float64))
    log_p_target = (s_y - s_max).to(tl.float64) * inv_tau - s_log
    log_q_target = (t_y - t_max).to(tl.float64) * inv_tau - t_log
    log_p_rest = (s_rest_max - s_max).to(tl.float64) * inv_tau + s_rest_log - s_log
    log_q_rest = (t_rest_max - t_max).to(tl.float64) * inv_tau + t_rest_log - t_log
    q_target = tl.exp(log_q_target)
    q_rest = tl.exp(log_q_rest)
    tckd = tl.where(q_target > 0.0, q_target * (log_q_target - log_p_target), 0.0) \
        + tl.where(q_rest > 0.0, q_rest * (log_q_rest - log_p_rest), 0.0)
    return log_p_target, log_q_target, log_p_rest, log_q_rest, tckd, s_rest_log - t_rest_log


@triton.jit
def _rest_probabilities(s, t, mask, cols, target, s_rest_max, inv_s_rest, t_rest_max, inv_t_rest, inv_tau):
    """A tile's target lanes and DKD's p̃ = exp((s − s̃_max)/τ)/S̃, q̃ likewise, over the real
    non-target lanes (0 at the target and outside ``mask``). The gradient recomputes them
    (two exponentials per element) rather than keep the forward's tiles in registers."""
    is_target = cols[None, :] == target[:, None]
    rest = mask & (cols[None, :] != target[:, None])
    tilde_p = tl.where(rest, tl.exp((s - s_rest_max[:, None]) * inv_tau) * inv_s_rest[:, None], 0.0)
    tilde_q = tl.where(rest, tl.exp((t - t_rest_max[:, None]) * inv_tau) * inv_t_rest[:, None], 0.0)
    return is_target, tilde_p, tilde_q


@triton.jit
def _dkd_gradients(s, t, tilde_p, tilde_q, is_target, t_rest_max, s_rest_max, rest_shift, nckd, target_gap,
                   binary_grad, tckd_grad, nckd_grad, inv_tau, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """DKD's share of dL/dz of a tile (the CPU kernel's "DKD's gradients"), z = the logits
    the loss sees: student TCKD (P − Q)/τ at y, p̃_j (Q − P)/τ elsewhere, NCKD (p̃_j − q̃_j)/τ
    off y (``target_gap`` = Q − P; the coefficients and 1/τ in ``tckd_grad``, ``nckd_grad``);
    teacher ``binary_grad`` = ℓ_b·Q(1 − Q)·tckd_grad at y, −binary_grad·q̃_j elsewhere, and
    NCKD q̃_j (log q̃_j − log p̃_j − NCKD)/τ where q̃_j > 0 (the log ratio from logits, fp64).
    p̃ and q̃ are 0 at the target and outside the row."""
    d_s = tilde_p  # placeholders where a gradient is not asked for
    d_t = tilde_q
    if STUDENT_GRAD:
        d_s = tl.where(is_target, -tckd_grad * target_gap[:, None],
                       tckd_grad * tilde_p * target_gap[:, None] + nckd_grad * (tilde_p - tilde_q))
    if TEACHER_GRAD:
        ratio = ((t - t_rest_max[:, None]).to(tl.float64) - (s - s_rest_max[:, None]).to(tl.float64)) * inv_tau \
            + rest_shift[:, None]
        nckd_part = tl.where(tilde_q > 0.0, nckd_grad * tilde_q * (ratio - nckd[:, None]).to(tl.float32), 0.0)
        d_t = tl.where(is_target, binary_grad[:, None], nckd_part - binary_grad[:, None] * tilde_q)
    return d_s, d_t


@triton.jit
def _sparse_slot(idx_ptr, rows, cols, mask, K, log_k):
    """Where column ``cols`` of row ``rows`` (broadcast to ``mask``'s shape) lies in a sparse
    teacher's [B, K] arrays: (rows·K + j, found), j the last position of the row's sorted
    indices holding a class <= the column (0 if none), found where that class is the column
    (and ``mask``). A branchless binary search: the window [j, j + n) starts as the row's K
    indices and halves ``log_k`` = ceil(log2 K) times (n is the same in every lane, so a lane
    keeps only j), then one more load compares; each a gathered int32 load of the row's K
    indices (they stay in L1).

    Memory safety, whatever the indices hold: every load is at rows·K + j + half with
    j + half < j + n <= K (the window stays inside [0, K)) or at rows·K + j with j < K, and
    only where ``mask`` holds (rows < B); rows·K in int64, j int32 (K <= C < 2^31). An index
    out of range never equals a column in [0, C); unsorted or repeated indices can only make
    a column miss or match another slot of its own row (a repeated class: its last slot, as
    the CPU operator's rebuild, whose later write wins), never address outside the row.
    Each lane searches alone (no value crosses threads), so no barrier is needed."""
    _, column = tl.broadcast(mask, cols)
    base = (rows + tl.zeros((), tl.int64)) * K
    low = tl.zeros_like(column)
    n = K
    for _ in range(log_k):
        half = n // 2
        key = tl.load(idx_ptr + base + low + half, mask=mask, other=0)
        low = tl.where(key <= column, low + half, low)
        n -= half
    key = tl.load(idx_ptr + base + low, mask=mask, other=0)
    return base + low, mask & (key == column)


@triton.jit
def _teacher_tile(t_ptr, offsets, idx_ptr, fill_ptr, rows, row_mask, cols, mask, other, K, log_k,
                  SPARSE: tl.constexpr):
    """The teacher logits of a tile, in fp32, ``other`` where ``mask`` is False: every kernel
    reads the teacher through this. Dense: the [B, C] logits at ``offsets`` (row·C + column,
    the caller's). Sparse (int32 indices): the row rebuilt where it is read, without a dense
    B×C teacher, from ``t_ptr`` [B, K] values, ``idx_ptr`` [B, K] their classes (sorted in
    each row) and ``fill_ptr`` [B] the logit of every other class: values[j] where the binary
    search (``_sparse_slot``) finds the column, else the row's fill. ``rows`` and ``cols``
    broadcast to ``mask``'s shape; ``row_mask`` (``rows``' shape) says which rows are < B. A
    sparse tile's memory safety is ``_sparse_slot``'s: the value is loaded only at a found
    slot, the fill once per row (not per element: a per-element gather's 64-bit addresses
    cost the resident kd kernel 11 registers on sm_90) and only where ``row_mask`` holds."""
    if SPARSE:
        slot, found = _sparse_slot(idx_ptr, rows, cols, mask, K, log_k)
        value = tl.load(t_ptr + slot, mask=found, other=0.0)
        fill = tl.load(fill_ptr + rows, mask=row_mask, other=0.0)
        t = tl.where(mask, tl.where(found, value, fill), other)
    else:
        t = tl.load(t_ptr + offsets, mask=mask, other=other).to(tl.float32)
    return t


@triton.jit
def _column_value(x, cols, column):
    """x[i, column[i]] for each row i of a tile (a masked sum: NaN or ±inf elsewhere in the
    row does not leak in)."""
    return tl.sum(tl.where(cols[None, :] == column[:, None], x, 0.0), 1)


@triton.jit
def _swap_columns(x, cols, a, b):
    """x with columns a[i] and b[i] of each row i exchanged (nothing where a = b = −1)."""
    at_a = _column_value(x, cols, a)
    at_b = _column_value(x, cols, b)
    return tl.where(cols[None, :] == a[:, None], at_b[:, None], tl.where(cols[None, :] == b[:, None], at_a[:, None], x))


@triton.jit
def _kl_and_moments(s, t, q, mask, s_max, t_max, t_log_sum, log_sum_difference, inv_tau, p, p0, q0,
                    HAS_KL: tl.constexpr):
    """A tile's share of KL(q‖p) in fp64, of the teacher's entropy, and of Σ(p − p0), Σ(q − q0)."""
    log_q = (t - t_max[:, None]) * inv_tau - t_log_sum[:, None]
    # q = 0 (a −inf teacher logit, or underflow) contributes 0, never 0·(±inf).
    present = mask & (q > 0.0)
    kl = tl.zeros_like(s_max).to(tl.float64)
    if HAS_KL:
        ratio = ((t - t_max[:, None]).to(tl.float64) - (s - s_max[:, None]).to(tl.float64)) * inv_tau \
            + log_sum_difference[:, None]
        kl = tl.sum(tl.where(present, q.to(tl.float64) * ratio, 0.0), 1)
    entropy = -tl.sum(tl.where(present, q * log_q, 0.0), 1)
    p_shift = tl.sum(tl.where(mask, p - p0[:, None], 0.0), 1)
    q_shift = tl.sum(tl.where(mask, q - q0[:, None], 0.0), 1)
    return kl, entropy, p_shift, q_shift


@triton.jit
def _pearson_moments(p, q, mask, p_mean, q_mean):
    """A tile's share of the centered moments Σab, Σa², Σb² (a = p − p̄, b = q − q̄) in fp64:
    near ρ = 1 the term 1 − ρ is ill-conditioned."""
    a = tl.where(mask, p - p_mean[:, None], 0.0).to(tl.float64)
    b = tl.where(mask, q - q_mean[:, None], 0.0).to(tl.float64)
    return tl.sum(a * b, 1), tl.sum(a * a, 1), tl.sum(b * b, 1)


@triton.jit
def _correlation_gradients(p, q, p_row, q_row, cols, col_mask, col_ptr, C, centers, cross, self_p, self_q,
                           pearson_grad, column_grad, HAS_COLUMN: tl.constexpr):
    """g = dℓ/dp and dℓ/dq of a tile (fp32) from the row correlation (per-row coefficients)
    and the column correlations (per-column statistics, read once per tile and shared by its
    rows). The row term's g_s = w·(cross·(q − c_q) − self_p·(p − c_p)) is taken from
    ``p_row``, ``q_row`` centered at ``centers`` = (c_p, c_q) for the student and (c'_p, c'_q)
    for the teacher's g_t: in the resident layout the fp32 p, q at their means (it then
    subtracts <p, g> summed over its registers); in the chunked layout fp64 values at the
    weighted means Σp²/Σp, Σpq/Σp (and Σqp/Σq, Σq²/Σq) of those very values, for which
    <p, g_s> = <q, g_t> = 0 term by term, so no pass sums them. (fp64, because near ρ = 1
    the two terms of g are ~10³ times g: a rounded center would shift every g_j alike,
    an error that only <p, g> would have taken back out.)"""
    p_center_s, q_center_s, p_center_t, q_center_t = centers
    g_s = pearson_grad[:, None] * (cross[:, None] * (q_row - q_center_s[:, None])
                                   - self_p[:, None] * (p_row - p_center_s[:, None]))
    g_t = pearson_grad[:, None] * (cross[:, None] * (p_row - p_center_t[:, None])
                                   - self_q[:, None] * (q_row - q_center_t[:, None]))
    g_s = g_s.to(tl.float32)
    g_t = g_t.to(tl.float32)
    if HAS_COLUMN:
        wide_c = C + tl.zeros((), tl.int64)  # k·C in int64
        mean_p = tl.load(col_ptr + cols, mask=col_mask, other=0.0)[None, :]
        mean_q = tl.load(col_ptr + wide_c + cols, mask=col_mask, other=0.0)[None, :]
        c_cross = tl.load(col_ptr + 2 * wide_c + cols, mask=col_mask, other=0.0)[None, :]
        c_self_p = tl.load(col_ptr + 3 * wide_c + cols, mask=col_mask, other=0.0)[None, :]
        c_self_q = tl.load(col_ptr + 4 * wide_c + cols, mask=col_mask, other=0.0)[None, :]
        g_s += column_grad * (c_cross * (q - mean_q) - c_self_p * (p - mean_p))
        g_t += column_grad * (c_cross * (p - mean_p) - c_self_q * (q - mean_q))
    return g_s, g_t


@triton.jit
def _gradient_values(s, t, p, q, ce_prob, g_s, g_t, cols, offsets, mask, grad_rho_ptr, s_max, t_max, kl, p_dot, q_dot,
                     log_sum_difference, target, valid, inv_tau, kl_grad, ce_grad, spearman_grad,
                     HAS_KL: tl.constexpr, HAS_CE: tl.constexpr, HAS_SPEARMAN: tl.constexpr,
                     HAS_TARGET: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
                     PQ_TERMS: tl.constexpr = True):
    """dL/ds and dL/dt of a tile: (p/τ)(g − <p, g>) for g = dℓ/dp from the correlations, the
    KL part in closed form, (p − q)/τ for the student and (q/τ)(log q − log p − KL) for the
    teacher, CE's softmax at τ = 1 (``ce_prob``) − one-hot, and the Spearman kernel's dρ_S/ds.
    Without KL and correlations (PQ_TERMS False: DKD's loss) the terms in p and q are left
    out, so that p and q need not be formed."""
    v_s = p  # placeholders of the right shape where a gradient is not asked for
    v_t = q
    if STUDENT_GRAD:
        if PQ_TERMS:
            v_s = kl_grad * (p - q) + inv_tau * p * (g_s - p_dot[:, None])
        else:
            v_s = tl.zeros_like(s)
        if HAS_CE:
            v_s += ce_grad * (ce_prob - tl.where(cols[None, :] == target[:, None], 1.0, 0.0))
        if HAS_SPEARMAN:
            v_s -= spearman_grad[:, None] * tl.load(grad_rho_ptr + offsets, mask=mask, other=0.0)
        if HAS_TARGET:
            v_s = tl.where(valid[:, None], v_s, float("nan"))
    if TEACHER_GRAD:
        if PQ_TERMS:
            v_t = inv_tau * q * (g_t - q_dot[:, None])
        else:
            v_t = tl.zeros_like(t)
        if HAS_KL:
            ratio = ((t - t_max[:, None]).to(tl.float64) - (s - s_max[:, None]).to(tl.float64)) * inv_tau \
                + log_sum_difference[:, None]
            v_t += tl.where(q > 0.0, kl_grad * q * (ratio - kl[:, None]).to(tl.float32), 0.0)
        if HAS_TARGET:
            v_t = tl.where(valid[:, None], v_t, float("nan"))
    return v_s, v_t


@triton.jit
def _chunk(s_ptr, t_ptr, t_idx_ptr, t_fill_ptr, rows, row_base, row_mask, start, cols, C, K, log_k, swap_a, swap_b,
           t_at_a, t_at_b, s_max, s_log_sum, t_max, t_log_sum, inv_tau, standard, RECTIFY: tl.constexpr,
           SPARSE: tl.constexpr, STANDARDIZE: tl.constexpr):
    """Columns [start, start + BLOCK) of a program's rows for the chunked path's later passes:
    the raw student logits (CE's), the logits the loss sees and p, q. Both rows are read
    contiguously (vector loads; a sparse teacher's chunk is rebuilt by ``_teacher_tile``),
    standardized (STANDARDIZE) by the rows' statistics ``standard`` = (student mean, a,
    teacher mean, a); the rectified teacher's two exchanged columns are put in place from
    their values t_at_a, t_at_b (standardized already)."""
    offs = start + cols
    col_mask = offs < C
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = row_base[:, None] + offs[None, :]
    s_raw = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    s = s_raw
    t = _teacher_tile(t_ptr, offsets, t_idx_ptr, t_fill_ptr, rows[:, None], row_mask[:, None], offs[None, :], mask, 0.0,
                      K, log_k, SPARSE)
    if STANDARDIZE:
        s_mean, s_scale, t_mean, t_scale = standard
        s = _standardized(s_raw, s_mean[:, None], s_scale[:, None])
        t = _standardized(t, t_mean[:, None], t_scale[:, None])
    if RECTIFY:
        t = tl.where(offs[None, :] == swap_a[:, None], t_at_b[:, None],
                     tl.where(offs[None, :] == swap_b[:, None], t_at_a[:, None], t))
    p = tl.where(mask, _probability(s, s_max[:, None], s_log_sum[:, None], inv_tau), 0.0)
    q = tl.where(mask, _probability(t, t_max[:, None], t_log_sum[:, None], inv_tau), 0.0)
    return offs, col_mask, mask, offsets, s_raw, s, t, p, q


@triton.jit
def _chunk_gradient(s_ptr, t_ptr, t_idx_ptr, t_fill_ptr, grad_rho_ptr, col_ptr, chunk_max_ptr, rows, row_base,
                    row_mask, start, cols, C, K, log_k, swap_a, swap_b, t_at_a, t_at_b, s_max, s_log_sum, t_max,
                    t_log_sum, inv_tau, standard, moment_s, moment_t, weighted_centers, cross, self_p, self_q,
                    pearson_grad, column_grad, ce_max, s_sum1, kl, p_dot, q_dot, log_sum_difference, target, valid,
                    kl_grad, ce_grad, spearman_grad, dkd, HAS_KL: tl.constexpr, HAS_CE: tl.constexpr,
                    HAS_PEARSON: tl.constexpr, HAS_SPEARMAN: tl.constexpr, HAS_COLUMN: tl.constexpr,
                    HAS_TARGET: tl.constexpr, HAS_DKD: tl.constexpr, RECTIFY: tl.constexpr, SPARSE: tl.constexpr,
                    STANDARDIZE: tl.constexpr, STUDENT_GRAD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
                    BLOCK: tl.constexpr):
    """The chunked layout's gradient of columns [start, start + BLOCK) of a row: dL/dz for the
    logits z the loss sees (with CE's part unless STANDARDIZE, where CE is added after the
    standardization's chain rule), for the student and the teacher (the teacher's at the
    rectified positions). Returns the chunk's offsets, mask, addresses, raw student logits,
    z_s, z_t, dL/dz_s, dL/dz_t. ``dkd`` = (s̃_max, 1/S̃, t̃_max, 1/T̃, log S̃ − log T̃, NCKD,
    Q − P, ℓ_b·Q(1 − Q)·tckd_grad, tckd_grad, nckd_grad). Reads only this row's chunk (masked
    by j < C), its chunk maxima and the column statistics at columns < C."""
    offs, col_mask, mask, offsets, s_raw, s, t, p, q = _chunk(
        s_ptr, t_ptr, t_idx_ptr, t_fill_ptr, rows, row_base, row_mask, start, cols, C, K, log_k, swap_a, swap_b,
        t_at_a, t_at_b, s_max, s_log_sum, t_max, t_log_sum, inv_tau, standard, RECTIFY, SPARSE, STANDARDIZE)
    p_row = p.to(tl.float64)
    q_row = q.to(tl.float64)
    if HAS_PEARSON and not HAS_COLUMN:
        # p and q as the first pass summed them: e over the running max of the
        # chunk's turn (the same fp32 exponentials), times exp((m_k − max)/τ)/S in
        # fp64. The rectified teacher's two moved columns are taken over the final
        # max (over m_k an exchanged maximum could overflow).
        slot = chunk_max_ptr + (rows * ((C + BLOCK - 1) // BLOCK) + start // BLOCK) * 2
        chunk_s_max = tl.load(slot, mask=row_mask, other=0.0)
        chunk_t_max = tl.load(slot + 1, mask=row_mask, other=0.0)
        e_s = tl.exp((s - tl.where(chunk_s_max > -float("inf"), chunk_s_max, 0.0)[:, None]) * inv_tau)
        e_t = tl.exp((t - tl.where(chunk_t_max > -float("inf"), chunk_t_max, 0.0)[:, None]) * inv_tau)
        scale_s = _rescale(chunk_s_max, s_max, inv_tau) / moment_s
        scale_t = _rescale(chunk_t_max, t_max, inv_tau) / moment_t
        p_row = tl.where(mask, e_s.to(tl.float64) * scale_s[:, None], 0.0)
        q_row = tl.where(mask, e_t.to(tl.float64) * scale_t[:, None], 0.0)
        if RECTIFY:
            moved = (offs[None, :] == swap_a[:, None]) | (offs[None, :] == swap_b[:, None])
            q_moved = tl.exp((t - t_max[:, None]) * inv_tau).to(tl.float64) / moment_t[:, None]
            q_row = tl.where(moved & mask, q_moved, q_row)
        p = p_row.to(tl.float32)
        q = q_row.to(tl.float32)
    g_s, g_t = _correlation_gradients(p, q, p_row, q_row, offs, col_mask, col_ptr, C, weighted_centers,
                                      cross, self_p, self_q, pearson_grad, column_grad, HAS_COLUMN)
    ce_prob = p
    if HAS_CE:
        ce_prob = tl.exp(s_raw - ce_max[:, None]) / s_sum1[:, None]
    v_s, v_t = _gradient_values(s, t, p, q, ce_prob, g_s, g_t, offs, offsets, mask, grad_rho_ptr, s_max,
                                t_max, kl, p_dot, q_dot, log_sum_difference, target, valid, inv_tau,
                                kl_grad, ce_grad, spearman_grad, HAS_KL, HAS_CE and not STANDARDIZE, HAS_SPEARMAN,
                                HAS_TARGET, STUDENT_GRAD, TEACHER_GRAD,
                                HAS_KL or HAS_PEARSON or HAS_COLUMN or not HAS_DKD)
    if HAS_DKD:
        s_rest_max, inv_s_rest, t_rest_max, inv_t_rest, rest_shift, nckd, target_gap, binary_grad, tckd_grad, \
            nckd_grad = dkd
        is_target, tilde_p, tilde_q = _rest_probabilities(s, t, mask, offs, target, s_rest_max, inv_s_rest,
                                                          t_rest_max, inv_t_rest, inv_tau)
        d_s, d_t = _dkd_gradients(s, t, tilde_p, tilde_q, is_target, t_rest_max, s_rest_max, rest_shift, nckd,
                                  target_gap, binary_grad, tckd_grad, nckd_grad, inv_tau, STUDENT_GRAD, TEACHER_GRAD)
        if STUDENT_GRAD:
            v_s += d_s
        if TEACHER_GRAD:
            v_t += d_t
    return offs, mask, offsets, s_raw, s, t, v_s, v_t


@triton.jit
def _fused_row_kernel(
    s_ptr,  # [B, C] student logits
    t_ptr,  # [B, C] teacher logits; sparse: [B, K] fp32 values (_teacher_tile)
    t_idx_ptr,  # sparse: [B, K] int32 their classes, sorted in each row (an fp32 placeholder when dense)
    t_fill_ptr,  # sparse: [B] fp32 the logit of every other class
    target_ptr,  # [B] int64 targets (when HAS_TARGET)
    difficulty_ptr,  # [B] fp32 per-sample difficulty (DIFFICULTY_MODE == 2)
    rho_s_ptr,  # [B] fp64 Spearman correlations (when HAS_SPEARMAN)
    grad_rho_ptr,  # [B, C] fp32 dρ_S/ds (when HAS_SPEARMAN and STUDENT_GRAD; dρ_S/dz_s with STANDARDIZE)
    col_ptr,  # [5, C] fp32 column statistics: mean_p, mean_q, cross, self_p, self_q (HAS_COLUMN)
    stats_ptr,  # [B, 4] fp32 the rows' softmax statistics the column statistics used (HAS_COLUMN)
    standard_ptr,  # [B, 6] fp64 the rows' standardization (STANDARDIZE: fp64, else an fp32 placeholder)
    chunk_max_ptr,  # [B, chunks, 2] fp32 workspace: the chunked first pass's running maxima per chunk
    row_loss_ptr,  # [B] fp32 out: ℓ_i
    dkd_ptr,  # [B, 2] fp64 out: each row's TCKD and NCKD (HAS_DKD: fp64, else an fp32 placeholder)
    gs_ptr,  # [B, C] out: dL/ds, in the student's dtype (STUDENT_GRAD)
    gt_ptr,  # [B, C] out: dL/dt, in the teacher's dtype (TEACHER_GRAD; never with a sparse teacher)
    B,
    K,  # sparse: the values per row
    log_k,  # sparse: ceil(log2 K), the binary search's halvings
    inv_tau,
    kl_coef,
    ce_coef,
    pearson_coef,
    spearman_coef,
    column_coef,
    tckd_coef,
    nckd_coef,
    difficulty_value,
    grad_scale,
    C: tl.constexpr,
    HAS_TARGET: tl.constexpr,
    HAS_KL: tl.constexpr,
    HAS_CE: tl.constexpr,
    HAS_PEARSON: tl.constexpr,
    HAS_SPEARMAN: tl.constexpr,
    HAS_COLUMN: tl.constexpr,
    RECTIFY: tl.constexpr,
    DIFFICULTY_MODE: tl.constexpr,
    STUDENT_GRAD: tl.constexpr,
    TEACHER_GRAD: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    # Two layouts of one computation. RESIDENT (C <= BLOCK): ROWS rows per program, each
    # [ROWS, BLOCK] input tile read from global memory once (C is a constexpr, so for C a
    # multiple of 8 the compiler knows every row starts 16-byte aligned and emits 128-bit
    # loads and stores), the exponentials computed once and kept in registers for every
    # later pass, the gradient written once. Chunked (C > BLOCK, ROWS = 1): two reads of
    # each input, whatever the loss: a first pass over chunks of BLOCK columns (an online
    # softmax that also folds in KL, the entropy, the row Pearson moments and DKD's
    # non-target statistics; with the column term, whose kernel already wrote the rows'
    # statistics, a direct pass for KL, the moments, DKD's statistics and the column term's
    # <p, g>), then the gradient's pass, backward (it starts on the chunks the first pass
    # read last, the likeliest still in L2). Two settings add a pass: DKD with a rectified
    # teacher (its non-target classes are known only after the argmax: a pass over the
    # rectified row, backward), and STANDARDIZE with a gradient (<g, 1> and <g, z> of the
    # chain rule before any gradient is written: a sums pass, backward, then the gradient's
    # pass forward); with STANDARDIZE the rows' statistics come from _standardize_kernel,
    # which read the row once more before this kernel.
    #
    # DKD (HAS_DKD): the non-target statistics are an online softmax over the lanes
    # j != y (_rest_step), in the resident layout one over the registers; TCKD from logs of
    # logits (_dkd_terms), NCKD from the KL's online sum (chunked) or a masked sum (resident).
    # STANDARDIZE: every row the loss sees is z = (x − mean)·a (_standardized, from fp64
    # statistics: taken in registers by _row_moments in the resident layout unless another
    # kernel standardized the rows too (READ_STANDARD), else read from standard_ptr); the
    # rectification's argmax, the entropy and the Spearman gradient are the standardized
    # rows'; CE's softmax, max and target logit are the raw student's.
    #
    # Memory safety: rows i = program·ROWS + r are masked by i < B (the last program's
    # surplus rows load nothing and store nothing); row offsets i·C are int64, column offsets
    # within a row int32 (C <= MAX_CLASSES) masked by j < C. The rectification's two swapped
    # columns are the target (used only when 0 <= target < C) and the teacher's first
    # argmax, taken over NaN-free values where padding lanes hold −inf and lie right of every
    # real column, so that with left tie-breaking it is always a real column (NaN would
    # otherwise make the reduction return a padding lane and the swap read and write past
    # the row). Column statistics are read at k·C + j in int64. Each program writes only
    # its own rows. The only cross-thread values are reductions (along a row), which Triton
    # synchronizes itself, and the chunked row Pearson term's workspace of running maxima
    # (chunk_max_ptr, int64 row offsets, a row's slots written and read by its own program
    # only): the first pass stores them, a barrier orders those stores before the
    # gradient's pass loads them (a slot may be stored by one thread and loaded by another).
    # DKD and standardization add only row reductions and per-row values: the target
    # column's logits are taken by a masked sum over the row's lanes (resident) or loaded
    # at row·C + y only where 0 <= y < C (chunked); the statistics are loaded at rows·6 + k
    # and TCKD, NCKD stored at rows·2 + k (int64) for rows < B; no workspace is shared.
    # The standardization's sums pass and the gradient's pass both read the inputs only,
    # and the gradient is stored once, by the last.
    #
    # A sparse teacher (SPARSE, int32 indices) is read only through _teacher_tile, at the
    # same (row, column) lanes and masks as the dense one: its loads are at rows·K + j of
    # this program's own rows (int64 row offsets, 0 <= j < K whatever the indices hold:
    # _sparse_slot) and at fill[row] for unmasked rows, so the dense argument above holds for
    # the rebuilt row unchanged, the rectification's argmax included (taken over the rebuilt
    # values: the first max of the dense row), and so does the standardization (of the
    # rebuilt row). Nothing is written for the teacher.
    SPARSE: tl.constexpr = t_idx_ptr.dtype.element_ty == tl.int32
    HAS_DKD: tl.constexpr = dkd_ptr.dtype.element_ty == tl.float64
    STANDARDIZE: tl.constexpr = standard_ptr.dtype.element_ty == tl.float64
    # The statistics _standardize_kernel wrote (the launcher runs it exactly then), so that
    # the column statistics and the Spearman terms, which read them too, see these floats.
    READ_STANDARD: tl.constexpr = STANDARDIZE and (not RESIDENT or HAS_COLUMN or HAS_SPEARMAN)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < B
    row_base = rows * C
    cols = tl.arange(0, BLOCK)
    zeros = tl.zeros((ROWS,), tl.float32)
    target = tl.zeros((ROWS,), tl.int32)
    valid = row_mask
    if HAS_TARGET:
        target64 = tl.load(target_ptr + rows, mask=row_mask, other=0)
        valid = row_mask & (target64 >= 0) & (target64 < C)  # in int64: 2^32 + 3 is not class 3
        target = tl.where(valid, target64, 0).to(tl.int32)
    # Each row's standardization (fp64): mean, a = 1/(std + 1e-7), 1/((C − 1)·std).
    s_mean = zeros.to(tl.float64)
    s_scale = s_mean + 1.0
    s_dof = s_mean
    t_mean = s_mean
    t_scale = s_scale
    t_dof = s_mean
    if READ_STANDARD:
        s_mean, s_scale, s_dof, t_mean, t_scale, t_dof = _load_standard(standard_ptr, rows, row_mask)

    # Pass 1: per-row max and softmax normalizers (at τ, and at 1 for the CE term), and the
    # teacher's first argmax for the rectification.
    s_max = zeros - float("inf")
    t_max = zeros - float("inf")
    s_sum = zeros
    t_sum = zeros
    s_sum1 = zeros
    ce_max = zeros - float("inf")  # CE's max, of the raw logits (STANDARDIZE; otherwise s_max)
    t_arg = tl.zeros((ROWS,), tl.int32)
    t_best = zeros - float("inf")
    weighted = zeros.to(tl.float64)  # the chunked layout's online KL and entropy
    centered = zeros
    # DKD's non-target statistics (_rest_step; the chunked layout's NCKD sum)
    s_rest_max = zeros - float("inf")
    s_rest_sum = zeros
    t_rest_max = zeros - float("inf")
    t_rest_sum = zeros
    weighted_rest = zeros.to(tl.float64)
    if RESIDENT:
        col_mask = cols < C
        mask = row_mask[:, None] & col_mask[None, :]
        offsets = row_base[:, None] + cols[None, :]
        s = tl.load(s_ptr + offsets, mask=mask, other=-float("inf")).to(tl.float32)
        t = _teacher_tile(t_ptr, offsets, t_idx_ptr, t_fill_ptr, rows[:, None], row_mask[:, None], cols[None, :], mask,
                          -float("inf"), K, log_k, SPARSE)
        e_s1 = s
        if HAS_CE:
            ce_max, s_sum1, e_s1 = _softmax_step(s_max, s_sum1, s, 1.0)
        if STANDARDIZE:
            if not READ_STANDARD:
                # The shift: each row's first logit, loaded again (a cached scalar, the tile's
                # very float) rather than reduced out of the tile.
                s_first = tl.load(s_ptr + row_base, mask=row_mask, other=0.0).to(tl.float32)
                t_first = _teacher_tile(t_ptr, row_base, t_idx_ptr, t_fill_ptr, rows, row_mask, target * 0, row_mask,
                                        0.0, K, log_k, SPARSE)
                s_mean, s_squares = _row_moments(s, mask, s_first, C)
                t_mean, t_squares = _row_moments(t, mask, t_first, C)
                s_scale, s_dof = _standard_scales(s_squares, C)
                t_scale, t_dof = _standard_scales(t_squares, C)
            s = tl.where(mask, _standardized(s, s_mean[:, None], s_scale[:, None]), -float("inf"))
            t = tl.where(mask, _standardized(t, t_mean[:, None], t_scale[:, None]), -float("inf"))
        s_max, s_sum, e_s = _softmax_step(s_max, s_sum, s, inv_tau)
        t_max, t_sum, e_t = _softmax_step(t_max, t_sum, t, inv_tau)
        if RECTIFY:
            t_arg = tl.argmax(tl.where(t == t, t, -float("inf")), 1, tie_break_left=True).to(tl.int32)
    # The chunked layout's row Pearson moments, taken online in its first pass
    # (_online_moments_step): Σe_s, Σe_t, Σe_s², Σe_t², Σe_s·e_t in fp64.
    moment_s = zeros.to(tl.float64)
    moment_t = zeros.to(tl.float64)
    moment_ss = zeros.to(tl.float64)
    moment_tt = zeros.to(tl.float64)
    moment_st = zeros.to(tl.float64)
    if not RESIDENT and not HAS_COLUMN:
        # With the column term the rows' statistics come from the column statistics' kernel
        # (below), and this pass is not needed.
        for start in range(0, C, BLOCK):
            offs = start + cols
            mask = row_mask[:, None] & (offs < C)[None, :]
            s = tl.load(s_ptr + row_base[:, None] + offs[None, :], mask=mask, other=-float("inf")).to(tl.float32)
            t = _teacher_tile(t_ptr, row_base[:, None] + offs[None, :], t_idx_ptr, t_fill_ptr, rows[:, None],
                              row_mask[:, None], offs[None, :], mask, -float("inf"), K, log_k, SPARSE)
            if HAS_CE:
                if STANDARDIZE:
                    ce_max, s_sum1, _ = _softmax_step(ce_max, s_sum1, s, 1.0)
                else:
                    _, s_sum1, _ = _softmax_step(s_max, s_sum1, s, 1.0)
            if STANDARDIZE:
                s = tl.where(mask, _standardized(s, s_mean[:, None], s_scale[:, None]), -float("inf"))
                t = tl.where(mask, _standardized(t, t_mean[:, None], t_scale[:, None]), -float("inf"))
            new_s_max, s_sum, e_s = _softmax_step(s_max, s_sum, s, inv_tau)
            if RECTIFY:
                t_ordered = tl.where(t == t, t, -float("inf"))  # NaN never wins the argmax
                chunk_best = tl.max(t_ordered, 1)
                chunk_arg = tl.argmax(t_ordered, 1, tie_break_left=True).to(tl.int32)
                t_arg = tl.where(chunk_best > t_best, start + chunk_arg, t_arg)
                t_best = tl.maximum(t_best, chunk_best)
            new_max, new_sum, e_t = _softmax_step(t_max, t_sum, t, inv_tau)
            if HAS_KL or DIFFICULTY_MODE == 1:
                weighted, centered = _online_kl_step(t_max, t_sum, new_max, e_t, weighted, centered, s, t, inv_tau)
            if HAS_PEARSON:
                moment_s, moment_t, moment_ss, moment_tt, moment_st = _online_moments_step(
                    moment_s, moment_t, moment_ss, moment_tt, moment_st, _rescale(s_max, new_s_max, inv_tau),
                    _rescale(t_max, new_max, inv_tau), e_s, e_t)
                # The maxima e_s, e_t were taken over, so that the gradient's pass recomputes
                # these very exponentials (bit for bit) and the sums hold its values.
                slot = chunk_max_ptr + (rows * ((C + BLOCK - 1) // BLOCK) + start // BLOCK) * 2
                tl.store(slot, new_s_max, mask=row_mask)
                tl.store(slot + 1, new_max, mask=row_mask)
            if HAS_DKD and not RECTIFY:  # (a rectified teacher's non-target classes: a pass below)
                rest = mask & (offs[None, :] != target[:, None])
                s_rest_max, s_rest_sum, t_rest_max, t_rest_sum, weighted_rest = _rest_step(
                    s_rest_max, s_rest_sum, t_rest_max, t_rest_sum, weighted_rest, s, t, rest, inv_tau)
            s_max = new_s_max
            t_max = new_max
            t_sum = new_sum
        if HAS_PEARSON:
            tl.debug_barrier()  # the maxima stored above are read back by other threads below
    s_log_sum = tl.log(s_sum)
    t_log_sum = tl.log(t_sum)
    # The logs in fp64: at τ = 100 an fp32 log's rounding alone, times τ², moves the loss of
    # two nearly equal rows by ~6e-4 (two scalar fp64 logs per row: no cost).
    log_sum_difference = tl.log(s_sum.to(tl.float64)) - tl.log(t_sum.to(tl.float64))
    s_log64 = tl.log(s_sum.to(tl.float64))  # (DKD's)
    t_log64 = tl.log(t_sum.to(tl.float64))
    if HAS_COLUMN:
        # The column statistics were computed from these rows' p and q: the row kernel uses
        # the very same values (the same statistics, the same formula), or a constant
        # column's p − mean_p would be rounding, times the 1/1e-8 floor of its correlation.
        stats = stats_ptr + rows * 4
        s_max = tl.load(stats, mask=row_mask, other=0.0)
        s_log_sum = tl.load(stats + 1, mask=row_mask, other=0.0)
        t_max = tl.load(stats + 2, mask=row_mask, other=0.0)
        t_log_sum = tl.load(stats + 3, mask=row_mask, other=0.0)
        log_sum_difference = s_log_sum.to(tl.float64) - t_log_sum.to(tl.float64)
        s_log64 = s_log_sum.to(tl.float64)
        t_log64 = t_log_sum.to(tl.float64)
    # Rectified teacher: column t_arg and the target trade places (no-op when equal).
    swap_a = tl.where(RECTIFY & valid, t_arg, -1)
    swap_b = tl.where(RECTIFY & valid, target, -1)
    t_at_a = zeros  # the chunked layout's rectification: the teacher at the two columns
    t_at_b = zeros
    if RECTIFY and not RESIDENT:
        t_at_a = _teacher_tile(t_ptr, row_base + swap_a, t_idx_ptr, t_fill_ptr, rows, swap_a >= 0, swap_a, swap_a >= 0,
                               0.0, K, log_k, SPARSE)
        t_at_b = _teacher_tile(t_ptr, row_base + swap_b, t_idx_ptr, t_fill_ptr, rows, swap_b >= 0, swap_b, swap_b >= 0,
                               0.0, K, log_k, SPARSE)
        if STANDARDIZE:
            t_at_a = _standardized(t_at_a, t_mean, t_scale)
            t_at_b = _standardized(t_at_b, t_mean, t_scale)
    standard = (s_mean, s_scale, t_mean, t_scale)  # what _chunk standardizes with

    # Pass 2: KL, entropy, and the means of p and q shifted by their first element (so that
    # a constant row centers to exactly zero).
    if RESIDENT:
        if RECTIFY:
            t = _swap_columns(t, cols, swap_a, swap_b)
            e_t = _swap_columns(e_t, cols, swap_a, swap_b)
        if HAS_COLUMN:
            p = tl.where(mask, _probability(s, s_max[:, None], s_log_sum[:, None], inv_tau), 0.0)
            q = tl.where(mask, _probability(t, t_max[:, None], t_log_sum[:, None], inv_tau), 0.0)
        else:
            p = e_s * (1.0 / s_sum)[:, None]
            q = e_t * (1.0 / t_sum)[:, None]
        p0 = _column_value(p, cols, target * 0)
        q0 = _column_value(q, cols, target * 0)
        kl, entropy, p_shift, q_shift = _kl_and_moments(s, t, q, mask, s_max, t_max, t_log_sum, log_sum_difference,
                                                        inv_tau, p, p0, q0, HAS_KL)
    else:
        # KL and entropy came from the first pass (the rectification moves q between columns
        # a and b only: KL gains (q_a − q_b)(s_a − s_b)/τ; the entropy does not change);
        # with the column term, from the pass below.
        p0 = zeros
        q0 = zeros
        p_shift = zeros
        q_shift = zeros
        kl = weighted / t_sum.to(tl.float64) + (s_max - t_max).to(tl.float64) * inv_tau + log_sum_difference
        entropy = t_log_sum - centered / t_sum
        # Σ(e_s − ē_s)(e_t − ē_t) over the rectified teacher: exchanging the teacher's columns a
        # and b takes (e_s,a − e_s,b)(e_t,a − e_t,b) off the cross sum (its other sums and
        # means do not change).
        cross_fix = zeros.to(tl.float64)
        if RECTIFY:
            swapped = swap_a != swap_b
            s_a = tl.load(s_ptr + row_base + swap_a, mask=swapped, other=0.0).to(tl.float32)
            s_b = tl.load(s_ptr + row_base + swap_b, mask=swapped, other=0.0).to(tl.float32)
            if STANDARDIZE:
                s_a = _standardized(s_a, s_mean, s_scale)
                s_b = _standardized(s_b, s_mean, s_scale)
            q_a = tl.exp((t_at_a - t_max) * inv_tau - t_log_sum)
            q_b = tl.exp((t_at_b - t_max) * inv_tau - t_log_sum)
            kl += tl.where(swapped, ((q_a - q_b) * (s_a - s_b)).to(tl.float64) * inv_tau, 0.0)
            e_gap_s = tl.exp((s_a - s_max) * inv_tau) - tl.exp((s_b - s_max) * inv_tau)
            e_gap_t = tl.exp((t_at_a - t_max) * inv_tau) - tl.exp((t_at_b - t_max) * inv_tau)
            cross_fix = tl.where(swapped, e_gap_s.to(tl.float64) * e_gap_t.to(tl.float64), 0.0)
    # The chunked layout's row term: its centered moments Σ(p − p̄)(q − q̄), Σ(p − p̄)²,
    # Σ(q − q̄)² (fp64) give ρ; its gradients are centered at the weighted means (see
    # _correlation_gradients), for which <p, g> and <q, g> vanish: no pass for them.
    centered_ab = zeros.to(tl.float64)
    centered_aa = zeros.to(tl.float64)
    centered_bb = zeros.to(tl.float64)
    weighted_centers = (zeros, zeros, zeros, zeros)
    if not RESIDENT and HAS_PEARSON and not HAS_COLUMN:
        # From the first pass's sums over e = exp((x − max)/τ), with p = e_s/S, q = e_t/T as
        # the gradient's pass forms them (fp64): Σp²/Σp = Σe_s²/S², Σpq/Σp = Σe_s e_t/(S·T).
        # Divided in an order that leaves a constant row's center exactly its p = 1/C (every
        # e_s = 1, S = C, Σe_s e_t = T): p − c_p is then exactly 0, as the 1/1e-8 floor of a
        # constant row's correlation needs.
        n = C + tl.zeros_like(moment_s)
        sum_s = moment_s
        sum_t = moment_t
        cross_sum = moment_st - cross_fix
        centered_ab = (cross_sum - sum_s * sum_t / n) / (sum_s * sum_t)
        centered_aa = tl.maximum(moment_ss - sum_s * sum_s / n, 0.0) / (sum_s * sum_s)
        centered_bb = tl.maximum(moment_tt - sum_t * sum_t / n, 0.0) / (sum_t * sum_t)
        weighted_centers = (moment_ss / sum_s / sum_s, cross_sum / sum_s / sum_t, cross_sum / sum_t / sum_s,
                            moment_tt / sum_t / sum_t)
    if not RESIDENT and HAS_COLUMN:
        # The rows' statistics are known (the column statistics' kernel wrote them), so one
        # pass takes KL and the entropy directly, CE's normalizer, the row's sums shifted by
        # its first element, Σa, Σb, Σab, Σa², Σb² for a = p − p_0, b = q − q_0 (fp64; a
        # constant row stays exactly zero), the column term's share of <p, g>, <q, g>
        # from the very fp32 p, q and column statistics the gradient uses, and DKD's
        # non-target statistics.
        first = tl.where(swap_a == 0, swap_b, tl.where(swap_b == 0, swap_a, 0))
        s0 = tl.load(s_ptr + row_base, mask=row_mask, other=0.0).to(tl.float32)
        t0 = _teacher_tile(t_ptr, row_base + first, t_idx_ptr, t_fill_ptr, rows, row_mask, first, row_mask, 0.0, K,
                           log_k, SPARSE)
        if STANDARDIZE:
            s0 = _standardized(s0, s_mean, s_scale)
            t0 = _standardized(t0, t_mean, t_scale)
        p0 = _probability(s0, s_max, s_log_sum, inv_tau)
        q0 = _probability(t0, t_max, t_log_sum, inv_tau)
        kl = zeros.to(tl.float64)
        entropy = zeros
        sum_a = zeros.to(tl.float64)
        sum_b = zeros.to(tl.float64)
        sum_ab = zeros.to(tl.float64)
        sum_aa = zeros.to(tl.float64)
        sum_bb = zeros.to(tl.float64)
        column_dot_s = zeros
        column_dot_t = zeros
        for step in range(0, (C + BLOCK - 1) // BLOCK):
            start = _chunk_start(step, C, BLOCK, False)
            offs, col_mask, mask, offsets, s_raw, s, t, p, q = _chunk(
                s_ptr, t_ptr, t_idx_ptr, t_fill_ptr, rows, row_base, row_mask, start, cols, C, K, log_k, swap_a, swap_b,
                t_at_a, t_at_b, s_max, s_log_sum, t_max, t_log_sum, inv_tau, standard, RECTIFY, SPARSE, STANDARDIZE)
            if HAS_KL or DIFFICULTY_MODE == 1:
                chunk_kl, chunk_entropy, _, _ = _kl_and_moments(s, t, q, mask, s_max, t_max, t_log_sum,
                                                                log_sum_difference, inv_tau, p, p0, q0, HAS_KL)
                kl += chunk_kl
                entropy += chunk_entropy
            if HAS_CE:
                if STANDARDIZE:  # the raw logits' own online normalizer
                    ce_max, s_sum1, _ = _softmax_step(ce_max, s_sum1, tl.where(mask, s_raw, -float("inf")), 1.0)
                else:
                    s_sum1 += tl.sum(tl.where(mask, tl.exp(s - s_max[:, None]), 0.0), 1)
            if HAS_PEARSON:
                # In fp64 from the fp32 values (exact): the centering below cancels Σa·Σb/C
                # against Σab, and a rounded a would pass its error on, magnified.
                a = tl.where(mask, p.to(tl.float64) - p0.to(tl.float64)[:, None], 0.0)
                b = tl.where(mask, q.to(tl.float64) - q0.to(tl.float64)[:, None], 0.0)
                sum_a += tl.sum(a, 1)
                sum_b += tl.sum(b, 1)
                sum_ab += tl.sum(a * b, 1)
                sum_aa += tl.sum(a * a, 1)
                sum_bb += tl.sum(b * b, 1)
            if HAS_DKD:
                rest = mask & (offs[None, :] != target[:, None])
                s_rest_max, s_rest_sum, t_rest_max, t_rest_sum, weighted_rest = _rest_step(
                    s_rest_max, s_rest_sum, t_rest_max, t_rest_sum, weighted_rest, s, t, rest, inv_tau)
            # the column part of g alone (row coefficients 0, column weight 1)
            c_s, c_t = _correlation_gradients(p, q, p, q, offs, col_mask, col_ptr, C, (zeros, zeros, zeros, zeros),
                                              zeros, zeros, zeros, zeros, 1.0, HAS_COLUMN)
            column_dot_s += tl.sum(tl.where(mask, p * c_s, 0.0), 1)
            column_dot_t += tl.sum(tl.where(mask, q * c_t, 0.0), 1)
        p_shift = sum_a.to(tl.float32)
        q_shift = sum_b.to(tl.float32)
        if HAS_PEARSON:
            # The moments about the fp32 means the gradient uses (as the resident layout takes
            # them), from the shifted sums: Σ(p − p̄)(q − q̄) = Σab − d_q Σa − d_p Σb + C d_p d_q
            # with d = p̄ − p_0, in fp64.
            d_p = (p0 + p_shift / C).to(tl.float64) - p0.to(tl.float64)
            d_q = (q0 + q_shift / C).to(tl.float64) - q0.to(tl.float64)
            centered_ab = sum_ab - d_q * sum_a - d_p * sum_b + C * d_p * d_q
            centered_aa = tl.maximum(sum_aa - 2.0 * d_p * sum_a + C * d_p * d_p, 0.0)
            centered_bb = tl.maximum(sum_bb - 2.0 * d_q * sum_b + C * d_q * d_q, 0.0)
            # The weighted means from the same sums of the very p, q the gradient uses, about
            # p_0 and q_0 (a constant row's center is then exactly its p): Σp²/Σp =
            # p_0 + (Σa² + p_0 Σa)/Σp, Σpq/Σp = q_0 + (Σab + p_0 Σb)/Σp, with Σp = C p_0 + Σa.
            p064 = p0.to(tl.float64)
            q064 = q0.to(tl.float64)
            total_p = C * p064 + sum_a
            total_q = C * q064 + sum_b
            weighted_centers = (p064 + (sum_aa + p064 * sum_a) / total_p, q064 + (sum_ab + p064 * sum_b) / total_p,
                                p064 + (sum_ab + q064 * sum_a) / total_q, q064 + (sum_bb + q064 * sum_b) / total_q)
    if not RESIDENT and HAS_DKD and RECTIFY:
        # DKD's non-target classes of the rectified row (known only now): one more pass.
        for step in range(0, (C + BLOCK - 1) // BLOCK):
            start = _chunk_start(step, C, BLOCK, True)
            offs, col_mask, mask, offsets, s_raw, s, t, p, q = _chunk(
                s_ptr, t_ptr, t_idx_ptr, t_fill_ptr, rows, row_base, row_mask, start, cols, C, K, log_k, swap_a, swap_b,
                t_at_a, t_at_b, s_max, s_log_sum, t_max, t_log_sum, inv_tau, standard, RECTIFY, SPARSE, STANDARDIZE)
            rest = mask & (offs[None, :] != target[:, None])
            s_rest_max, s_rest_sum, t_rest_max, t_rest_sum, weighted_rest = _rest_step(
                s_rest_max, s_rest_sum, t_rest_max, t_rest_sum, weighted_rest, s, t, rest, inv_tau)
    p_mean = p0 + p_shift / C
    q_mean = q0 + q_shift / C

    # DKD's terms: TCKD from logs of logits, NCKD over the non-target classes (the rectified
    # teacher's when RECTIFY: its target column holds the argmax's logit).
    tckd = zeros.to(tl.float64)
    nckd = zeros.to(tl.float64)
    log_p_target = tckd
    log_q_target = tckd
    log_p_rest = tckd
    log_q_rest = tckd
    rest_shift = tckd
    if HAS_DKD:
        if RESIDENT:
            rest = mask & (cols[None, :] != target[:, None])
            s_rest_max, s_rest_sum, _ = _softmax_step(s_rest_max, s_rest_sum, tl.where(rest, s, -float("inf")), inv_tau)
            t_rest_max, t_rest_sum, e_rest_t = _softmax_step(t_rest_max, t_rest_sum,
                                                             tl.where(rest, t, -float("inf")), inv_tau)
            tilde_q = e_rest_t * (1.0 / t_rest_sum)[:, None]
            s_y = _column_value(s, cols, target)
            t_y = _column_value(t, cols, target)
        else:
            s_y = tl.load(s_ptr + row_base + target, mask=valid, other=0.0).to(tl.float32)
            t_y = _teacher_tile(t_ptr, row_base + target, t_idx_ptr, t_fill_ptr, rows, valid, target, valid, 0.0, K,
                                log_k, SPARSE)
            if STANDARDIZE:
                s_y = _standardized(s_y, s_mean, s_scale)
                t_y = _standardized(t_y, t_mean, t_scale)
            if RECTIFY:
                t_y = t_at_a
        log_p_target, log_q_target, log_p_rest, log_q_rest, tckd, rest_shift = _dkd_terms(
            s_y, t_y, s_max, t_max, s_log64, t_log64, s_rest_max, s_rest_sum, t_rest_max, t_rest_sum, inv_tau)
        if RESIDENT:
            ratio = ((t - t_rest_max[:, None]).to(tl.float64) - (s - s_rest_max[:, None]).to(tl.float64)) * inv_tau \
                + rest_shift[:, None]
            nckd = tl.sum(tl.where(rest & (tilde_q > 0.0), tilde_q.to(tl.float64) * ratio, 0.0), 1)
        else:
            nckd = weighted_rest / t_rest_sum.to(tl.float64) + (s_rest_max - t_rest_max).to(tl.float64) * inv_tau \
                + rest_shift
        tl.store(dkd_ptr + rows * 2, tckd, mask=row_mask)
        tl.store(dkd_ptr + rows * 2 + 1, nckd, mask=row_mask)

    loss = zeros.to(tl.float64)
    if HAS_KL:  # KL ≥ 0 despite rounding at a large τ (the gradient keeps the unclamped kl)
        loss += kl_coef * tl.where(kl < 0.0, 0.0, kl)  # NaN stays NaN
    if not STANDARDIZE:
        ce_max = s_max
    if HAS_CE:
        s_y_raw = tl.load(s_ptr + row_base + target, mask=valid, other=0.0).to(tl.float32)
        loss += ce_coef * (tl.log(s_sum1) + ce_max - s_y_raw)
    if HAS_DKD:  # NCKD ≥ 0 despite rounding, as KL
        loss += tckd_coef * tckd + nckd_coef * tl.where(nckd < 0.0, 0.0, nckd)
    d = zeros + difficulty_value
    if DIFFICULTY_MODE == 1:
        d = tl.minimum(1.0, tl.maximum(0.0, entropy / tl.log(zeros + C)))
    if DIFFICULTY_MODE == 2:
        d = tl.load(difficulty_ptr + rows, mask=row_mask, other=0.0)
    pearson_weight = zeros
    cross = zeros
    self_p = zeros
    self_q = zeros
    if HAS_PEARSON:
        pearson_weight = pearson_coef * (1.0 - d)
        if RESIDENT:
            ab, aa, bb = _pearson_moments(p, q, mask, p_mean, q_mean)
        else:
            ab = centered_ab
            aa = centered_aa
            bb = centered_bb
        rho, cross64, self_p64, self_q64 = _correlation(ab, aa, bb)
        cross = cross64.to(tl.float32)
        self_p = self_p64.to(tl.float32)
        self_q = self_q64.to(tl.float32)
        loss += pearson_weight * (1.0 - rho)
    spearman_weight = zeros
    if HAS_SPEARMAN:
        spearman_weight = spearman_coef * d
        loss += spearman_weight * (1.0 - tl.load(rho_s_ptr + rows, mask=row_mask, other=0.0))
    if HAS_TARGET:
        loss = tl.where(valid, loss, float("nan"))
    tl.store(row_loss_ptr + rows, loss.to(tl.float32), mask=row_mask)

    if STUDENT_GRAD or TEACHER_GRAD:
        pearson_grad = -pearson_weight * grad_scale
        column_grad = -column_coef / C
        kl_grad = kl_coef * grad_scale * inv_tau
        ce_grad = ce_coef * grad_scale
        spearman_grad = spearman_weight * grad_scale
        # DKD's per-row gradient factors (the CPU kernel's): Q − P, and ℓ_b·Q·(1 − Q)·tckd_grad
        # with Q·(1 − Q) from logs (either factor may be tiny), 0 where it underflows.
        tckd_grad = tckd_coef * grad_scale * inv_tau
        nckd_grad = nckd_coef * grad_scale * inv_tau
        target_gap = zeros
        binary_grad = zeros
        if HAS_DKD:
            q_target = tl.exp(log_q_target)
            target_gap = (q_target - tl.exp(log_p_target)).to(tl.float32)
            q_mass = q_target * tl.exp(log_q_rest)
            binary_grad = tl.where(q_mass > 0.0, ((log_q_target - log_q_rest - log_p_target + log_p_rest) * q_mass)
                                   .to(tl.float32) * tckd_grad, 0.0)
        if RESIDENT:
            g_s, g_t = _correlation_gradients(p, q, p, q, cols, col_mask, col_ptr, C, (p_mean, q_mean, p_mean, q_mean),
                                              cross, self_p, self_q, pearson_grad, column_grad, HAS_COLUMN)
            p_dot = zeros
            q_dot = zeros
            if HAS_PEARSON or HAS_COLUMN:
                p_dot = tl.sum(tl.where(mask, p * g_s, 0.0), 1)
                q_dot = tl.sum(tl.where(mask, q * g_t, 0.0), 1)
            ce_prob = e_s1 * (1.0 / s_sum1)[:, None]
            v_s, v_t = _gradient_values(s, t, p, q, ce_prob, g_s, g_t, cols, offsets, mask, grad_rho_ptr, s_max,
                                        t_max, kl, p_dot, q_dot, log_sum_difference, target, valid, inv_tau, kl_grad,
                                        ce_grad, spearman_grad, HAS_KL, HAS_CE and not STANDARDIZE, HAS_SPEARMAN,
                                        HAS_TARGET, STUDENT_GRAD, TEACHER_GRAD,
                                        HAS_KL or HAS_PEARSON or HAS_COLUMN or not HAS_DKD)
            if HAS_DKD:
                is_target, tilde_p, tilde_q = _rest_probabilities(s, t, mask, cols, target, s_rest_max,
                                                                  1.0 / s_rest_sum, t_rest_max, 1.0 / t_rest_sum,
                                                                  inv_tau)
                d_s, d_t = _dkd_gradients(s, t, tilde_p, tilde_q, is_target, t_rest_max, s_rest_max, rest_shift, nckd,
                                          target_gap, binary_grad, tckd_grad, nckd_grad, inv_tau, STUDENT_GRAD,
                                          TEACHER_GRAD)
                if STUDENT_GRAD:
                    v_s += d_s
                if TEACHER_GRAD:
                    v_t += d_t
            if STUDENT_GRAD:
                if STANDARDIZE:  # dL/dz → dL/ds, then CE's part on the raw logits
                    s_g_sum, s_gz = _standardize_sums(v_s, s, mask)
                    v_s = _standardize_gradient(v_s, s, s_scale, s_g_sum, s_gz, s_dof, C)
                    if HAS_CE:
                        v_s += ce_grad * (ce_prob - tl.where(cols[None, :] == target[:, None], 1.0, 0.0))
                tl.store(gs_ptr + offsets, v_s.to(gs_ptr.dtype.element_ty), mask=mask)
            if TEACHER_GRAD:
                if STANDARDIZE:  # at the rectified positions, as z_t is held
                    t_g_sum, t_gz = _standardize_sums(v_t, t, mask)
                    v_t = _standardize_gradient(v_t, t, t_scale, t_g_sum, t_gz, t_dof, C)
                if RECTIFY:  # back to the unrectified positions (the swap is its own inverse)
                    v_t = _swap_columns(v_t, cols, swap_a, swap_b)
                tl.store(gt_ptr + offsets, v_t.to(gt_ptr.dtype.element_ty), mask=mask)
        else:
            # <p, g> and <q, g>: the row term's are 0 at the weighted centers; the column
            # term's were summed in the pass above.
            p_dot = zeros
            q_dot = zeros
            if HAS_COLUMN:
                p_dot += column_grad * column_dot_s
                q_dot += column_grad * column_dot_t
            dkd = (s_rest_max, 1.0 / s_rest_sum, t_rest_max, 1.0 / t_rest_sum, rest_shift, nckd, target_gap,
                   binary_grad, tckd_grad, nckd_grad)
            # STANDARDIZE: the chain rule's <g, 1>, <g, z> before any gradient is stored.
            s_g_sum = zeros.to(tl.float64)
            s_gz = zeros.to(tl.float64)
            t_g_sum = zeros.to(tl.float64)
            t_gz = zeros.to(tl.float64)
            if STANDARDIZE:
                for step in range(0, (C + BLOCK - 1) // BLOCK):
                    start = _chunk_start(step, C, BLOCK, True)
                    offs, mask, offsets, s_raw, s, t, v_s, v_t = _chunk_gradient(
                        s_ptr, t_ptr, t_idx_ptr, t_fill_ptr, grad_rho_ptr, col_ptr, chunk_max_ptr, rows, row_base,
                        row_mask, start, cols, C, K, log_k, swap_a, swap_b, t_at_a, t_at_b, s_max, s_log_sum, t_max,
                        t_log_sum, inv_tau, standard, moment_s, moment_t, weighted_centers, cross, self_p, self_q,
                        pearson_grad, column_grad, ce_max, s_sum1, kl, p_dot, q_dot, log_sum_difference, target,
                        valid, kl_grad, ce_grad, spearman_grad, dkd, HAS_KL, HAS_CE, HAS_PEARSON, HAS_SPEARMAN,
                        HAS_COLUMN, HAS_TARGET, HAS_DKD, RECTIFY, SPARSE, STANDARDIZE, STUDENT_GRAD, TEACHER_GRAD,
                        BLOCK)
                    if STUDENT_GRAD:
                        chunk_sum, chunk_z = _standardize_sums(v_s, s, mask)
                        s_g_sum += chunk_sum
                        s_gz += chunk_z
                    if TEACHER_GRAD:
                        chunk_sum, chunk_z = _standardize_sums(v_t, t, mask)
                        t_g_sum += chunk_sum
                        t_gz += chunk_z
            for step in range(0, (C + BLOCK - 1) // BLOCK):
                start = _chunk_start(step, C, BLOCK, not STANDARDIZE)
                offs, mask, offsets, s_raw, s, t, v_s, v_t = _chunk_gradient(
                    s_ptr, t_ptr, t_idx_ptr, t_fill_ptr, grad_rho_ptr, col_ptr, chunk_max_ptr, rows, row_base,
                    row_mask, start, cols, C, K, log_k, swap_a, swap_b, t_at_a, t_at_b, s_max, s_log_sum, t_max,
                    t_log_sum, inv_tau, standard, moment_s, moment_t, weighted_centers, cross, self_p, self_q,
                    pearson_grad, column_grad, ce_max, s_sum1, kl, p_dot, q_dot, log_sum_difference, target, valid,
                    kl_grad, ce_grad, spearman_grad, dkd, HAS_KL, HAS_CE, HAS_PEARSON, HAS_SPEARMAN, HAS_COLUMN,
                    HAS_TARGET, HAS_DKD, RECTIFY, SPARSE, STANDARDIZE, STUDENT_GRAD, TEACHER_GRAD, BLOCK)
                if STUDENT_GRAD:
                    if STANDARDIZE:  # dL/dz → dL/ds, then CE's part on the raw logits
                        v_s = _standardize_gradient(v_s, tl.where(mask, s, 0.0), s_scale, s_g_sum, s_gz, s_dof, C)
                        if HAS_CE:
                            ce_prob = tl.exp(s_raw - ce_max[:, None]) / s_sum1[:, None]
                            v_s += ce_grad * (ce_prob - tl.where(offs[None, :] == target[:, None], 1.0, 0.0))
                    tl.store(gs_ptr + offsets, v_s.to(gs_ptr.dtype.element_ty), mask=mask)
                if TEACHER_GRAD:
                    if STANDARDIZE:
                        v_t = _standardize_gradient(v_t, tl.where(mask, t, 0.0), t_scale, t_g_sum, t_gz, t_dof, C)
                    v_t = v_t.to(gt_ptr.dtype.element_ty)
                    if RECTIFY:
                        # Back to the unrectified positions: rectified columns a and b hold the
                        # teacher's b and a. Every other column is stored in place (a vector
                        # store), those two to each other's place: the two stores' addresses are
                        # disjoint, so no ordering between the threads that issue them matters.
                        at_a = offs[None, :] == swap_a[:, None]
                        moved = at_a | (offs[None, :] == swap_b[:, None])
                        tl.store(gt_ptr + offsets, v_t, mask=mask & ~moved)
                        source = tl.where(at_a, swap_b[:, None], swap_a[:, None])
                        tl.store(gt_ptr + row_base[:, None] + source, v_t, mask=mask & moved)
                    else:
                        tl.store(gt_ptr + offsets, v_t, mask=mask)


@triton.jit
def _softmax_stats_kernel(
    s_ptr,  # [B, C] student logits
    t_ptr,  # [B, C] teacher logits; sparse: [B, K] fp32 values (_teacher_tile)
    t_idx_ptr,  # sparse: [B, K] int32 their classes, sorted in each row (an fp32 placeholder when dense)
    t_fill_ptr,  # sparse: [B] fp32 the logit of every other class
    stats_ptr,  # [B, 4] fp32 out: student max, log-sum, teacher max, log-sum (at τ)
    standard_ptr,  # [B, 6] fp64 the rows' standardization (STANDARDIZE: fp64, else an fp32 placeholder)
    C,
    K,  # sparse: the values per row
    log_k,  # sparse: ceil(log2 K)
    inv_tau,
    BLOCK: tl.constexpr,
):
    # One program per row: reads row·C + j (int64 row offset, j < C masked), writes its own
    # four statistics; nothing is shared between threads but Triton's reductions. A sparse
    # teacher's row is read by _teacher_tile under the same mask: loads at row·K + j, 0 <= j < K
    # (int64 row offset), and fill[row], row < B (one program per row). STANDARDIZE: the
    # softmax of the standardized rows (_standardized from the row's six statistics, loaded
    # at row·6 + k), the floats the row kernel forms from the same statistics.
    SPARSE: tl.constexpr = t_idx_ptr.dtype.element_ty == tl.int32
    STANDARDIZE: tl.constexpr = standard_ptr.dtype.element_ty == tl.float64
    rows = tl.program_id(0).to(tl.int64) + tl.zeros((1,), tl.int64)  # a [1, BLOCK] tile per chunk
    if STANDARDIZE:
        s_mean, s_scale, s_dof, t_mean, t_scale, t_dof = _load_standard(standard_ptr, rows, rows >= 0)
    s_max = tl.full((1,), -float("inf"), tl.float32)
    t_max = tl.full((1,), -float("inf"), tl.float32)
    s_sum = tl.zeros((1,), tl.float32)
    t_sum = tl.zeros((1,), tl.float32)
    for start in range(0, C, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = (offs < C)[None, :]
        offsets = rows[:, None] * C + offs[None, :]
        s = tl.load(s_ptr + offsets, mask=mask, other=-float("inf")).to(tl.float32)
        t = _teacher_tile(t_ptr, offsets, t_idx_ptr, t_fill_ptr, rows[:, None], rows[:, None] >= 0, offs[None, :], mask,
                          -float("inf"), K, log_k, SPARSE)  # every program's row is < B
        if STANDARDIZE:
            s = tl.where(mask, _standardized(s, s_mean[:, None], s_scale[:, None]), -float("inf"))
            t = tl.where(mask, _standardized(t, t_mean[:, None], t_scale[:, None]), -float("inf"))
        s_max, s_sum, _ = _softmax_step(s_max, s_sum, s, inv_tau)
        t_max, t_sum, _ = _softmax_step(t_max, t_sum, t, inv_tau)
    tl.store(stats_ptr + rows * 4, s_max)
    tl.store(stats_ptr + rows * 4 + 1, tl.log(s_sum))
    tl.store(stats_ptr + rows * 4 + 2, t_max)
    tl.store(stats_ptr + rows * 4 + 3, tl.log(t_sum))


@triton.jit
def _column_moments_kernel(
    s_ptr,  # [B, C] student logits
    t_ptr,  # [B, C] teacher logits; sparse: [B, K] fp32 values (_teacher_tile)
    t_idx_ptr,  # sparse: [B, K] int32 their classes, sorted in each row (an fp32 placeholder when dense)
    t_fill_ptr,  # sparse: [B] fp32 the logit of every other class
    stats_ptr,  # [B, 4] fp32 softmax statistics
    standard_ptr,  # [B, 6] fp64 the rows' standardization (STANDARDIZE: fp64, else an fp32 placeholder)
    partial_ptr,  # [chunks, 5, C] fp64 out: per chunk of rows, the shifted column sums
    origin_ptr,  # [2, C] fp32 out: p and q of row 0 (chunk 0)
    B,
    C,
    K,  # sparse: the values per row
    log_k,  # sparse: ceil(log2 K)
    inv_tau,
    rows_per_chunk,
    BLOCK: tl.constexpr,
):
    # The long-row layout of the column statistics, in one pass over a chunk of rows for a
    # block of columns: Σa, Σb, Σab, Σa², Σb² for a = p − p_0, b = q − q_0 (shifted by row
    # 0: a constant column is exactly zero), finished by _finish_columns.
    # Program (column block, chunk of rows) writes only its own columns of its own chunk's
    # partial sums; every thread owns its columns (no shared workspace). Offsets of rows,
    # of statistics and of partials are int64; column offsets are < C (masked). A sparse
    # teacher's rows (row 0, then the chunk's rows < B) are read by _teacher_tile under the
    # same mask: at row·K + j with 0 <= j < K (int64), and fill[row]. STANDARDIZE: every row
    # (row 0's centers included) standardized by its statistics, loaded at row·6 + k (int64,
    # row < B): elementwise, the floats the row kernel forms.
    SPARSE: tl.constexpr = t_idx_ptr.dtype.element_ty == tl.int32
    STANDARDIZE: tl.constexpr = standard_ptr.dtype.element_ty == tl.float64
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < C
    chunk = tl.program_id(1)
    first = chunk.to(tl.int64) * rows_per_chunk
    last = tl.minimum(first + rows_per_chunk, B)
    wide_c = C + tl.zeros((), tl.int64)
    out = partial_ptr + chunk.to(tl.int64) * 5 * wide_c
    s0 = tl.load(s_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    row0 = tl.zeros((), tl.int64)
    t0 = _teacher_tile(t_ptr, cols, t_idx_ptr, t_fill_ptr, row0, row0 < B, cols, mask, 0.0, K, log_k, SPARSE)
    if STANDARDIZE:
        s0 = _standardized(s0, tl.load(standard_ptr), tl.load(standard_ptr + 1))
        t0 = _standardized(t0, tl.load(standard_ptr + 3), tl.load(standard_ptr + 4))
    center_p = _probability(s0, tl.load(stats_ptr), tl.load(stats_ptr + 1), inv_tau)
    center_q = _probability(t0, tl.load(stats_ptr + 2), tl.load(stats_ptr + 3), inv_tau)
    if chunk == 0:
        tl.store(origin_ptr + cols, center_p, mask=mask)
        tl.store(origin_ptr + C + cols, center_q, mask=mask)
    sum_a = tl.zeros((BLOCK,), dtype=tl.float64)
    sum_b = tl.zeros((BLOCK,), dtype=tl.float64)
    sum_ab = tl.zeros((BLOCK,), dtype=tl.float64)
    sum_aa = tl.zeros((BLOCK,), dtype=tl.float64)
    sum_bb = tl.zeros((BLOCK,), dtype=tl.float64)
    s_rows = s_ptr + first * C
    st = stats_ptr + first * 4
    for row in range(first, last):
        s = tl.load(s_rows + cols, mask=mask, other=0.0).to(tl.float32)
        t = _teacher_tile(t_ptr, row * C + cols, t_idx_ptr, t_fill_ptr, row, row < B, cols, mask, 0.0, K, log_k,
                          SPARSE)
        if STANDARDIZE:
            row_standard = standard_ptr + row * 6
            s = _standardized(s, tl.load(row_standard), tl.load(row_standard + 1))
            t = _standardized(t, tl.load(row_standard + 3), tl.load(row_standard + 4))
        a = (_probability(s, tl.load(st), tl.load(st + 1), inv_tau) - center_p).to(tl.float64)
        b = (_probability(t, tl.load(st + 2), tl.load(st + 3), inv_tau) - center_q).to(tl.float64)
        sum_a += a
        sum_b += b
        sum_ab += a * b
        sum_aa += a * a
        sum_bb += b * b
        s_rows += C
        st += 4
    tl.store(out + cols, sum_a, mask=mask)
    tl.store(out + wide_c + cols, sum_b, mask=mask)
    tl.store(out + 2 * wide_c + cols, sum_ab, mask=mask)
    tl.store(out + 3 * wide_c + cols, sum_aa, mask=mask)
    tl.store(out + 4 * wide_c + cols, sum_bb, mask=mask)


@triton.jit
def _standardize_kernel(
    s_ptr,  # [B, C] student logits
    t_ptr,  # [B, C] teacher logits; sparse: [B, K] fp32 values (_teacher_tile)
    t_idx_ptr,  # sparse: [B, K] int32 their classes, sorted in each row (an fp32 placeholder when dense)
    t_fill_ptr,  # sparse: [B] fp32 the logit of every other class
    standard_ptr,  # [B, 6] fp64 out: student mean, a = 1/(std + 1e-7), 1/((C − 1)·std), then the teacher's
    zs_ptr,  # [B, C] fp32 out: the standardized student rows (WRITE_ROWS)
    zt_ptr,  # [B, C] fp32 out: the standardized teacher rows, dense (WRITE_ROWS)
    C,
    K,  # sparse: the values per row
    log_k,  # sparse: ceil(log2 K)
    BLOCK: tl.constexpr,
    WRITE_ROWS: tl.constexpr,
):
    # Logit standardization's statistics, one program per row: the moments over chunks of
    # BLOCK columns (_moments_step, fp64; one chunk: exactly the two-pass moments), then
    # _standard_scales; with WRITE_ROWS a second pass writes the standardized rows
    # (_standardized: the floats every other kernel forms from these statistics), which the
    # Spearman kernels sort and rank. Memory safety: reads and writes row·C + j (int64 row
    # offset, j < C masked), writes the row's six statistics at row·6 + k; a sparse teacher
    # is rebuilt by _teacher_tile under the same mask (loads at row·K + j with 0 <= j < K and
    # fill[row], row < B: one program per row). Nothing is shared between threads but
    # Triton's reductions, and nothing this kernel writes is read in the launch.
    SPARSE: tl.constexpr = t_idx_ptr.dtype.element_ty == tl.int32
    rows = tl.program_id(0).to(tl.int64) + tl.zeros((1,), tl.int64)  # a [1, BLOCK] tile per chunk
    s_count = tl.zeros((1,), tl.float64)
    s_mean = tl.zeros((1,), tl.float64)
    s_squares = tl.zeros((1,), tl.float64)
    t_count = tl.zeros((1,), tl.float64)
    t_mean = tl.zeros((1,), tl.float64)
    t_squares = tl.zeros((1,), tl.float64)
    for start in range(0, C, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = (offs < C)[None, :]
        offsets = rows[:, None] * C + offs[None, :]
        s = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        t = _teacher_tile(t_ptr, offsets, t_idx_ptr, t_fill_ptr, rows[:, None], rows[:, None] >= 0, offs[None, :], mask,
                          0.0, K, log_k, SPARSE)  # every program's row is < B
        s_count, s_mean, s_squares = _moments_step(s_count, s_mean, s_squares, s, mask)
        t_count, t_mean, t_squares = _moments_step(t_count, t_mean, t_squares, t, mask)
    s_scale, s_dof = _standard_scales(s_squares, C)
    t_scale, t_dof = _standard_scales(t_squares, C)
    out = standard_ptr + rows * 6
    tl.store(out, s_mean)
    tl.store(out + 1, s_scale)
    tl.store(out + 2, s_dof)
    tl.store(out + 3, t_mean)
    tl.store(out + 4, t_scale)
    tl.store(out + 5, t_dof)
    if WRITE_ROWS:
        for start in range(0, C, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = (offs < C)[None, :]
            offsets = rows[:, None] * C + offs[None, :]
            s = tl.load(s_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            t = _teacher_tile(t_ptr, offsets, t_idx_ptr, t_fill_ptr, rows[:, None], rows[:, None] >= 0, offs[None, :],
                              mask, 0.0, K, log_k, SPARSE)
            tl.store(zs_ptr + offsets, _standardized(s, s_mean[:, None], s_scale[:, None]), mask=mask)
            tl.store(zt_ptr + offsets, _standardized(t, t_mean[:, None], t_scale[:, None]), mask=mask)


@triton.jit
def _tile_probabilities(s_ptr, t_ptr, t_idx_ptr, t_fill_ptr, standard_ptr, rows, row_mask, cols, col_mask, C, K, log_k,
                        inv_tau, SPARSE: tl.constexpr, STANDARDIZE: tl.constexpr):
    """A [ROWS, BLOCK] tile of whole rows: its mask, each row's max and log-normalizer for
    the student and the teacher, and p, q (0 outside the mask) by ``_probability`` (of the
    rows standardized by their statistics at rows·6 + k when STANDARDIZE)."""
    mask = row_mask[:, None] & col_mask[None, :]
    offsets = rows[:, None] * C + cols[None, :]
    s = tl.load(s_ptr + offsets, mask=mask, other=-float("inf")).to(tl.float32)
    t = _teacher_tile(t_ptr, offsets, t_idx_ptr, t_fill_ptr, rows[:, None], row_mask[:, None], cols[None, :], mask,
                      -float("inf"), K, log_k, SPARSE)
    if STANDARDIZE:
        s_mean, s_scale, s_dof, t_mean, t_scale, t_dof = _load_standard(standard_ptr, rows, row_mask)
        s = tl.where(mask, _standardized(s, s_mean[:, None], s_scale[:, None]), -float("inf"))
        t = tl.where(mask, _standardized(t, t_mean[:, None], t_scale[:, None]), -float("inf"))
    start = tl.zeros_like(rows).to(tl.float32)
    s_max, s_sum, _ = _softmax_step(start - float("inf"), start, s, inv_tau)
    t_max, t_sum, _ = _softmax_step(start - float("inf"), start, t, inv_tau)
    s_log_sum = tl.log(s_sum)
    t_log_sum = tl.log(t_sum)
    p = tl.where(mask, _probability(s, s_max[:, None], s_log_sum[:, None], inv_tau), 0.0)
    q = tl.where(mask, _probability(t, t_max[:, None], t_log_sum[:, None], inv_tau), 0.0)
    return mask, s_max, s_log_sum, t_max, t_log_sum, p, q


@triton.jit
def _column_partials_kernel(
    s_ptr,  # [B, C] student logits
    t_ptr,  # [B, C] teacher logits; sparse: [B, K] fp32 values (_teacher_tile)
    t_idx_ptr,  # sparse: [B, K] int32 their classes, sorted in each row (an fp32 placeholder when dense)
    t_fill_ptr,  # sparse: [B] fp32 the logit of every other class
    stats_ptr,  # [B, 4] fp32 out: each row's student max, log-sum, teacher max, log-sum (at τ)
    standard_ptr,  # [B, 6] fp64 the rows' standardization (STANDARDIZE: fp64, else an fp32 placeholder)
    partial_ptr,  # [programs, 5, C] fp64 out: per program, the shifted column sums
    origin_ptr,  # [2, C] fp32 out: p and q of row 0 (program 0)
    B,
    K,  # sparse: the values per row
    log_k,  # sparse: ceil(log2 K)
    inv_tau,
    rows_per_program,
    C: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The resident layout of the column statistics (C <= BLOCK), in one read of each input:
    # each program takes rows_per_program rows (a multiple of ROWS), ROWS whole rows at a
    # time, computes their softmax statistics (which the row kernel then uses, so that both
    # round p and q alike) and adds Σa, Σb, Σab, Σa², Σb² for a = p − p_0, b = q − q_0 per
    # column, p_0 and q_0 being row 0's (recomputed by every program in a tile of the same
    # shape: the same reduction, the same bits), finished by _finish_columns.
    # Program g writes only the statistics of its rows [g·rows_per_program, ...) ∩ [0, B),
    # its own slice of the partial sums and (g = 0) the origin; offsets are int64 for rows,
    # columns < C masked. The only values shared between threads are Triton's reductions.
    # A sparse teacher's rows are read by _teacher_tile under the same masks (rows < B, or
    # row 0 alone): at row·K + j with 0 <= j < K (int64), and fill[row]. STANDARDIZE: each row
    # standardized by its statistics (loaded at row·6 + k under the same row masks).
    SPARSE: tl.constexpr = t_idx_ptr.dtype.element_ty == tl.int32
    STANDARDIZE: tl.constexpr = standard_ptr.dtype.element_ty == tl.float64
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < C
    row_offsets = tl.arange(0, ROWS).to(tl.int64)
    _, _, _, _, _, p_first, q_first = _tile_probabilities(s_ptr, t_ptr, t_idx_ptr, t_fill_ptr, standard_ptr,
                                                          row_offsets, row_offsets < 1, cols, col_mask, C, K, log_k,
                                                          inv_tau, SPARSE, STANDARDIZE)
    p0 = tl.sum(p_first, 0)  # row 0 alone (the others are masked to 0)
    q0 = tl.sum(q_first, 0)
    first = program.to(tl.int64) * rows_per_program
    last = tl.minimum(first + rows_per_program, B)
    sum_a = tl.zeros((BLOCK,), dtype=tl.float64)
    sum_b = tl.zeros((BLOCK,), dtype=tl.float64)
    sum_ab = tl.zeros((BLOCK,), dtype=tl.float64)
    sum_aa = tl.zeros((BLOCK,), dtype=tl.float64)
    sum_bb = tl.zeros((BLOCK,), dtype=tl.float64)
    for start in range(first, last, ROWS):
        rows = start + row_offsets
        row_mask = rows < last
        mask, s_max, s_log_sum, t_max, t_log_sum, p, q = _tile_probabilities(
            s_ptr, t_ptr, t_idx_ptr, t_fill_ptr, standard_ptr, rows, row_mask, cols, col_mask, C, K, log_k, inv_tau,
            SPARSE, STANDARDIZE)
        tl.store(stats_ptr + rows * 4, s_max, mask=row_mask)
        tl.store(stats_ptr + rows * 4 + 1, s_log_sum, mask=row_mask)
        tl.store(stats_ptr + rows * 4 + 2, t_max, mask=row_mask)
        tl.store(stats_ptr + rows * 4 + 3, t_log_sum, mask=row_mask)
        a = tl.where(mask, p - p0[None, :], 0.0).to(tl.float64)
        b = tl.where(mask, q - q0[None, :], 0.0).to(tl.float64)
        sum_a += tl.sum(a, 0)
        sum_b += tl.sum(b, 0)
        sum_ab += tl.sum(a * b, 0)
        sum_aa += tl.sum(a * a, 0)
        sum_bb += tl.sum(b * b, 0)
    out = partial_ptr + program.to(tl.int64) * 5 * C
    tl.store(out + cols, sum_a, mask=col_mask)
    tl.store(out + C + cols, sum_b, mask=col_mask)
    tl.store(out + 2 * C + cols, sum_ab, mask=col_mask)
    tl.store(out + 3 * C + cols, sum_aa, mask=col_mask)
    tl.store(out + 4 * C + cols, sum_bb, mask=col_mask)
    if program == 0:
        tl.store(origin_ptr + cols, p0, mask=col_mask)
        tl.store(origin_ptr + C + cols, q0, mask=col_mask)


@triton.jit
def _standardization(s_ptr, base, offs, mask, n):
    """The row's first logit s0, the mean of s − s0 and 1/σ (0 for a constant row), in fp64:
    centering on the first element makes a constant row exactly zero."""
    s0 = tl.load(s_ptr + base).to(tl.float32)
    s = tl.load(s_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    shifted = tl.where(mask, (s - s0).to(tl.float64), 0.0)
    mean_shift = tl.sum(shifted, 0) / n
    centered = tl.where(mask, shifted - mean_shift, 0.0)
    variance = tl.sum(centered * centered, 0) / n
    varying = variance > 0.0
    z_scale = tl.where(varying, 1.0 / tl.sqrt(tl.where(varying, variance, 1.0)), 0.0)
    return s0, mean_shift, z_scale


@triton.jit
def _spearman_prepare_kernel(
    s_ptr,  # [B, C] student logits
    s_sorted_ptr,  # [B, C] student logits sorted descending (stable), the student's dtype
    t_sorted_ptr,  # [B, C] teacher logits sorted ascending (stable), the teacher's dtype (dense)
    t_order_ptr,  # [B, C] int64: their original columns (dense)
    t_idx_ptr,  # sparse: [B, K] int32 the teacher's classes, sorted in each row (an fp32 placeholder when dense)
    stored_rank_ptr,  # sparse: [B, K] fp32 the average ranks of the K stored logits in the rebuilt row
    tail_rank_ptr,  # sparse: [B] fp32 the average rank every other class shares
    theta_ptr,  # [C, B] fp64 out, column-major: θ = ẑ/ε in the student's descending order
    rank_ptr,  # [B, C] fp32 out: teacher average ranks, original order
    B,
    C,
    K,  # sparse: the values per row
    log_k,  # sparse: ceil(log2 K)
    strength,
    BLOCK: tl.constexpr,
):
    # Memory safety: one program per row. Row-major addresses are row·C + j (int64, j < C
    # masked), column-major ones j·B + row; the teacher's sort order is a permutation of
    # 0..C−1 (torch.sort of the whole row, NaN and ±inf included). The program writes only
    # its own row's ranks and θ column; nothing it writes is read again in this launch.
    # A sparse teacher's rank row is itself a sparse row (the K stored logits' ranks, one
    # rank for the other classes), rebuilt by _teacher_tile: loads at row·K + j with
    # 0 <= j < K (int64) and tail_rank[row]; each column's rank is stored in place, once.
    SPARSE: tl.constexpr = t_idx_ptr.dtype.element_ty == tl.int32
    row = tl.program_id(0).to(tl.int64)
    base = row * C
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    s0, mean_shift, z_scale = _standardization(s_ptr, base, offs, mask, C * 1.0)
    if SPARSE:
        average = _teacher_tile(stored_rank_ptr, base + offs, t_idx_ptr, tail_rank_ptr, row, row < B, offs, mask, 0.0,
                                K, log_k, SPARSE)
        tl.store(rank_ptr + base + offs, average, mask=mask)
    else:
        # The teacher's average ranks: tie groups are runs of equal sorted values (NaN equals
        # nothing, −0 equals +0), their first and last positions by max/min scans, scattered
        # back to the original columns.
        t_here = tl.load(t_sorted_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
        t_before = tl.load(t_sorted_ptr + base + offs - 1, mask=mask & (offs > 0), other=0.0).to(tl.float32)
        t_after = tl.load(t_sorted_ptr + base + offs + 1, mask=mask & (offs + 1 < C), other=0.0).to(tl.float32)
        group_start = mask & ((offs == 0) | (t_before != t_here))
        group_end = mask & ((offs == C - 1) | (t_after != t_here))
        starts = tl.associative_scan(tl.where(group_start, offs, 0), 0, _max)
        ends = tl.associative_scan(tl.where(group_end, offs, BLOCK), 0, _min, reverse=True)
        average = (starts + ends).to(tl.float32) * 0.5 + 1.0
        t_index = tl.load(t_order_ptr + base + offs, mask=mask, other=0)
        tl.store(rank_ptr + base + t_index, average, mask=mask)
    s_sorted = tl.load(s_sorted_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    z = tl.where(mask, ((s_sorted - s0).to(tl.float64) - mean_shift) * z_scale, 0.0)
    tl.store(theta_ptr + offs.to(tl.int64) * B + row, z / strength, mask=mask)


@triton.jit
def _pav_kernel(
    theta_ptr,  # [C, B] fp64, column-major: θ per row in the student's descending order
    stack_start_ptr,  # [C, B] int32 out, column-major: PAV blocks' starts
    stack_a_ptr,  # [C, B] fp64 out, column-major: PAV blocks' sums
    stack_b_ptr,  # [C, B] fp64 out, column-major: PAV blocks' counts
    block_count_ptr,  # [B] int32 out: each row's number of blocks
    B,
    C,
    ROWS: tl.constexpr,
):
    # Pool-adjacent-violators on θ − (n, n−1, ..., 1), ROWS rows at once: lane r runs its
    # row's sequential PAV, the rows advancing in lockstep over k (the merge loop runs while
    # any lane still merges, the others masked). Column-major workspace: at step k the
    # lanes read θ[k] of consecutive rows, one coalesced load.
    #
    # Memory safety: launched with one warp and ROWS = 32 lanes, so every [ROWS] vector of
    # the kernel has the one layout in which thread r holds lane r (no layout conversion,
    # no shared memory: tests/test_gpu_path.py checks the IR): every workspace slot of a
    # row is read and written by the same thread, in program order, so no barrier is
    # needed and no thread can see another's slot. Slots are j·B + row (int64) with
    # j < count <= k + 1 <= C and row < B (rows past B are masked).
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_in = rows < B
    count = tl.zeros((ROWS,), tl.int32)
    # θ[k + 1] is loaded while step k merges: its latency hides behind the merge loop.
    wide_b = B + tl.zeros((), tl.int64)  # slots k·B + row in int64: k·B may pass 2^31
    theta_next = tl.load(theta_ptr + rows, mask=row_in, other=0.0)
    for k in range(0, C):
        a = theta_next - (C - k).to(tl.float64)
        theta_next = tl.load(theta_ptr + (k + 1) * wide_b + rows, mask=row_in & (k + 1 < C), other=0.0)
        b = tl.full((ROWS,), 1.0, tl.float64)
        start = tl.zeros((ROWS,), tl.int32) + k
        merging = row_in & (count > 0)
        while tl.max(merging.to(tl.int32), 0) > 0:
            top = (count - 1) * wide_b + rows
            top_a = tl.load(stack_a_ptr + top, mask=merging, other=0.0)
            top_b = tl.load(stack_b_ptr + top, mask=merging, other=1.0)
            violates = merging & (top_a * b <= a * top_b)
            a = tl.where(violates, a + top_a, a)
            b = tl.where(violates, b + top_b, b)
            start = tl.where(violates, tl.load(stack_start_ptr + top, mask=violates, other=0), start)
            count = tl.where(violates, count - 1, count)
            merging = violates & (count > 0)
        push = count * wide_b + rows
        tl.store(stack_start_ptr + push, start, mask=row_in)
        tl.store(stack_a_ptr + push, a, mask=row_in)
        tl.store(stack_b_ptr + push, b, mask=row_in)
        count += 1
    tl.store(block_count_ptr + rows, count, mask=row_in)


@triton.jit
def _spearman_finish_kernel(
    s_ptr,  # [B, C] student logits
    s_sorted_ptr,  # [B, C] student logits sorted descending (stable), the student's dtype
    s_order_ptr,  # [B, C] int64: their original columns
    stack_start_ptr,  # [C, B] int32, column-major: PAV blocks' starts
    stack_a_ptr,  # [C, B] fp64, column-major: PAV blocks' sums
    stack_b_ptr,  # [C, B] fp64, column-major: PAV blocks' counts
    block_count_ptr,  # [B] int32: each row's number of blocks
    flag_ptr,  # [B, C] int32 workspace
    prefix_ptr,  # [B, C] fp64 workspace: prefix sums of g
    rank_ptr,  # [B, C] fp32: teacher average ranks, original order
    rho_ptr,  # [B] fp64 out: ρ_S
    grad_ptr,  # [B, C] fp32 out: dρ_S/ds, original order (WITH_GRAD)
    B,
    C,
    strength,
    WITH_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Memory safety: one program per row; addresses row·C + j or j·B + row (int64) with
    # j < C masked; the block starts are positions < C, block indices < count <= C. The
    # flags and prefix sums are the row's own workspace, each written then read after a
    # barrier (the reads are other threads'); the PAV workspace is only read.
    row = tl.program_id(0).to(tl.int64)
    base = row * C
    offs = tl.arange(0, BLOCK)
    mask = offs < C
    n = C * 1.0
    s0, mean_shift, z_scale = _standardization(s_ptr, base, offs, mask, n)
    # Registers: at C = 8192 a thread holds 16 elements of every per-element value, so the
    # kernel keeps few of them live — the order as int32 (< C), the teacher ranks in fp32
    # (integers and halves, exact), z recomputed from the sorted logits where used again.
    s_sorted = tl.load(s_sorted_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    theta = tl.where(mask, ((s_sorted - s0).to(tl.float64) - mean_shift) * z_scale, 0.0) / strength
    order = tl.load(s_order_ptr + base + offs, mask=mask, other=0).to(tl.int32)
    u = tl.load(rank_ptr + base + order, mask=mask, other=0.0)
    count = tl.load(block_count_ptr + row)

    # Each element's block (flags at block starts, then a running count), the soft ranks.
    tl.store(flag_ptr + base + offs, tl.zeros((BLOCK,), dtype=tl.int32), mask=mask)
    tl.debug_barrier()
    column = offs.to(tl.int64) * B + row
    block_starts = tl.load(stack_start_ptr + column, mask=offs < count, other=0)
    tl.store(flag_ptr + base + block_starts, tl.full((BLOCK,), 1, tl.int32), mask=(offs < count) & (offs > 0))
    tl.debug_barrier()
    block = tl.cumsum(tl.load(flag_ptr + base + offs, mask=mask, other=0), 0)
    block_slot = block.to(tl.int64) * B + row
    block_a = tl.load(stack_a_ptr + block_slot, mask=mask, other=0.0)
    block_b = tl.load(stack_b_ptr + block_slot, mask=mask, other=1.0)
    ranks = tl.where(mask, theta - block_a / block_b, 0.0)

    # Pearson correlation of the soft ranks with the teacher ranks (fp64, shifted sums).
    r0 = tl.sum(tl.where(offs == 0, ranks, 0.0), 0)
    u0 = tl.sum(tl.where(offs == 0, u, 0.0), 0).to(tl.float64)
    r_mean = r0 + tl.sum(tl.where(mask, ranks - r0, 0.0), 0) / n
    u_mean = u0 + tl.sum(tl.where(mask, u.to(tl.float64) - u0, 0.0), 0) / n
    ra = tl.where(mask, ranks - r_mean, 0.0)
    ua = tl.where(mask, u.to(tl.float64) - u_mean, 0.0)
    rho, cross, self_r, _ = _correlation(tl.sum(ra * ua, 0), tl.sum(ra * ra, 0), tl.sum(ua * ua, 0))
    tl.store(rho_ptr + row, rho)

    if WITH_GRAD:
        # Backward: through the correlation; through the soft rank (g minus its block's
        # mean, / ε), with block sums from prefix sums; through the standardization.
        g = tl.where(mask, cross * ua - self_r * ra, 0.0)
        tl.store(prefix_ptr + base + offs, tl.cumsum(g, 0), mask=mask)
        tl.debug_barrier()
        first = tl.load(stack_start_ptr + block_slot, mask=mask, other=0)
        end = tl.where(block + 1 < count, tl.load(stack_start_ptr + block_slot + B,
                                                  mask=mask & (block + 1 < count), other=0), C)
        z = tl.where(mask, ((s_sorted - s0).to(tl.float64) - mean_shift) * z_scale, 0.0)
        before = tl.load(prefix_ptr + base + first - 1, mask=mask & (first > 0), other=0.0)
        through = tl.load(prefix_ptr + base + end - 1, mask=mask, other=0.0)
        block_mean = (through - before) / (end - first).to(tl.float64)
        g = tl.where(mask, (g - block_mean) / strength, 0.0)
        g_mean = tl.sum(g, 0) / n
        gz_mean = tl.sum(g * z, 0) / n
        grad = (g - g_mean - z * gz_mean) * z_scale
        tl.store(grad_ptr + base + order, grad.to(tl.float32), mask=mask)


@dataclasses.dataclass(frozen=True)
class TeacherRows:
    """The teacher as every kernel takes it (``t_ptr, t_idx_ptr, t_fill_ptr`` and ``K, log_k``):
    dense, the [B, C] logits; sparse, ``values`` [B, K] fp32, ``indices`` [B, K] int32 (sorted
    in each row) and ``fill`` [B] fp32, each row rebuilt by ``_teacher_tile`` where it is read.
    A kernel is compiled sparse exactly when its ``t_idx_ptr`` is int32 (a constexpr of the
    pointer's type), so a dense teacher passes an fp32 placeholder there, and ``K`` = 0."""

    values: torch.Tensor
    indices: torch.Tensor
    fill: torch.Tensor
    k: int = 0

    @classmethod
    def dense(cls, teacher: torch.Tensor, placeholder: torch.Tensor) -> "TeacherRows":
        return cls(teacher, placeholder, placeholder)

    @property
    def sparse(self) -> bool:
        return self.indices.dtype == torch.int32

    @property
    def pointers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.values, self.indices, self.fill

    @property
    def sizes(self) -> tuple[int, int]:
        """K and ceil(log2 K), the binary search's halvings ((K − 1).bit_length())."""
        return self.k, max(self.k - 1, 0).bit_length()


def _column_statistics(student, teacher: TeacherRows, inv_tau, layout: RowLayout, standard: torch.Tensor):
    """[5, C] fp32 (mean_p, mean_q, cross, self_p, self_q), the [C] column correlations, and
    the [B, 4] fp32 per-row softmax statistics they were computed with: in the row kernel's
    ``layout``, one read of each input when it is resident and C <= MAX_COLUMN_PARTIALS_CLASSES
    (``_column_partials_kernel``), else two (``_softmax_stats_kernel``, then
    ``_column_moments_kernel``). ``standard``: the rows' standardization statistics ([B, 6]
    fp64, _standardize_kernel's) or an fp32 placeholder (no standardization)."""
    rows, classes = student.shape
    stats = torch.empty(rows, 4, dtype=torch.float32, device=student.device)
    origin = torch.empty(2, classes, dtype=torch.float32, device=student.device)
    rows_per_chunk = max(16, triton.cdiv(rows, 64))  # a fixed function of B: deterministic
    if layout.resident and classes <= MAX_COLUMN_PARTIALS_CLASSES:
        rows_per_chunk = triton.cdiv(rows_per_chunk, layout.rows) * layout.rows
        chunks = triton.cdiv(rows, rows_per_chunk)
        partial = torch.empty(chunks, 5, classes, dtype=torch.float64, device=student.device)
        _column_partials_kernel[(chunks,)](student, *teacher.pointers, stats, standard, partial, origin, rows,
                                           *teacher.sizes,
                                           inv_tau, rows_per_chunk, C=classes, ROWS=layout.rows, BLOCK=layout.block,
                                           num_warps=layout.warps)
    else:
        block, warps = chunk_config(classes)
        _softmax_stats_kernel[(rows,)](student, *teacher.pointers, stats, standard, classes, *teacher.sizes, inv_tau,
                                       BLOCK=block, num_warps=warps)
        chunks = triton.cdiv(rows, rows_per_chunk)
        column_block = min(256, triton.next_power_of_2(classes))
        partial = torch.empty(chunks, 5, classes, dtype=torch.float64, device=student.device)
        _column_moments_kernel[(triton.cdiv(classes, column_block), chunks)](
            student, *teacher.pointers, stats, standard, partial, origin, rows, classes, *teacher.sizes, inv_tau,
            rows_per_chunk, BLOCK=column_block)
    return (*_finish_columns(origin, partial.sum(0), rows), stats)


def _finish_columns(origin, sums, rows):
    """The column statistics from row 0's p, q and the shifted sums Σa, Σb, Σab, Σa², Σb²
    (a = p − p_0, b = q − q_0): means, and the centered moments Σab − ΣaΣb/B, ... in fp64
    (exactly 0 in a constant column)."""
    sum_a, sum_b, sum_ab, sum_aa, sum_bb = sums
    means = (origin.double() + torch.stack([sum_a, sum_b]) / rows).float()
    ab = sum_ab - sum_a * sum_b / rows
    aa = (sum_aa - sum_a * sum_a / rows).clamp_min(0.0)
    bb = (sum_bb - sum_b * sum_b / rows).clamp_min(0.0)
    norm = aa.sqrt() * bb.sqrt()
    above = norm > PEARSON_EPS
    safe = torch.where(above, norm, torch.full_like(norm, PEARSON_EPS))
    rho = ab / safe
    self_p = torch.where(above, rho / torch.where(aa > 0, aa, torch.ones_like(aa)), torch.zeros_like(rho))
    self_q = torch.where(above, rho / torch.where(bb > 0, bb, torch.ones_like(bb)), torch.zeros_like(rho))
    columns = torch.stack([means[0], means[1], (1.0 / safe).float(), self_p.float(), self_q.float()])
    return columns.contiguous(), rho


def _sparse_teacher_ranks(values, fill, classes):
    """A sparse teacher's average ranks (ascending, from 1; a tie group shares the mean of its
    positions) in its rebuilt rows, without building them: [B, K] fp32 for the K stored logits
    (in their order) and [B] fp32 shared by the C − K other classes, the fill's tie group
    (with every stored logit equal to the fill). A number x's group starts after the n_<(x)
    logits below it and holds the n_=(x) equal to it, both counted over the sorted stored
    logits (searchsorted) plus C − K copies of the fill; its rank (2·n_< + n_= − 1)·0.5 + 1
    takes the same integer the dense kernel's (first + last)·0.5 + 1 does, so the ranks are
    bitwise the dense row's. NaN as in the dense kernel (each NaN alone, after every number,
    in column order: the stored values are in class order) while the fill is a number; a
    NaN fill (K < C) makes every NaN class one tie group (the CPU operator, which groups
    NaNs of one bit pattern, differs from the dense kernel there too). [B, K]-sized work."""
    k = values.shape[1]
    tail = classes - k
    nan = values.isnan()
    fill = fill[:, None]
    nan_fill = fill.isnan() & (tail > 0)  # (a fill no class takes is not a NaN class)
    key = values.masked_fill(nan, math.inf)  # NaN counted apart (an inf key must not count as equal to inf)
    nans = nan.sum(1, keepdim=True)
    queries = torch.cat([key, fill.masked_fill(fill.isnan(), 0.0)], 1)
    ordered = key.sort(dim=1).values
    below = torch.searchsorted(ordered, queries)
    equal = torch.searchsorted(ordered, queries, right=True) - below - torch.where(queries == math.inf, nans, 0)
    first = torch.cat([below[:, :k] + tail * (fill < values), below[:, k:]], 1)
    size = torch.cat([equal[:, :k] + tail * (fill == values), equal[:, k:] + tail], 1)
    numbers = (k - nans) + tail * ~nan_fill
    nan_first = numbers + torch.where(nan_fill, 0, nan.cumsum(1) - nan.long())
    nan_size = torch.where(nan_fill, nans + tail, 1)
    is_nan = torch.cat([nan, nan_fill], 1)
    first = torch.where(is_nan, torch.cat([nan_first, numbers], 1), first)
    size = torch.where(is_nan, torch.cat([nan_size.expand(-1, k), nans + tail], 1), size)
    ranks = (2 * first + size - 1).float() * 0.5 + 1.0
    return ranks[:, :k].contiguous(), ranks[:, k].contiguous()


def _spearman(student, teacher: TeacherRows, strength, with_grad):
    """ρ_S per row [B] fp64 and, when asked, dρ_S/ds [B, C] fp32.

    The rows are sorted by ``torch.sort`` (stable, ties in column order, a segmented sort
    on the GPU) rather than inside the kernel: a sort network unrolled in the kernel took
    15–65 s to compile per width, and padding lanes could collide with NaN keys. A sparse
    teacher is not sorted: its ranks come from its K values (``_sparse_teacher_ranks``)."""
    rows, classes = student.shape
    if classes > MAX_SPEARMAN_CLASSES:
        raise ValueError(f"the Triton backend computes the Spearman terms for at most {MAX_SPEARMAN_CLASSES} "
                         f"classes (each row is held by one program), got C={classes}; use backend='cuda' or 'cpu'")
    block = triton.next_power_of_2(classes)
    device = student.device
    s_sorted, s_order = torch.sort(student, dim=1, descending=True, stable=True)
    # θ and the PAV stacks column-major ([C, B]: the PAV kernel's lanes are rows), the
    # flags and prefix sums row-major; 32 bytes of workspace per logit.
    theta = torch.empty(classes, rows, dtype=torch.float64, device=device)
    stack_a = torch.empty(classes, rows, dtype=torch.float64, device=device)
    stack_b = torch.empty(classes, rows, dtype=torch.float64, device=device)
    stack_start = torch.empty(classes, rows, dtype=torch.int32, device=device)
    flags = torch.empty(rows, classes, dtype=torch.int32, device=device)
    counts = torch.empty(rows, dtype=torch.int32, device=device)
    ranks = torch.empty(rows, classes, dtype=torch.float32, device=device)
    rho = torch.empty(rows, dtype=torch.float64, device=device)
    grad = torch.empty(rows, classes, dtype=torch.float32, device=device) if with_grad else rho
    warps = spearman_warps(classes)
    if teacher.sparse:
        stored_rank, tail_rank = _sparse_teacher_ranks(teacher.values, teacher.fill, classes)
        _spearman_prepare_kernel[(rows,)](student, s_sorted, ranks, ranks, teacher.indices, stored_rank, tail_rank,
                                          theta, ranks, rows, classes, *teacher.sizes, strength, BLOCK=block,
                                          num_warps=warps)
    else:
        t_sorted, t_order = torch.sort(teacher.values, dim=1, stable=True)
        _spearman_prepare_kernel[(rows,)](student, s_sorted, t_sorted, t_order, ranks, ranks, ranks, theta, ranks, rows,
                                          classes, *teacher.sizes, strength, BLOCK=block, num_warps=warps)
    _pav_kernel[(triton.cdiv(rows, PAV_ROWS),)](theta, stack_start, stack_a, stack_b, counts, rows, classes,
                                                ROWS=PAV_ROWS, num_warps=1)
    # θ is no longer needed: its storage holds the prefix sums of the backward.
    _spearman_finish_kernel[(rows,)](student, s_sorted, s_order, stack_start, stack_a, stack_b, counts, flags, theta,
                                     ranks, rho, grad, rows, classes, strength, WITH_GRAD=with_grad, BLOCK=block,
                                     num_warps=warps)
    return rho, (grad if with_grad else None)


@torch.library.custom_op("kdfast::fused_kd_loss_triton", mutates_args=())
def fused_kd_loss_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    difficulty: torch.Tensor | None,
    temperature: float,
    kl_coef: float,
    ce_coef: float,
    pearson_coef: float,
    spearman_coef: float,
    column_coef: float,
    rank_strength: float,
    difficulty_mode: int,
    difficulty_value: float,
    rectify: bool,
    student_grad: bool,
    teacher_grad: bool,
    teacher_indices: torch.Tensor | None = None,
    teacher_fill: torch.Tensor | None = None,
    tckd_coef: float = 0.0,
    nckd_coef: float = 0.0,
    standardize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The generic fused loss on Triton (same schema and results as kdfast::fused_kd_loss).

    With ``teacher_indices`` (a sparse teacher: ``teacher`` [B, k] fp32 values, int32 indices
    sorted in each row, ``teacher_fill`` [B] fp32) every kernel rebuilds the teacher's rows
    where it reads them (``_teacher_tile``); no dense B×C teacher is made. ``tckd_coef``,
    ``nckd_coef``: DKD's terms (they need a target and C >= 2); ``standardize``: logit
    standardization of every term but CE (C >= 2), the rebuilt row of a sparse teacher
    included."""
    check_fused_arguments("kdfast fused loss (triton)", student, teacher, target, difficulty, temperature,
                          rank_strength, difficulty_mode, ce_coef, column_coef, rectify, teacher_indices,
                          teacher_fill, teacher_grad)
    rows, classes = student.shape
    if classes > MAX_CLASSES:
        raise ValueError(f"kdfast fused loss (triton): at most {MAX_CLASSES} classes (32-bit column offsets), "
                         f"got C={classes}")
    dkd = tckd_coef != 0 or nckd_coef != 0
    if dkd and target is None:
        raise ValueError("kdfast fused loss (triton): the DKD terms need a target")
    if (dkd or standardize) and classes < 2:
        raise ValueError(f"kdfast fused loss (triton): the DKD terms and logit standardization need at least 2 "
                         f"classes, got {classes}")
    with on_device_of(student):
        return _fused_loss(student.contiguous(), teacher.contiguous(), target, difficulty, temperature, kl_coef,
                           ce_coef, pearson_coef, spearman_coef, column_coef, rank_strength, difficulty_mode,
                           difficulty_value, rectify, student_grad, teacher_grad, teacher_indices, teacher_fill,
                           tckd_coef, nckd_coef, standardize)


def _fused_loss(student, teacher, target, difficulty, temperature, kl_coef, ce_coef, pearson_coef, spearman_coef,
                column_coef, rank_strength, difficulty_mode, difficulty_value, rectify, student_grad, teacher_grad,
                teacher_indices, teacher_fill, tckd_coef=0.0, nckd_coef=0.0, standardize=False, dkd_terms=None):
    """The launches of :func:`fused_kd_loss_triton`, on the inputs' device (checked inputs).
    ``dkd_terms``: a [B, 2] fp64 tensor to receive each row's TCKD and NCKD (tests), when
    the DKD terms are on."""
    rows, classes = student.shape
    inv_tau = 1.0 / temperature
    device = student.device
    row_loss = torch.empty(rows, dtype=torch.float32, device=device)
    if teacher_indices is None:
        teacher = TeacherRows.dense(teacher, row_loss)
    else:
        teacher = TeacherRows(teacher, teacher_indices.contiguous(), teacher_fill.contiguous(), teacher.shape[1])
    grad_student = torch.empty_like(student) if student_grad else student.new_empty((0,))
    grad_teacher = torch.empty_like(teacher.values) if teacher_grad else teacher.values.new_empty((0,))
    layout = launch_config(classes, (pearson_coef != 0) + (column_coef != 0) + (spearman_coef != 0))
    # Flags carried by pointer dtypes (see the module doc): fp64 switches DKD's terms and
    # the standardization on in every kernel that takes the pointer.
    dkd = tckd_coef != 0 or nckd_coef != 0
    if dkd and dkd_terms is None:
        dkd_terms = torch.empty(rows, 2, dtype=torch.float64, device=device)
    dkd_out = dkd_terms if dkd else row_loss
    standard = row_loss
    spearman_student, spearman_teacher = student, teacher
    if standardize:
        # The row kernel takes a resident row's statistics in registers, unless other kernels
        # standardize the rows too: then all read _standardize_kernel's (the same floats).
        if not layout.resident or column_coef != 0 or spearman_coef != 0:
            standard = torch.empty(rows, 6, dtype=torch.float64, device=device)
            block, warps = chunk_config(classes)
            z_student = z_teacher = row_loss
            if spearman_coef != 0:  # the Spearman terms rank and sort the standardized rows
                z_student = torch.empty(rows, classes, dtype=torch.float32, device=device)
                z_teacher = torch.empty(rows, classes, dtype=torch.float32, device=device)
                spearman_student, spearman_teacher = z_student, TeacherRows.dense(z_teacher, row_loss)
            _standardize_kernel[(rows,)](student, *teacher.pointers, standard, z_student, z_teacher, classes,
                                         *teacher.sizes, BLOCK=block, WRITE_ROWS=spearman_coef != 0, num_warps=warps)
        else:
            standard = torch.empty(1, dtype=torch.float64, device=device)  # the flag alone (not read)
    columns, column_rho, stats = (_column_statistics(student, teacher, inv_tau, layout, standard) if column_coef != 0
                                  else (row_loss, None, row_loss))
    spearman_rho, spearman_grad = (_spearman(spearman_student, spearman_teacher, rank_strength, student_grad)
                                   if spearman_coef != 0 else (row_loss, None))
    # The chunked layout's row Pearson term keeps each chunk's running maxima (8 bytes per
    # chunk of MAX_ROW_BLOCK classes).
    chunk_max = (torch.empty(rows, triton.cdiv(classes, layout.block), 2, dtype=torch.float32, device=device)
                 if not layout.resident and pearson_coef != 0 and column_coef == 0 else row_loss)
    target = target.long().contiguous() if target is not None else row_loss
    difficulty = difficulty.float().contiguous() if difficulty is not None else row_loss
    _fused_row_kernel[(triton.cdiv(rows, layout.rows),)](
        student, *teacher.pointers, target, difficulty, spearman_rho,
        spearman_grad if spearman_grad is not None else row_loss, columns, stats, standard, chunk_max, row_loss,
        dkd_out, grad_student if student_grad else row_loss, grad_teacher if teacher_grad else row_loss,
        rows, *teacher.sizes, inv_tau, kl_coef, ce_coef, pearson_coef, spearman_coef, column_coef, tckd_coef,
        nckd_coef, difficulty_value, 1.0 / rows,
        C=classes, HAS_TARGET=target is not row_loss, HAS_KL=kl_coef != 0, HAS_CE=ce_coef != 0, HAS_PEARSON=pearson_coef != 0,
        HAS_SPEARMAN=spearman_coef != 0, HAS_COLUMN=column_coef != 0, RECTIFY=rectify,
        DIFFICULTY_MODE=difficulty_mode, STUDENT_GRAD=student_grad, TEACHER_GRAD=teacher_grad,
        ROWS=layout.rows, BLOCK=layout.block, RESIDENT=layout.resident, num_warps=layout.warps,
    )
    loss = row_loss.sum() / rows
    if column_rho is not None:
        loss = loss + column_coef * (1.0 - column_rho.mean()).float()
    return loss, grad_student, grad_teacher


@fused_kd_loss_triton.register_fake
def _(student, teacher, target, difficulty, temperature, kl_coef, ce_coef, pearson_coef, spearman_coef,
      column_coef, rank_strength, difficulty_mode, difficulty_value, rectify, student_grad, teacher_grad,
      teacher_indices=None, teacher_fill=None, tckd_coef=0.0, nckd_coef=0.0, standardize=False):
    loss = student.new_empty((), dtype=torch.float32)
    grad_student = torch.empty_like(student) if student_grad else student.new_empty((0,))
    grad_teacher = torch.empty_like(teacher) if teacher_grad else teacher.new_empty((0,))
    return loss, grad_student, grad_teacher
