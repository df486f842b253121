// Decode attention straight from the paged KV cache. The PyTorch path first gathers every sequence's keys
// and values into padded copies (index_select), then runs SDPA with a padding mask: two extra passes over
// the whole context per layer per step, plus a dozen ops of dispatch. Here each (sequence, KV head) walks
// its block table and reads keys/values where they live, once for all the query heads sharing that KV head
// (GQA).
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

using tokenmill::Exps;
using tokenmill::exp_shifted;
using tokenmill::sum4x8;
using tokenmill::sum8;

// Key and value rows this far ahead of the one in use are fetched into L2 (and the first item's first ones
// before any work starts; the later items' rows come through the pipeline in the item loop, Fetch): each is
// a miss to memory (the rows sit in scattered blocks, and the weights streamed since
// the last step evicted them), and taken one at a time the core waits on each in turn. Decode steps,
// measured A/B in one process with 48 ahead: batch 1 at context 1,500 13.2 -> 10.1 ms, batch 8 at 1,000
// 60 -> 45 ms (96 ahead did as well).
constexpr int64_t kAheadKeys = 64;
constexpr int64_t kMinPart = 64;  // keys per part at least, when a small batch splits its contexts

// The cache holds fp32, fp16 (at::Half's bits) or int8 rows; each is read as fp32, eight values at a time.
// An int8 row (layers/attention.py's quantize_kv) ends in its scale's four bytes: scores and value weights
// take the scale once per row, after the integer values' dot products.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) { return _cvtsh_ss(*p); }
inline float load1(const int8_t* p) { return *p; }

template <typename T>
constexpr bool kScaledRows = std::is_same_v<T, int8_t>;

// Elements per (token, head) row: D values, and for int8 the scale's four bytes.
template <typename T>
constexpr int64_t row_width(int64_t D) {
  return kScaledRows<T> ? D + 4 : D;
}

// The scale of the row at `row` (D values long); 1 for rows that need none.
template <typename T>
inline float row_scale(const T* row, int64_t D) {
  if constexpr (kScaledRows<T>) {
    float scale;
    std::memcpy(&scale, row + D, sizeof(scale));
    return scale;
  } else {
    return 1.f;
  }
}

template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  for (int64_t d = 0; d < row_width<T>(D); d += 64 / sizeof(T)) tokenmill::prefetch_l2(row + d);
}

// Rows of another stream to bring into L2 while a loop works through its own keys, one row per key: the
// values of the item being scored, or the next item's keys while this one's values are weighed.
struct Fetch {
  const char* base = nullptr;
  const int64_t* slot_of = nullptr;
  int64_t count = 0, stride = 0, bytes = 0;  // rows; bytes from one slot to the next; bytes per row
  void row(int64_t s) const {
    if (s < count)
      for (int64_t o = 0; o < bytes; o += 64) tokenmill::prefetch_l2(base + slot_of[s] * stride + o);
  }
  void rest(int64_t s) const {
    for (; s < count; ++s) row(s);
  }
};

// scores[s] = scale * <query, key_s> for L keys found through slot_of, one key at a time: the few keys (or
// the rows of a head size not a multiple of eight) that score_keys_heads leaves.
template <typename T>
void score_keys(const float* query, const T* keys, const int64_t* slot_of, int64_t L, int64_t stride, int64_t D,
                float scale, float* scores) {
  for (int64_t s = 0; s < L; ++s) {
    const T* key = keys + slot_of[s] * stride;
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), load8(key + d), acc);
    float total = sum8(acc);
    for (; d < D; ++d) total += query[d] * load1(key + d);
    scores[s] = total * scale * row_scale(key, D);
  }
}

// out[d] = sum_s p[s] * value_s[d] for d0 <= d < D: the columns weigh_values_heads leaves (fewer than 32),
// eight at a time while they last, the output staying in a register for the whole context.
template <typename T>
void weigh_values(const float* p, const T* values, const int64_t* slot_of, int64_t L, int64_t stride, int64_t D,
                  float* out, int64_t d0) {
  for (; d0 + 8 <= D; d0 += 8) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t s = 0; s < L; ++s) {
      if (s + kAheadKeys < L) prefetch_row(values + slot_of[s + kAheadKeys] * stride + d0, 8);
      const T* value = values + slot_of[s] * stride;
      acc = _mm256_fmadd_ps(_mm256_set1_ps(p[s] * row_scale(value, D)), load8(value + d0), acc);
    }
    _mm256_storeu_ps(out + d0, acc);
  }
  if (d0 == D) return;
  std::fill(out + d0, out + D, 0.f);
  for (int64_t s = 0; s < L; ++s) {
    const T* value = values + slot_of[s] * stride;
    const float weight = p[s] * row_scale(value, D);
    for (int64_t d = d0; d < D; ++d) out[d] += weight * load1(value + d);
  }
}

