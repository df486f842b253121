// The kernels' entry points, declared for C++ callers: the fused decode step (cpu_decode.cpp) calls them
// directly instead of through the PyTorch dispatcher. Each is also registered as a torch.ops.tokenmill op.
#pragma once
#include <ATen/core/Tensor.h>

namespace tokenmill {

at::Tensor fp32_linear(const at::Tensor& x, const at::Tensor& weight);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& units, const at::Tensor& scales);
at::Tensor int8_silu_gate_up(const at::Tensor& x, const at::Tensor& units, const at::Tensor& scales);
// For callers that checked the weights once (check_int8_weights) and own the outputs, as the decode step does
// every step: x [M, K] and y contiguous fp32 rows (y [M, N], or [M, I] for gate|up).
void check_int8_weights(const at::Tensor& units, const at::Tensor& scales, bool gate_up);
void int8_linear_into(const float* x, int64_t M, const at::Tensor& units, const at::Tensor& scales, float* y);
void int8_silu_gate_up_into(const float* x, int64_t M, const at::Tensor& units, const at::Tensor& scales,
                            float* y);
// The same with the residual add and RMSNorm before: hidden [M, K] += delta, then x = RMSNorm(hidden) * weight
// goes to the matmul rounded to int8 straight from cache (add_rms_norm_ and the *_into above, bit for bit).
void int8_linear_norm_into(float* hidden, const float* delta, const float* weight, double eps, int64_t M,
                           const at::Tensor& units, const at::Tensor& scales, float* y);
// ... and then a whole int8 MLP: y [M, H] = down(silu(gate) * up) of x, the product rounded in cache too.
void int8_mlp_into(float* hidden, const float* delta, const float* weight, double eps, int64_t M,
                   const at::Tensor& gate_up_units, const at::Tensor& gate_up_scales, const at::Tensor& down_units,
                   const at::Tensor& down_scales, float* y);
at::Tensor int8_mlp_(at::Tensor hidden, const at::Tensor& delta, const at::Tensor& weight, double eps,
                     const at::Tensor& gate_up_units, const at::Tensor& gate_up_scales, const at::Tensor& down_units,
                     const at::Tensor& down_scales);
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t rows);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_(at::Tensor hidden, const at::Tensor& delta, const at::Tensor& weight, double eps);
void rotary_(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin);
// In place on T rows of `heads` heads of D values at base + t * row + h * head; cos, sin [T, D / 2].
void rotate_rows(float* base, int64_t T, int64_t row, int64_t heads, int64_t head, int64_t D, const float* cos,
                 const float* sin);
at::Tensor silu_mul(const at::Tensor& gate_up);
// T rows of K and V ([Hkv, D] fp32 each, rows `stride` floats apart) into cache slots slot[t] of [slots, Hkv,
// row] caches holding fp32, fp16 or int8 rows (D values and a 4-byte scale).
void write_kv_rows(const float* key, const float* value, int64_t stride, const int64_t* slot, int64_t T,
                   int64_t kv_heads, int64_t D, at::ScalarType dtype, char* keys, char* values);
// D values -> D int8 (x * (127 / max|x|), to nearest even) and the scale max|x| / 127's four bytes: as
// layers/attention.py's quantize_kv, byte for byte. The cache writes round K and V rows this way, and decode
// attention the query that meets an int8 cache.
void to_int8_row(const float* in, int64_t D, int8_t* out);
at::Tensor paged_decode_attention_rows(const float* q, int64_t q_row, int64_t q_head, int64_t B, int64_t Hq,
                                       int64_t D, const void* keys, const void* values, at::ScalarType dtype,
                                       int64_t slots,
                                       int64_t Hkv, const at::Tensor& block_tables, const at::Tensor& lengths,
                                       int64_t block_size, double scale);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& lengths, int64_t block_size,
                                  double scale);

}  // namespace tokenmill
