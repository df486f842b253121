// A decode step through every decoder layer in one call. In Python a layer is ~20 PyTorch ops (views,
// cache writes, the kernels), each paying ~3-10 us of interpreter and dispatcher time: ~2 ms per step for
// SmolLM2's 30 layers, a fifth of an int8 single-stream step. Here the same kernels run in the same order
// (so the numbers are identical to the Python path's), called directly.
//
// Built once per model (LlamaModel._decode_stack) holding references to its weights; used only for steps
// where every row is a decode (the Python path keeps prefill, chunked prefill and the fallbacks).
#include <immintrin.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/linear.h>
#include <c10/util/Exception.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

#include "kernels.h"

namespace {

// kInt8GateUp: a gate|up projection whose kernel returns silu(gate) * up (layers/linear.py's Int8GateUp).
enum class Format : int64_t { kFp32 = 0, kInt8 = 1, kInt4 = 2, kInt8GateUp = 3 };

struct Linear {
  Format format;
  at::Tensor a, b;  // fp32: weight; int8 (and gate|up): units, scales; int4: blocks
  int64_t rows;  // int4: the output rows (blocks pad them to a multiple of eight)
  std::optional<at::Tensor> bias;
};

struct Layer {
  at::Tensor input_norm, post_norm;
  Linear qkv, o_proj, gate_up, down;
};

void to_half(const float* in, at::Half* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) out[i] = static_cast<at::Half>(in[i]);
}