// The query heads that share a KV head (GQA) read the same keys and values: NG of them at once load each key
// and value row once, where one head at a time loaded it NG times (those loads, not memory, bounded the
// kernel at long contexts). scores[g][s] = scale * <query[g], key_s>; four keys x NG heads of accumulators,
// the NG query vectors and one key at a time: sixteen registers at NG = 3. (Loading the four keys first
// needed seventeen, and the compiler kept an accumulator on the stack, a store and a load around every FMA.)
// With AVX-512's 32 registers eight keys go at a time (24 accumulators at NG = 3), half the passes.
#ifdef __AVX512F__
constexpr int kKeysAtOnce = 8, kValueVectors = 8;
#else
constexpr int kKeysAtOnce = 4, kValueVectors = 4;
#endif

// Keys from s on, J at a time while J remain; returns where it stopped. Each key's score is its own FMAs
// over D and one sum4x8, whatever J is.
template <int NG, int J, typename T>
int64_t score_key_groups(const float* const* query, const T* keys, const int64_t* slot_of, int64_t L,
                         int64_t stride, int64_t D, float scale, float* const* scores, const Fetch& fetch,
                         int64_t s) {
  static_assert(!kScaledRows<T>, "int8 rows score as integers (score_keys_int8)");
  for (; s + J <= L; s += J) {
    __m256 acc[NG][J];
    const T* key[J];
    UNROLL8 for (int j = 0; j < J; ++j) {
      key[j] = keys + slot_of[s + j] * stride;
      if (s + kAheadKeys + j < L) prefetch_row(keys + slot_of[s + kAheadKeys + j] * stride, D);
      fetch.row(s + j);
      UNROLL4 for (int g = 0; g < NG; ++g) acc[g][j] = _mm256_setzero_ps();
    }
    for (int64_t d = 0; d < D; d += 8) {
      __m256 q[NG];
      UNROLL4 for (int g = 0; g < NG; ++g) q[g] = _mm256_loadu_ps(query[g] + d);
      UNROLL8 for (int j = 0; j < J; ++j) {
        const __m256 k = load8(key[j] + d);
        UNROLL4 for (int g = 0; g < NG; ++g) acc[g][j] = _mm256_fmadd_ps(q[g], k, acc[g][j]);
      }
    }
    UNROLL4 for (int g = 0; g < NG; ++g)
      UNROLL4 for (int j = 0; j < J; j += 4)
        _mm_storeu_ps(scores[g] + s + j, _mm_mul_ps(sum4x8(acc[g] + j), _mm_set1_ps(scale)));
  }
  return s;
}

// Groups of kKeysAtOnce keys, then (AVX-512) of four: the keys the AVX2 build scores in groups of four are
// scored the same way in both builds, so a context's scores are the same bits in either.
template <int NG, typename T>
void score_keys_heads(const float* const* query, const T* keys, const int64_t* slot_of, int64_t L,
                      int64_t stride, int64_t D, float scale, float* const* scores, const Fetch& fetch) {
  int64_t s = 0;
  if (D % 8 == 0) {
    s = score_key_groups<NG, kKeysAtOnce>(query, keys, slot_of, L, stride, D, scale, scores, fetch, s);
    if constexpr (kKeysAtOnce > 4)
      s = score_key_groups<NG, 4>(query, keys, slot_of, L, stride, D, scale, scores, fetch, s);
  }
  for (int g = 0; g < NG; ++g) score_keys(query[g], keys, slot_of + s, L - s, stride, D, scale, scores[g] + s);
  fetch.rest(s);
}

