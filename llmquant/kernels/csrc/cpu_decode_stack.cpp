// A whole decode step of a Llama-shaped model for one sequence and one new token, in C++.
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

  at::Tensor forward(const at::Tensor& x) const {
    switch (kind) {
      case INT4:
        return int4_linear(x, *t[0], *t[1], t[2], t[3]);
      case INT8:
        return int8_linear(x, *t[0], *t[1], *t[2], t[3], activation_scales, static_scale);
      default:
        return t[1].has_value() ? at::linear(x, *t[0], *t[1]) : at::linear(x, *t[0]);
    }
  }
};

Projection make_projection(int64_t kind, std::vector<c10::optional<at::Tensor>> tensors, int64_t activation_scales,
                           double static_scale) {
  const size_t wanted = kind == INT4 || kind == INT8 ? 4 : kind == FLOAT ? 2 : 0;
  TORCH_CHECK(wanted && tensors.size() == wanted, "Projection: kind 0 (int4), 1 (int8) or 2 (float) with ",
              "4, 4 or 2 tensors");
  TORCH_CHECK(tensors[0].has_value() && (kind == FLOAT || tensors[1].has_value()) &&
              (kind != INT8 || tensors[2].has_value()), "Projection: missing weight tensors");
  return Projection{kind, std::move(tensors), activation_scales, static_scale};
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

  // x (1, 1, H): the new token's embedding, used as the residual stream (updated in place).
  // cos/sin (1, 1, D) at its position. keys/values: each layer's cache buffer (1, KVH, capacity,
  // D) holding `length` tokens; the new token's key/value go to column `length`. mask (1,
  // length + 1) or None: which cache columns hold tokens. Returns the final-normed hidden state.
  at::Tensor step(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const std::vector<at::Tensor>& keys,
                  const std::vector<at::Tensor>& values, int64_t length, const c10::optional<at::Tensor>& mask) {
    const int64_t n = static_cast<int64_t>(layers_.size());
    TORCH_CHECK(x.dim() == 3 && x.size(0) == 1 && x.size(1) == 1 && x.is_contiguous(), "step: x (1, 1, H)");
    TORCH_CHECK(static_cast<int64_t>(keys.size()) == n && static_cast<int64_t>(values.size()) == n,
                "step: one key and one value buffer per layer");
    const int64_t qw = heads_ * d_, kw = kv_heads_ * d_;
    c10::optional<at::Tensor> key_mask;
    if (mask.has_value()) key_mask = mask->to(at::kBool).contiguous();
    at::Tensor h = rms_norm(x, layers_[0].ln1, layers_[0].eps1);
    at::Tensor delta;
    for (int64_t i = 0; i < n; ++i) {
      const Layer& layer = layers_[i];
      if (i > 0) h = add_rms_norm_(x, delta, layer.ln1, layer.eps1);
      at::Tensor fused = layer.qkv.forward(h);  // (1, 1, qw + 2 kw)
      rope_(fused, cos, sin, heads_ + kv_heads_, d_);
      append(keys[i], fused, qw, length);
      append(values[i], fused, qw + kw, length);
      at::Tensor q = fused.view({1, qw + 2 * kw}).narrow(1, 0, qw).view({1, heads_, d_});
      at::Tensor att = decode_attention(q, keys[i].narrow(2, 0, length + 1), values[i].narrow(2, 0, length + 1),
                                        key_mask);
      h = add_rms_norm_(x, layer.o.forward(att.view({1, 1, qw})), layer.ln2, layer.eps2);
      delta = layer.down.forward(silu_mul(layer.gate_up.forward(h)));
    }
    x.add_(delta);
    return rms_norm(x, final_norm_, final_eps_);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  // The new token's kv_heads heads from `fused` (starting at column `start`) into column `at`.
  void append(const at::Tensor& buffer, const at::Tensor& fused, int64_t start, int64_t at) const {
    TORCH_CHECK(buffer.dim() == 4 && buffer.size(0) == 1 && buffer.size(1) == kv_heads_ && buffer.size(3) == d_ &&
                buffer.size(2) > at && buffer.stride(3) == 1 && buffer.scalar_type() == fused.scalar_type(),
                "step: cache buffer (1, KVH, capacity > length, D) of the model's dtype");
    const int64_t item = fused.element_size();
    const char* src = static_cast<const char*>(fused.data_ptr()) + start * item;
    char* dst = static_cast<char*>(buffer.data_ptr());
    for (int64_t hh = 0; hh < kv_heads_; ++hh)
      std::memcpy(dst + (hh * buffer.stride(1) + at * buffer.stride(2)) * item, src + hh * d_ * item, d_ * item);
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
