// The small per-layer steps of a decode step on CPU, each one call instead of a chain of
// PyTorch ops: RMSNorm (with the residual add), silu * up, rotary embedding, and attention of
// one new token against the KV cache. Loops over 16-float vectors on AVX-512 (widths that are
// multiples of 16), with the same roundings as the scalar code.
#include "cpu_decode.h"

namespace llmquant_cpu {
namespace {

// transformers' LlamaRMSNorm: normalize in float32, round to the input dtype, times the weight.
// With `delta`, first x += delta (rounded to x's dtype, as `x = x + delta`), in place.
template <typename T>
void rms_norm_rows(T* x, const T* delta, const T* w, T* out, int64_t rows, int64_t h, float eps) {
  at::parallel_for(0, rows, work_grain(h, 64), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* xr = x + r * h;
      T* outr = out + r * h;
      const T* dr = delta ? delta + r * h : nullptr;
#if LLMQUANT_VNNI
      if (h % 16 == 0) {
        __m512 ss = _mm512_setzero_ps();
        for (int64_t i = 0; i < h; i += 16) {
          __m512 v = load16(xr + i);
          if (dr) {
            v = round16(_mm512_add_ps(v, load16(dr + i)), xr);
            store16(xr + i, v);
          }
          ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(h) + eps));
        for (int64_t i = 0; i < h; i += 16)
          store16(outr + i, _mm512_mul_ps(load16(w + i), round16(_mm512_mul_ps(load16(xr + i), inv), xr)));
        continue;
      }
#endif
      float ss = 0.f;
      for (int64_t i = 0; i < h; ++i) {
        if (dr) xr[i] = static_cast<T>(to_float(xr[i]) + to_float(dr[i]));
        ss += to_float(xr[i]) * to_float(xr[i]);
      }
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
      for (int64_t i = 0; i < h; ++i)
        outr[i] = static_cast<T>(to_float(w[i]) * to_float(static_cast<T>(to_float(xr[i]) * inv)));
    }
  });
}

}  // namespace

at::Tensor norm_impl(at::Tensor& x, const at::Tensor* delta, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && weight.scalar_type() == x.scalar_type() && weight.numel() == x.size(-1) &&
              weight.is_contiguous() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "rms_norm wants a contiguous float32/bfloat16 input and a weight of its dtype");
  TORCH_CHECK(!delta || (delta->sizes() == x.sizes() && delta->scalar_type() == x.scalar_type() &&
                         delta->is_contiguous()), "add_rms_norm_ wants delta shaped like x");
  at::Tensor out = at::empty_like(x);
  const int64_t h = x.size(-1), rows = x.numel() / h;
  if (x.scalar_type() == at::kBFloat16)
    rms_norm_rows<c10::BFloat16>(x.data_ptr<c10::BFloat16>(), delta ? delta->data_ptr<c10::BFloat16>() : nullptr,
                                 weight.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, h,
                                 static_cast<float>(eps));
  else
    rms_norm_rows<float>(x.data_ptr<float>(), delta ? delta->data_ptr<float>() : nullptr, weight.data_ptr<float>(),
                         out.data_ptr<float>(), rows, h, static_cast<float>(eps));
  return out;
}

at::Tensor rms_norm(at::Tensor x, const at::Tensor& weight, double eps) { return norm_impl(x, nullptr, weight, eps); }

// x += delta, then rms_norm(x): the residual add and the next norm of a layer in one pass.
at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps) {
  return norm_impl(x, &delta, weight, eps);
}

// silu(gate) * up for gate_up = cat(gate, up) on the last dimension; silu rounded to the
// dtype first, as transformers' act_fn(gate) * up.
namespace {
template <typename T>
void silu_mul_rows(const T* gu, T* out, int64_t rows, int64_t inter) {
  at::parallel_for(0, rows, work_grain(inter, 16), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* g = gu + r * 2 * inter;
      const T* u = g + inter;
      int64_t i = 0;
#if LLMQUANT_VNNI
      for (; i + 16 <= inter; i += 16) {
        const __m512 gv = load16(g + i);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        const __m512 act = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e));
        store16(out + r * inter + i, _mm512_mul_ps(round16(act, g), load16(u + i)));
      }
#endif
      for (; i < inter; ++i) {
        const float gv = to_float(g[i]);
        const T act = static_cast<T>(gv / (1.f + std::exp(-gv)));
        out[r * inter + i] = static_cast<T>(to_float(act) * to_float(u[i]));
      }
    }
  });
}
}  // namespace