#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// As weigh_values_heads below, 64 columns at a time in 512-bit registers: each lane sees the same FMAs in the
// same order, so the same bits. Returns the first column it left. One layer's decode attention over an int8
// cache, 64 sequences of 192 tokens, cache-hot 354 -> 320 us (alternated in one process); in the engine's
// 64-request batch a decode step's attention 12.8 -> 11.4 ms (the step itself 40.1 -> 39.5 ms).
template <int NG, typename T>
int64_t weigh_values_wide(const float* const* p, const T* values, const int64_t* slot_of, int64_t L,
                          int64_t stride, int64_t D, float* const* out, const Fetch& fetch) {
  constexpr int C = 4, width = 16 * C;
  int64_t d0 = 0;
  for (; d0 + width <= D; d0 += width) {
    __m512 acc[NG][C];
    UNROLL4 for (int g = 0; g < NG; ++g) UNROLL4 for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
    for (int64_t s = 0; s < L; ++s) {
      const T* row = values + slot_of[s] * stride;
      if (s + kAheadKeys < L) prefetch_row(values + slot_of[s + kAheadKeys] * stride + d0, width);
      if (d0 == 0) fetch.row(s);
      __m512 weight[NG];
      const float scale = row_scale(row, D);
      UNROLL4 for (int g = 0; g < NG; ++g) weight[g] = _mm512_set1_ps(kScaledRows<T> ? p[g][s] * scale : p[g][s]);
      UNROLL4 for (int c = 0; c < C; ++c) {
        const __m512 v = load16(row + d0 + 16 * c);
        UNROLL4 for (int g = 0; g < NG; ++g) acc[g][c] = _mm512_fmadd_ps(weight[g], v, acc[g][c]);
      }
    }
    UNROLL4 for (int g = 0; g < NG; ++g)
      UNROLL4 for (int c = 0; c < C; ++c) _mm512_storeu_ps(out[g] + d0 + 16 * c, acc[g][c]);
  }
  fetch.rest(d0 > 0 ? L : 0);
  return d0;
}
#endif

// out[g][d] = sum_s p[g][s] * value_s[d] for NG heads, 32 columns at a time: NG x 4 accumulators, the NG
// weights of a key broadcast once, and one value vector at a time (sixteen registers at NG = 3).
template <int NG, typename T>
void weigh_values_heads(const float* const* p, const T* values, const int64_t* slot_of, int64_t L,
                        int64_t stride, int64_t D, float* const* out, const Fetch& fetch) {
  constexpr int C = kValueVectors, width = 8 * C;
#ifdef __AVX512F__
  int64_t d0 = weigh_values_wide<NG>(p, values, slot_of, L, stride, D, out, fetch);
  const Fetch& first = d0 > 0 ? Fetch{} : fetch;  // rows it fetched already
#else
  int64_t d0 = 0;
  const Fetch& first = fetch;
#endif
  const int64_t start = d0;
  for (; d0 + width <= D; d0 += width) {
    __m256 acc[NG][C];
    UNROLL4 for (int g = 0; g < NG; ++g)
      UNROLL8 for (int c = 0; c < C; ++c) acc[g][c] = _mm256_setzero_ps();
    for (int64_t s = 0; s < L; ++s) {
      const T* row = values + slot_of[s] * stride;
      const T* value = row + d0;
      if (s + kAheadKeys < L) prefetch_row(values + slot_of[s + kAheadKeys] * stride + d0, width);
      if (d0 == 0) first.row(s);
      __m256 weight[NG];
      if constexpr (kScaledRows<T>) {  // an int8 row's scale rides on its weights
        const float scale = row_scale(row, D);
        UNROLL4 for (int g = 0; g < NG; ++g) weight[g] = _mm256_set1_ps(p[g][s] * scale);
      } else {
        UNROLL4 for (int g = 0; g < NG; ++g) weight[g] = _mm256_broadcast_ss(p[g] + s);
      }
      UNROLL8 for (int c = 0; c < C; ++c) {
        const __m256 v = load8(value + 8 * c);
        UNROLL4 for (int g = 0; g < NG; ++g) acc[g][c] = _mm256_fmadd_ps(weight[g], v, acc[g][c]);
      }
    }
    UNROLL4 for (int g = 0; g < NG; ++g)
      UNROLL8 for (int c = 0; c < C; ++c) _mm256_storeu_ps(out[g] + d0 + 8 * c, acc[g][c]);
  }
  first.rest(d0 > start ? L : 0);
  if (d0 < D)
    for (int g = 0; g < NG; ++g) weigh_values(p[g], values, slot_of, L, stride, D, out[g], d0);
}

