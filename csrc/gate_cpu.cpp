// ResKD's gate-and-compact operator for CPU tensors (the Triton kernel in
// kernels/gate.py and the torch reference in kdfast/gate.py compute the same thing).
//
// For the logits [A, C] of the A still-active rows, whose dataset rows are `rows` [A]:
//   confidence_i = max_j softmax(logits_i)_j = 1 / sum_j exp(x_ij − max_i),
// accumulated in double from the exact differences x_ij − max_i (two passes: max, then
// sum), so every implementation reaches the same value up to the last bits of exp and of
// the summation order. A row continues when confidence_i < threshold (a NaN confidence
// stops). The continuing rows are written, in their input order (stable), to the front of
// `next_rows` [A]; the rest of it is −1; `count` holds how many continue.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <tuple>

namespace kdfast {
namespace {

template <typename scalar_t>
double max_probability(const scalar_t* x, int64_t n) {
  float maximum = -INFINITY;
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    const float v = static_cast<float>(x[j]);
    nan |= std::isnan(v);
    maximum = std::max(maximum, v);
  }
  if (nan) return NAN;
  double sum = 0.0;
  for (int64_t j = 0; j < n; ++j) sum += std::exp(static_cast<double>(static_cast<float>(x[j])) - maximum);
  return 1.0 / sum;  // an all −inf or +inf row gives NaN (−inf − −inf), like the others
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gate_compact_cpu(const at::Tensor& logits, const at::Tensor& rows,
                                                                 double threshold) {
  TORCH_CHECK(logits.dim() == 2, "gate_compact: logits must be [A, C], got ", logits.dim(), " dimensions");
  TORCH_CHECK(rows.dim() == 1 && rows.size(0) == logits.size(0) && rows.scalar_type() == at::kLong,
              "gate_compact: rows must be an int64 vector with one entry per row of logits");
  const at::Tensor x = logits.contiguous();
  const at::Tensor r = rows.contiguous();
  const int64_t active = x.size(0), n = x.size(1);
  at::Tensor confidence = at::empty({active}, x.options().dtype(at::kDouble));
  at::Tensor next_rows = at::empty({active}, r.options());
  double* conf = confidence.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gate_compact", [&] {
    const scalar_t* data = x.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
    at::parallel_for(0, active, grain, [&](int64_t first, int64_t last) {
      for (int64_t i = first; i < last; ++i) conf[i] = max_probability(data + i * n, n);
    });
  });
  // Compaction: one ordered pass (A entries; the exp pass above is the work).
  const int64_t* in = r.data_ptr<int64_t>();
  int64_t* out = next_rows.data_ptr<int64_t>();
  int64_t count = 0;
  for (int64_t i = 0; i < active; ++i) {
    if (conf[i] < threshold) out[count++] = in[i];
  }
  std::fill(out + count, out + active, int64_t{-1});
  return {next_rows, at::scalar_tensor(count, r.options()), confidence};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kdfast, m) {
  m.def("gate_compact(Tensor logits, Tensor rows, float threshold) -> (Tensor next_rows, Tensor count, "
        "Tensor confidence)");
}

TORCH_LIBRARY_IMPL(kdfast, CPU, m) { m.impl("gate_compact", &gate_compact_cpu); }

}  // namespace kdfast