at::Tensor silu_mul(const at::Tensor& gate_up) {
  TORCH_CHECK(gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0, "silu_mul wants a contiguous (.., 2I) input");
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  const int64_t inter = shape.back() / 2, rows = gate_up.numel() / shape.back();
  shape.back() = inter;
  at::Tensor out = at::empty(shape, gate_up.options());
  if (gate_up.scalar_type() == at::kBFloat16)
    silu_mul_rows<c10::BFloat16>(gate_up.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, inter);
  else
    silu_mul_rows<float>(gate_up.data_ptr<float>(), out.data_ptr<float>(), rows, inter);
  return out;
}

// Rotary embedding in place on a fused q/k/v projection output (rows, (H + 2 KVH) * D): the
// first `rotated_heads` (= H + KVH) heads of each row are rotated (rotate-half convention) with
// that row's cos/sin (rows, D); the value heads are left alone.
namespace {
template <typename T>
void rope_rows(T* qkv, const T* cos, const T* sin, int64_t rows, int64_t width, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  at::parallel_for(0, rows, work_grain(heads * d, 8), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* c = cos + r * d;
      const T* s = sin + r * d;
      for (int64_t hd = 0; hd < heads; ++hd) {
        T* x = qkv + r * width + hd * d;
        for (int64_t i = 0; i < half; ++i) {
          const float a = to_float(x[i]), b = to_float(x[i + half]);
          x[i] = static_cast<T>(a * to_float(c[i]) - b * to_float(s[i]));
          x[i + half] = static_cast<T>(b * to_float(c[i + half]) + a * to_float(s[i + half]));
        }
      }
    }
  });
}
}  // namespace

void rope_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t rotated_heads, int64_t head_dim) {
  const int64_t width = qkv.size(-1), rows = qkv.numel() / width;
  TORCH_CHECK(qkv.is_contiguous() && cos.is_contiguous() && sin.is_contiguous() && cos.numel() == rows * head_dim &&
              sin.numel() == cos.numel() && cos.scalar_type() == qkv.scalar_type() &&
              sin.scalar_type() == qkv.scalar_type() && rotated_heads * head_dim <= width && head_dim % 2 == 0,
              "rope_ wants contiguous qkv (rows, width) and cos/sin (rows, head_dim) of its dtype");
  if (qkv.scalar_type() == at::kBFloat16)
    rope_rows<c10::BFloat16>(qkv.data_ptr<c10::BFloat16>(), cos.data_ptr<c10::BFloat16>(),
                             sin.data_ptr<c10::BFloat16>(), rows, width, rotated_heads, head_dim);
  else
    rope_rows<float>(qkv.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), rows, width,
                     rotated_heads, head_dim);
}

// One query token per row attending to its cached keys: q (B, H, D); keys/values (B, KVH, L, D)
// with any strides in the first three dimensions (the cache's views of its buffers); mask
// (B, L) bool or None (key j of row b visible when mask[b, j]). Scores and softmax in float32.
//
// Work is split by (row, kv head): the query heads that share a kv head (grouped-query
// attention) read each cached key and value once between them, in chunks that fit registers.
namespace {

struct AttentionShape {
  int64_t batch, heads, kv_heads, length, d, q_stride;
  int64_t ks0, ks1, ks2, vs0, vs1, vs2;
};

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// Softmax numerators in place (masked keys exactly 0); returns their sum.
float exp_scores(float* sc, int64_t length, float best) {
  int64_t t = 0;
  float total = 0.f;
#if LLMQUANT_VNNI
  const __m512 best_v = _mm512_set1_ps(best), neg_inf = _mm512_set1_ps(NEG_INF);
  __m512 total_v = _mm512_setzero_ps();
  for (; t + 16 <= length; t += 16) {
    const __m512 s = _mm512_loadu_ps(sc + t);
    const __m512 p = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, neg_inf, _CMP_NEQ_OQ), exp16(_mm512_sub_ps(s, best_v)));
    _mm512_storeu_ps(sc + t, p);
    total_v = _mm512_add_ps(total_v, p);
  }
  total = _mm512_reduce_add_ps(total_v);
#endif
  for (; t < length; ++t) {
    sc[t] = sc[t] == NEG_INF ? 0.f : std::exp(sc[t] - best);
    total += sc[t];
  }
  return total;
}

#if LLMQUANT_VNNI
constexpr int64_t VECTOR_REGS = 16;  // query vectors of one chunk of heads, and as many accumulators