// int8 caches: the query rounded to int8 too (one scale per head, as quantize_kv rounds a cache row), so a key
// scores as an exact integer dot product, scaled once: score = float(<q8, k8>) * (q_scale * scale) * k_scale.
// (llama.cpp's CPU attention rounds the query to its K cache's type in the same way.) Against converting
// every key to fp32 for FMAs: with VNNI a key and head is one vpdpbusd and ~3 shuffles or adds of the
// transposing sums, where it was 8 conversions and 4 FMAs over 256-bit registers. The layers/attention.py
// paths round the query the same way, so both read the same numbers (up to float rounding). Measured on one
// layer's decode attention, 64 sequences of 192 tokens (with the vectorised to_int8_row and exp_shifted):
// cache-hot 440 -> 354 us, cold 556 -> ~450; the engine's 64 x (128 -> 128) batch 8.45 -> 8.04 s with the
// cache on huge pages (models/weight_arena.py), medians of four alternated processes each.
// The query of one (sequence, head), laid out for the score loops: its D bytes padded with zeros to a whole
// number of 64-byte vectors, the sum of its bytes, and the factor q_scale * scale.
struct Int8Query {
  const int8_t* bytes;  // 64-byte aligned
  int32_t sum;
  float factor;
};

constexpr int64_t padded_dim(int64_t D) { return (D + 63) / 64 * 64; }
// Bytes a rounded query takes in its scratch: its padded vectors, and room for the scale's four bytes.
constexpr int64_t query_stride(int64_t D) { return padded_dim(D) + 64; }

// bytes: query_stride(D) of them, 64-byte aligned.
Int8Query round_query(const float* query, int64_t D, float scale, int8_t* bytes) {
  tokenmill::to_int8_row(query, D, bytes);
  float q_scale;
  std::memcpy(&q_scale, bytes + D, sizeof(q_scale));
  std::memset(bytes + D, 0, padded_dim(D) - D);
  int32_t sum = 0;
  for (int64_t d = 0; d < D; ++d) sum += bytes[d];
  return {bytes, sum, q_scale * scale};
}

inline float int8_score(int32_t dot, float factor, float k_scale) { return static_cast<float>(dot) * factor * k_scale; }

#ifdef __AVX512VNNI__
// vpdpbusd multiplies unsigned bytes by signed ones: the key goes in as k + 128 (its sign bit flipped) and the
// query as it is, so each sum comes out 128 * sum(q) too high (the query's zero padding adds nothing).
inline __m512i key_bytes(const int8_t* key, int64_t v, int64_t D) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t left = D - 64 * v;
  const __m512i bytes = left >= 64 ? _mm512_loadu_si512(key + 64 * v)
                                   : _mm512_maskz_loadu_epi8((__mmask64(1) << left) - 1, key + 64 * v);
  return _mm512_xor_si512(bytes, flip);
}

// Lane sums of sixteen vectors in one: four levels of adding pairs of vectors, each interleaving their 32-bit
// words, then 64-bit pairs, then (twice) 128-bit quarters, so that lane j ends as the sum of vector j's lanes.
inline __m512i sum_pairs32(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}
inline __m512i sum_pairs64(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
}
inline __m512i sum_pairs128(__m512i a, __m512i b) {
  return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                          _mm512_shuffle_i32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
}

