// AVX2 helpers shared by the kernels: a vectorised exp (softmax and SiLU call it per element, and
// std::exp one lane at a time was most of the decode-attention time at long contexts) and a reduction
// of four accumulators to one vector of their four sums.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

// Unroll a short loop over accumulators fully, so that they stay in registers.
#define UNROLL4 _Pragma("GCC unroll 4")
#define UNROLL8 _Pragma("GCC unroll 8")

namespace tokenmill {

// e^x for eight lanes, relative error ~2e-7 (x clamped to the normal fp32 range).
// x = n ln2 + r with |r| <= ln2/2; e^r by its degree-6 Taylor polynomial; 2^n built in the exponent bits.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);  // ln2 split in two for exactness
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682e-6f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

#ifdef __AVX512F__
// exp256 on sixteen lanes: the same steps, so the same bits in every lane.
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682e-6f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  const __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(scale));
}
#endif

// silu(gate) * up for eight lanes: silu_mul and the int8 gate|up kernel share it, to the same bits.
inline __m256 silu_mul8(__m256 gate, __m256 up) {
  const __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), gate));
  return _mm256_mul_ps(_mm256_div_ps(gate, _mm256_add_ps(_mm256_set1_ps(1.f), e)), up);
}

// Lane j of the result is the sum of the eight lanes of a[j], j < 4.
inline __m128 sum4x8(const __m256* a) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// Software prefetch of weights we will stream soon. Into L2, not L1: with T0 the L1's few miss buffers
// capped a single-row-stream kernel at ~8 GB/s per core; T1 reached ~19 (measured, int8 decode, one thread).
inline void prefetch_l2(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }

inline float sum8(__m256 v) {
  __m128 low = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  low = _mm_hadd_ps(low, low);
  low = _mm_hadd_ps(low, low);
  return _mm_cvtss_f32(low);
}

// The largest of eight lanes.
inline float max8(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// row[0..L) <- exp(row - max(row)), eight lanes at a time; returns the max and the sum of the new row (the
// normalisation waits for the output: D divisions instead of L, and parts of one context merge by these two).
struct Exps {
  float peak, total;
};
inline Exps exp_shifted(float* row, int64_t L) {
  __m256 peaks = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t s = 0;
  for (; s + 8 <= L; s += 8) peaks = _mm256_max_ps(peaks, _mm256_loadu_ps(row + s));
  float peak = max8(peaks);
  for (; s < L; ++s) peak = std::max(peak, row[s]);
  const __m256 shift = _mm256_set1_ps(peak);
  __m256 acc = _mm256_setzero_ps();
  s = 0;
#ifdef __AVX512F__
  // Sixteen at a time, the sum still taken eight lanes at a time in the same order: the same bits.
  const __m512 shift16 = _mm512_set1_ps(peak);
  for (; s + 16 <= L; s += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(row + s), shift16));
    _mm512_storeu_ps(row + s, e);
    acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
    acc = _mm256_add_ps(acc, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
  }
#endif
  for (; s + 8 <= L; s += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row + s), shift));
    _mm256_storeu_ps(row + s, e);
    acc = _mm256_add_ps(acc, e);
  }
  // The last 1-7 in one masked vector, where std::exp took them one at a time: prefill attention over eight
  // 128-token prompts 1.04 -> 0.98 ms (best of seven x 20 calls, two threads).
  if (s < L) {
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(L - s)),
                                             _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const __m256 e = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_maskload_ps(row + s, lanes), shift)),
                                   _mm256_castsi256_ps(lanes));
    _mm256_maskstore_ps(row + s, lanes, e);
    acc = _mm256_add_ps(acc, e);
  }
  return {peak, sum8(acc)};
}

// RMSNorm of one row in the reference order (variance = mean(x^2), x * rsqrt(variance + eps) * weight).
inline void normalise_row(const float* in, const float* weight, float* out, int64_t H, double eps) {
  // Four vector accumulators: one scalar sum is a chain of dependent adds (576 values: ~0.8 us, more than
  // the rest of the norm), and PyTorch's own reduction does not add in order either.
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= H; i += 32)
    UNROLL4 for (int j = 0; j < 4; ++j) {
      const __m256 v = _mm256_loadu_ps(in + i + 8 * j);
      acc[j] = _mm256_fmadd_ps(v, v, acc[j]);
    }
  float sum = tokenmill::sum8(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  for (; i < H; ++i) sum += in[i] * in[i];
  const float inverse = 1.f / std::sqrt(sum / static_cast<float>(H) + static_cast<float>(eps));
  for (int64_t i = 0; i < H; ++i) out[i] = in[i] * inverse * weight[i];
}

// row += add (the residual), then out = normalise_row(row): add_rms_norm_ and the fused int8 ops alike.
inline void add_normalise_row(float* row, const float* add, const float* weight, float* out, int64_t H,
                              double eps) {
  for (int64_t i = 0; i < H; ++i) row[i] += add[i];
  normalise_row(row, weight, out, H, eps);
}

// A row's largest value, and whether it holds a NaN (which max comparisons skip), eight lanes at a time.
struct RowPeak {
  float best;
  bool nan;
};

inline RowPeak row_peak(const float* row, int64_t V) {
  __m256 peak = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 unordered = _mm256_setzero_ps();  // lanes that met a NaN
  int64_t i = 0;
  for (; i + 8 <= V; i += 8) {
    const __m256 v = _mm256_loadu_ps(row + i);
    unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    peak = _mm256_max_ps(peak, v);
  }
  float best = -std::numeric_limits<float>::infinity();
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, peak);
  for (float lane : lanes) best = std::max(best, lane);
  bool nan = _mm256_movemask_ps(unordered) != 0;
  for (int64_t j = i; j < V; ++j) {
    nan |= std::isnan(row[j]);
    best = std::max(best, row[j]);
  }
  return {best, nan};
}

}  // namespace tokenmill
