// Linear layers for small batches on an AVX2 CPU: y[M, N] = x[M, K] @ W[N, K]^T.
//
// Decode is memory-bound: each step reads every weight once, so the bytes per weight set the speed. These
// kernels read int8 (1 byte) or packed int4 (half a byte) weights, widen them to fp32 in registers and use
// fp32 FMAs, so the arithmetic stays fp32 while the memory traffic shrinks 4-8x. The fp32 kernel exists
// because MKL's sgemv reaches only ~a third of the machine's bandwidth on two threads.
//
// Shape of the work: output rows are handled four at a time (a "panel"), each panel's weights are decoded
// once into an L1-resident fp32 buffer, then every group of three input rows runs through a 4x3 register
// tile (12 accumulators + 3 inputs + 1 weight = 16 ymm registers).
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

#define UNROLL _Pragma("GCC unroll 16")

constexpr int64_t kRows = 4;  // output rows per panel
constexpr int64_t kAhead = 4 * kRows;  // software prefetch distance, in rows (measured: 2-4 panels)

inline float horizontal_sum(__m256 v) {
  __m128 low = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  low = _mm_hadd_ps(low, low);
  low = _mm_hadd_ps(low, low);
  return _mm_cvtss_f32(low);
}

// panel: kRows rows of K floats, row stride `panel_stride`; x: rows of K floats, stride `x_stride`.
template <int MB>
inline void tile(const float* panel, int64_t panel_stride, const float* x, int64_t x_stride, float* y,
                 int64_t y_stride, int64_t K) {
  __m256 acc[kRows][MB];
  UNROLL for (int n = 0; n < kRows; ++n)
    UNROLL for (int m = 0; m < MB; ++m) acc[n][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[MB];
    UNROLL for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * x_stride + k);
    UNROLL for (int n = 0; n < kRows; ++n) {
      __m256 w = _mm256_loadu_ps(panel + n * panel_stride + k);
      UNROLL for (int m = 0; m < MB; ++m) acc[n][m] = _mm256_fmadd_ps(w, xv[m], acc[n][m]);
    }
  }
  UNROLL for (int m = 0; m < MB; ++m)
    UNROLL for (int n = 0; n < kRows; ++n) y[m * y_stride + n] = horizontal_sum(acc[n][m]);
}

inline void run_tiles(const float* panel, int64_t panel_stride, const float* x, int64_t M, int64_t K, float* y,
                      int64_t N) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) tile<3>(panel, panel_stride, x + m * K, K, y + m * N, N, K);
  if (M - m == 2) tile<2>(panel, panel_stride, x + m * K, K, y + m * N, N, K);
  if (M - m == 1) tile<1>(panel, panel_stride, x + m * K, K, y + m * N, N, K);
}

inline void decode_int8_row(const int8_t* q, float scale, float* out, int64_t K) {
  const __m256 s = _mm256_set1_ps(scale);
  for (int64_t k = 0; k < K; k += 8) {
    if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(q + kAhead * K + k), _MM_HINT_T0);
    __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + k));
    __m256 values = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
    _mm256_storeu_ps(out + k, _mm256_mul_ps(values, s));
  }
}

inline __m256 widen_u8(__m128i bytes) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes)); }

// Each 32 weights are 16 bytes: the low nibble of byte j is weight j, the high nibble weight j + 16
// (llama.cpp's Q4 layout). w = q * scale + min, with one (scale, min) per `group` weights.
inline void decode_int4_row(const uint8_t* packed, const float* scales, const float* mins, int64_t group,
                            float* out, int64_t K) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  for (int64_t k = 0; k < K; k += 32) {
    if (k % 128 == 0) _mm_prefetch(reinterpret_cast<const char*>(packed + kAhead * (K / 2) + k / 2), _MM_HINT_T0);
    const int64_t g = k / group;
    const __m256 s = _mm256_set1_ps(scales[g]);
    const __m256 z = _mm256_set1_ps(mins[g]);
    __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + k / 2));
    __m128i low = _mm_and_si128(bytes, mask);
    __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    _mm256_storeu_ps(out + k, _mm256_fmadd_ps(widen_u8(low), s, z));
    _mm256_storeu_ps(out + k + 8, _mm256_fmadd_ps(widen_u8(_mm_srli_si128(low, 8)), s, z));
    _mm256_storeu_ps(out + k + 16, _mm256_fmadd_ps(widen_u8(high), s, z));
    _mm256_storeu_ps(out + k + 24, _mm256_fmadd_ps(widen_u8(_mm_srli_si128(high, 8)), s, z));
  }
}