// scores[g][s] for NG heads, sixteen keys at a time: one vpdpbusd per key, head and 64 bytes, then the
// transposing sums; the keys a multiple of sixteen leaves go one at a time, to the same integers. kV: D is
// kV whole vectors (the loops unroll, no masks), or 0 for any D.
template <int NG, int kV>
void score_keys_int8(const Int8Query* const* query, const int8_t* keys, const int64_t* slot_of, int64_t L,
                     int64_t stride, int64_t D, float* const* scores, const Fetch& fetch) {
  const int64_t V = kV ? kV : (D + 63) / 64;
  const auto bytes = [&](const int8_t* key, int64_t v) {
    return key_bytes(key, v, kV ? 64 * (v + 1) : D);  // whole vectors need no mask
  };
  int64_t s = 0;
  for (; s + 16 <= L; s += 16) {
    alignas(64) float k_scale[16];
    __m512i quads[NG][4];
    UNROLL4 for (int c = 0; c < 4; ++c) {
      const int8_t* key[4];
      UNROLL4 for (int j = 0; j < 4; ++j) {
        key[j] = keys + slot_of[s + 4 * c + j] * stride;
        if (s + kAheadKeys + 4 * c + j < L) prefetch_row(keys + slot_of[s + kAheadKeys + 4 * c + j] * stride, D);
        fetch.row(s + 4 * c + j);
        k_scale[4 * c + j] = row_scale(key[j], D);
      }
      __m512i dot[NG][4];
      UNROLL4 for (int g = 0; g < NG; ++g) UNROLL4 for (int j = 0; j < 4; ++j) dot[g][j] = _mm512_setzero_si512();
      UNROLL4 for (int64_t v = 0; v < V; ++v) {
        UNROLL4 for (int j = 0; j < 4; ++j) {
          const __m512i k = bytes(key[j], v);
          UNROLL4 for (int g = 0; g < NG; ++g)
            dot[g][j] = _mm512_dpbusd_epi32(dot[g][j], k, _mm512_load_si512(query[g]->bytes + 64 * v));
        }
      }
      UNROLL4 for (int g = 0; g < NG; ++g)
        quads[g][c] = sum_pairs64(sum_pairs32(dot[g][0], dot[g][1]), sum_pairs32(dot[g][2], dot[g][3]));
    }
    const __m512 scales = _mm512_load_ps(k_scale);
    UNROLL4 for (int g = 0; g < NG; ++g) {
      const __m512i low = sum_pairs128(quads[g][0], quads[g][1]), high = sum_pairs128(quads[g][2], quads[g][3]);
      const __m512i dots = _mm512_sub_epi32(sum_pairs128(low, high), _mm512_set1_epi32(128 * query[g]->sum));
      _mm512_storeu_ps(scores[g] + s, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(dots),
                                                                  _mm512_set1_ps(query[g]->factor)), scales));
    }
  }
  const int64_t L16 = s;
  for (; s < L; ++s) {
    const int8_t* key = keys + slot_of[s] * stride;
    for (int g = 0; g < NG; ++g) {
      __m512i dot = _mm512_setzero_si512();
      for (int64_t v = 0; v < V; ++v)
        dot = _mm512_dpbusd_epi32(dot, key_bytes(key, v, D), _mm512_load_si512(query[g]->bytes + 64 * v));
      scores[g][s] = int8_score(_mm512_reduce_add_epi32(dot) - 128 * query[g]->sum, query[g]->factor,
                                row_scale(key, D));
    }
  }
  fetch.rest(L16);
}

template <int NG>
void score_keys_int8(const Int8Query* const* query, const int8_t* keys, const int64_t* slot_of, int64_t L,
                     int64_t stride, int64_t D, float* const* scores, const Fetch& fetch) {
  switch (D) {
    case 64: return score_keys_int8<NG, 1>(query, keys, slot_of, L, stride, D, scores, fetch);
    case 128: return score_keys_int8<NG, 2>(query, keys, slot_of, L, stride, D, scores, fetch);
    default: return score_keys_int8<NG, 0>(query, keys, slot_of, L, stride, D, scores, fetch);
  }
}
#else
// Without VNNI: vpmaddubsw takes |q| (unsigned) against k with q's sign, pairs of at most 2 x 127 x 127
// fitting int16, widened by vpmaddwd: the same integers.
inline __m256i dot32(const int8_t* key, const int8_t* q) {
  const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key));
  const __m256i qv = _mm256_load_si256(reinterpret_cast<const __m256i*>(q));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(qv), _mm256_sign_epi8(k, qv)),
                           _mm256_set1_epi16(1));
}

