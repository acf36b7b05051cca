// Shared by the CPU decode kernels (cpu_decode_*.cpp): types, constants and AVX-512 helpers.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define LLMQUANT_VNNI 1
#else
#define LLMQUANT_VNNI 0
#endif

namespace llmquant_cpu {

constexpr int64_t BLOCK = 64;    // activation block: one int8 scale per 64 values
constexpr int64_t MAX_ROWS = 8;  // few-row kernels: rows share each weight block read

// A parallel region costs waking the other threads and, on a machine whose cores are busy with
// other work, waiting until each of them is scheduled again: for tiny layers that wait was
// thousands of times the work (a test suite of tiny models ran 30x slower beside one other
// busy process). So a chunk of work given to a thread holds at least this many multiply-adds
// (about 10 us); smaller operations run on the calling thread alone.
constexpr int64_t MIN_PARALLEL_WORK = 1 << 16;

// The at::parallel_for grain for units of `work_per_unit` multiply-adds each (at least `min_grain`).
inline int64_t work_grain(int64_t work_per_unit, int64_t min_grain) {
  const int64_t per = std::max<int64_t>(1, work_per_unit);
  return std::max<int64_t>(min_grain, (MIN_PARALLEL_WORK + per - 1) / per);
}

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }

// How activations get their int8 scales (see quantize_rows in cpu_decode_matmul.cpp).
enum ActivationScales : int64_t { PER_BLOCK = 0, PER_ROW = 1, STATIC = 2 };

#if LLMQUANT_VNNI
// Vectors of 16 floats; bf16 values are widened exactly and rounded back to nearest-even.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline __m512i bf16_bits(__m512 v) {  // round to nearest even, upper 16 bits
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
}
inline __m512 round16(__m512 v, const float*) { return v; }
inline __m512 round16(__m512 v, const c10::BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(bf16_bits(v), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(c10::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(bf16_bits(v)));
}
// exp(x) as 2^n * exp(r), r = x - n ln 2, with Cephes' expf polynomial (relative error ~1e-7).
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.f)), _mm512_set1_ps(-88.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

// Matmuls (cpu_decode_matmul.cpp); x has up to MAX_ROWS rows of in_features % 64 == 0.
at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                       const at::Tensor& wsum, const c10::optional<at::Tensor>& bias, int64_t activation_scales,
                       double static_scale);
at::Tensor int8_linear_float(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                             const c10::optional<at::Tensor>& bias);

// Many-row 4-bit matmuls on AMX tiles (cpu_amx_matmul.cpp); amx_ready() says whether they run here.
bool amx_ready();
std::vector<at::Tensor> int4_amx_pack(const at::Tensor& packed, const at::Tensor& scale,
                                      const c10::optional<at::Tensor>& offset);
at::Tensor int4_linear_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                           const at::Tensor& offset, const c10::optional<at::Tensor>& bias);
at::Tensor int8_amx_pack(const at::Tensor& weight);
at::Tensor int8_linear_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& bias);

// 4-bit weights dequantized from the few-row layout, for prefill (cpu_dequantize.cpp).
at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& offset,
                           at::ScalarType dtype);

// Steps around them (cpu_decode_steps.cpp).
at::Tensor rms_norm(at::Tensor x, const at::Tensor& weight, double eps);
at::Tensor add_rms_norm_(at::Tensor& x, const at::Tensor& delta, const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
void rope_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t rotated_heads, int64_t head_dim);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const c10::optional<at::Tensor>& mask);

}  // namespace llmquant_cpu