// For one or two input rows decoding into a buffer costs more than it saves: widen the weights in
// registers and multiply at once. int8 applies its row scale after the sum; int4 dequantises per group.
template <int MB>
inline void int8_direct(const int8_t* q, const float* scales, const float* x, float* y, int64_t N, int64_t K) {
  // 32 weights per row per iteration from one 32-byte load, widened with register shuffles: on AMD
  // cores vpmovsxbd from memory per 8 bytes ran at half this speed (measured).
  __m256 acc[kRows][MB];
  UNROLL for (int n = 0; n < kRows; ++n)
    UNROLL for (int m = 0; m < MB; ++m) acc[n][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    UNROLL for (int n = 0; n < kRows; ++n) {
      // Rows are short (K bytes), too short for the hardware prefetcher to ramp up: fetch panels ahead.
      _mm_prefetch(reinterpret_cast<const char*>(q + (n + kAhead) * K + k), _MM_HINT_T0);
      __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + n * K + k));
      __m128i low = _mm256_castsi256_si128(bytes);
      __m128i high = _mm256_extracti128_si256(bytes, 1);
      __m256 w[4] = {
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(low)),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(low, 8))),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(high)),
          _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(high, 8))),
      };
      UNROLL for (int m = 0; m < MB; ++m)
        UNROLL for (int j = 0; j < 4; ++j)
          acc[n][m] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + m * K + k + 8 * j), acc[n][m]);
    }
  }
  UNROLL for (int m = 0; m < MB; ++m)
    UNROLL for (int n = 0; n < kRows; ++n) y[m * N + n] = horizontal_sum(acc[n][m]) * scales[n];
}

template <int MB>
inline void int4_direct(const uint8_t* packed, const float* scales, const float* mins, int64_t group,
                        const float* x, float* y, int64_t N, int64_t K) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  const int64_t groups = K / group;
  __m256 acc[kRows][MB];
  UNROLL for (int n = 0; n < kRows; ++n)
    UNROLL for (int m = 0; m < MB; ++m) acc[n][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const int64_t g = k / group;
    UNROLL for (int n = 0; n < kRows; ++n) {
      const __m256 s = _mm256_set1_ps(scales[n * groups + g]);
      const __m256 z = _mm256_set1_ps(mins[n * groups + g]);
      _mm_prefetch(reinterpret_cast<const char*>(packed + (n + kAhead) * (K / 2) + k / 2), _MM_HINT_T0);
      __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(packed + n * (K / 2) + k / 2));
      __m128i low = _mm_and_si128(bytes, mask);
      __m128i high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
      __m256 w[4] = {
          _mm256_fmadd_ps(widen_u8(low), s, z),
          _mm256_fmadd_ps(widen_u8(_mm_srli_si128(low, 8)), s, z),
          _mm256_fmadd_ps(widen_u8(high), s, z),
          _mm256_fmadd_ps(widen_u8(_mm_srli_si128(high, 8)), s, z),
      };
      UNROLL for (int m = 0; m < MB; ++m)
        UNROLL for (int j = 0; j < 4; ++j)
          acc[n][m] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(x + m * K + k + 8 * j), acc[n][m]);
    }
  }
  UNROLL for (int m = 0; m < MB; ++m)
    UNROLL for (int n = 0; n < kRows; ++n) y[m * N + n] = horizontal_sum(acc[n][m]);
}

