// The kernels' entry points, declared for C++ callers: the fused decode step (cpu_decode.cpp) calls them
// directly instead of through the PyTorch dispatcher. Each is also registered as a torch.ops.tokenmill op.
#pragma once
#include <ATen/core/Tensor.h>

namespace tokenmill {

at::Tensor fp32_linear(const at::Tensor& x, const at::Tensor& weight);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales);
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& blocks, int64_t rows);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_(at::Tensor hidden, const at::Tensor& delta, const at::Tensor& weight, double eps);
void rotary_(at::Tensor q, at::Tensor k, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& lengths, int64_t block_size,
                                  double scale);

}  // namespace tokenmill
