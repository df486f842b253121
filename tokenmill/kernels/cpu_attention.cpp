// Decode attention straight from the paged KV cache. The PyTorch path first gathers every sequence's keys
// and values into padded copies (index_select), then runs SDPA with a padding mask: two extra passes over
// the whole context per layer per step, plus a dozen ops of dispatch. Here each (sequence, KV head) walks
// its block table and reads keys/values where they live; the query heads sharing that KV head (GQA) take
// turns while those keys and values are still in L2.
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

using tokenmill::exp256;
using tokenmill::sum8;
using tokenmill::sum8x8;

// Key and value rows this far ahead of the one in use are fetched into L2 (and the first ones before any
// work starts): each is a miss to memory (the rows sit in scattered blocks, and the weights streamed since
// the last step evicted them), and taken one at a time the core waits on each in turn. Decode steps,
// measured A/B in one process with 48 ahead: batch 1 at context 1,500 13.2 -> 10.1 ms, batch 8 at 1,000
// 60 -> 45 ms (96 ahead did as well).
constexpr int64_t kAheadKeys = 64;

inline void prefetch_row(const float* row, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) tokenmill::prefetch_l2(row + d);
}

// scores[s] = scale * <query, key_s> for L keys found through slot_of. Eight keys at a time, their eight
// accumulators reduced together: one horizontal reduction per eight keys instead of one per key.
void score_keys(const float* query, const float* keys, const int64_t* slot_of, int64_t L, int64_t stride,
                int64_t D, float scale, float* scores) {
  int64_t s = 0;
  if (D % 8 == 0) {
    for (; s + 8 <= L; s += 8) {
      __m256 acc[8];
      const float* key[8];
      for (int j = 0; j < 8; ++j) {
        acc[j] = _mm256_setzero_ps();
        key[j] = keys + slot_of[s + j] * stride;
        if (s + kAheadKeys + j < L) prefetch_row(keys + slot_of[s + kAheadKeys + j] * stride, D);
      }
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 q = _mm256_loadu_ps(query + d);
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(q, _mm256_loadu_ps(key[j] + d), acc[j]);
      }
      _mm256_storeu_ps(scores + s, _mm256_mul_ps(sum8x8(acc), _mm256_set1_ps(scale)));
    }
  }
  for (; s < L; ++s) {
    const float* key = keys + slot_of[s] * stride;
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(query + d), _mm256_loadu_ps(key + d), acc);
    float total = sum8(acc);
    for (; d < D; ++d) total += query[d] * key[d];
    scores[s] = total * scale;
  }
}

// row[0..L) <- softmax(row), exp eight lanes at a time.
void softmax(float* row, int64_t L) {
  float peak = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < L; ++s) peak = std::max(peak, row[s]);
  const __m256 shift = _mm256_set1_ps(peak);
  __m256 acc = _mm256_setzero_ps();
  int64_t s = 0;
  for (; s + 8 <= L; s += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(row + s), shift));
    _mm256_storeu_ps(row + s, e);
    acc = _mm256_add_ps(acc, e);
  }
  float total = sum8(acc);
  for (; s < L; ++s) total += (row[s] = std::exp(row[s] - peak));
  const float inverse = 1.f / total;
  for (int64_t t = 0; t < L; ++t) row[t] *= inverse;
}

// out[d0 .. d0 + 8 * CHUNKS) = sum_s p[s] * value_s[...]: the output tile stays in registers for the
// whole context instead of being loaded and stored once per key.
template <int CHUNKS>
void weigh_values_tile(const float* p, const float* values, const int64_t* slot_of, int64_t L, int64_t stride,
                       int64_t d0, float* out) {
  __m256 acc[CHUNKS];
  for (int c = 0; c < CHUNKS; ++c) acc[c] = _mm256_setzero_ps();
  for (int64_t s = 0; s < L; ++s) {
    const __m256 weight = _mm256_set1_ps(p[s]);
    const float* value = values + slot_of[s] * stride + d0;
    if (s + kAheadKeys < L) prefetch_row(values + slot_of[s + kAheadKeys] * stride + d0, 8 * CHUNKS);
    for (int c = 0; c < CHUNKS; ++c) acc[c] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(value + 8 * c), acc[c]);
  }
  for (int c = 0; c < CHUNKS; ++c) _mm256_storeu_ps(out + d0 + 8 * c, acc[c]);
}