inline int32_t sum8_epi32(__m256i v) {
  const __m128i half = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i quarter = _mm_add_epi32(half, _mm_shuffle_epi32(half, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtsi128_si32(_mm_add_epi32(quarter, _mm_shuffle_epi32(quarter, _MM_SHUFFLE(2, 3, 0, 1))));
}

template <int NG>
void score_keys_int8(const Int8Query* const* query, const int8_t* keys, const int64_t* slot_of, int64_t L,
                     int64_t stride, int64_t D, float* const* scores, const Fetch& fetch) {
  const int64_t D32 = D / 32 * 32;
  for (int64_t s = 0; s < L; ++s) {
    const int8_t* key = keys + slot_of[s] * stride;
    if (s + kAheadKeys < L) prefetch_row(keys + slot_of[s + kAheadKeys] * stride, D);
    fetch.row(s);
    __m256i dot[NG];
    UNROLL4 for (int g = 0; g < NG; ++g) dot[g] = _mm256_setzero_si256();
    for (int64_t d = 0; d < D32; d += 32)
      UNROLL4 for (int g = 0; g < NG; ++g) dot[g] = _mm256_add_epi32(dot[g], dot32(key + d, query[g]->bytes + d));
    const float k_scale = row_scale(key, D);
    UNROLL4 for (int g = 0; g < NG; ++g) {
      int32_t total = sum8_epi32(dot[g]);
      for (int64_t d = D32; d < D; ++d) total += key[d] * query[g]->bytes[d];
      scores[g][s] = int8_score(total, query[g]->factor, k_scale);
    }
  }
  fetch.rest(L);
}
#endif

// Heads in groups of up to three (12 accumulators plus the loaded keys fill the sixteen registers).
template <typename Run>
void in_head_groups(int64_t G, Run run) {
  for (int64_t g0 = 0; g0 < G; g0 += 3) {
    switch (std::min<int64_t>(3, G - g0)) {
      case 3: run(std::integral_constant<int, 3>{}, g0); break;
      case 2: run(std::integral_constant<int, 2>{}, g0); break;
      default: run(std::integral_constant<int, 1>{}, g0); break;
    }
  }
}

}  // namespace

namespace tokenmill {

void to_int8_row(const float* in, int64_t D, int8_t* out) {
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 peaks = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) peaks = _mm256_max_ps(peaks, _mm256_and_ps(_mm256_loadu_ps(in + d), magnitude));
  float largest = tokenmill::max8(peaks);
  for (; d < D; ++d) largest = std::max(largest, std::fabs(in[d]));
  // As PyTorch evaluates quantize_kv's 127.0 / largest: reciprocal, then times 127 (one bit off the true
  // quotient for a quarter of rows, enough to round a value halfway between two steps the other way).
  const float inverse = largest > 0.f ? (1.f / largest) * 127.f : 0.f;
  // vcvtps2dq rounds to nearest even, as nearbyint and torch.round do; the packs saturate nothing, as every
  // value is already within +-127, and interleave 128-bit halves, which the permute undoes.
  const __m256 times = _mm256_set1_ps(inverse);
  const __m256i low = _mm256_set1_epi32(-127), high = _mm256_set1_epi32(127);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (d = 0; d + 8 <= D; d += 8) {
    __m256i words = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(in + d), times));
    words = _mm256_min_epi32(_mm256_max_epi32(words, low), high);
    const __m256i halves = _mm256_packs_epi32(words, words), bytes = _mm256_packs_epi16(halves, halves);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + d),
                     _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(bytes, order)));
  }
  for (; d < D; ++d) out[d] = static_cast<int8_t>(std::clamp(std::nearbyint(in[d] * inverse), -127.f, 127.f));
  const float scale = largest / 127.f;
  std::memcpy(out + D, &scale, sizeof(scale));
}