class DecodeStack : public torch::CustomClassHolder {
 public:
  // dense_max_rows: above this many rows fp32 weights go to MKL (layers/linear.py's DENSE_KERNEL_MAX_ROWS).
  DecodeStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale,
              int64_t dense_max_rows)
      : heads_(num_heads), kv_heads_(num_kv_heads), head_dim_(head_dim), eps_(eps), scale_(scale),
        dense_max_rows_(dense_max_rows) {}

  // Linears arrive in layer order, four per layer (qkv, o_proj, gate_up, down), before add_layer.
  void add_linear(int64_t format, at::Tensor a, at::Tensor b, int64_t rows, std::optional<at::Tensor> bias) {
    TORCH_CHECK(format >= 0 && format <= 3, "format must be 0 (fp32), 1 (int8), 2 (int4) or 3 (int8 gate|up)");
    if (format == 1 || format == 3) tokenmill::check_int8_weights(a, b, format == 3);  // once, not every step
    pending_.push_back({static_cast<Format>(format), a, b, rows, bias});
  }

  void add_layer(at::Tensor input_norm, at::Tensor post_norm) {
    TORCH_CHECK(pending_.size() == 4, "add_layer needs the layer's four linears first");
    for (const at::Tensor* norm : {&input_norm, &post_norm})
      TORCH_CHECK(norm->scalar_type() == at::kFloat && norm->is_contiguous() && norm->dim() == 1,
                  "norm weights must be contiguous fp32 [H]");
    for (size_t i = 0; i < 4; ++i)
      TORCH_CHECK(pending_[i].format != Format::kInt8GateUp || i == 2, "only gate_up may be int8 gate|up");
    layers_.push_back({input_norm, post_norm, pending_[0], pending_[1], pending_[2], pending_[3]});
    pending_.clear();
  }

  // hidden [T, H] (the residual stream, updated in place) and x = input_norm(hidden) of layer 0; every row
  // a decode whose K/V go to slot_mapping[t], then slot_copies [E, 2] copy slot [e][0] to [e][1] (E may be
  // 0). Returns final_norm(hidden after the last layer).
  at::Tensor run(at::Tensor hidden, at::Tensor x, at::Tensor kv_cache, at::Tensor slot_mapping,
                 at::Tensor block_tables, at::Tensor lengths, int64_t block_size, at::Tensor cos, at::Tensor sin,
                 at::Tensor final_norm, at::Tensor slot_copies) {
    const int64_t T = hidden.size(0), q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2 && x.size(0) == T &&
                    hidden.scalar_type() == at::kFloat && hidden.is_contiguous() && hidden.sizes() == x.sizes(),
                "hidden and x must be contiguous fp32 [T, H]");
    const at::ScalarType dtype = kv_cache.scalar_type();
    TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.is_contiguous() && kv_cache.size(0) == (int64_t)layers_.size() &&
                    kv_cache.size(1) == 2 && kv_cache.size(3) == kv_heads_ &&
                    (((dtype == at::kFloat || dtype == at::kHalf) && kv_cache.size(4) == head_dim_) ||
                     (dtype == at::kChar && kv_cache.size(4) == head_dim_ + 4)),
                "kv_cache must be contiguous fp32 or fp16 [layers, 2, slots, Hkv, D] or int8 [..., D + 4]");
    TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() &&
                    slot_mapping.numel() == T,
                "one int64 cache slot per row");
    ++runs_;
    const int64_t slots = kv_cache.size(2);
    const int64_t* slot = slot_mapping.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < slots, "cache slot out of range");
    TORCH_CHECK(slot_copies.scalar_type() == at::kLong && slot_copies.is_contiguous() &&
                    (slot_copies.numel() == 0 || (slot_copies.dim() == 2 && slot_copies.size(1) == 2)),
                "slot_copies must be int64 [E, 2]");
    const int64_t copies = slot_copies.numel() / 2;
    const int64_t* copy = slot_copies.data_ptr<int64_t>();
    for (int64_t e = 0; e < 2 * copies; ++e) TORCH_CHECK(copy[e] >= 0 && copy[e] < slots, "copy slot out of range");
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
                    sin.scalar_type() == at::kFloat && cos.numel() == T * (head_dim_ / 2) &&
                    sin.numel() == cos.numel(),
                "cos/sin must be contiguous fp32 [T, D / 2]");
    const float *cos_rows = cos.data_ptr<float>(), *sin_rows = sin.data_ptr<float>();
    const int64_t slot_bytes = kv_heads_ * kv_cache.size(4) * kv_cache.element_size();  // one slot's K (or V)
    const int64_t layer_bytes = 2 * slots * slot_bytes;
    char* cache_base = static_cast<char*>(kv_cache.data_ptr());
    float* residual = hidden.data_ptr<float>();
    // With int8 weights the residual add and RMSNorm before a matmul run fused with it (int8_linear_norm_into,
    // int8_mlp_into): `pending` is the last MLP's output, added when the next layer's QKV projection runs.
    at::Tensor pending;
    for (size_t index = 0; index < layers_.size(); ++index) {
      const Layer& layer = layers_[index];
      // Rows of the fused projection are [q | k | v]; rotary, the cache writes and attention work on them in
      // place, through pointers: tensor views cost about a microsecond each, a few per layer.
      at::Tensor qkv;
      if (pending.defined()) {
        tokenmill::int8_linear_norm_into(residual, pending.data_ptr<float>(), layer.input_norm.data_ptr<float>(),
                                         eps_, T, layer.qkv.a, layer.qkv.b,
                                         output(kQkv, T, layer.qkv.b.numel(), qkv));
      } else {
        qkv = linear(x, layer.qkv, kQkv);
      }
      float* rows = qkv.data_ptr<float>();
      const int64_t stride = qkv.stride(0);
      tokenmill::rotate_rows(rows, T, stride, heads_, head_dim_, head_dim_, cos_rows, sin_rows);
      tokenmill::rotate_rows(rows + q_size, T, stride, kv_heads_, head_dim_, head_dim_, cos_rows, sin_rows);
      char* keys = cache_base + index * layer_bytes;  // this layer's [slots, Hkv, D], then its values
      char* values = keys + layer_bytes / 2;
      tokenmill::write_kv_rows(rows + q_size, rows + q_size + kv_size, stride, slot, T, kv_heads_, head_dim_,
                               dtype, keys, values);
      copy_slots(copy, copies, slot_bytes, keys, values);
      at::Tensor attended = tokenmill::paged_decode_attention_rows(rows, stride, head_dim_, T, heads_, head_dim_,
                                                                   keys, values, dtype, slots, kv_heads_,
                                                                   block_tables, lengths, block_size, scale_);
      const at::Tensor out = linear(attended, layer.o_proj, kOut);
      at::Tensor mlp;
      if (fused_mlp(layer)) {
        tokenmill::int8_mlp_into(residual, out.data_ptr<float>(), layer.post_norm.data_ptr<float>(), eps_, T,
                                 layer.gate_up.a, layer.gate_up.b, layer.down.a, layer.down.b,
                                 output(kDown, T, layer.down.b.numel(), mlp));
      } else {
        x = tokenmill::add_rms_norm_(hidden, out, layer.post_norm, eps_);
        mlp = linear(gated(x, layer.gate_up), layer.down, kDown);
      }
      if (index + 1 < layers_.size() && fused_qkv(layers_[index + 1])) {
        pending = mlp;
      } else {
        x = tokenmill::add_rms_norm_(hidden, mlp, index + 1 < layers_.size() ? layers_[index + 1].input_norm
                                                                                : final_norm, eps_);
        pending = at::Tensor();
      }
    }
    return x;
  }

  // Steps run so far (tests check that decode steps really take this path).
  int64_t runs() const { return runs_; }

 private:
  // Where each of a layer's matmuls writes (int8 weights): one buffer per kind, reused by every layer and step.
  enum Slot { kQkv = 0, kOut = 1, kGateUp = 2, kDown = 3 };

  // An int8 matmul's output [T, width]: the same buffer while the batch keeps its size. Without an allocation
  // and the op's checks (made once, in add_linear) per matmul, a batch-1 int8 step ran ~1% faster (median
  // ratios 0.990 and 0.991 over 80 alternating windows; batch 64 0.996).
  float* output(Slot slot, int64_t T, int64_t width, at::Tensor& y) const {
    at::Tensor& buffer = outputs_[slot];
    if (!buffer.defined() || buffer.size(0) != T || buffer.size(1) != width)
      buffer = at::empty({T, width}, at::TensorOptions().dtype(at::kFloat));
    y = buffer;
    return buffer.data_ptr<float>();
  }

  static bool fused_qkv(const Layer& layer) { return layer.qkv.format == Format::kInt8 && !layer.qkv.bias; }
  static bool fused_mlp(const Layer& layer) {
    return layer.gate_up.format == Format::kInt8GateUp && layer.down.format == Format::kInt8 && !layer.down.bias;
  }

  // silu(gate) * up of a gate|up projection.
  at::Tensor gated(const at::Tensor& x, const Linear& l) const {
    if (l.format != Format::kInt8GateUp) return tokenmill::silu_mul(linear(x, l, kGateUp));
    at::Tensor y;
    float* out = output(kGateUp, x.size(0), l.b.numel() / 2, y);
    tokenmill::int8_silu_gate_up_into(x.data_ptr<float>(), x.size(0), l.a, l.b, out);
    return y;
  }

  // x: contiguous fp32 rows (the stack's own tensors).
  at::Tensor linear(const at::Tensor& x, const Linear& l, Slot slot) const {
    at::Tensor y;
    switch (l.format) {
      case Format::kFp32:
        if (x.size(0) > dense_max_rows_) return at::linear(x, l.a, l.bias);
        y = tokenmill::fp32_linear(x, l.a);
        break;
      case Format::kInt8:
        tokenmill::int8_linear_into(x.data_ptr<float>(), x.size(0), l.a, l.b,
                                    output(slot, x.size(0), l.b.numel(), y));
        break;
      case Format::kInt4:
        y = tokenmill::int4_linear(x, l.a, l.rows);
        break;
      case Format::kInt8GateUp:
        TORCH_CHECK(false, "an int8 gate|up projection goes through gated()");
    }
    if (l.bias) y.add_(*l.bias);
    return y;
  }

  // bytes: one slot's K (or V) row.
  static void copy_slots(const int64_t* copy, int64_t copies, int64_t bytes, char* keys, char* values) {
    for (int64_t e = 0; e < copies; ++e) {
      std::memcpy(keys + copy[2 * e + 1] * bytes, keys + copy[2 * e] * bytes, bytes);
      std::memcpy(values + copy[2 * e + 1] * bytes, values + copy[2 * e] * bytes, bytes);
    }
  }

  int64_t heads_, kv_heads_, head_dim_;
  double eps_, scale_;
  int64_t dense_max_rows_;
  int64_t runs_ = 0;
  std::vector<Layer> layers_;
  std::vector<Linear> pending_;
  mutable at::Tensor outputs_[4];
};

}  // namespace

