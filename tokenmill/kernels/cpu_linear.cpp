// Linear layers for small batches on an AVX2 CPU: y[M, N] = x[M, K] @ W[N, K]^T. Built with AVX-512 VNNI where
// the CPU has it (kernels/__init__.py): the integer tiles then multiply-add with vpdpbusd (int8 on 512-bit
// registers, int4 two panels at a time in AVX-512's 32 registers), to the same integer sums and so the same
// outputs bit for bit.
//
// Decode is memory-bound: each step reads every weight once, so the bytes per weight set the speed. These
// kernels read int8 (1 byte) or packed int4 (half a byte) weights, so the memory traffic shrinks 4-8x. The
// fp32 kernel exists because MKL's sgemv reaches only ~a third of the machine's bandwidth on two threads.
// Weights still ahead are prefetched into L2 (tokenmill::prefetch_l2).
//
// Shape of the work, by the number of input rows M:
// - int8 and int4, any M: integer tiles on panels of 16 (int8) or 8 (int4) output rows, stored that way at
//   load (int8_tile, int4_tile): each output one int32 lane, the weights meeting activations rounded to int8
//   (one scale per 32) in vpdpbusd (vpmaddubsw without VNNI). One row is memory-bound, many compute-bound;
//   the same code serves both, and a sequence's outputs do not depend on how many rows share its batch.
// - fp32, up to kFp32OuterMinRows: memory-bound. Dot products along K, four output rows and up to three
//   input rows at a time.
// - fp32, more rows: compute-bound, so the multiply units set the pace and every output must stay in a
//   register for the whole of K. Output rows go sixteen at a time, stored K-major ([k][16], two vectors per
//   k) in slices of K small enough to stay in L1 between packing and use; each block of up to six input rows
//   then runs a 6x16 outer-product tile: per k two weight loads, one broadcast per row, twelve FMAs, and no
//   horizontal sums.
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

#define UNROLL _Pragma("GCC unroll 16")

constexpr int64_t kRows = 4;  // output rows per dot-product panel (one or two input rows); N must divide
constexpr int64_t kAhead = 4 * kRows;  // software prefetch distance, in rows (measured: 2-4 panels)

using tokenmill::prefetch_l2;
using tokenmill::sum8;

// panel: kRows rows of K floats, row stride `panel_stride`; x: rows of K floats, stride `x_stride`.
// The panels are weights streaming from memory: fetch the ones ahead into L2.
template <int MB>
// Kept out of line: inlined into the panel loops it ran 5-20% slower (measured at 8 rows).
__attribute__((noinline)) void dot_tile(const float* panel, int64_t panel_stride, const float* x,
                                        int64_t x_stride, float* y, int64_t y_stride, int64_t K) {
  __m256 acc[kRows][MB];
  UNROLL for (int n = 0; n < kRows; ++n)
    UNROLL for (int m = 0; m < MB; ++m) acc[n][m] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 xv[MB];
    UNROLL for (int m = 0; m < MB; ++m) xv[m] = _mm256_loadu_ps(x + m * x_stride + k);
    UNROLL for (int n = 0; n < kRows; ++n) {
      if (k % 16 == 0) prefetch_l2(panel + (n + kAhead) * panel_stride + k);
      __m256 w = _mm256_loadu_ps(panel + n * panel_stride + k);
      UNROLL for (int m = 0; m < MB; ++m) acc[n][m] = _mm256_fmadd_ps(w, xv[m], acc[n][m]);
    }
  }
  UNROLL for (int m = 0; m < MB; ++m)
    UNROLL for (int n = 0; n < kRows; ++n) y[m * y_stride + n] = sum8(acc[n][m]);
}

inline void run_dot_tiles(const float* panel, int64_t panel_stride, const float* x, int64_t M, int64_t K, float* y,
                          int64_t N) {
  int64_t m = 0;
  for (; m + 3 <= M; m += 3) dot_tile<3>(panel, panel_stride, x + m * K, K, y + m * N, N, K);
  if (M - m == 2) dot_tile<2>(panel, panel_stride, x + m * K, K, y + m * N, N, K);
  if (M - m == 1) dot_tile<1>(panel, panel_stride, x + m * K, K, y + m * N, N, K);
}

inline float sum8_epi32(__m256i v) { return sum8(_mm256_cvtepi32_ps(v)); }

// The largest |v[k]| of n values (n a multiple of 8).
inline float largest_abs(const float* v, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 peak = _mm256_setzero_ps();
  for (int64_t k = 0; k < n; k += 8) peak = _mm256_max_ps(peak, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + k)));
  __m128 p = _mm_max_ps(_mm256_castps256_ps128(peak), _mm256_extractf128_ps(peak, 1));
  p = _mm_max_ps(p, _mm_movehl_ps(p, p));
  p = _mm_max_ss(p, _mm_shuffle_ps(p, p, 1));
  return _mm_cvtss_f32(p);
}

// 32 values rounded to int8 with one scale, the largest |v| / 127 (vcvtps2dq rounds to nearest even, as
// torch.round does in the fallback): the bytes in order, the scale, and the sum of the rounded values.
struct Int8Block {
  __m256i bytes;
  float scale;
  float sum;
};

inline Int8Block round_block_int8(const float* v) {
  const float largest = largest_abs(v, 32);
  const __m256 inverse = _mm256_set1_ps(largest > 0 ? 127.f / largest : 0.f);
  __m256i q[4];
  UNROLL for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v + 8 * j), inverse));
  const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  // The packs interleave 128-bit halves (and then 4-byte runs); the permute puts the 32 bytes back in order.
  const __m256i bytes = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  return {bytes, largest / 127.f, sum8_epi32(total)};
}

inline __m256i broadcast4(const void* p) {
  int32_t word;
  std::memcpy(&word, p, sizeof(word));
  return _mm256_set1_epi32(word);
}

constexpr int64_t kPanel = 16;  // output rows per panel of fp32's outer-product path: two vectors
constexpr int64_t kTileRows = 6;  // input rows per tile: 12 accumulators + 2 weights + 1 broadcast registers
constexpr int64_t kSlice = 256;  // K per packed slice
// From this many input rows on the outer-product tiles beat fp32's dot-product tiles (measured on 576-3072 x
// 576-1536 weights): below, packing (a transpose straight from memory) costs more than the horizontal sums it
// saves.
constexpr int64_t kFp32OuterMinRows = 48;

