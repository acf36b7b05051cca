// Few-row matmuls of quantized layers for decoding on CPU.
//
// Built on the user's machine at first use (cpu_ext.py, torch.utils.cpp_extension) with
// -march=native, so the AVX-512 VNNI paths are compiled exactly where the CPU has them;
// elsewhere the portable loops below compute the same numbers, and Python keeps torch's own
// kernels (cpu_ext.fast() tells which).
//
// Quantized matmuls follow llama.cpp's recipe for few rows: activations are rounded to int8
// per block of 64 values (one float scale per block), and each block's dot product with the
// weights is an integer dot product (vpdpbusd: 64 multiply-adds in one instruction), scaled
// once per block. Weights stay in their quantized form: 4-bit values two per byte, 8-bit values
// as bytes.
#include "cpu_decode.h"

namespace llmquant_cpu {
namespace {

// ---- activations to int8 --------------------------------------------------------------------

struct QuantizedRows {
  std::vector<int8_t> q;      // (M, K) signed values
  std::vector<uint8_t> u;     // (M, K) q + 128, for kernels whose weights are the signed operand
  std::vector<float> scale;   // (M, K / 64)
  std::vector<int32_t> sum;   // (M, K / 64) sum of q per block
};

// How activations get their int8 scales: one per 64-value block (weight-only schemes, where
// this rounding is the kernel's own approximation, as in llama.cpp), one per row (the scheme's
// dynamic per-token activations: the same numbers as compressed-tensors), or one given static
// per-tensor scale. Values are divided by the scale and rounded half to even, as torch.round.

template <typename T>
QuantizedRows quantize_rows(const T* x, int64_t rows, int64_t k, bool unsigned_copy, int64_t mode,
                            double static_scale) {
  const int64_t blocks = k / BLOCK;
  QuantizedRows out;
  out.q.resize(rows * k);
  out.scale.resize(rows * blocks);
  out.sum.resize(rows * blocks);
  if (unsigned_copy) out.u.resize(rows * k);
  std::vector<float> v(k);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t i = 0; i < k; ++i) v[i] = to_float(x[m * k + i]);
    float row_scale = static_cast<float>(static_scale);
    if (mode == PER_ROW) {
      float amax = 0.f;
      for (int64_t i = 0; i < k; ++i) amax = std::max(amax, std::fabs(v[i]));
      row_scale = amax > 0.f ? amax / 127.f : 1.f;
    }
    for (int64_t b = 0; b < blocks; ++b) {
      const float* src = v.data() + b * BLOCK;
      float scale = row_scale;
      if (mode == PER_BLOCK) {
        float amax = 0.f;
        for (int64_t i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(src[i]));
        scale = amax > 0.f ? amax / 127.f : 1.f;
      }
      int8_t* dst = out.q.data() + m * k + b * BLOCK;
      int32_t total = 0;
      for (int64_t i = 0; i < BLOCK; ++i) {
        const float r = std::min(127.f, std::max(-128.f, std::nearbyint(src[i] / scale)));
        dst[i] = static_cast<int8_t>(r);
        total += static_cast<int32_t>(r);
      }
      if (unsigned_copy) {
        uint8_t* udst = out.u.data() + m * k + b * BLOCK;
        for (int64_t i = 0; i < BLOCK; ++i) udst[i] = static_cast<uint8_t>(dst[i] + 128);
      }
      out.scale[m * blocks + b] = scale;
      out.sum[m * blocks + b] = total;
    }
  }
  return out;
}

#if LLMQUANT_VNNI
// 32 bytes holding 64 4-bit values (byte j: value j in the low nibble, value j + 32 in the high
// one) as 64 unsigned bytes in order.
inline __m512i unpack_nibbles(const uint8_t* p) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(bytes, mask);
  const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask);
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
}
#endif

void check_rows(const at::Tensor& x2) {
  TORCH_CHECK(x2.size(0) <= MAX_ROWS, "few-row kernel called with ", x2.size(0), " rows");
  TORCH_CHECK(x2.size(1) % BLOCK == 0, "in_features must be a multiple of ", BLOCK);
  TORCH_CHECK(x2.scalar_type() == at::kFloat || x2.scalar_type() == at::kBFloat16,
              "activations must be float32 or bfloat16");
}

