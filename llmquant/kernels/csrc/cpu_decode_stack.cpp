// A whole decode step of a Llama-shaped model, one new token for each row of a batch, in C++.
//
// At batch 1 a small model's step is ~10 ms of matmuls; driving its ~30 layers from Python
// (a dozen calls and views per layer) adds a quarter to that. DecodeStack holds each layer's
// tensors (the same storage the Python modules use: nothing is copied) and runs the layer loop
// here: RMSNorm with the residual add, the fused q/k/v projection, rotary embedding, the new
// key/value written into the cache buffer, attention, o_proj, and the MLP. It is built from the
// lean forward's own layers (serve/forward/cpu_backend.py, the lean forward's CPU backend), which
// also grows the cache buffers and exposes the new length afterwards.
//
// This file also defines the Python module of all the CPU decode kernels.
#include "cpu_decode.h"

#include <cstring>

namespace llmquant_cpu {

// One projection's one-row kernel and its tensors.
enum ProjectionKind : int64_t { INT4 = 0, INT8 = 1, FLOAT = 2 };

struct Projection {
  int64_t kind;
  std::vector<c10::optional<at::Tensor>> t;  // INT4: packed, scale, offset, bias; INT8: weight, scale,
                                             // wsum, bias; FLOAT: weight, bias (None where absent)
  int64_t activation_scales;
  double static_scale;
  std::vector<at::Tensor> amx;  // INT4 on an AMX CPU: the tile layout of int4_amx_pack (empty otherwise)

  at::Tensor forward(const at::Tensor& x) const {
    const int64_t rows = x.numel() / x.size(-1);
    switch (kind) {
      case INT4:
        // Two rows and up: one tile instruction serves 16 rows, so the batch costs about what one
        // row does; one row keeps the VNNI kernel, tuned for a single row's memory stream.
        if (!amx.empty() && rows > 1) return int4_linear_amx(x, amx[0], amx[1], amx[2], t[3]);
        return by_few_rows(x, [&](const at::Tensor& part) { return int4_linear(part, *t[0], *t[1], t[2], t[3]); });
      case INT8:
        return by_few_rows(x, [&](const at::Tensor& part) {
          return int8_linear(part, *t[0], *t[1], *t[2], t[3], activation_scales, static_scale);
        });
      default:
        return t[1].has_value() ? at::linear(x, *t[0], *t[1]) : at::linear(x, *t[0]);
    }
  }

 private:
  // The few-row kernels take up to MAX_ROWS rows: a larger batch goes MAX_ROWS rows at a time.
  template <typename F>
  static at::Tensor by_few_rows(const at::Tensor& x, F kernel) {
    const int64_t rows = x.numel() / x.size(-1);
    if (rows <= MAX_ROWS) return kernel(x);
    at::Tensor x2 = x.reshape({rows, x.size(-1)});
    std::vector<at::Tensor> parts;
    for (int64_t r = 0; r < rows; r += MAX_ROWS) parts.push_back(kernel(x2.narrow(0, r, std::min(MAX_ROWS, rows - r))));
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = parts[0].size(-1);
    return at::cat(parts).view(shape);
  }
};

Projection make_projection(int64_t kind, std::vector<c10::optional<at::Tensor>> tensors, int64_t activation_scales,
                           double static_scale) {
  const size_t wanted = kind == INT4 || kind == INT8 ? 4 : kind == FLOAT ? 2 : 0;
  TORCH_CHECK(wanted && tensors.size() == wanted, "Projection: kind 0 (int4), 1 (int8) or 2 (float) with ",
              "4, 4 or 2 tensors");
  TORCH_CHECK(tensors[0].has_value() && (kind == FLOAT || tensors[1].has_value()) &&
              (kind != INT8 || tensors[2].has_value()), "Projection: missing weight tensors");
  Projection p{kind, std::move(tensors), activation_scales, static_scale, {}};
  if (kind == INT4 && amx_ready() && p.t[0]->size(0) % 16 == 0) p.amx = int4_amx_pack(*p.t[0], *p.t[1], p.t[2]);
  return p;
}

struct Layer {
  at::Tensor ln1, ln2;
  double eps1, eps2;
  Projection qkv, o, gate_up, down;
};

class DecodeStack {
 public:
  DecodeStack(int64_t heads, int64_t kv_heads, int64_t head_dim, at::Tensor final_norm, double final_eps)
      : heads_(heads), kv_heads_(kv_heads), d_(head_dim), final_norm_(std::move(final_norm)), final_eps_(final_eps) {}