// r[j] lane i <- r[i] lane j.
inline void transpose8(__m256* r) {
  __m256 t[8], s[8];
  UNROLL for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  UNROLL for (int i = 0; i < 8; i += 4) {
    s[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    s[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    s[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    s[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  UNROLL for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(s[i], s[i + 4], 0x31);
  }
}

// Fills buf[(k - k0) * kPanel + j] with weight k of panel row j, k0 <= k < k1. load8(j, k) gives row j's
// weights k..k+7 (rows at or past `width` read as zero).
template <bool kFull, typename Load8>
inline void pack_panel(Load8 load8, int64_t width, int64_t k0, int64_t k1, float* buf) {
  for (int64_t k = k0; k < k1; k += 8) {
    UNROLL for (int half = 0; half < 2; ++half) {
      __m256 r[8];
      UNROLL for (int j = 0; j < 8; ++j) {
        const int64_t row = half * 8 + j;
        r[j] = (kFull || row < width) ? load8(row, k) : _mm256_setzero_ps();
      }
      transpose8(r);
      float* out = buf + (k - k0) * kPanel + half * 8;
      UNROLL for (int j = 0; j < 8; ++j) _mm256_store_ps(out + j * kPanel, r[j]);
    }
  }
}

template <typename Load8>
inline void pack(Load8 load8, int64_t width, int64_t k0, int64_t k1, float* buf) {
  if (width == kPanel) pack_panel<true>(load8, width, k0, k1, buf);
  else pack_panel<false>(load8, width, k0, k1, buf);
}

// MB input rows (stride K) times the panel's 16 outputs over `steps` values of k; adds to y if `accumulate`.
template <int MB>
inline void outer_tile(const float* buf, const float* x, int64_t K, int64_t steps, float* y, int64_t N,
                       int64_t width, bool accumulate) {
  __m256 acc[MB][2];
  alignas(32) float row[kPanel] = {};
  UNROLL for (int m = 0; m < MB; ++m) {
    if (!accumulate) {
      acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    } else if (width == kPanel) {
      acc[m][0] = _mm256_loadu_ps(y + m * N);
      acc[m][1] = _mm256_loadu_ps(y + m * N + 8);
    } else {
      std::memcpy(row, y + m * N, width * sizeof(float));
      acc[m][0] = _mm256_load_ps(row);
      acc[m][1] = _mm256_load_ps(row + 8);
    }
  }
  _Pragma("GCC unroll 4") for (int64_t k = 0; k < steps; ++k) {
    const __m256 w0 = _mm256_load_ps(buf + k * kPanel);
    const __m256 w1 = _mm256_load_ps(buf + k * kPanel + 8);
    UNROLL for (int m = 0; m < MB; ++m) {
      const __m256 xm = _mm256_broadcast_ss(x + m * K + k);
      acc[m][0] = _mm256_fmadd_ps(w0, xm, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(w1, xm, acc[m][1]);
    }
  }
  UNROLL for (int m = 0; m < MB; ++m) {
    if (width == kPanel) {
      _mm256_storeu_ps(y + m * N, acc[m][0]);
      _mm256_storeu_ps(y + m * N + 8, acc[m][1]);
    } else {
      _mm256_store_ps(row, acc[m][0]);
      _mm256_store_ps(row + 8, acc[m][1]);
      std::memcpy(y + m * N, row, width * sizeof(float));
    }
  }
}

// Splits M rows into as few tiles as kTileRows allows, of near-equal height (8 rows: 4 + 4, not 6 + 2).
inline void run_outer_tiles(const float* buf, const float* x, int64_t M, int64_t K, int64_t steps, float* y,
                            int64_t N, int64_t width, bool accumulate) {
  const int64_t tiles = (M + kTileRows - 1) / kTileRows;
  for (int64_t t = 0, m = 0; t < tiles; ++t) {
    const int64_t rows = M / tiles + (t < M % tiles ? 1 : 0);
    const float* xt = x + m * K;
    float* yt = y + m * N;
    switch (rows) {
      case 6: outer_tile<6>(buf, xt, K, steps, yt, N, width, accumulate); break;
      case 5: outer_tile<5>(buf, xt, K, steps, yt, N, width, accumulate); break;
      case 4: outer_tile<4>(buf, xt, K, steps, yt, N, width, accumulate); break;
      case 3: outer_tile<3>(buf, xt, K, steps, yt, N, width, accumulate); break;
      case 2: outer_tile<2>(buf, xt, K, steps, yt, N, width, accumulate); break;
      default: outer_tile<1>(buf, xt, K, steps, yt, N, width, accumulate); break;
    }
    m += rows;
  }
}

// Panels are independent, so threads split them. K goes in slices of kSlice so that a packed slice (16 KB)
// is still in L1 when the tiles read it; each slice adds to y. pack_rows(n0, width, k0, k1, buf) packs
// rows n0 .. n0 + width - 1, weights k0 .. k1 - 1.
template <typename PackRows>
void tiled_linear(const float* x, int64_t M, int64_t N, int64_t K, float* y, PackRows pack_rows) {
  at::parallel_for(0, (N + kPanel - 1) / kPanel, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> storage(kPanel * kSlice + 16);
    float* buf = storage.data() + (-reinterpret_cast<uintptr_t>(storage.data()) / sizeof(float)) % 16;
    for (int64_t p = begin; p < end; ++p) {
      const int64_t n0 = p * kPanel, width = std::min(kPanel, N - n0);
      for (int64_t k0 = 0; k0 < K; k0 += kSlice) {
        const int64_t k1 = std::min(K, k0 + kSlice);
        pack_rows(n0, width, k0, k1, buf);
        run_outer_tiles(buf, x + k0, M, K, k1 - k0, y + n0, N, width, k0 > 0);
      }
    }
  });
}

at::Tensor check_input(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "x must be float32");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [M, ", K, "]");
  return x.contiguous();
}

// int4: integer tiles at every row count. vpmaddubsw does 32 byte products (and adds pairs) per instruction
// against an FMA's 8; with 4-bit weights a pair is at most 2 x 15 x 127, so eight of them add up in int16
// before one vpmaddwd widens a block of 32 to int32. The weights are stored as the tiles read them
// (quantization.py's INT4_UNIT): a panel of eight output rows, and per block of 32 inputs four 32-byte vectors,
// vector j holding each row's packed bytes 4j .. 4j + 3 (weights 4j .. 4j + 3 in the low nibbles, 4j + 16 ..
// 4j + 19 in the high ones; row r at bytes 4r .. 4r + 3), then the eight rows' fp16 scales and minimums. The
// input row's four activations broadcast meet a vector, and each int32 lane is one output: no horizontal
// sums, no repacking, and one sequential stream of bytes per thread. The activations are int8 per 32 in order
// (`round_activations_int8_groups` in the fallback), the same sums at every row count.
struct Int8Blocks {
  std::unique_ptr<int32_t[]> storage;  // what the pointers below point into
  int8_t* q;  // [M, K]
  float* scale;  // [M, K / 32]
  float* offset;  // [M, K / 32]: scale * the block's sum, which multiplies the weights' minimum
  int32_t* start;  // [M, K / 32]: -128 x the block's sum of rounded values (int8's VNNI sums)
};

// n words of `scratch`, which only grows, from a 64-byte boundary (vector stores then never split a line).
inline int32_t* aligned_scratch(std::vector<int32_t>& scratch, size_t n) {
  scratch.resize(std::max(scratch.size(), n + 16));
  return reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t(63));
}

#ifdef __AVX512F__
// r[i] = op over the sixteen lanes of v[i]: a tree of shuffles (halving the lanes per block at each level)
// in place of a horizontal reduction per vector, three shuffles and an op per vector.
template <typename Op>
inline __m512 reduce16(const __m512* v, Op op) {
  __m512 t[8], u[4], w[2];
  UNROLL8 for (int i = 0; i < 8; ++i)  // [a.L0|a.L2, a.L1|a.L3, b.L0|b.L2, b.L1|b.L3] (128-bit lanes)
    t[i] = op(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44), _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  UNROLL4 for (int i = 0; i < 4; ++i)  // a 128-bit lane per block: four blocks
    u[i] = op(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88), _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
  UNROLL4 for (int i = 0; i < 2; ++i)  // two values per block, in each 128-bit lane
    w[i] = op(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0x44), _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], 0xEE));
  const __m512 r = op(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
  // r lane 4k + j holds block 4j + k
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), r);
}

// The largest |x| of each of sixteen blocks of 32.
inline __m512 largest16(const float* x) {
  __m512 v[16];
  UNROLL for (int i = 0; i < 16; ++i)
    v[i] = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + 32 * i)), _mm512_abs_ps(_mm512_loadu_ps(x + 32 * i + 16)));
  return reduce16(v, [](__m512 a, __m512 b) { return _mm512_max_ps(a, b); });
}

// round_block_int8 on sixteen blocks at once, to the same bytes, scales and sums (largest: largest16(x)): the
// maxima and integer sums are exact in any order, the divisions correctly rounded in vectors as in scalars,
// and vpmovdb writes the bytes in order (every value is within +-127). Block i's bytes go to q + i * q_stride,
// its scale, offset and start to index i * stride of the arrays.
inline void round_blocks16(const float* x, __m512 largest, int8_t* q, int64_t q_stride, float* scales,
                           float* offsets, int32_t* starts, int64_t stride) {
  alignas(64) float inverse[16];
  _mm512_store_ps(inverse, _mm512_maskz_div_ps(_mm512_cmp_ps_mask(largest, _mm512_setzero_ps(), _CMP_GT_OQ),
                                               _mm512_set1_ps(127.f), largest));
  __m512 v[16];
  UNROLL for (int i = 0; i < 16; ++i) {
    const __m512 times = _mm512_set1_ps(inverse[i]);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 32 * i), times));
    const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + 32 * i + 16), times));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + q_stride * i), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + q_stride * i + 16), _mm512_cvtepi32_epi8(q1));
    v[i] = _mm512_castsi512_ps(_mm512_add_epi32(q0, q1));
  }
  const __m512i sums = _mm512_castps_si512(reduce16(v, [](__m512 a, __m512 b) {
    return _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }));
  const __m512 scale = _mm512_div_ps(largest, _mm512_set1_ps(127.f));
  const __m512 offset = _mm512_mul_ps(scale, _mm512_cvtepi32_ps(sums));
  const __m512i start = _mm512_mullo_epi32(sums, _mm512_set1_epi32(-128));
  if (stride == 1) {
    _mm512_storeu_ps(scales, scale);
    _mm512_storeu_ps(offsets, offset);
    _mm512_storeu_si512(starts, start);
  } else {
    const __m512i at = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(static_cast<int32_t>(stride)));
    _mm512_i32scatter_ps(scales, at, scale, 4);
    _mm512_i32scatter_ps(offsets, at, offset, 4);
    _mm512_i32scatter_epi32(starts, at, start, 4);
  }
}
#endif