// The query of row b, head j at qp + b * q_row + j * q_head (D contiguous fp32); keys and values: caches
// [slots, Hkv, D] of fp32 or fp16 bits, or [slots, Hkv, D + 4] of int8 rows and their scales; block_tables
// [B, W] (int64); lengths [B]: context length per row,
// the current token included (its K/V are already in the cache). Returns [B, Hq * D]. The decode step
// (cpu_decode.cpp) passes its fused QKV output's rows and its cache's layers as they are: views of them
// would cost about a microsecond each.
at::Tensor paged_decode_attention_rows(const float* qp, int64_t q_row, int64_t q_head, int64_t B, int64_t Hq,
                                       int64_t D, const void* keys, const void* values, at::ScalarType dtype,
                                       int64_t slots,
                                       int64_t Hkv, const at::Tensor& block_tables, const at::Tensor& lengths,
                                       int64_t block_size, double scale) {
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  lengths.scalar_type() == at::kLong && lengths.is_contiguous(),
              "block_tables and lengths must be contiguous int64");
  TORCH_CHECK(Hkv > 0 && Hq % Hkv == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.size(0) == B && lengths.numel() == B, "one block table and length per row");
  const int64_t G = Hq / Hkv, width = block_tables.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= width * block_size, "context length outside the block table");
  at::Tensor out = at::empty({B, Hq * D}, block_tables.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  const float factor = static_cast<float>(scale);
  // One item per (sequence, KV head, part of the context), all its query heads at once. A batch of one has
  // three (sequence, KV head) pairs for two threads: contexts then split into parts (of at least kMinPart
  // keys) so that the threads share the work evenly and every cache row is still read once; the parts'
  // outputs merge by their softmax maxima and sums. Against one item per query head (each reading its KV
  // head's rows again), measured per decode step: batch 1 at context 1,500 10.4 -> 8.9 ms, batch 8 at 1,000
  // 38.2 -> 34.9 ms, batch 1 at 130 unchanged.
  const int64_t threads = at::get_num_threads();
  int64_t parts = 1;
  if (B * Hkv < 2 * threads) {
    const int64_t longest = *std::max_element(lens, lens + B);
    parts = std::clamp<int64_t>((2 * threads + B * Hkv - 1) / (B * Hkv), 1,
                                (longest + kMinPart - 1) / kMinPart);
  }
  const int64_t items = B * Hkv * parts;
  std::vector<float> part_out(parts > 1 ? B * Hq * parts * D : 0);
  std::vector<Exps> part_exps(parts > 1 ? B * Hq * parts : 0);
  // Item i: sequence b, KV head h, keys [first, last) of its context.
  const auto locate = [&](int64_t index, int64_t& b, int64_t& h, int64_t& first, int64_t& last) {
    b = index / (Hkv * parts);
    h = index / parts % Hkv;
    const int64_t part = index % parts, size = (lens[b] + parts - 1) / parts;
    first = std::min(lens[b], part * size);
    last = std::min(lens[b], first + size);
  };
  // kp, vp: the caches as float, uint16_t (fp16 bits) or int8_t; a (token, head) row is W of them.
  const auto attend = [&](const auto* kp, const auto* vp) {
    using T = std::remove_cv_t<std::remove_pointer_t<decltype(kp)>>;
    const int64_t W = row_width<T>(D);
    at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      std::vector<int64_t> slot_of;
      std::vector<const float*> queries(G);
      std::vector<float*> rows(G), dests(G);
      std::vector<Exps> exps(G);
      std::vector<Int8Query> rounded(kScaledRows<T> ? G : 0);
      std::vector<const Int8Query*> rounded_of(rounded.size());
      std::vector<int8_t> query_storage(kScaledRows<T> ? G * query_stride(D) + 64 : 0);
      int8_t* query_bytes = query_storage.data() + (-reinterpret_cast<uintptr_t>(query_storage.data()) & 63);
      int64_t b, h, first, last;
      locate(begin, b, h, first, last);  // the first item's first rows, before any work
      for (int64_t s = first; s < std::min(last, first + kAheadKeys); ++s) {
        const int64_t row = (tables[b * width + s / block_size] * block_size + s % block_size) * Hkv + h;
        if (row < 0 || row >= slots * Hkv) continue;  // refused below
        prefetch_row(kp + row * W, D);
        prefetch_row(vp + row * W, D);
      }
      // Item `index`'s cache slots, keys first to last, into `into`.
      const auto find_slots = [&](int64_t index, std::vector<int64_t>& into) {
        int64_t b, h, first, last;
        locate(index, b, h, first, last);
        into.resize(last - first);
        for (int64_t pos = first; pos < last;) {  // a block at a time: no division per key
          const int64_t base = tables[b * width + pos / block_size] * block_size;
          TORCH_CHECK(base >= 0 && base + block_size <= slots, "block table points outside the cache");
          for (int64_t o = pos % block_size; o < block_size && pos < last; ++o, ++pos) into[pos - first] = base + o;
        }
      };
      std::vector<int64_t> next_slots;
      const int64_t row_bytes = W * static_cast<int64_t>(sizeof(*kp));
      for (int64_t index = begin; index < end; ++index) {
        locate(index, b, h, first, last);
        const int64_t L = last - first;
        if (index > begin) {
          std::swap(slot_of, next_slots);  // found during the previous item
        } else {
          find_slots(index, slot_of);
        }
        // A software pipeline: the scores loop fetches this item's values, the values loop the next item's
        // keys, a row per key. Against fetching every item's first rows before any work (as many prefetches
        // as L2 holds, most of them evicted again before their item came): decode steps of 64 sequences
        // 41.0 -> 40.3 ms (int8 cache, medians of six alternated runs of 128 steps).
        const Fetch these_values{reinterpret_cast<const char*>(vp + h * W), slot_of.data(), L, Hkv * row_bytes,
                                 row_bytes};
        Fetch next_keys;
        if (index + 1 < end) {
          find_slots(index + 1, next_slots);
          int64_t nb, nh, nfirst, nlast;
          locate(index + 1, nb, nh, nfirst, nlast);
          next_keys = {reinterpret_cast<const char*>(kp + nh * W), next_slots.data(),
                       static_cast<int64_t>(next_slots.size()), Hkv * row_bytes, row_bytes};
        }
        scores.resize(G * L);
        for (int64_t g = 0; g < G; ++g) {
          const int64_t row = b * Hq + h * G + g;
          queries[g] = qp + b * q_row + (h * G + g) * q_head;
          rows[g] = scores.data() + g * L;
          dests[g] = parts > 1 ? part_out.data() + (row * parts + index % parts) * D : op + row * D;
        }
        if constexpr (kScaledRows<T>) {
          for (int64_t g = 0; g < G; ++g) {
            rounded[g] = round_query(queries[g], D, factor, query_bytes + g * query_stride(D));
            rounded_of[g] = &rounded[g];
          }
          in_head_groups(G, [&](auto ng, int64_t g0) {
            score_keys_int8<ng>(rounded_of.data() + g0, kp + h * W, slot_of.data(), L, Hkv * W, D,
                                rows.data() + g0, g0 == 0 ? these_values : Fetch{});
          });
        } else {
          in_head_groups(G, [&](auto ng, int64_t g0) {
            score_keys_heads<ng>(queries.data() + g0, kp + h * W, slot_of.data(), L, Hkv * W, D, factor,
                                 rows.data() + g0, g0 == 0 ? these_values : Fetch{});
          });
        }
        for (int64_t g = 0; g < G; ++g) exps[g] = exp_shifted(rows[g], L);
        in_head_groups(G, [&](auto ng, int64_t g0) {
          weigh_values_heads<ng>(rows.data() + g0, vp + h * W, slot_of.data(), L, Hkv * W, D, dests.data() + g0,
                                 g0 == 0 ? next_keys : Fetch{});
        });
        for (int64_t g = 0; g < G; ++g) {
          if (parts > 1) {
            part_exps[(b * Hq + h * G + g) * parts + index % parts] = exps[g];
          } else {
            const float inverse = 1.f / exps[g].total;
            for (int64_t d = 0; d < D; ++d) dests[g][d] *= inverse;
          }
        }
      }
    });
  };
  switch (dtype) {
    case at::kHalf: attend(static_cast<const uint16_t*>(keys), static_cast<const uint16_t*>(values)); break;
    case at::kChar: attend(static_cast<const int8_t*>(keys), static_cast<const int8_t*>(values)); break;
    case at::kFloat: attend(static_cast<const float*>(keys), static_cast<const float*>(values)); break;
    default: TORCH_CHECK(false, "the KV cache must hold fp32, fp16 or int8 rows");
  }
  for (int64_t row = 0; row < B * Hq && parts > 1; ++row) {
    const Exps* exps = part_exps.data() + row * parts;
    float peak = -std::numeric_limits<float>::infinity();
    for (int64_t part = 0; part < parts; ++part) peak = std::max(peak, exps[part].peak);
    float total = 0.f;
    float* dest = op + row * D;
    std::fill(dest, dest + D, 0.f);
    for (int64_t part = 0; part < parts; ++part) {
      if (exps[part].total == 0.f) continue;  // an empty part: a short context beside a long one
      const float weight = std::exp(exps[part].peak - peak);
      total += weight * exps[part].total;
      const float* partial = part_out.data() + (row * parts + part) * D;
      for (int64_t d = 0; d < D; ++d) dest[d] += weight * partial[d];
    }
    const float inverse = 1.f / total;
    for (int64_t d = 0; d < D; ++d) dest[d] *= inverse;
  }
  return out;
}