  void add_layer(at::Tensor ln1, double eps1, Projection qkv, Projection o, at::Tensor ln2, double eps2,
                 Projection gate_up, Projection down) {
    layers_.push_back(Layer{std::move(ln1), std::move(ln2), eps1, eps2, std::move(qkv), std::move(o),
                            std::move(gate_up), std::move(down)});
  }

  // x (B, 1, H): each row's new token's embedding, used as the residual stream (updated in
  // place). cos/sin (B, 1, D) at each row's position. keys/values: each layer's cache buffer (B,
  // KVH, capacity, D) holding `length` columns; the new keys/values go to column `length`. mask
  // (B, length + 1) or None: which cache columns hold tokens of the row (rows are left-padded).
  // Returns the final-normed hidden states (B, 1, H).
  at::Tensor step(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const std::vector<at::Tensor>& keys,
                  const std::vector<at::Tensor>& values, int64_t length, const c10::optional<at::Tensor>& mask) {
    const int64_t n = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.is_contiguous(), "step: x (B, 1, H)");
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == n && static_cast<int64_t>(values.size()) == n,
                "step: one key and one value buffer per layer");
    const int64_t batch = x.size(0), qw = heads_ * d_, kw = kv_heads_ * d_;
    c10::optional<at::Tensor> key_mask;
    if (mask.has_value()) key_mask = mask->to(at::kBool).contiguous();
    at::Tensor h = rms_norm(x, layers_[0].ln1, layers_[0].eps1);
    at::Tensor delta;
    for (int64_t i = 0; i < n; ++i) {
      const Layer& layer = layers_[i];
      if (i > 0) h = add_rms_norm_(x, delta, layer.ln1, layer.eps1);
      at::Tensor fused = layer.qkv.forward(h);  // (B, 1, qw + 2 kw)
      rope_(fused, cos, sin, heads_ + kv_heads_, d_);
      append(keys[i], fused, qw, length);
      append(values[i], fused, qw + kw, length);
      at::Tensor q = fused.view({batch, qw + 2 * kw}).narrow(1, 0, qw).view({batch, heads_, d_});
      at::Tensor att = decode_attention(q, keys[i].narrow(2, 0, length + 1), values[i].narrow(2, 0, length + 1),
                                        key_mask);
      h = add_rms_norm_(x, layer.o.forward(att.view({batch, 1, qw})), layer.ln2, layer.eps2);
      delta = layer.down.forward(silu_mul(layer.gate_up.forward(h)));
    }
    x.add_(delta);
    return rms_norm(x, final_norm_, final_eps_);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  // Each row's new kv_heads heads from `fused` (starting at column `start`) into column `at`.
  void append(const at::Tensor& buffer, const at::Tensor& fused, int64_t start, int64_t at) const {
    const int64_t batch = fused.size(0);
    TORCH_CHECK(buffer.dim() == 4 && buffer.size(0) == batch && buffer.size(1) == kv_heads_ && buffer.size(3) == d_ &&
                buffer.size(2) > at && buffer.stride(3) == 1 && buffer.scalar_type() == fused.scalar_type(),
                "step: cache buffer (B, KVH, capacity > length, D) of the model's dtype");
    const int64_t item = fused.element_size(), width = fused.size(-1);
    for (int64_t b = 0; b < batch; ++b) {
      const char* src = static_cast<const char*>(fused.data_ptr()) + (b * width + start) * item;
      char* dst = static_cast<char*>(buffer.data_ptr()) + b * buffer.stride(0) * item;
      for (int64_t hh = 0; hh < kv_heads_; ++hh)
        std::memcpy(dst + (hh * buffer.stride(1) + at * buffer.stride(2)) * item, src + hh * d_ * item, d_ * item);
    }
  }