// Fresh, uninitialised storage per call: a zero-filled vector cost ~2.5% of a batch-64 decode step in memset
// (rounding [1,024, 1,536] and a 64-row matmul of it: 0.65 -> 0.48 ms). With AVX-512 sixteen blocks at a time
// (round_blocks16; a block alone spent most of its ~35 cycles in two scalar divisions and two horizontal
// reductions), two threads, best of five: [64, 576] 7.6 -> 4.9 us, [64, 1,536] 18.3 -> 10.5, [1,024, 576]
// 106 -> 47, [1,024, 1,536] 276 -> 180; the engine's 64 x (128 -> 128) batch 7.94 -> 7.79 s (medians of six
// alternated runs, two processes).
inline Int8Blocks int8_blocks(int64_t M, int64_t K) {
  static_assert(sizeof(float) == 4 && sizeof(int32_t) == 4);
  const int64_t blocks = M * K / 32;
  Int8Blocks rows;
  rows.storage.reset(new int32_t[M * K / 4 + 3 * blocks + 16]);
  int32_t* words =
      reinterpret_cast<int32_t*>((reinterpret_cast<uintptr_t>(rows.storage.get()) + 63) & ~uintptr_t(63));
  rows.q = reinterpret_cast<int8_t*>(words);
  rows.scale = reinterpret_cast<float*>(words + M * K / 4);
  rows.offset = reinterpret_cast<float*>(words + M * K / 4 + blocks);
  rows.start = words + M * K / 4 + 2 * blocks;
  return rows;
}

// Blocks first .. last - 1 of rows (counted across rows, as the arrays index them), from x: block b's 32
// values at x + 32 * (b - first).
inline void round_blocks(const float* x, int64_t first, int64_t last, const Int8Blocks& rows) {
  int8_t* q = rows.q;
  float *scales = rows.scale, *offsets = rows.offset;
  int32_t* starts = rows.start;
  x -= 32 * first;
  int64_t b = first;
#ifdef __AVX512F__
  // The next sixteen blocks' maxima before this sixteen's rounding: the two chains (loads, reduction,
  // division) overlap.
  const int64_t whole = b + (last - b) / 16 * 16;
  __m512 largest = b < whole ? largest16(x + 32 * b) : _mm512_setzero_ps();
  for (; b < whole; b += 16) {
    const __m512 next = b + 16 < whole ? largest16(x + 32 * (b + 16)) : largest;
    round_blocks16(x + 32 * b, largest, q + 32 * b, 32, scales + b, offsets + b, starts + b, 1);
    largest = next;
  }
#endif
  for (; b < last; ++b) {
    const Int8Block block = round_block_int8(x + 32 * b);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 32 * b), block.bytes);
    scales[b] = block.scale;
    offsets[b] = block.scale * block.sum;
    starts[b] = -128 * static_cast<int32_t>(block.sum);
  }
}

inline Int8Blocks quantize_blocks_int8(const float* x, int64_t M, int64_t K) {
  Int8Blocks rows = int8_blocks(M, K);
  const int64_t count = M * K / 32;  // blocks, in order across rows
  at::parallel_for(0, (count + 15) / 16, 4, [&](int64_t begin, int64_t end) {
    round_blocks(x + 32 * 16 * begin, 16 * begin, std::min(count, 16 * end), rows);
  });
  return rows;
}

// hidden += delta, then RMSNorm(hidden) * weight rounded as quantize_blocks_int8 rounds add_rms_norm_'s output,
// to the same bytes: each row is normed and rounded while it sits in L1, in one parallel region where there
// were two passes over memory and two regions.
inline Int8Blocks norm_blocks_int8(float* hidden, const float* delta, const float* weight, double eps, int64_t M,
                                   int64_t K) {
  Int8Blocks rows = int8_blocks(M, K);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    thread_local std::vector<int32_t> scratch;
    float* normed = reinterpret_cast<float*>(aligned_scratch(scratch, K));
    for (int64_t m = begin; m < end; ++m) {
      tokenmill::add_normalise_row(hidden + m * K, delta + m * K, weight, normed, K, eps);
      round_blocks(normed, m * K / 32, (m + 1) * K / 32, rows);
    }
  });
  return rows;
}

constexpr int64_t kInt4Panel = 8;  // output rows per integer panel: one int32 lane each
constexpr int64_t kInt4Unit = 160;  // bytes per panel and block of 32 inputs: 128 of weights, 16 + 16 of fp16
// Software prefetch distance along a thread's stream of units (its panels are consecutive in memory): SmolLM2's
// 120 one-row matmuls, cold, 1.5 KB 3.4 ms, 3 KB 2.5, 4 KB 2.3, 6-12 KB 1.9-2.1.
constexpr int64_t kInt4Ahead = 6144;

// One input row's outputs of an eight-row panel; a last panel may have fewer rows (`width`).
inline void store_panel_row(float* out, __m256 values, int64_t width) {
  if (width == kInt4Panel) {
    _mm256_storeu_ps(out, values);
  } else {
    alignas(32) float row[kInt4Panel];
    _mm256_store_ps(row, values);
    std::memcpy(out, row, width * sizeof(float));
  }
}

inline __m256 load_halves(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(p)));
}

// MB input rows (from m0) times NB consecutive panels of `blocks` units; y points at output (m0, n0), and
// `width` is the last panel's (the others are full). `stream`: the panels come from memory (the first tile of
// a panel): prefetch the units ahead. kFactors (many rows): the panels' scales and minimums come converted to
// fp32 in `factors`, [NB][blocks][16], once for all their tiles; a decision made at compile time, as a branch
// in the loop cost the 4-row tiles ~20% (GCC no longer unrolled it without spilling).
#ifdef __AVX512VNNI__
template <int MB, int NB, bool kFactors>
inline void int4_tile(const uint8_t* panel, const float* factors, int64_t blocks, const Int8Blocks& x, int64_t m0,
                      float* y, int64_t N, int64_t width, bool stream) {
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const int64_t K = blocks * 32;
  const int8_t* xq = x.q + m0 * K;
  const float* xs = x.scale + m0 * blocks;
  const float* xo = x.offset + m0 * blocks;
  // With one or two rows the minimums' FMAs go to an accumulator of their own, two short dependency chains
  // instead of one long one; more rows have the registers only for one.
  constexpr bool kSplit = MB <= 2;
  __m256 acc[NB][MB], low_acc[NB][kSplit ? MB : 1];
  UNROLL for (int n = 0; n < NB; ++n) UNROLL for (int m = 0; m < MB; ++m) acc[n][m] = _mm256_setzero_ps();
  if constexpr (kSplit)
    UNROLL for (int n = 0; n < NB; ++n) UNROLL for (int m = 0; m < MB; ++m) low_acc[n][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* unit[NB];
    UNROLL for (int n = 0; n < NB; ++n) {
      unit[n] = panel + kInt4Unit * (n * blocks + b);
      if (stream) {
        prefetch_l2(unit[n] + kInt4Ahead);
        prefetch_l2(unit[n] + kInt4Ahead + 64);
        prefetch_l2(unit[n] + kInt4Ahead + 128);
      }
    }
    __m256i sums[NB][MB];
    UNROLL for (int n = 0; n < NB; ++n) UNROLL for (int m = 0; m < MB; ++m) sums[n][m] = _mm256_setzero_si256();
    UNROLL for (int j = 0; j < 4; ++j) {  // weights 4j .. 4j + 3 and 4j + 16 .. 4j + 19 of the block
      __m256i low[NB], high[NB];
      UNROLL for (int n = 0; n < NB; ++n) {
        const __m256i bytes = _mm256_load_si256(reinterpret_cast<const __m256i*>(unit[n] + 32 * j));
        low[n] = _mm256_and_si256(bytes, mask);
        high[n] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
      }
      UNROLL for (int m = 0; m < MB; ++m) {
        const int8_t* xm = xq + m * K + 32 * b + 4 * j;
        const __m256i x_low = broadcast4(xm), x_high = broadcast4(xm + 16);
        UNROLL for (int n = 0; n < NB; ++n)
          sums[n][m] = _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(sums[n][m], low[n], x_low), high[n], x_high);
      }
    }
    UNROLL for (int n = 0; n < NB; ++n) {
      const float* f = factors + 16 * (n * blocks + b);
      const __m256 scale = kFactors ? _mm256_load_ps(f) : load_halves(unit[n] + 128);
      const __m256 minimum = kFactors ? _mm256_load_ps(f + 8) : load_halves(unit[n] + 144);
      UNROLL for (int m = 0; m < MB; ++m) {
        const __m256 total = _mm256_cvtepi32_ps(sums[n][m]);
        acc[n][m] =
            _mm256_fmadd_ps(total, _mm256_mul_ps(scale, _mm256_broadcast_ss(xs + m * blocks + b)), acc[n][m]);
        const __m256 offset = _mm256_broadcast_ss(xo + m * blocks + b);
        if constexpr (kSplit) low_acc[n][m] = _mm256_fmadd_ps(minimum, offset, low_acc[n][m]);
        else acc[n][m] = _mm256_fmadd_ps(minimum, offset, acc[n][m]);
      }
    }
  }
  UNROLL for (int n = 0; n < NB; ++n) UNROLL for (int m = 0; m < MB; ++m) {
    __m256 out = acc[n][m];
    if constexpr (kSplit) out = _mm256_add_ps(out, low_acc[n][m]);
    store_panel_row(y + m * N + n * kInt4Panel, out, n < NB - 1 ? kInt4Panel : width);
  }
}