namespace tokenmill {

// Rounded to fp16 as torch's conversion is (to nearest even), or to int8 rows as layers/attention.py's
// quantize_kv (the same bytes), if the cache is.
void write_kv_rows(const float* key, const float* value, int64_t stride, const int64_t* slot, int64_t T,
                   int64_t kv_heads, int64_t D, at::ScalarType dtype, char* keys, char* values) {
  const int64_t width = dtype == at::kChar ? D + 4 : D;
  const int64_t slot_bytes = kv_heads * width * (dtype == at::kChar ? 1 : dtype == at::kHalf ? 2 : 4);
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* k = key + t * stride;
      const float* v = value + t * stride;
      char* key_out = keys + slot[t] * slot_bytes;
      char* value_out = values + slot[t] * slot_bytes;
      if (dtype == at::kHalf) {
        to_half(k, reinterpret_cast<at::Half*>(key_out), kv_heads * D);
        to_half(v, reinterpret_cast<at::Half*>(value_out), kv_heads * D);
      } else if (dtype == at::kChar) {
        for (int64_t h = 0; h < kv_heads; ++h) {
          to_int8_row(k + h * D, D, reinterpret_cast<int8_t*>(key_out) + h * width);
          to_int8_row(v + h * D, D, reinterpret_cast<int8_t*>(value_out) + h * width);
        }
      } else {
        std::memcpy(key_out, k, kv_heads * D * sizeof(float));
        std::memcpy(value_out, v, kv_heads * D * sizeof(float));
      }
    }
  });
}