// q [B, Hq, D] fp32 (rows and heads may be strided, each head's D values contiguous); caches [slots, Hkv, D],
// fp32 or fp16, both alike. Returns [B, Hq, D].
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& lengths, int64_t block_size,
                                  double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3 && q.stride(2) == 1, "q must be fp32 [B, Hq, D]");
  const at::ScalarType dtype = k_cache.scalar_type();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  (dtype == at::kHalf || dtype == at::kFloat || dtype == at::kChar) &&
                  v_cache.scalar_type() == dtype && k_cache.sizes() == v_cache.sizes() && k_cache.dim() == 3,
              "caches must be contiguous fp32, fp16 or int8 [slots, Hkv, row], both alike");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  TORCH_CHECK(k_cache.size(2) == (dtype == at::kChar ? D + 4 : D),
              "cache rows must hold D values (int8: and a 4-byte scale)");
  return paged_decode_attention_rows(q.data_ptr<float>(), q.stride(0), q.stride(1), B, Hq, D, k_cache.data_ptr(),
                                     v_cache.data_ptr(), dtype, k_cache.size(0), k_cache.size(1), block_tables,
                                     lengths, block_size, scale)
      .view({B, Hq, D});
}

}  // namespace tokenmill

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor lengths, "
      "int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("paged_decode_attention", &tokenmill::paged_decode_attention); }