// One input row: a thread's panels in one loop, two of a unit's four weight vectors per 512-bit register.
// The activations each vector meets (vector j: x[4j .. 4j + 3] against the low nibbles, x[4j + 16 ..] against
// the high, the same in every lane) are laid out once per call as registers of two vectors' worth, so a unit
// takes two loads, six bit operations and four vpdpbusd where the tile took four, twelve and eight. The two
// halves' integer sums fold before any scaling: the same sums, the same float steps as int4_tile<1, 1>, so
// the same outputs bit for bit. Cache-hot on two threads (weights in L2, ~3.5 us of each call the op's
// overhead), SmolLM2's shapes: gate|up 3072 x 576 21.1 -> 17.0 us, down 576 x 1536 13.1 -> 11.7, qkv 960 x 576
// 9.8 -> 8.5. A decode step gains only where the tiles, not memory, set the pace: int4 from L2 ran at ~52 GB/s
// (two threads), below what memory delivers in the machine's fast minutes (55-60); in slow ones (~28) an int4
// batch-1 step measured the same (1.01, alternating windows).
inline void int4_row(const uint8_t* units, int64_t blocks, const Int8Blocks& x, int64_t N, int64_t p0, int64_t p1,
                     float* y) {
  thread_local std::vector<__m512i> pattern_storage;
  if ((int64_t)pattern_storage.size() < 4 * blocks) pattern_storage.resize(4 * blocks);
  __m512i* patterns = pattern_storage.data();
  for (int64_t b = 0; b < blocks; ++b) {
    const int8_t* xb = x.q + 32 * b;
    UNROLL for (int h = 0; h < 2; ++h)  // vectors 0-1 and 2-3
      UNROLL for (int nibble = 0; nibble < 2; ++nibble) {
        const int8_t* base = xb + 16 * nibble + 8 * h;
        patterns[4 * b + 2 * nibble + h] =
            _mm512_inserti64x4(_mm512_castsi256_si512(broadcast4(base)), broadcast4(base + 4), 1);
      }
  }
  const __m512i mask = _mm512_set1_epi8(0x0F);
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = units + p * blocks * kInt4Unit;
    __m256 acc = _mm256_setzero_ps(), low_acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* unit = panel + kInt4Unit * b;
      prefetch_l2(unit + kInt4Ahead);
      prefetch_l2(unit + kInt4Ahead + 64);
      prefetch_l2(unit + kInt4Ahead + 128);
      const __m512i* xp = patterns + 4 * b;
      const __m512i w0 = _mm512_loadu_si512(unit), w1 = _mm512_loadu_si512(unit + 64);
      // Two chains of two (low nibbles, high nibbles), then added: one chain of four ran 2-6% slower.
      const __m512i zero = _mm512_setzero_si512();
      __m512i low = _mm512_dpbusd_epi32(zero, _mm512_and_si512(w0, mask), xp[0]);
      __m512i high = _mm512_dpbusd_epi32(zero, _mm512_and_si512(_mm512_srli_epi16(w0, 4), mask), xp[2]);
      low = _mm512_dpbusd_epi32(low, _mm512_and_si512(w1, mask), xp[1]);
      high = _mm512_dpbusd_epi32(high, _mm512_and_si512(_mm512_srli_epi16(w1, 4), mask), xp[3]);
      const __m512i sums = _mm512_add_epi32(low, high);
      const __m256i folded = _mm256_add_epi32(_mm512_castsi512_si256(sums), _mm512_extracti64x4_epi64(sums, 1));
      const __m256 total = _mm256_cvtepi32_ps(folded);
      acc = _mm256_fmadd_ps(total, _mm256_mul_ps(load_halves(unit + 128), _mm256_broadcast_ss(x.scale + b)), acc);
      low_acc = _mm256_fmadd_ps(load_halves(unit + 144), _mm256_broadcast_ss(x.offset + b), low_acc);
    }
    const int64_t n0 = p * kInt4Panel;
    store_panel_row(y + n0, _mm256_add_ps(acc, low_acc), std::min(kInt4Panel, N - n0));
  }
}

#else
template <int MB, int NB, bool kFactors>
inline void int4_tile(const uint8_t* panel, const float* factors, int64_t blocks, const Int8Blocks& x, int64_t m0,
                      float* y, int64_t N, int64_t width, bool stream) {
  static_assert(NB == 1, "AVX2 has the registers for one panel");
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const int64_t K = blocks * 32;
  const int8_t* xq = x.q + m0 * K;
  const float* xs = x.scale + m0 * blocks;
  const float* xo = x.offset + m0 * blocks;
  // With one or two rows the minimums' FMAs go to an accumulator of their own, two short dependency chains
  // instead of one long one; more rows have the registers only for one.
  constexpr bool kSplit = MB <= 2;
  __m256 acc[MB], low_acc[kSplit ? MB : 1];
  UNROLL for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
  if constexpr (kSplit) UNROLL for (int m = 0; m < MB; ++m) low_acc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* unit = panel + kInt4Unit * b;
    if (stream) {
      prefetch_l2(unit + kInt4Ahead);
      prefetch_l2(unit + kInt4Ahead + 64);
      prefetch_l2(unit + kInt4Ahead + 128);
    }
    __m256i sums[MB];
    UNROLL for (int j = 0; j < 4; ++j) {  // weights 4j .. 4j + 3 and 4j + 16 .. 4j + 19 of the block
      const __m256i bytes = _mm256_load_si256(reinterpret_cast<const __m256i*>(unit + 32 * j));
      const __m256i low = _mm256_and_si256(bytes, mask);
      const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
      UNROLL for (int m = 0; m < MB; ++m) {
        const int8_t* xm = xq + m * K + 32 * b + 4 * j;
        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(low, broadcast4(xm)),
                                           _mm256_maddubs_epi16(high, broadcast4(xm + 16)));
        sums[m] = j == 0 ? p : _mm256_add_epi16(sums[m], p);
      }
    }
    const __m256 scale = kFactors ? _mm256_load_ps(factors + 16 * b) : load_halves(unit + 128);
    const __m256 minimum = kFactors ? _mm256_load_ps(factors + 16 * b + 8) : load_halves(unit + 144);
    UNROLL for (int m = 0; m < MB; ++m) {
      const __m256 total = _mm256_cvtepi32_ps(_mm256_madd_epi16(sums[m], ones));
      acc[m] = _mm256_fmadd_ps(total, _mm256_mul_ps(scale, _mm256_broadcast_ss(xs + m * blocks + b)), acc[m]);
      const __m256 offset = _mm256_broadcast_ss(xo + m * blocks + b);
      if constexpr (kSplit) low_acc[m] = _mm256_fmadd_ps(minimum, offset, low_acc[m]);
      else acc[m] = _mm256_fmadd_ps(minimum, offset, acc[m]);
    }
  }
  UNROLL for (int m = 0; m < MB; ++m) {
    __m256 out = acc[m];
    if constexpr (kSplit) out = _mm256_add_ps(out, low_acc[m]);
    store_panel_row(y + m * N, out, width);
  }
}

#endif

constexpr int64_t kInt4TileRows = 4;  // 4, 5 and 6 measured alike; 3 ~30% slower

// Rows per pass over a thread's panels: a pass's activations (K bytes and K / 4 of scales per row) stay in L2
// while every panel meets them.
constexpr int64_t kInt4RowChunk = 256;  // 128 measured alike; without chunks 1024 rows ran ~5% slower

// The last n < N rows of a pass (from m) as one tile of n.
template <int N, typename Tile>
inline void last_row_tile(int64_t n, int64_t m, Tile& tile) {
  if constexpr (N > 0) {
    if (n == N) return tile(std::integral_constant<int, N>{}, m);
    last_row_tile<N - 1>(n, m, tile);
  }
}

// Rows m0 .. m1 - 1 of an integer tile kernel: tile(rows, m) for the rows from m, an integral_constant of R at
// a time, then the rest.
template <int R, typename Tile>
inline void in_row_tiles(int64_t m0, int64_t m1, Tile tile) {
  int64_t m = m0;
  for (; m + R <= m1; m += R) tile(std::integral_constant<int, R>{}, m);
  last_row_tile<R - 1>(m1 - m, m, tile);
}

// Rows m0 .. m1 - 1 times one panel (output rows n0 ..).
template <int NB, bool kFactors>
inline void int4_rows(const uint8_t* panel, const float* factors, int64_t blocks, const Int8Blocks& x, int64_t m0,
                      int64_t m1, float* y, int64_t N, int64_t n0, int64_t width) {
  in_row_tiles<kInt4TileRows>(m0, m1, [&](auto rows, int64_t m) {
    int4_tile<decltype(rows)::value, NB, kFactors>(panel, factors, blocks, x, m, y + m * N + n0, N, width, m == m0);
  });
}