// A few-row matmul's operands: x as (M, K) rows, the bias in x's dtype (undefined if none), and
// the output (..., N) in x's dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor> matmul_io(const at::Tensor& x, int64_t n_out,
                                                         const c10::optional<at::Tensor>& bias) {
  at::Tensor x2 = x.reshape({-1, x.size(-1)}).contiguous();
  check_rows(x2);
  at::Tensor b = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n_out;
  return {x2, b, at::empty(shape, x.options())};
}

template <typename T>
QuantizedRows quantize_input(const at::Tensor& x2, bool unsigned_copy, int64_t mode = PER_BLOCK,
                             double static_scale = 0.0) {
  TORCH_CHECK(mode == PER_BLOCK || mode == PER_ROW || (mode == STATIC && static_scale > 0.0),
              "activation scales: per block, per row, or a positive static scale");
  return quantize_rows<T>(x2.data_ptr<T>(), x2.size(0), x2.size(1), unsigned_copy, mode, static_scale);
}

// ---- 4-bit weights ----------------------------------------------------------------------------
// packed (N, K/64, 32) uint8: unsigned values u = q + 8 in [0, 15] (layout of unpack_nibbles);
// scale (N, K/64) float32 or bfloat16 (a checkpoint's bf16 scales as they are: half the bytes);
// offset (N, K/64) int32 or None: w = (u - offset) * scale per 64-value block, offset 8 + zero
// point for asymmetric weights, 8 when None. The offset term, offset * sum(activations), is
// integer too: it starts the block's dot product, so it costs no extra instruction.

template <typename S>
struct Int4Weights {
  const uint8_t* packed;
  const S* scale;
  const int32_t* offset;  // nullptr: symmetric (8)
};

#if LLMQUANT_VNNI
// Weights are read once per token, from memory, never from cache: ask for the bytes
// PREFETCH_DISTANCE ahead of a tile as it starts, so the loads are in flight before the hardware
// prefetcher has seen enough misses to start (it restarts at every call and every 4 KiB page).
constexpr int64_t PREFETCH_DISTANCE = 2048;  // measured best of 512-4096 on a 2-core AVX-512 VM
inline void prefetch_ahead(const void* start, int64_t bytes) {
  const char* p = static_cast<const char*>(start) + PREFETCH_DISTANCE;
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(p + off, _MM_HINT_T0);
}

// One activation row against R weight rows at once: R independent accumulator chains keep the
// core busy (a single row's chain of 9-24 blocks is mostly latency).
template <int R, typename T, typename S>
inline void int4_tile_one_row(const QuantizedRows& a, int64_t blocks, const Int4Weights<S>& w, const T* bias,
                              T* out, int64_t n) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  prefetch_ahead(w.packed + n * blocks * 32, R * blocks * 32);
  prefetch_ahead(w.scale + n * blocks, R * blocks * sizeof(S));
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512i x = _mm512_loadu_si512(a.q.data() + b * BLOCK);
    const float fa = a.scale[b];
    const int32_t asum = a.sum[b];
    const __m512i sym_start = _mm512_maskz_set1_epi32(1, -8 * asum);
    for (int r = 0; r < R; ++r) {
      const int64_t i = (n + r) * blocks + b;
      const __m512i start = w.offset ? _mm512_maskz_set1_epi32(1, -w.offset[i] * asum) : sym_start;
      const __m512i dot = _mm512_dpbusd_epi32(start, unpack_nibbles(w.packed + i * 32), x);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(to_float(w.scale[i]) * fa), acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float y = _mm512_reduce_add_ps(acc[r]);
    if (bias) y += to_float(bias[n + r]);
    out[n + r] = static_cast<T>(y);
  }
}
#endif

