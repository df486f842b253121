// Fused element-wise ops for the decode step. At batch 1 a layer's matmuls take tens of microseconds, so
// each extra PyTorch op (~5 us of dispatch) matters: RMSNorm is five ops in PyTorch, rotary eight per
// tensor, SiLU-and-multiply three. These do each in one pass over memory, in fp32, in the reference order
// (variance = mean(x^2), x * rsqrt(variance + eps) * weight) so results match within float rounding.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/argmax.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <mutex>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {


void check_rows(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "fp32 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x must be [T, H] with contiguous rows");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == x.size(1), "weight must be [H]");
}

void check_heads(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1, "q/k must be fp32 [T, H, D]");
}

}  // namespace

namespace tokenmill {

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, weight);
  const int64_t T = x.size(0), H = x.size(1), stride = x.stride(0);
  at::Tensor y = at::empty({T, H}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tokenmill::normalise_row(xp + t * stride, wp, yp + t * H, H, eps);
  });
  return y;
}

// hidden += delta (the residual add, in place), then return RMSNorm(hidden).
at::Tensor add_rms_norm_(at::Tensor hidden, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  check_rows(hidden, weight);
  TORCH_CHECK(hidden.is_contiguous() && delta.is_contiguous() && delta.sizes() == hidden.sizes(),
              "hidden and delta must be contiguous [T, H]");
  const int64_t T = hidden.size(0), H = hidden.size(1);
  at::Tensor y = at::empty({T, H}, hidden.options());
  float* hp = hidden.data_ptr<float>();
  const float* dp = delta.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) tokenmill::add_normalise_row(hp + t * H, dp + t * H, wp, yp + t * H, H, eps);
  });
  return y;
}

// HF's half-split layout: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin).
void rotate_rows(float* base, int64_t T, int64_t row, int64_t heads, int64_t head, int64_t D, const float* cos,
                 const float* sin) {
  const int64_t half = D / 2;
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cos + t * half;
      const float* s = sin + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        float* x1 = base + t * row + h * head;
        float* x2 = x1 + half;
        for (int64_t i = 0; i < half; ++i) {
          const float a = x1[i], b = x2[i];
          x1[i] = a * c[i] - b * s[i];
          x2[i] = b * c[i] + a * s[i];
        }
      }
    }
  });
}

// In place on q [T, Hq, D] and k [T, Hkv, D] (views into the fused QKV output are fine).
void rotary_(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
                  sin.scalar_type() == at::kFloat,
              "cos/sin must be contiguous fp32 [T, D / 2]");
  check_heads(q);
  check_heads(k);
  const int64_t T = q.size(0), D = q.size(2);
  TORCH_CHECK(cos.numel() == T * (D / 2) && k.size(0) == T && k.size(2) == D, "shape mismatch");
  const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  rotate_rows(q.data_ptr<float>(), T, q.stride(0), q.size(1), q.stride(1), D, c, s);
  rotate_rows(k.data_ptr<float>(), T, k.stride(0), k.size(1), k.stride(1), D, c, s);
}

// [T, 2I] (gate | up) -> silu(gate) * up, [T, I].
at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat && gate_up.dim() == 2 && gate_up.is_contiguous(),
              "gate_up must be contiguous fp32 [T, 2I]");
  const int64_t T = gate_up.size(0), I = gate_up.size(1) / 2;
  at::Tensor y = at::empty({T, I}, gate_up.options());
  const float* in = gate_up.data_ptr<float>();
  float* out = y.data_ptr<float>();
  at::parallel_for(0, T, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* gate = in + t * 2 * I;
      const float* up = gate + I;
      int64_t i = 0;
      // Four vectors per iteration: one exp is a chain of dependent FMAs, and four independent chains
      // keep the FMA units busy (measured ~4x on [1024, 3072], a prefill chunk's gate|up).
      for (; i + 32 <= I; i += 32) {
        __m256 g[4];
        UNROLL4 for (int j = 0; j < 4; ++j) g[j] = _mm256_loadu_ps(gate + i + 8 * j);
        UNROLL4 for (int j = 0; j < 4; ++j)
          _mm256_storeu_ps(out + t * I + i + 8 * j, tokenmill::silu_mul8(g[j], _mm256_loadu_ps(up + i + 8 * j)));
      }
      for (; i + 8 <= I; i += 8)
        _mm256_storeu_ps(out + t * I + i, tokenmill::silu_mul8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
      for (; i < I; ++i) out[t * I + i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
  return y;
}

// The index of each row's largest value, the first on ties, as torch.argmax. torch's takes ~1.3 ms on
// [64, 49152] logits (a greedy batch-64 step's), a lane at a time; here eight lanes compare at once and rows
// split between threads. A row holding NaN goes to torch.argmax (NaN counts as the largest there).
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous() && x.size(1) > 0,
              "x must be contiguous fp32 [N, V], V > 0");
  const int64_t N = x.size(0), V = x.size(1);
  at::Tensor out = at::empty({N}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  std::vector<int64_t> nan_rows;
  std::mutex nan_lock;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* row = xp + n * V;
      const auto [best, nan] = tokenmill::row_peak(row, V);
      if (nan) {
        std::lock_guard<std::mutex> guard(nan_lock);
        nan_rows.push_back(n);
        continue;
      }
      int64_t index = 0;
      while (row[index] != best) ++index;  // the first index holding the maximum
      op[n] = index;
    }
  });
  for (int64_t n : nan_rows) op[n] = x[n].argmax().item<int64_t>();
  return out;
}