#ifdef __AVX512VNNI__
constexpr int kInt4Panels = 2;
#else
constexpr int kInt4Panels = 1;
#endif

// Threads split the panels; each panel meets the rows kInt4TileRows at a time while it sits in L1.
inline void int4_tiles(const uint8_t* units, const Int8Blocks& x, int64_t M, int64_t N, int64_t K, float* y) {
  const int64_t blocks = K / 32;
  at::parallel_for(0, (N + kInt4Panel - 1) / kInt4Panel, 1, [&](int64_t begin, int64_t end) {
#ifdef __AVX512VNNI__
    if (M == 1) return int4_row(units, blocks, x, N, begin, end, y);
#endif
    std::vector<float> storage(M > 2 ? kInt4Panels * blocks * 16 + 8 : 0);
    float* factors = M > 2 ? storage.data() + (-reinterpret_cast<uintptr_t>(storage.data()) / 4) % 8 : nullptr;
    for (int64_t m0 = 0; m0 < M; m0 += kInt4RowChunk) {
      const int64_t m1 = std::min(M, m0 + kInt4RowChunk);
      for (int64_t p = begin; p < end;) {
        const uint8_t* panel = units + p * blocks * kInt4Unit;
        const int64_t panels = factors ? std::min<int64_t>(kInt4Panels, end - p) : 1;
        const int64_t n0 = p * kInt4Panel, width = std::min(kInt4Panel, N - n0 - (panels - 1) * kInt4Panel);
        if (factors) {
          for (int64_t b = 0; b < panels * blocks; ++b) {
            _mm256_store_ps(factors + 16 * b, load_halves(panel + kInt4Unit * b + 128));
            _mm256_store_ps(factors + 16 * b + 8, load_halves(panel + kInt4Unit * b + 144));
          }
          if constexpr (kInt4Panels > 1) {
            if (panels == kInt4Panels) int4_rows<kInt4Panels, true>(panel, factors, blocks, x, m0, m1, y, N, n0, width);
            else int4_rows<1, true>(panel, factors, blocks, x, m0, m1, y, N, n0, width);
          } else {
            int4_rows<1, true>(panel, factors, blocks, x, m0, m1, y, N, n0, width);
          }
        } else {
          int4_rows<1, false>(panel, factors, blocks, x, m0, m1, y, N, n0, width);
        }
        p += panels;
      }
    }
  });
}

// int8: integer tiles on bytes. The weights are stored as the tiles read them (quantization.py's INT8_UNIT): a
// panel of sixteen output rows, and per block of 32 inputs eight 64-byte vectors, vector j holding each row's
// weights 4j .. 4j + 3 (row r at bytes 4r .. 4r + 3) as w + 128; one fp32 scale per output row, applied once
// at the end. The activations are int8 per 32 as for int4, so per block and row only the activations' scale
// remains to apply: one convert and one FMA per eight vpdpbusd, against int4's convert, multiply and two FMAs.
// vpdpbusd multiplies unsigned by signed bytes: w + 128 goes in as stored, and each block's sums start at
// -128 x the block's activation sum, so they end exact. With VNNI a panel is one 512-bit register; four input
// rows times two panels is eight independent sums, enough to keep both multiply pipes busy. Measured on one
// core, 64 rows (cache-hot): 8-row panels in 256-bit registers with the sign flip in the loop 187 GMAC/s, this
// 208 (the core's peak is 234). Without VNNI each half of a panel (eight rows) runs apart: the sign flipped
// back, vpmaddubsw takes |x| against w with x's sign (pairs of at most 2 x 127 x 127 fit int16), widened at
// once by vpmaddwd: the same exact sums, so the same outputs bit for bit.
constexpr int64_t kInt8Panel = 16;  // output rows per panel
constexpr int64_t kInt8Unit = 512;  // bytes per panel and block of 32 inputs

#ifdef __AVX512VNNI__
constexpr int kInt8Panels = 2;  // panels per tile, from three input rows on
// Input rows per tile. vpdpbusd issues two a cycle but its result comes ~5 cycles later, and each of a tile's
// sums is a chain of eight of them per block: a core needs ten or more chains in flight. Measured on one core
// (a loop of independent chains): 8 chains 253 GMAC/s, 10 302, 12 358, 16 376. Four rows x two panels were
// 8 chains; seven are 14, with 28 accumulators (the int32 sums and their fp32 totals), two weight vectors and
// the broadcast: 31 of the 32 registers. Alternated in one process, the same bits: SmolLM2's matmuls at 64
// rows qkv 100 -> 85 us, o 65 -> 57, gate|up 297 -> 256, down 154 -> 144 (1,024 rows 13-15% faster); the
// 64 x (128 -> 128) batch 7.84-7.97 -> 7.13-7.25 s (eight rows: 7.20-7.29).
constexpr int kInt8TileRows = 7;

// MB input rows (from m0) times NB consecutive panels; y points at output (m0, n0); `width`: the last panel's
// rows (the others are full). `stream`: the first tile of its panels, which prefetches the units ahead.
template <int MB, int NB>
inline void int8_tile(const uint8_t* panel, int64_t blocks, const Int8Blocks& x, int64_t m0, const float* scales,
                      float* y, int64_t N, int64_t width, bool stream, const uint8_t* ahead = nullptr,
                      int lines = 0) {
  const int64_t K = blocks * 32;
  const int8_t* xq = x.q + m0 * K;
  const float* xs = x.scale + m0 * blocks;
  const int32_t* start = x.start + m0 * blocks;
  __m512 acc[NB][MB];
  UNROLL for (int n = 0; n < NB; ++n) UNROLL for (int m = 0; m < MB; ++m) acc[n][m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* unit[NB];
    UNROLL for (int n = 0; n < NB; ++n) {
      unit[n] = panel + kInt8Unit * (n * blocks + b);
      if (stream) UNROLL for (int c = 0; c < 8; ++c) prefetch_l2(unit[n] + kInt4Ahead + 64 * c);
    }
    for (int c = 0; c < lines; ++c) prefetch_l2(ahead + 64 * (lines * b + c));
    __m512i sums[NB][MB];
    UNROLL for (int m = 0; m < MB; ++m) {
      const __m512i first = _mm512_set1_epi32(start[m * blocks + b]);
      UNROLL for (int n = 0; n < NB; ++n) sums[n][m] = first;
    }
    UNROLL for (int j = 0; j < 8; ++j) {
      __m512i w[NB];
      UNROLL for (int n = 0; n < NB; ++n) w[n] = _mm512_loadu_si512(unit[n] + 64 * j);
      UNROLL for (int m = 0; m < MB; ++m) {
        int32_t word;
        std::memcpy(&word, xq + m * K + 32 * b + 4 * j, sizeof(word));
        const __m512i xb = _mm512_set1_epi32(word);
        UNROLL for (int n = 0; n < NB; ++n) sums[n][m] = _mm512_dpbusd_epi32(sums[n][m], w[n], xb);
      }
    }
    UNROLL for (int m = 0; m < MB; ++m) {
      const __m512 scale = _mm512_set1_ps(xs[m * blocks + b]);
      UNROLL for (int n = 0; n < NB; ++n) acc[n][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[n][m]), scale, acc[n][m]);
    }
  }
  UNROLL for (int n = 0; n < NB; ++n) {
    const __m512 scale = _mm512_loadu_ps(scales + n * kInt8Panel);
    const __mmask16 rows = n < NB - 1 ? __mmask16(0xFFFF) : __mmask16((1u << width) - 1);
    UNROLL for (int m = 0; m < MB; ++m)
      _mm512_mask_storeu_ps(y + m * N + n * kInt8Panel, rows, _mm512_mul_ps(acc[n][m], scale));
  }
}

// One input row (a decode step of one sequence): a thread's panels p0 .. p1 - 1 in one loop, each block's
// prefetch first. The same sums in the same order as int8_tile<1, 1>, so the same outputs bit for bit. Against
// the general tiles (a call and a set-up per panel, the prefetch behind the `stream` test), alternated in one
// process: SmolLM2's 120 one-row matmuls, cold, 26 -> 28.3 GB/s; an int8 batch-1 decode step 6.6 -> 6.2 ms
// and 6.9 -> 6.1 ms (medians of two runs of 24 windows).
//
// Prefetch distance: with the weights back to back on 2 MB pages (models/weight_arena.py), 1-4 KB ahead
// beats the 6 KB the tiles use: an int8 batch-1 step, distances alternated in one process in minutes when the
// bandwidth probe read 52-59 GB/s, 3 KB against 6 KB 0.80-0.86 of the time over three runs (0.75 at the
// shortest contexts; none at all 0.91; 12 KB 1.03). The int4 tiles measured the other way (3 KB
// 1.07-1.17x, 6 KB kept), and fp32's 16 rows ahead stayed best (4 rows 0.98-1.01, 1-2 rows 1.08-1.14, none
// 1.32).
constexpr int64_t kInt8RowAhead = 3072;

