// Decode attention straight from the paged KV cache. The PyTorch path first gathers every sequence's keys
// and values into padded copies (index_select), then runs SDPA with a padding mask: two extra passes over
// the whole context per layer per step, plus a dozen ops of dispatch. Here each (sequence, KV head) walks
// its block table and reads keys/values where they live; the query heads sharing that KV head (GQA) are
// scored together so each key is loaded once.
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

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  __m128 low = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  low = _mm_hadd_ps(low, low);
  low = _mm_hadd_ps(low, low);
  float sum = _mm_cvtss_f32(low);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

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
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<int64_t> slot_of;
    for (int64_t index = begin; index < end; ++index) {
      const int64_t b = index / Hkv, h = index % Hkv, L = lens[b];
      scores.assign(G * L, 0.f);
      slot_of.resize(L);
      for (int64_t s = 0; s < L; ++s) {
        const int64_t block = tables[b * W + s / block_size];
        slot_of[s] = block * block_size + s % block_size;
        TORCH_CHECK(slot_of[s] >= 0 && slot_of[s] < slots, "block table points outside the cache");
      }
      for (int64_t s = 0; s < L; ++s) {
        const float* key = kp + (slot_of[s] * Hkv + h) * D;
        for (int64_t g = 0; g < G; ++g) scores[g * L + s] = dot(qp + b * q_row + (h * G + g) * q_head, key, D) * factor;
      }
      for (int64_t g = 0; g < G; ++g) {
        float* row = scores.data() + g * L;
        const float peak = *std::max_element(row, row + L);
        float total = 0.f;
        for (int64_t s = 0; s < L; ++s) total += (row[s] = std::exp(row[s] - peak));
        const float inverse = 1.f / total;
        for (int64_t s = 0; s < L; ++s) row[s] *= inverse;
        std::fill(op + (b * Hq + h * G + g) * D, op + (b * Hq + h * G + g + 1) * D, 0.f);
      }
      for (int64_t s = 0; s < L; ++s) {
        const float* value = vp + (slot_of[s] * Hkv + h) * D;
        for (int64_t g = 0; g < G; ++g) axpy(scores[g * L + s], value, op + (b * Hq + h * G + g) * D, D);
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def(
      "paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor lengths, "
      "int block_size, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("paged_decode_attention", &paged_decode_attention); }