#if LLMQUANT_VNNI
// M activation rows (2..8, unrolled) against one weight row: each weight block is unpacked once.
template <int M, typename T, typename S>
inline void int4_tile_rows(const QuantizedRows& a, int64_t k, const Int4Weights<S>& w, const T* bias, T* out,
                           int64_t n, int64_t n_out) {
  const int64_t blocks = k / BLOCK;
  __m512 acc[M];
  for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
  prefetch_ahead(w.packed + n * blocks * 32, blocks * 32);
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t i = n * blocks + b;
    const __m512i wv = unpack_nibbles(w.packed + i * 32);
    const float ws = to_float(w.scale[i]);
    const int32_t offset = w.offset ? w.offset[i] : 8;
    for (int m = 0; m < M; ++m) {
      const __m512i start = _mm512_maskz_set1_epi32(1, -offset * a.sum[m * blocks + b]);
      const __m512i dot = _mm512_dpbusd_epi32(start, wv, _mm512_loadu_si512(a.q.data() + m * k + b * BLOCK));
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(ws * a.scale[m * blocks + b]), acc[m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    float y = _mm512_reduce_add_ps(acc[m]);
    if (bias) y += to_float(bias[n]);
    out[m * n_out + n] = static_cast<T>(y);
  }
}

template <int M, typename T, typename S>
void int4_rows_of(const QuantizedRows& a, int64_t k, const Int4Weights<S>& w, const T* bias, T* out, int64_t n0,
                  int64_t n1, int64_t n_out) {
  for (int64_t n = n0; n < n1; ++n) int4_tile_rows<M, T, S>(a, k, w, bias, out, n, n_out);
}
#endif

template <typename T, typename S>
void int4_rows(const QuantizedRows& a, int64_t rows, int64_t k, const Int4Weights<S>& w, const T* bias, T* out,
               int64_t n_out) {
  const int64_t blocks = k / BLOCK;
  at::parallel_for(0, n_out, work_grain(rows * k, 16), [&](int64_t n0, int64_t n1) {
#if LLMQUANT_VNNI
    if (rows == 1) {
      prefetch_ahead(w.packed + n0 * blocks * 32 - PREFETCH_DISTANCE, PREFETCH_DISTANCE);  // the lead-in
      prefetch_ahead(w.scale + n0 * blocks - PREFETCH_DISTANCE / sizeof(S), PREFETCH_DISTANCE / 8);
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) int4_tile_one_row<4, T, S>(a, blocks, w, bias, out, n);
      for (; n < n1; ++n) int4_tile_one_row<1, T, S>(a, blocks, w, bias, out, n);
      return;
    }
    switch (rows) {
      case 2: return int4_rows_of<2, T, S>(a, k, w, bias, out, n0, n1, n_out);
      case 3: return int4_rows_of<3, T, S>(a, k, w, bias, out, n0, n1, n_out);
      case 4: return int4_rows_of<4, T, S>(a, k, w, bias, out, n0, n1, n_out);
      case 5: return int4_rows_of<5, T, S>(a, k, w, bias, out, n0, n1, n_out);
      case 6: return int4_rows_of<6, T, S>(a, k, w, bias, out, n0, n1, n_out);
      case 7: return int4_rows_of<7, T, S>(a, k, w, bias, out, n0, n1, n_out);
      case 8: return int4_rows_of<8, T, S>(a, k, w, bias, out, n0, n1, n_out);
      default: break;
    }
#endif
    for (int64_t n = n0; n < n1; ++n) {
      float acc[MAX_ROWS] = {0};
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t i = n * blocks + b;
        const uint8_t* wb = w.packed + i * 32;
        const int32_t offset = w.offset ? w.offset[i] : 8;
        for (int64_t m = 0; m < rows; ++m) {
          const int8_t* x = a.q.data() + m * k + b * BLOCK;
          int32_t dot = -offset * a.sum[m * blocks + b];
#if LLMQUANT_VNNI
          dot = _mm512_reduce_add_epi32(_mm512_dpbusd_epi32(_mm512_maskz_set1_epi32(1, dot), unpack_nibbles(wb),
                                                            _mm512_loadu_si512(x)));
#else
          for (int64_t j = 0; j < 32; ++j) dot += (wb[j] & 0x0F) * x[j] + (wb[j] >> 4) * x[j + 32];
#endif
          acc[m] += to_float(w.scale[i]) * a.scale[m * blocks + b] * static_cast<float>(dot);
        }
      }
      for (int64_t m = 0; m < rows; ++m) {
        float y = acc[m];
        if (bias) y += to_float(bias[n]);
        out[m * n_out + n] = static_cast<T>(y);
      }
    }
  });
}