// Panel p's outputs go to y + p * 16 - col0.
inline void int8_row(const uint8_t* units, int64_t blocks, const Int8Blocks& x, const float* scales, int64_t N,
                     int64_t p0, int64_t p1, float* y, int64_t col0 = 0) {
  for (int64_t p = p0; p < p1; ++p) {
    const uint8_t* panel = units + p * blocks * kInt8Unit;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* unit = panel + kInt8Unit * b;
      UNROLL for (int c = 0; c < 8; ++c) prefetch_l2(unit + kInt8RowAhead + 64 * c);
      __m512i sums = _mm512_set1_epi32(x.start[b]);
      UNROLL for (int j = 0; j < 8; ++j) {
        int32_t word;
        std::memcpy(&word, x.q + 32 * b + 4 * j, sizeof(word));
        sums = _mm512_dpbusd_epi32(sums, _mm512_loadu_si512(unit + 64 * j), _mm512_set1_epi32(word));
      }
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(x.scale[b]), acc);
    }
    const int64_t n0 = p * kInt8Panel;
    const __mmask16 rows = __mmask16((1u << std::min(kInt8Panel, N - n0)) - 1);
    _mm512_mask_storeu_ps(y + (n0 - col0), rows, _mm512_mul_ps(acc, _mm512_maskz_loadu_ps(rows, scales + n0)));
  }
}
#else
constexpr int kInt8Panels = 1;
constexpr int kInt8TileRows = 4;  // sixteen ymm registers

// As above for one half of one panel (eight rows, from `half`'s byte offset 0 or 32 in each vector).
template <int MB, int NB>
inline void int8_tile(const uint8_t* panel, int64_t blocks, const Int8Blocks& x, int64_t m0, const float* scales,
                      float* y, int64_t N, int64_t width, bool stream, const uint8_t* ahead = nullptr,
                      int lines = 0) {
  static_assert(NB == 1, "AVX2 has the registers for one panel");
  const int64_t K = blocks * 32;
  const int8_t* xq = x.q + m0 * K;
  const float* xs = x.scale + m0 * blocks;
  const __m256i flip = _mm256_set1_epi8(-128), ones = _mm256_set1_epi16(1);
  for (int half = 0; half < 2 && 8 * half < width; ++half) {
    __m256 acc[MB];
    UNROLL for (int m = 0; m < MB; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* unit = panel + kInt8Unit * b + 32 * half;
      if (stream && half == 0) UNROLL for (int c = 0; c < 8; ++c) prefetch_l2(unit + kInt4Ahead + 64 * c);
      if (half == 0) for (int c = 0; c < lines; ++c) prefetch_l2(ahead + 64 * (lines * b + c));
      __m256i sums[MB];
      UNROLL for (int m = 0; m < MB; ++m) sums[m] = _mm256_setzero_si256();
      UNROLL for (int j = 0; j < 8; ++j) {
        const __m256i w = _mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(unit + 64 * j)), flip);
        UNROLL for (int m = 0; m < MB; ++m) {
          const __m256i xb = broadcast4(xq + m * K + 32 * b + 4 * j);
          sums[m] = _mm256_add_epi32(
              sums[m], _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(xb), _mm256_sign_epi8(w, xb)), ones));
        }
      }
      UNROLL for (int m = 0; m < MB; ++m)
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums[m]), _mm256_broadcast_ss(xs + m * blocks + b), acc[m]);
    }
    const __m256 scale = _mm256_loadu_ps(scales + 8 * half);
    UNROLL for (int m = 0; m < MB; ++m)
      store_panel_row(y + m * N + 8 * half, _mm256_mul_ps(acc[m], scale), std::min<int64_t>(8, width - 8 * half));
  }
}
#endif

// next: the weights the thread reads after these panels (nullptr if none), `bytes` of them. The first tile
// streams the panels from memory and prefetches kInt4Ahead bytes past them; the later tiles, which find the
// panels in L1/L2, spread the prefetch of the rest of `next` over their blocks (`lines` per block), so that
// the next panels' first tile does not wait on memory either. Alternated in one process, int8 weights: 64
// requests of 128 -> 128 tokens (int8 KV) 8.65 -> 8.31 s (medians of six runs each); decode steps of 8
// sequences 0.89x, of 32 0.91x (medians of 16-20 windows).
template <int NB>
inline void int8_rows(const uint8_t* panel, int64_t blocks, const Int8Blocks& x, int64_t m0, int64_t m1,
                      const float* scales, float* y, int64_t N, int64_t n0, int64_t width,
                      const uint8_t* next = nullptr, int64_t bytes = 0) {
  const int64_t tiles = (m1 - m0 + kInt8TileRows - 1) / kInt8TileRows;
  const int64_t rest = next ? bytes - kInt4Ahead : 0;
  const int lines = tiles > 1 && rest > 0
                        ? static_cast<int>(std::min<int64_t>(8, (rest / 64 + (tiles - 1) * blocks - 1) /
                                                                     ((tiles - 1) * blocks)))
                        : 0;
  in_row_tiles<kInt8TileRows>(m0, m1, [&](auto rows, int64_t m) {
    const int64_t tile = (m - m0) / kInt8TileRows, offset = (tile - 1) * blocks * 64 * lines;
    const bool fetch = tile > 0 && offset < rest;
    int8_tile<decltype(rows)::value, NB>(panel, blocks, x, m, scales, y + m * N + n0, N, width, m == m0,
                                         fetch ? next + kInt4Ahead + offset : nullptr, fetch ? lines : 0);
  });
}

// Panels begin .. end - 1 of y = x W^T, every row: one or two rows take a panel at a time (one sequential
// stream), more meet each panel while it sits in L1. Panel p's outputs go to columns p * 16 - col0 of y,
// whose rows are ldy apart.
// stream_end: where the thread's run of panels ends (its later tiles prefetch the panels after `end` up to
// it). Always inlined: called from two places, GCC otherwise kept it out of line and the 4 x 32 tiles with
// it, a call per tile (int8 matmuls ~4% slower).
__attribute__((always_inline)) inline void int8_panels(const uint8_t* units, const float* scales,
                                                       const Int8Blocks& x, int64_t M, int64_t N, int64_t K,
                                                       int64_t begin, int64_t end, float* y, int64_t ldy,
                                                       int64_t col0, int64_t stream_end) {
  const int64_t blocks = K / 32;
#ifdef __AVX512VNNI__
  if (M == 1) return int8_row(units, blocks, x, scales, N, begin, end, y, col0);
#endif
  alignas(64) float panel_scales[kInt8Panels * kInt8Panel];
  for (int64_t m0 = 0; m0 < M; m0 += kInt4RowChunk) {
    const int64_t m1 = std::min(M, m0 + kInt4RowChunk);
    for (int64_t p = begin; p < end;) {
      const int64_t panels = M > 2 ? std::min<int64_t>(kInt8Panels, end - p) : 1;
      const int64_t n0 = p * kInt8Panel, width = std::min(kInt8Panel, N - n0 - (panels - 1) * kInt8Panel);
      for (int64_t n = 0; n < panels * kInt8Panel; ++n) panel_scales[n] = n0 + n < N ? scales[n0 + n] : 0.f;
      const uint8_t* panel = units + p * blocks * kInt8Unit;
      const uint8_t* next = p + panels < stream_end ? panel + panels * blocks * kInt8Unit : nullptr;
      const int64_t next_bytes = std::min<int64_t>(panels, stream_end - p - panels) * blocks * kInt8Unit;
      if constexpr (kInt8Panels > 1) {
        if (panels == kInt8Panels) {
          int8_rows<kInt8Panels>(panel, blocks, x, m0, m1, panel_scales, y, ldy, n0 - col0, width, next,
                                 next_bytes);
          p += panels;
          continue;
        }
      }
      int8_rows<1>(panel, blocks, x, m0, m1, panel_scales, y, ldy, n0 - col0, width, next, next_bytes);
      p += 1;
    }
  }
}

// As int4_tiles: threads split the panels.
inline void int8_tiles(const uint8_t* units, const float* scales, const Int8Blocks& x, int64_t M, int64_t N,
                       int64_t K, float* y) {
  at::parallel_for(0, (N + kInt8Panel - 1) / kInt8Panel, 1, [&](int64_t begin, int64_t end) {
    int8_panels(units, scales, x, M, N, K, begin, end, y, N, 0, end);
  });
}