void weigh_values(const float* p, const float* values, const int64_t* slot_of, int64_t L, int64_t stride,
                  int64_t D, float* out) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) weigh_values_tile<8>(p, values, slot_of, L, stride, d0, out);
  for (; d0 + 8 <= D; d0 += 8) weigh_values_tile<1>(p, values, slot_of, L, stride, d0, out);
  if (d0 == D) return;
  std::fill(out + d0, out + D, 0.f);
  for (int64_t s = 0; s < L; ++s) {
    const float* value = values + slot_of[s] * stride;
    for (int64_t d = d0; d < D; ++d) out[d] += p[s] * value[d];
  }
}

}  // namespace

namespace tokenmill {

// q [B, Hq, D]; caches [slots, Hkv, D]; block_tables [B, W] (int64); lengths [B]: context length per row,
// the current token included (its K/V are already in the cache). Returns [B, Hq, D].
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& lengths, int64_t block_size,
                                  double scale) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 3 && q.stride(2) == 1, "q must be fp32 [B, Hq, D]");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat && k_cache.sizes() == v_cache.sizes(),
              "caches must be contiguous fp32 [slots, Hkv, D]");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && block_tables.is_contiguous() &&
                  lengths.scalar_type() == at::kLong && lengths.is_contiguous(),
              "block_tables and lengths must be contiguous int64");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D && Hq % Hkv == 0, "head sizes do not match");
  TORCH_CHECK(block_tables.size(0) == B && lengths.numel() == B, "one block table and length per row");
  const int64_t G = Hq / Hkv, W = block_tables.size(1), slots = k_cache.size(0);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= W * block_size, "context length outside the block table");
  at::Tensor out = at::empty({B, Hq, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t q_row = q.stride(0), q_head = q.stride(1);
  const float factor = static_cast<float>(scale);
  // One item per (sequence, KV head), its query heads in turn; with fewer items than two per thread (a batch
  // of one: three items on two threads), one item per query head so that the threads share the work evenly.
  const int64_t per_item = B * Hkv < 2 * at::get_num_threads() ? 1 : G, items = B * Hq / per_item;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> slot_of;
    int64_t last = -1;  // items of one KV head follow each other: fetch its rows once
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / (items / B), h = index % (items / B) * per_item / G;
      if (b * Hkv + h == last) continue;
      last = b * Hkv + h;
      for (int64_t s = 0; s < std::min(lens[b], kAheadKeys); ++s) {
        const int64_t row = (tables[b * W + s / block_size] * block_size + s % block_size) * Hkv + h;
        if (row < 0 || row >= slots * Hkv) continue;  // refused below
        prefetch_row(kp + row * D, D);
        prefetch_row(vp + row * D, D);
      }
    }
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / (items / B), first = index % (items / B) * per_item, h = first / G, L = lens[b];
      scores.resize(L);
      slot_of.resize(L);
      for (int64_t s = 0; s < L; ++s) {
        const int64_t block = tables[b * W + s / block_size];
        slot_of[s] = block * block_size + s % block_size;
        TORCH_CHECK(slot_of[s] >= 0 && slot_of[s] < slots, "block table points outside the cache");
      }
      // Each query head of the group in turn: its keys and values (L x D floats) stay in L2 between heads.
      for (int64_t head = first; head < first + per_item; ++head) {
        score_keys(qp + b * q_row + head * q_head, kp + h * D, slot_of.data(), L, Hkv * D, D, factor,
                   scores.data());
        softmax(scores.data(), L);
        weigh_values(scores.data(), vp + h * D, slot_of.data(), L, Hkv * D, D, op + (b * Hq + head) * D);
      }
    }
  });
  return out;
}

}  // namespace tokenmill

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor lengths, "
      "int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("paged_decode_attention", &tokenmill::paged_decode_attention); }