// Up to this many input rows the direct kernels run; above it, decoding once per panel pays.
constexpr int64_t kDirectMaxRows = 2;

at::Tensor check_input(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "]");
  return x.contiguous();
}

// Panels are independent, so threads split the output rows; each thread keeps one decode buffer.
template <typename Decode, typename Direct>
at::Tensor panel_linear(const at::Tensor& x_in, int64_t N, int64_t K, Decode decode, Direct direct) {
  at::Tensor x = check_input(x_in, K);
  TORCH_CHECK(N % kRows == 0 && K % 32 == 0, "need N % 4 == 0 and K % 32 == 0");
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (M <= kDirectMaxRows) {
    at::parallel_for(0, N / kRows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) direct(p * kRows, xp, yp + p * kRows, M);
    });
    return y;
  }
  at::parallel_for(0, N / kRows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(kRows * K);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kRows;
      for (int64_t r = 0; r < kRows; ++r) decode(n0 + r, panel.data() + r * K);
      run_tiles(panel.data(), K, xp, M, K, yp + n0, N);
    }
  });
  return y;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && qweight.is_contiguous(), "qweight must be contiguous int8");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == qweight.size(0), "one fp32 scale per row");
  const int64_t N = qweight.size(0), K = qweight.size(1);
  const int8_t* q = qweight.data_ptr<int8_t>();
  const float* s = scales.data_ptr<float>();
  return panel_linear(
      x, N, K, [&](int64_t n, float* out) { decode_int8_row(q + n * K, s[n], out, K); },
      [&](int64_t n0, const float* xp, float* yp, int64_t M) {
        if (M == 1) int8_direct<1>(q + n0 * K, s + n0, xp, yp, N, K);
        else int8_direct<2>(q + n0 * K, s + n0, xp, yp, N, K);
      });
}

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                       const at::Tensor& mins, int64_t group) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(group % 32 == 0, "group must be a multiple of 32");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(scales.is_contiguous() && mins.is_contiguous() && scales.numel() == N * (K / group) &&
                  mins.numel() == scales.numel(),
              "scales/mins must be [N, K / group] fp32");
  const uint8_t* q = packed.data_ptr<uint8_t>();
  const float* s = scales.data_ptr<float>();
  const float* z = mins.data_ptr<float>();
  const int64_t groups = K / group;
  return panel_linear(
      x, N, K,
      [&](int64_t n, float* out) { decode_int4_row(q + n * (K / 2), s + n * groups, z + n * groups, group, out, K); },
      [&](int64_t n0, const float* xp, float* yp, int64_t M) {
        const uint8_t* rows = q + n0 * (K / 2);
        if (M == 1) int4_direct<1>(rows, s + n0 * groups, z + n0 * groups, group, xp, yp, N, K);
        else int4_direct<2>(rows, s + n0 * groups, z + n0 * groups, group, xp, yp, N, K);
      });
}

// fp32 weights need no decoding: the tile reads them straight from memory.
at::Tensor fp32_linear(const at::Tensor& x_in, const at::Tensor& weight) {
  TORCH_CHECK(weight.scalar_type() == at::kFloat && weight.is_contiguous(), "weight must be contiguous fp32");
  const int64_t N = weight.size(0), K = weight.size(1);
  at::Tensor x = check_input(x_in, K);
  TORCH_CHECK(N % kRows == 0 && K % 8 == 0, "need N % 4 == 0 and K % 8 == 0");
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N / kRows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) run_tiles(wp + p * kRows * K, K, xp, M, K, yp + p * kRows, N);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(tokenmill, m) {
  m.def("int8_linear(Tensor x, Tensor qweight, Tensor scales) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor mins, int group) -> Tensor");
  m.def("fp32_linear(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("int8_linear", &int8_linear);
  m.impl("int4_linear", &int4_linear);
  m.impl("fp32_linear", &fp32_linear);
}