// k, v [T, Hkv, D] fp32 (rows may be strided, as views of a fused QKV output); caches [slots, Hkv, row] of
// fp32, fp16 or int8 rows (layers/attention.py's layout). One pass, where the PyTorch path rounds with a
// dozen ops over the whole chunk and scatters with index_copy_ (~5% of a 1,024-token prefill step).
void write_kv_cache_(const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache, at::Tensor v_cache,
                     const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat && k.dim() == 3 &&
                  k.sizes() == v.sizes() && k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) &&
                  v.stride(1) == v.size(2) && k.stride(0) == v.stride(0),
              "k and v must be fp32 [T, Hkv, D], heads contiguous, rows alike");
  const int64_t T = k.size(0), Hkv = k.size(1), D = k.size(2);
  const at::ScalarType dtype = k_cache.scalar_type();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3 &&
                  k_cache.sizes() == v_cache.sizes() && v_cache.scalar_type() == dtype &&
                  (dtype == at::kFloat || dtype == at::kHalf || dtype == at::kChar) && k_cache.size(1) == Hkv &&
                  k_cache.size(2) == (dtype == at::kChar ? D + 4 : D),
              "caches must be contiguous fp32, fp16 or int8 [slots, Hkv, row], both alike");
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous() && slot_mapping.numel() == T,
              "one int64 cache slot per row");
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(slot[t] >= 0 && slot[t] < k_cache.size(0), "cache slot out of range");
  write_kv_rows(k.data_ptr<float>(), v.data_ptr<float>(), k.stride(0), slot, T, Hkv, D, dtype,
                static_cast<char*>(k_cache.data_ptr()), static_cast<char*>(v_cache.data_ptr()));
}

}  // namespace tokenmill

TORCH_LIBRARY_FRAGMENT(tokenmill, m) {
  m.def("write_kv_cache_(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.class_<DecodeStack>("DecodeStack")
      .def(torch::init<int64_t, int64_t, int64_t, double, double, int64_t>())
      .def("add_linear", &DecodeStack::add_linear)
      .def("add_layer", &DecodeStack::add_layer)
      .def("run", &DecodeStack::run)
      .def("runs", &DecodeStack::runs);
}

TORCH_LIBRARY_IMPL(tokenmill, CPU, m) { m.impl("write_kv_cache_", &tokenmill::write_kv_cache_); }