  int64_t heads_, kv_heads_, d_;
  at::Tensor final_norm_;
  double final_eps_;
  std::vector<Layer> layers_;
};

bool fast_path() { return LLMQUANT_VNNI; }

}  // namespace llmquant_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace llmquant_cpu;
  // The long calls let go of the GIL: a server's other threads (HTTP, streaming) keep running
  // during a decode step instead of queueing behind it.
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("fast_path", &fast_path, "whether the AVX-512 VNNI kernels were compiled in");
  m.def("int4_linear", &int4_linear, "x @ W.T (+ bias) for 4-bit weights, up to 8 rows", release());
  m.def("int8_linear", &int8_linear, "x @ W.T (+ bias) for 8-bit per-row weights, up to 8 rows",
        py::arg("x"), py::arg("weight"), py::arg("scale"), py::arg("wsum"), py::arg("bias"),
        py::arg("activation_scales") = 0, py::arg("static_scale") = 0.0, release());
  m.def("amx_ready", &amx_ready, "whether the AMX tile kernels run here (compiled in, and granted by the OS)");
  m.def("int4_amx_pack", &int4_amx_pack, "4-bit weights in the AMX tile layout: [packed, scale, offset]");
  m.def("int4_linear_amx", &int4_linear_amx, "x @ W.T (+ bias) for 4-bit weights on AMX tiles, any rows",
        release());
  m.def("int4_dequantize", &int4_dequantize, "4-bit weights from the few-row layout as a float matrix (N, K)",
        release());
  m.def("int8_amx_pack", &int8_amx_pack, "8-bit weights in the bf16 AMX tile order");
  m.def("int8_linear_amx", &int8_linear_amx, "x @ W.T (+ bias), 8-bit per-row weights, bf16 activations on AMX "
        "tiles, float32 out, any rows", release());
  m.def("int8_linear_float", &int8_linear_float, "x @ W.T (+ bias), 8-bit per-row weights, float activations",
        release());
  m.def("rms_norm", &rms_norm, "LlamaRMSNorm");
  m.def("add_rms_norm_", &add_rms_norm_, "x += delta; return rms_norm(x)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up of cat(gate, up)");
  m.def("rope_", &rope_, "rotary embedding in place on fused q/k/v rows");
  m.def("decode_attention", &decode_attention, "one query per row against its cached keys/values");
  py::class_<Projection>(m, "Projection");
  m.def("projection", &make_projection, "a projection's kernel: kind INT4/INT8/FLOAT and its tensors",
        py::arg("kind"), py::arg("tensors"), py::arg("activation_scales") = 0, py::arg("static_scale") = 0.0);
  py::class_<DecodeStack>(m, "DecodeStack")
      .def(py::init<int64_t, int64_t, int64_t, at::Tensor, double>())
      .def("add_layer", &DecodeStack::add_layer)
      .def("step", &DecodeStack::step, release())
      .def("num_layers", &DecodeStack::num_layers);
  m.attr("BLOCK") = BLOCK;
  m.attr("MAX_ROWS") = MAX_ROWS;
  m.attr("PER_BLOCK") = static_cast<int64_t>(PER_BLOCK);
  m.attr("PER_ROW") = static_cast<int64_t>(PER_ROW);
  m.attr("STATIC") = static_cast<int64_t>(STATIC);
  m.attr("INT4") = static_cast<int64_t>(INT4);
  m.attr("INT8") = static_cast<int64_t>(INT8);
  m.attr("FLOAT") = static_cast<int64_t>(FLOAT);
}