// Heads h0 .. h0 + count - 1 of row b (all on kv head kvh); d % 16 == 0, count * d / 16 <= 16.
// NV_T / COUNT_T, when not 0, fix d / 16 and count at compile time: the loops unroll and the
// query vectors and accumulators live in registers (with runtime bounds they go through the
// stack, which measured 5x slower).
template <typename T, int NV_T, int COUNT_T>
void attend_vector(const T* q, const T* kp, const T* vp, const bool* mask, T* out, const AttentionShape& a,
                   int64_t b, int64_t kvh, int64_t h0, int64_t count_arg, std::vector<float>& sc) {
  const int64_t nv = NV_T ? NV_T : a.d / 16, count = COUNT_T ? COUNT_T : count_arg, length = a.length;
  const float scale = 1.f / std::sqrt(static_cast<float>(a.d));
  __m512 qv[VECTOR_REGS], av[VECTOR_REGS];
  for (int64_t g = 0; g < count; ++g)
    for (int64_t j = 0; j < nv; ++j) {
      qv[g * nv + j] = _mm512_mul_ps(load16(q + b * a.q_stride + (h0 + g) * a.d + j * 16), _mm512_set1_ps(scale));
      av[g * nv + j] = _mm512_setzero_ps();
    }
  const T* kbase = kp + b * a.ks0 + kvh * a.ks1;
  const T* vbase = vp + b * a.vs0 + kvh * a.vs1;
  const bool* mrow = mask ? mask + b * length : nullptr;
  float best[VECTOR_REGS];
  for (int64_t g = 0; g < count; ++g) best[g] = NEG_INF;
  for (int64_t t = 0; t < length; ++t) {
    if (mrow && !mrow[t]) {
      for (int64_t g = 0; g < count; ++g) sc[g * length + t] = NEG_INF;
      continue;
    }
    const T* kr = kbase + t * a.ks2;
    __m512 kv[VECTOR_REGS];
    for (int64_t j = 0; j < nv; ++j) kv[j] = load16(kr + j * 16);
    for (int64_t g = 0; g < count; ++g) {
      __m512 s = _mm512_mul_ps(qv[g * nv], kv[0]);
      for (int64_t j = 1; j < nv; ++j) s = _mm512_fmadd_ps(qv[g * nv + j], kv[j], s);
      sc[g * length + t] = _mm512_reduce_add_ps(s);
    }
  }
  float inv[VECTOR_REGS];
  for (int64_t g = 0; g < count; ++g) {
    for (int64_t t = 0; t < length; ++t) best[g] = std::max(best[g], sc[g * length + t]);
    const float total = exp_scores(sc.data() + g * length, length, best[g]);
    inv[g] = total > 0.f ? 1.f / total : 0.f;
  }
  for (int64_t t = 0; t < length; ++t) {
    if (mrow && !mrow[t]) continue;
    const T* vr = vbase + t * a.vs2;
    __m512 vv[VECTOR_REGS];
    for (int64_t j = 0; j < nv; ++j) vv[j] = load16(vr + j * 16);
    for (int64_t g = 0; g < count; ++g) {
      const __m512 p = _mm512_set1_ps(sc[g * length + t]);
      for (int64_t j = 0; j < nv; ++j) av[g * nv + j] = _mm512_fmadd_ps(p, vv[j], av[g * nv + j]);
    }
  }
  for (int64_t g = 0; g < count; ++g)
    for (int64_t j = 0; j < nv; ++j)
      store16(out + (b * a.heads + h0 + g) * a.d + j * 16, _mm512_mul_ps(av[g * nv + j], _mm512_set1_ps(inv[g])));
}
#endif

// One head, any head_dim: plain loops.
template <typename T>
void attend_scalar(const T* q, const T* kp, const T* vp, const bool* mask, T* out, const AttentionShape& a,
                   int64_t b, int64_t kvh, int64_t h, std::vector<float>& sc) {
  const int64_t d = a.d, length = a.length;
  const float scale = 1.f / std::sqrt(static_cast<float>(d));
  std::vector<float> qf(d), acc(d, 0.f);
  for (int64_t j = 0; j < d; ++j) qf[j] = to_float(q[b * a.q_stride + h * d + j]) * scale;
  const bool* mrow = mask ? mask + b * length : nullptr;
  float best = NEG_INF;
  for (int64_t t = 0; t < length; ++t) {
    if (mrow && !mrow[t]) {
      sc[t] = NEG_INF;
      continue;
    }
    const T* kr = kp + b * a.ks0 + kvh * a.ks1 + t * a.ks2;
    float s = 0.f;
    for (int64_t j = 0; j < d; ++j) s += qf[j] * to_float(kr[j]);
    sc[t] = s;
    best = std::max(best, s);
  }
  const float total = exp_scores(sc.data(), length, best);
  for (int64_t t = 0; t < length; ++t) {
    if (sc[t] == 0.f) continue;
    const T* vr = vp + b * a.vs0 + kvh * a.vs1 + t * a.vs2;
    for (int64_t j = 0; j < d; ++j) acc[j] += sc[t] * to_float(vr[j]);
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int64_t j = 0; j < d; ++j) out[(b * a.heads + h) * d + j] = static_cast<T>(acc[j] * inv);
}