// gate|up and SiLU in one pass (quantization.py's pair_gate_up_rows): 2I rows stored with gate panel p and up
// panel p side by side, so a thread's pair of panels yields silu(gate) * up for sixteen columns. The tiles
// write the pair's 32 columns into a small scratch (cache-resident), and SiLU goes from there to y [M, I]:
// the [M, 2I] product never travels to memory and back, and no separate pass over it runs.
// Rows m0 .. m1 - 1 of gate|up pair p (gate panel p and up panel p, stored side by side): 32 outputs per row,
// the gate's sixteen then the up's, at y + m * ldy. `last`: the end of the thread's run of pairs (the tiles
// prefetch the next pair while it lasts).
inline void gate_up_pair(const uint8_t* units, const float* scales, const Int8Blocks& x, int64_t M, int64_t blocks,
                         int64_t m0, int64_t m1, int64_t p, int64_t last, float* y, int64_t ldy) {
  constexpr int64_t pair = 2 * kInt8Panel;
  const uint8_t* panels = units + 2 * p * blocks * kInt8Unit;
  const float* pair_scales = scales + p * pair;
#ifdef __AVX512VNNI__
  if (M == 1) return int8_row(panels, blocks, x, pair_scales, pair, 0, 2, y);
#endif
  if (kInt8Panels > 1 && M > 2) {
    const uint8_t* next = p + 1 < last ? panels + 2 * blocks * kInt8Unit : nullptr;
    int8_rows<kInt8Panels>(panels, blocks, x, m0, m1, pair_scales, y, ldy, 0, kInt8Panel, next,
                           2 * blocks * kInt8Unit);
  } else {
    int8_rows<1>(panels, blocks, x, m0, m1, pair_scales, y, ldy, 0, kInt8Panel);
    int8_rows<1>(panels + blocks * kInt8Unit, blocks, x, m0, m1, pair_scales + kInt8Panel, y, ldy, kInt8Panel,
                 kInt8Panel);
  }
}

inline void int8_gated_tiles(const uint8_t* units, const float* scales, const Int8Blocks& x, int64_t M, int64_t I,
                             int64_t K, float* y) {
  const int64_t blocks = K / 32, pair = 2 * kInt8Panel;
  at::parallel_for(0, I / kInt8Panel, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<int32_t> scratch;
    float* rows = reinterpret_cast<float*>(aligned_scratch(scratch, M * pair));  // [M, 32], a chunk in use
    for (int64_t m0 = 0; m0 < M; m0 += kInt4RowChunk) {
      const int64_t m1 = std::min(M, m0 + kInt4RowChunk);
      for (int64_t p = begin; p < end; ++p) {
        gate_up_pair(units, scales, x, M, blocks, m0, m1, p, end, rows, pair);
        for (int64_t m = m0; m < m1; ++m)
          UNROLL for (int64_t h = 0; h < kInt8Panel; h += 8)
            _mm256_storeu_ps(y + m * I + p * kInt8Panel + h,
                             tokenmill::silu_mul8(_mm256_loadu_ps(rows + m * pair + h),
                                                  _mm256_loadu_ps(rows + m * pair + kInt8Panel + h)));
      }
    }
  });
}

// int8_gated_tiles for a consumer that rounds silu(gate) * up to int8 per 32 anyway (the down projection):
// two pairs of panels give 32 columns, one block of every row, rounded while they sit in cache instead of
// written [M, I] fp32 and read back by quantize_blocks_int8. The same tiles, SiLU and rounding, so the same
// blocks bit for bit.
inline Int8Blocks int8_gated_blocks(const uint8_t* units, const float* scales, const Int8Blocks& x, int64_t M,
                                    int64_t I, int64_t K) {
  const int64_t blocks = K / 32, pair = 2 * kInt8Panel, width = I / 32;  // width: blocks per output row
  Int8Blocks out = int8_blocks(M, I);
  at::parallel_for(0, width, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<int32_t> scratch;
    float* rows = reinterpret_cast<float*>(aligned_scratch(scratch, M * 2 * pair + 16 * 32));  // [M, 64]
    float* product = rows + M * 2 * pair;  // [16, 32]: silu(gate) * up of sixteen rows' block
    for (int64_t m0 = 0; m0 < M; m0 += kInt4RowChunk) {
      const int64_t m1 = std::min(M, m0 + kInt4RowChunk);
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t half = 0; half < 2; ++half)  // pairs 2c and 2c + 1: columns 32c .. 32c + 31
          gate_up_pair(units, scales, x, M, blocks, m0, m1, 2 * c + half, 2 * end, rows + half * pair, 2 * pair);
        for (int64_t m = m0; m < m1; m += 16) {
          const int64_t n = std::min<int64_t>(16, m1 - m);
          for (int64_t r = 0; r < n; ++r) {
            const float* gate_up = rows + (m + r) * 2 * pair;
            UNROLL for (int64_t h = 0; h < 32; h += 8) {
              const float* g = gate_up + (h / kInt8Panel) * pair + h % kInt8Panel;
              _mm256_storeu_ps(product + 32 * r + h,
                               tokenmill::silu_mul8(_mm256_loadu_ps(g), _mm256_loadu_ps(g + kInt8Panel)));
            }
          }
          const int64_t first = m * width + c;  // block (m, c)
#ifdef __AVX512F__
          if (n == 16) {
            round_blocks16(product, largest16(product), out.q + 32 * first, I, out.scale + first,
                           out.offset + first, out.start + first, width);
            continue;
          }
#endif
          for (int64_t r = 0; r < n; ++r) round_blocks(product + 32 * r, first + r * width, first + r * width + 1, out);
        }
      }
    }
  });
  return out;
}

// quantization.py's Int8Weight.units as the tiles read them.
void check_int8_units(const at::Tensor& units) {
  TORCH_CHECK(units.scalar_type() == at::kByte && units.is_contiguous() && units.dim() == 3 &&
                  units.size(2) == kInt8Unit && reinterpret_cast<uintptr_t>(units.data_ptr()) % 32 == 0,
              "units must be contiguous 32-byte aligned uint8 [panels of 16 rows, K / 32, 512]");
}

}  // namespace

namespace tokenmill {

void check_int8_weights(const at::Tensor& units, const at::Tensor& scales, bool gate_up) {
  check_int8_units(units);
  const int64_t N = scales.numel();
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && N > 0 &&
                  units.size(0) == (N + kInt8Panel - 1) / kInt8Panel,
              "one fp32 scale per output row");
  TORCH_CHECK(!gate_up || N % (2 * kInt8Panel) == 0, "gate|up needs 2I fp32 scales, I a multiple of 16");
}

void int8_linear_into(const float* x, int64_t M, const at::Tensor& units, const at::Tensor& scales, float* y) {
  const int64_t K = units.size(1) * 32;
  if (M > 0) int8_tiles(units.data_ptr<uint8_t>(), scales.data_ptr<float>(), quantize_blocks_int8(x, M, K), M,
                        scales.numel(), K, y);
}

void int8_silu_gate_up_into(const float* x, int64_t M, const at::Tensor& units, const at::Tensor& scales,
                            float* y) {
  const int64_t K = units.size(1) * 32;
  if (M > 0) int8_gated_tiles(units.data_ptr<uint8_t>(), scales.data_ptr<float>(), quantize_blocks_int8(x, M, K),
                              M, scales.numel() / 2, K, y);
}

void int8_linear_norm_into(float* hidden, const float* delta, const float* weight, double eps, int64_t M,
                           const at::Tensor& units, const at::Tensor& scales, float* y) {
  const int64_t K = units.size(1) * 32;
  if (M > 0) int8_tiles(units.data_ptr<uint8_t>(), scales.data_ptr<float>(),
                        norm_blocks_int8(hidden, delta, weight, eps, M, K), M, scales.numel(), K, y);
}

void int8_mlp_into(float* hidden, const float* delta, const float* weight, double eps, int64_t M,
                   const at::Tensor& gate_up_units, const at::Tensor& gate_up_scales, const at::Tensor& down_units,
                   const at::Tensor& down_scales, float* y) {
  const int64_t K = gate_up_units.size(1) * 32, I = gate_up_scales.numel() / 2;
  if (M == 0) return;
  const Int8Blocks x = norm_blocks_int8(hidden, delta, weight, eps, M, K);
  int8_tiles(down_units.data_ptr<uint8_t>(), down_scales.data_ptr<float>(),
             int8_gated_blocks(gate_up_units.data_ptr<uint8_t>(), gate_up_scales.data_ptr<float>(), x, M, I, K), M,
             down_scales.numel(), I, y);
}