template <typename T>
void int4_dispatch(const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& offset, const at::Tensor& bias, at::Tensor& out) {
  const int64_t rows = x2.size(0), k = x2.size(1), n_out = packed.size(0);
  auto a = quantize_input<T>(x2, false);
  const int32_t* off = offset.has_value() ? offset->data_ptr<int32_t>() : nullptr;
  const T* b = bias.defined() ? bias.data_ptr<T>() : nullptr;
  if (scale.scalar_type() == at::kBFloat16) {
    Int4Weights<c10::BFloat16> w{packed.data_ptr<uint8_t>(), scale.data_ptr<c10::BFloat16>(), off};
    int4_rows<T, c10::BFloat16>(a, rows, k, w, b, out.data_ptr<T>(), n_out);
  } else {
    Int4Weights<float> w{packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), off};
    int4_rows<T, float>(a, rows, k, w, b, out.data_ptr<T>(), n_out);
  }
}

}  // namespace

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias) {
  const int64_t k = x.size(-1), n_out = packed.size(0);
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) * BLOCK == k && packed.size(2) == 32 &&
              packed.scalar_type() == at::kByte && packed.is_contiguous(), "bad packed 4-bit weight");
  TORCH_CHECK((scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16) && scale.is_contiguous() &&
              scale.numel() == n_out * (k / BLOCK), "bad 4-bit scales");
  TORCH_CHECK(!offset.has_value() || (offset->scalar_type() == at::kInt && offset->is_contiguous() &&
                                      offset->numel() == scale.numel()), "bad 4-bit offsets");
  auto [x2, b, out] = matmul_io(x, n_out, bias);
  if (x.scalar_type() == at::kBFloat16)
    int4_dispatch<c10::BFloat16>(x2, packed, scale, offset, b, out);
  else
    int4_dispatch<float>(x2, packed, scale, offset, b, out);
  return out;
}

namespace {
// ---- 8-bit weights ----------------------------------------------------------------------------
// weight (N, K) int8 with a per-row scale (N,) float: w = q * scale. wsum (N, K/64) int32 holds
// each block's sum of q: the integer dot product runs on unsigned activations (q + 128), and
// 128 * wsum takes that shift back out.

#if LLMQUANT_VNNI
template <int R, typename T>
inline void int8_tile_one_row(const QuantizedRows& a, int64_t k, const int8_t* weight, const float* scale,
                              const int32_t* wsum, const T* bias, T* out, int64_t n) {
  const int64_t blocks = k / BLOCK;
  __m512 acc[R];
  float corr[R];
  for (int r = 0; r < R; ++r) {
    acc[r] = _mm512_setzero_ps();
    corr[r] = 0.f;
  }
  prefetch_ahead(weight + n * k, R * k);
  for (int64_t b = 0; b < blocks; ++b) {
    const __m512i x = _mm512_loadu_si512(a.u.data() + b * BLOCK);
    const float fa = a.scale[b];
    const __m512 f = _mm512_set1_ps(fa);
    for (int r = 0; r < R; ++r) {
      const __m512i w = _mm512_loadu_si512(weight + (n + r) * k + b * BLOCK);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x, w);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), f, acc[r]);
      corr[r] += fa * 128.f * static_cast<float>(wsum[(n + r) * blocks + b]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float y = (_mm512_reduce_add_ps(acc[r]) - corr[r]) * scale[n + r];
    if (bias) y += to_float(bias[n + r]);
    out[n + r] = static_cast<T>(y);
  }
}
#endif