template <typename T>
void decode_attention_rows(const T* q, const at::Tensor& keys, const at::Tensor& values, const bool* mask, T* out,
                           const AttentionShape& a) {
  const T* kp = keys.data_ptr<T>();
  const T* vp = values.data_ptr<T>();
  const int64_t group = a.heads / a.kv_heads;
  // Short contexts are a few microseconds of work: waking the other threads costs more.
  const int64_t tasks = a.batch * a.kv_heads;
  const int64_t grain = a.heads * a.length < 8192 ? tasks : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t i0, int64_t i1) {
    std::vector<float> sc(a.length * group);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / a.kv_heads, kvh = i % a.kv_heads;
#if LLMQUANT_VNNI
      if (a.d % 16 == 0 && a.d / 16 <= VECTOR_REGS) {
        const int64_t chunk = VECTOR_REGS / (a.d / 16);
        for (int64_t g0 = 0; g0 < group; g0 += chunk) {
          const int64_t count = std::min(chunk, group - g0), h0 = kvh * group + g0, key = a.d / 16 * 10 + count;
          switch (key) {  // the common head sizes (64, 128) and group chunks, unrolled
            case 41: attend_vector<T, 4, 1>(q, kp, vp, mask, out, a, b, kvh, h0, count, sc); break;
            case 42: attend_vector<T, 4, 2>(q, kp, vp, mask, out, a, b, kvh, h0, count, sc); break;
            case 43: attend_vector<T, 4, 3>(q, kp, vp, mask, out, a, b, kvh, h0, count, sc); break;
            case 44: attend_vector<T, 4, 4>(q, kp, vp, mask, out, a, b, kvh, h0, count, sc); break;
            case 81: attend_vector<T, 8, 1>(q, kp, vp, mask, out, a, b, kvh, h0, count, sc); break;
            case 82: attend_vector<T, 8, 2>(q, kp, vp, mask, out, a, b, kvh, h0, count, sc); break;
            default: attend_vector<T, 0, 0>(q, kp, vp, mask, out, a, b, kvh, h0, count, sc);
          }
        }
        continue;
      }
#endif
      for (int64_t g = 0; g < group; ++g) attend_scalar<T>(q, kp, vp, mask, out, a, b, kvh, kvh * group + g, sc);
    }
  });
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(q.dim() == 3 && keys.dim() == 4 && values.sizes() == keys.sizes() && q.stride(2) == 1 &&
              q.stride(1) == q.size(2) &&
              keys.stride(3) == 1 && values.stride(3) == 1 && keys.scalar_type() == q.scalar_type() &&
              values.scalar_type() == q.scalar_type() && q.size(0) == keys.size(0) && q.size(2) == keys.size(3) &&
              q.size(1) % keys.size(1) == 0, "decode_attention: q (B, H, D), keys/values (B, KVH, L, D)");
  const int64_t batch = q.size(0), heads = q.size(1), d = q.size(2), kv_heads = keys.size(1), length = keys.size(2);
  at::Tensor m;
  if (mask.has_value()) {
    m = mask->to(at::kBool).contiguous();
    TORCH_CHECK(m.dim() == 2 && m.size(0) == batch && m.size(1) == length, "decode_attention: mask (B, L)");
  }
  at::Tensor out = at::empty({batch, heads, d}, q.options());
  const bool* mp = m.defined() ? m.data_ptr<bool>() : nullptr;
  const AttentionShape shape{batch, heads, kv_heads, length, d, q.stride(0), keys.stride(0), keys.stride(1),
                             keys.stride(2), values.stride(0), values.stride(1), values.stride(2)};
  if (q.scalar_type() == at::kBFloat16)
    decode_attention_rows<c10::BFloat16>(q.data_ptr<c10::BFloat16>(), keys, values, mp, out.data_ptr<c10::BFloat16>(),
                                         shape);
  else
    decode_attention_rows<float>(q.data_ptr<float>(), keys, values, mp, out.data_ptr<float>(), shape);
  return out;
}

}  // namespace llmquant_cpu