// hidden [M, H] += delta; returns down(silu(gate) * up) of RMSNorm(hidden) * weight: what add_rms_norm_,
// int8_silu_gate_up and int8_linear return in turn, bit for bit, with the normed rows and the [M, I] product
// rounded to int8 in cache instead of going through memory. gate_up_*: an Int8GateUp's weights, down_*: an
// Int8Linear's ([H, I]).
at::Tensor int8_mlp_(at::Tensor hidden, const at::Tensor& delta, const at::Tensor& weight, double eps,
                     const at::Tensor& gate_up_units, const at::Tensor& gate_up_scales, const at::Tensor& down_units,
                     const at::Tensor& down_scales) {
  check_int8_weights(gate_up_units, gate_up_scales, true);
  check_int8_weights(down_units, down_scales, false);
  const int64_t H = gate_up_units.size(1) * 32, I = gate_up_scales.numel() / 2;
  TORCH_CHECK(hidden.scalar_type() == at::kFloat && delta.scalar_type() == at::kFloat &&
                  weight.scalar_type() == at::kFloat && hidden.dim() == 2 && hidden.is_contiguous() &&
                  delta.is_contiguous() && delta.sizes() == hidden.sizes() && hidden.size(1) == H &&
                  weight.is_contiguous() && weight.numel() == H,
              "hidden and delta must be contiguous fp32 [M, H], weight [H], H the gate|up's inputs");
  TORCH_CHECK(I % 32 == 0 && down_units.size(1) * 32 == I && down_scales.numel() == H,
              "down must map the gate|up's I outputs (a multiple of 32) back to H");
  at::Tensor y = at::empty({hidden.size(0), H}, hidden.options());
  int8_mlp_into(hidden.data_ptr<float>(), delta.data_ptr<float>(), weight.data_ptr<float>(), eps,
                hidden.size(0), gate_up_units, gate_up_scales, down_units, down_scales, y.data_ptr<float>());
  return y;
}

// units: quantization.py's Int8Weight.units, uint8 [ceil(N / 16), K / 32, 512]; scales: fp32 [N].
at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& units, const at::Tensor& scales) {
  check_int8_weights(units, scales, false);
  at::Tensor x = check_input(x_in, units.size(1) * 32);
  at::Tensor y = at::empty({x.size(0), scales.numel()}, x.options());
  int8_linear_into(x.data_ptr<float>(), x.size(0), units, scales, y.data_ptr<float>());
  return y;
}

// units, scales: a gate|up projection's Int8Weight with its panels paired (quantization.py's
// pair_gate_up_rows), 2I rows; returns silu(gate) * up [M, I], as silu_mul(int8_linear(x, ...)) with the rows
// in their usual order would, bit for bit.
at::Tensor int8_silu_gate_up(const at::Tensor& x_in, const at::Tensor& units, const at::Tensor& scales) {
  check_int8_weights(units, scales, true);
  at::Tensor x = check_input(x_in, units.size(1) * 32);
  at::Tensor y = at::empty({x.size(0), scales.numel() / 2}, x.options());
  int8_silu_gate_up_into(x.data_ptr<float>(), x.size(0), units, scales, y.data_ptr<float>());
  return y;
}

// Greedy decoding wants each row's largest logit, not the logits: at batch 64 the LM head's output is
// [64, 49152] fp32, 12.6 MB written by the matmul and read back by argmax_rows. Here each thread's panels go
// a chunk at a time through a buffer that stays in L2, and only each row's best value and its index leave
// it: the same logits (the same tiles), the first index on ties, as argmax_rows(int8_linear(...)). A row
// with a NaN or no value above -inf gets -1, for the caller to take through the logits.
constexpr int64_t kArgmaxPanels = 32;  // panels per chunk: [64, 512] fp32 is 128 KB

// A row's largest value so far and its index (-1: none above -inf yet); on ties the first index stays.
struct BestOutput {
  float value = -std::numeric_limits<float>::infinity();
  int64_t index = -1;
  void offer(float v, int64_t at) {
    if (v > value || (v == value && index >= 0 && at < index)) {
      value = v;
      index = at;
    }
  }
};

at::Tensor int8_linear_argmax(const at::Tensor& x_in, const at::Tensor& units, const at::Tensor& scales) {
  check_int8_weights(units, scales, false);
  const int64_t K = units.size(1) * 32;
  at::Tensor x = check_input(x_in, K);
  const int64_t M = x.size(0), N = scales.numel(), P = (N + kInt8Panel - 1) / kInt8Panel;
  at::Tensor out = at::full({M}, -1, x.options().dtype(at::kLong));
  if (M == 0) return out;
  const Int8Blocks xq = quantize_blocks_int8(x.data_ptr<float>(), M, K);
  const uint8_t* up = units.data_ptr<uint8_t>();
  const float* sp = scales.data_ptr<float>();
  const int64_t threads = at::get_num_threads(), ld = kArgmaxPanels * kInt8Panel;
  std::vector<BestOutput> found(threads * M);  // per thread and row
  std::vector<uint8_t> unordered(threads * M, 0);
  at::parallel_for(0, P, 1, [&](int64_t begin, int64_t end) {
    const int64_t t = at::get_thread_num();
    thread_local std::vector<int32_t> scratch;
    float* chunk = reinterpret_cast<float*>(aligned_scratch(scratch, M * ld));
    for (int64_t c = begin; c < end; c += kArgmaxPanels) {
      const int64_t c1 = std::min(end, c + kArgmaxPanels), col0 = c * kInt8Panel;
      const int64_t cols = std::min(N, c1 * kInt8Panel) - col0;
      int8_panels(up, sp, xq, M, N, K, c, c1, chunk, ld, col0, end);
      for (int64_t m = 0; m < M; ++m) {
        const float* row = chunk + m * ld;
        const auto [best, nan] = tokenmill::row_peak(row, cols);
        unordered[t * M + m] |= nan;
        if (nan || best < found[t * M + m].value) continue;
        int64_t index = 0;
        while (row[index] != best) ++index;
        found[t * M + m].offer(best, col0 + index);
      }
    }
  });
  int64_t* op = out.data_ptr<int64_t>();
  for (int64_t m = 0; m < M; ++m) {
    BestOutput best;
    bool nan = false;
    for (int64_t t = 0; t < threads; ++t) {
      nan |= unordered[t * M + m] != 0;
      if (found[t * M + m].index >= 0) best.offer(found[t * M + m].value, found[t * M + m].index);
    }
    op[m] = nan ? -1 : best.index;
  }
  return out;
}

// blocks: quantization.py's Int4Weight.blocks, uint8 [ceil(N / 8), K / 32, 160]; N: the output rows.
at::Tensor int4_linear(const at::Tensor& x_in, const at::Tensor& blocks, int64_t N) {
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.is_contiguous() && blocks.dim() == 3 &&
                  blocks.size(2) == kInt4Unit && N > 0 && blocks.size(0) == (N + kInt4Panel - 1) / kInt4Panel,
              "blocks must be contiguous uint8 [ceil(N / 8), K / 32, 160]");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(blocks.data_ptr()) % 32 == 0, "blocks must be 32-byte aligned");
  const int64_t K = blocks.size(1) * 32;
  at::Tensor x = check_input(x_in, K);
  const int64_t M = x.size(0);
  at::Tensor y = at::empty({M, N}, x.options());
  if (M > 0) int4_tiles(blocks.data_ptr<uint8_t>(), quantize_blocks_int8(x.data_ptr<float>(), M, K), M, N, K,
                        y.data_ptr<float>());
  return y;
}

// fp32 weights need no decoding: for one or two rows the dot tiles read them straight from memory; for
// more, packing is a transpose.
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
  if (M < kFp32OuterMinRows) {
    at::parallel_for(0, N / kRows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) run_dot_tiles(wp + p * kRows * K, K, xp, M, K, yp + p * kRows, N);
    });
    return y;
  }
  const auto pack_rows = [&](int64_t n0, int64_t width, int64_t k0, int64_t k1, float* buf) {
    const float* rows = wp + n0 * K;
    const auto load8 = [&](int64_t j, int64_t k) {
      const float* row = rows + j * K + k;
      if (k % 16 == 0) prefetch_l2(row + kPanel * K);
      return _mm256_loadu_ps(row);
    };
    pack(load8, width, k0, k1, buf);
  };
  tiled_linear(xp, M, N, K, yp, pack_rows);
  return y;
}

}  // namespace tokenmill

TORCH_LIBRARY(tokenmill, m) {
  m.def("int8_linear(Tensor x, Tensor units, Tensor scales) -> Tensor");
  m.def("int8_silu_gate_up(Tensor x, Tensor units, Tensor scales) -> Tensor");
  m.def(
      "int8_mlp_(Tensor(a!) hidden, Tensor delta, Tensor weight, float eps, Tensor gate_up_units, "
      "Tensor gate_up_scales, Tensor down_units, Tensor down_scales) -> Tensor");
  m.def("int8_linear_argmax(Tensor x, Tensor units, Tensor scales) -> Tensor");
  m.def("int4_linear(Tensor x, Tensor blocks, int rows) -> Tensor");
  m.def("fp32_linear(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) {
  m.impl("int8_linear", &tokenmill::int8_linear);
  m.impl("int8_silu_gate_up", &tokenmill::int8_silu_gate_up);
  m.impl("int8_mlp_", &tokenmill::int8_mlp_);
  m.impl("int8_linear_argmax", &tokenmill::int8_linear_argmax);
  m.impl("int4_linear", &tokenmill::int4_linear);
  m.impl("fp32_linear", &tokenmill::fp32_linear);
}