template <typename T>
void int8_rows(const QuantizedRows& a, int64_t rows, int64_t k, const int8_t* weight, const float* scale,
               const int32_t* wsum, const T* bias, T* out, int64_t n_out) {
  const int64_t blocks = k / BLOCK;
  at::parallel_for(0, n_out, work_grain(rows * k, 16), [&](int64_t n0, int64_t n1) {
#if LLMQUANT_VNNI
    if (rows == 1) {
      prefetch_ahead(weight + n0 * k - PREFETCH_DISTANCE, PREFETCH_DISTANCE);  // the lead-in
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) int8_tile_one_row<4, T>(a, k, weight, scale, wsum, bias, out, n);
      for (; n < n1; ++n) int8_tile_one_row<1, T>(a, k, weight, scale, wsum, bias, out, n);
      return;
    }
#endif
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wrow = weight + n * k;
      const int32_t* ws = wsum + n * blocks;
      float corr[MAX_ROWS] = {0};
#if LLMQUANT_VNNI
      __m512 acc[MAX_ROWS];
      for (int64_t m = 0; m < rows; ++m) acc[m] = _mm512_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        const __m512i w = _mm512_loadu_si512(wrow + b * BLOCK);
        for (int64_t m = 0; m < rows; ++m) {
          const __m512i x = _mm512_loadu_si512(a.u.data() + m * k + b * BLOCK);
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), x, w);
          const float f = a.scale[m * blocks + b];
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_set1_ps(f), acc[m]);
          corr[m] += f * 128.f * static_cast<float>(ws[b]);
        }
      }
      for (int64_t m = 0; m < rows; ++m) {
        float y = (_mm512_reduce_add_ps(acc[m]) - corr[m]) * scale[n];
        if (bias) y += to_float(bias[n]);
        out[m * n_out + n] = static_cast<T>(y);
      }
#else
      float acc[MAX_ROWS] = {0};
      for (int64_t b = 0; b < blocks; ++b) {
        for (int64_t m = 0; m < rows; ++m) {
          const int8_t* x = a.q.data() + m * k + b * BLOCK;
          int32_t dot = 0;
          for (int64_t j = 0; j < BLOCK; ++j) dot += wrow[b * BLOCK + j] * x[j];
          acc[m] += a.scale[m * blocks + b] * static_cast<float>(dot);
        }
      }
      for (int64_t m = 0; m < rows; ++m) {
        float y = acc[m] * scale[n];
        if (bias) y += to_float(bias[n]);
        out[m * n_out + n] = static_cast<T>(y);
      }
#endif
    }
  });
}

}  // namespace

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& wsum, const c10::optional<at::Tensor>& bias, int64_t activation_scales,
                       double static_scale) {
  const int64_t k = x.size(-1), n_out = weight.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == k && weight.scalar_type() == at::kChar &&
              weight.is_contiguous(), "bad 8-bit weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == n_out && scale.is_contiguous() &&
              wsum.scalar_type() == at::kInt && wsum.numel() == n_out * (k / BLOCK) && wsum.is_contiguous(),
              "bad 8-bit scales");
  auto [x2, b, out] = matmul_io(x, n_out, bias);
  if (x.scalar_type() == at::kBFloat16) {
    auto a = quantize_input<c10::BFloat16>(x2, LLMQUANT_VNNI, activation_scales, static_scale);
    int8_rows<c10::BFloat16>(a, x2.size(0), k, weight.data_ptr<int8_t>(), scale.data_ptr<float>(),
                             wsum.data_ptr<int32_t>(), b.defined() ? b.data_ptr<c10::BFloat16>() : nullptr,
                             out.data_ptr<c10::BFloat16>(), n_out);
  } else {
    auto a = quantize_input<float>(x2, LLMQUANT_VNNI, activation_scales, static_scale);
    int8_rows<float>(a, x2.size(0), k, weight.data_ptr<int8_t>(), scale.data_ptr<float>(),
                     wsum.data_ptr<int32_t>(), b.defined() ? b.data_ptr<float>() : nullptr,
                     out.data_ptr<float>(), n_out);
  }
  return out;
}