// Plain temperature sampling by inverse CDF, one row per (logits row, temperature, uniform): the first token
// whose running sum of exp(l / T - max(l / T)) passes u times the row's total, as sampler.py's softmax,
// cumsum and searchsorted do, without their three [N, V] tensors (sample() at batch 64 x 49,152, argmax and
// uniforms included: 9.5 -> 1.6 ms a step; most of the old cost was fresh pages and single-lane passes). The
// sums run in another order than torch's cumsum, so a u within rounding of a boundary may pick the
// neighbour: the same distribution, not always the same token. A row with NaN or no finite logit gets -1:
// the caller takes it through the PyTorch path.
constexpr int64_t kSampleBlock = 256;  // values per partial sum: the walk to u skips whole blocks

at::Tensor sample_rows(const at::Tensor& logits, const at::Tensor& temperatures, const at::Tensor& uniforms) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.is_contiguous() &&
                  logits.size(1) > 0,
              "logits must be contiguous fp32 [N, V], V > 0");
  const int64_t N = logits.size(0), V = logits.size(1);
  TORCH_CHECK(temperatures.scalar_type() == at::kFloat && temperatures.is_contiguous() &&
                  temperatures.numel() == N && uniforms.scalar_type() == at::kFloat && uniforms.is_contiguous() &&
                  uniforms.numel() == N,
              "one fp32 temperature and one fp32 uniform per row");
  at::Tensor out = at::empty({N}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  const float* tp = temperatures.data_ptr<float>();
  const float* up = uniforms.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> exps(V), block_sums((V + kSampleBlock - 1) / kSampleBlock);
    for (int64_t n = begin; n < end; ++n) {
      const float* row = lp + n * V;
      const float temperature = tp[n];
      TORCH_CHECK(temperature > 0.f, "sample_rows needs temperatures above zero");
      const auto [best, nan] = tokenmill::row_peak(row, V);
      if (nan || !std::isfinite(best)) {
        op[n] = -1;
        continue;
      }
      // x / T - max(x) / T, dividing as the PyTorch path does (division is monotonic: max(x / T) = max(x) / T).
      const float shift = best / temperature;
      const __m256 t = _mm256_set1_ps(temperature), s = _mm256_set1_ps(shift);
      float total = 0.f;
      for (int64_t b0 = 0; b0 < V; b0 += kSampleBlock) {
        const int64_t b1 = std::min(V, b0 + kSampleBlock);
        __m256 acc = _mm256_setzero_ps();
        int64_t j = b0;
        for (; j + 8 <= b1; j += 8) {
          const __m256 e = tokenmill::exp256(_mm256_sub_ps(_mm256_div_ps(_mm256_loadu_ps(row + j), t), s));
          _mm256_storeu_ps(exps.data() + j, e);
          acc = _mm256_add_ps(acc, e);
        }
        float block = tokenmill::sum8(acc);
        for (; j < b1; ++j) block += (exps[j] = std::exp(row[j] / temperature - shift));
        block_sums[b0 / kSampleBlock] = block;
        total += block;
      }
      // exp256 clamps its argument at -87.3, so a -inf logit would weigh e^-87.3 > 0: never choose one.
      const float target = up[n] * total;
      float running = 0.f;
      int64_t b = 0;
      const int64_t blocks = static_cast<int64_t>(block_sums.size());
      while (b + 1 < blocks && running + block_sums[b] <= target) running += block_sums[b++];
      int64_t chosen = -1, last_possible = -1;
      for (int64_t j = b * kSampleBlock; j < std::min(V, (b + 1) * kSampleBlock); ++j) {
        if (row[j] == -std::numeric_limits<float>::infinity()) continue;
        last_possible = j;
        running += exps[j];
        if (running > target) {
          chosen = j;
          break;
        }
      }
      if (chosen < 0) {  // rounding left u at the block's end: the last token of weight there, or before
        chosen = last_possible;
        for (int64_t j = b * kSampleBlock - 1; chosen < 0 && j >= 0; --j)
          if (row[j] != -std::numeric_limits<float>::infinity()) chosen = j;
      }
      op[n] = chosen;
    }
  });
  return out;
}

}  // namespace tokenmill

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm_(Tensor(a!) hidden, Tensor delta, Tensor weight, float eps) -> Tensor");
  m.def("rotary_(Tensor(a!) q, Tensor(b!) k, Tensor cos, Tensor sin) -> ()");
  m.def("silu_mul(Tensor gate_up) -> Tensor");
  m.def("argmax_rows(Tensor x) -> Tensor");
  m.def("sample_rows(Tensor logits, Tensor temperatures, Tensor uniforms) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("rms_norm", &tokenmill::rms_norm);
  m.impl("add_rms_norm_", &tokenmill::add_rms_norm_);
  m.impl("rotary_", &tokenmill::rotary_);
  m.impl("silu_mul", &tokenmill::silu_mul);
  m.impl("argmax_rows", &tokenmill::argmax_rows);
  m.impl("sample_rows", &tokenmill::sample_rows);
}