// 8-bit weights with float activations: no activation rounding at all, for a layer whose
// outputs are read directly (the lm_head's logits). Each weight is widened to float32 and
// multiplied in; still one pass over the int8 weights, which is what bounds this matmul.
namespace {
#if LLMQUANT_VNNI
// One activation row against R weight rows, unrolled (accumulators in registers).
template <int R, typename T>
inline void int8_float_tile(const float* x, int64_t k, const int8_t* weight, const float* scale, const T* bias,
                            T* out, int64_t n) {
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  prefetch_ahead(weight + n * k, R * k);
  for (int64_t i = 0; i < k; i += 16) {
    const __m512 xv = _mm512_loadu_ps(x + i);
    for (int r = 0; r < R; ++r) {
      const __m512 w = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(weight + (n + r) * k + i))));
      acc[r] = _mm512_fmadd_ps(w, xv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float y = _mm512_reduce_add_ps(acc[r]) * scale[n + r];
    if (bias) y += to_float(bias[n + r]);
    out[n + r] = static_cast<T>(y);
  }
}
#endif

template <typename T>
void int8_float_rows(const std::vector<float>& x, int64_t rows, int64_t k, const int8_t* weight, const float* scale,
                     const T* bias, T* out, int64_t n_out) {
  at::parallel_for(0, n_out, work_grain(rows * k, 16), [&](int64_t n0, int64_t n1) {
#if LLMQUANT_VNNI
    prefetch_ahead(weight + n0 * k - PREFETCH_DISTANCE, PREFETCH_DISTANCE);  // the lead-in
    if (rows == 1) {
      int64_t n = n0;
      for (; n + 4 <= n1; n += 4) int8_float_tile<4, T>(x.data(), k, weight, scale, bias, out, n);
      for (; n < n1; ++n) int8_float_tile<1, T>(x.data(), k, weight, scale, bias, out, n);
      return;
    }
#endif
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* wrow = weight + n * k;
      float acc[MAX_ROWS];
#if LLMQUANT_VNNI
      prefetch_ahead(wrow, k);
      __m512 vacc[MAX_ROWS];
      for (int64_t m = 0; m < rows; ++m) vacc[m] = _mm512_setzero_ps();
      for (int64_t i = 0; i < k; i += 16) {
        const __m512 w = _mm512_cvtepi32_ps(
            _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wrow + i))));
        for (int64_t m = 0; m < rows; ++m) vacc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x.data() + m * k + i), vacc[m]);
      }
      for (int64_t m = 0; m < rows; ++m) acc[m] = _mm512_reduce_add_ps(vacc[m]);
#else
      for (int64_t m = 0; m < rows; ++m) {
        acc[m] = 0.f;
        for (int64_t i = 0; i < k; ++i) acc[m] += static_cast<float>(wrow[i]) * x[m * k + i];
      }
#endif
      for (int64_t m = 0; m < rows; ++m) {
        float y = acc[m] * scale[n];
        if (bias) y += to_float(bias[n]);
        out[m * n_out + n] = static_cast<T>(y);
      }
    }
  });
}

}  // namespace

at::Tensor int8_linear_float(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                             const c10::optional<at::Tensor>& bias) {
  const int64_t k = x.size(-1), n_out = weight.size(0);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == k && weight.scalar_type() == at::kChar &&
              weight.is_contiguous() && scale.scalar_type() == at::kFloat && scale.numel() == n_out &&
              scale.is_contiguous(), "bad 8-bit weight or scale");
  auto [x2, b, out] = matmul_io(x, n_out, bias);
  const int64_t rows = x2.size(0);
  std::vector<float> xf(rows * k);
  if (x.scalar_type() == at::kBFloat16) {
    const c10::BFloat16* src = x2.data_ptr<c10::BFloat16>();
    for (int64_t i = 0; i < rows * k; ++i) xf[i] = static_cast<float>(src[i]);
    int8_float_rows<c10::BFloat16>(xf, rows, k, weight.data_ptr<int8_t>(), scale.data_ptr<float>(),
                                   b.defined() ? b.data_ptr<c10::BFloat16>() : nullptr,
                                   out.data_ptr<c10::BFloat16>(), n_out);
  } else {
    std::copy(x2.data_ptr<float>(), x2.data_ptr<float>() + rows * k, xf.begin());
    int8_float_rows<float>(xf, rows, k, weight.data_ptr<int8_t>(), scale.data_ptr<float>(),
                           b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr<float>(), n_out);
  }
  return out;
}

}  // namespace llmquant_cpu
