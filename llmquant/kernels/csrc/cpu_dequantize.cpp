// 4-bit weights back to a float matrix, for prefill on CPU.
//
// A prompt's many rows are best served by the float matmul (oneDNN, on AMX where the CPU has
// it), once the weights are dequantized. Done with PyTorch ops (unpack the int32-packed codes,
// subtract the zero point, scale, cast) that costs more than the matmul itself at 1,024 rows
// (demo model, one core: 8 ms of 14 per layer). Here it is one pass from the few-row kernels'
// packed layout, with the same arithmetic as llmquant.quant.primitives.dequantize: (u - offset)
// in float32 times the float32 scale, rounded once to the output dtype (bit-identical).
#include "cpu_decode.h"

namespace llmquant_cpu {
namespace {

template <typename S, typename T>
void dequantize_rows(const uint8_t* packed, const S* scale, const int32_t* offset, T* out, int64_t n, int64_t k) {
  const int64_t blocks = k / BLOCK;
  at::parallel_for(0, n, work_grain(k, 16), [&](int64_t n0, int64_t n1) {
    for (int64_t row = n0; row < n1; ++row)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t i = row * blocks + b;
        const uint8_t* src = packed + i * 32;
        const float s = to_float(scale[i]);
        const float off = static_cast<float>(offset ? offset[i] : 8);
        T* dst = out + row * k + b * BLOCK;
#if LLMQUANT_VNNI
        const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
        const __m256i mask = _mm256_set1_epi8(0x0F);
        const __m256i halves[2] = {_mm256_and_si256(bytes, mask), _mm256_and_si256(_mm256_srli_epi16(bytes, 4), mask)};
        for (int h = 0; h < 2; ++h)
          for (int q = 0; q < 2; ++q) {
            const __m128i part = q ? _mm256_extracti128_si256(halves[h], 1) : _mm256_castsi256_si128(halves[h]);
            const __m512 u = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(part));
            store16(dst + 32 * h + 16 * q, _mm512_mul_ps(_mm512_sub_ps(u, _mm512_set1_ps(off)), _mm512_set1_ps(s)));
          }
#else
        for (int64_t j = 0; j < 32; ++j) {
          dst[j] = static_cast<T>((static_cast<float>(src[j] & 0x0F) - off) * s);
          dst[j + 32] = static_cast<T>((static_cast<float>(src[j] >> 4) - off) * s);
        }
#endif
      }
  });
}

template <typename T>
void dequantize_as(const at::Tensor& packed, const at::Tensor& scale, const int32_t* offset, at::Tensor& out) {
  const int64_t n = packed.size(0), k = packed.size(1) * BLOCK;
  if (scale.scalar_type() == at::kBFloat16)
    dequantize_rows(packed.data_ptr<uint8_t>(), scale.data_ptr<c10::BFloat16>(), offset, out.data_ptr<T>(), n, k);
  else
    dequantize_rows(packed.data_ptr<uint8_t>(), scale.data_ptr<float>(), offset, out.data_ptr<T>(), n, k);
}

}  // namespace

at::Tensor int4_dequantize(const at::Tensor& packed, const at::Tensor& scale, const c10::optional<at::Tensor>& offset,
                           at::ScalarType dtype) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 32 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "int4_dequantize: packed (N, K/64, 32) uint8");
  TORCH_CHECK((scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kBFloat16) && scale.is_contiguous() &&
              scale.numel() == packed.size(0) * packed.size(1), "int4_dequantize: scale (N, K/64)");
  TORCH_CHECK(!offset.has_value() || (offset->scalar_type() == at::kInt && offset->is_contiguous() &&
                                      offset->numel() == scale.numel()), "int4_dequantize: offset (N, K/64) int32");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "int4_dequantize: float32 or bfloat16 output");
  at::Tensor out = at::empty({packed.size(0), packed.size(1) * BLOCK}, packed.options().dtype(dtype));
  const int32_t* off = offset.has_value() ? offset->data_ptr<int32_t>() : nullptr;
  if (dtype == at::kBFloat16)
    dequantize_as<c10::BFloat16>(packed, scale, off, out);
  else
    dequantize_as<float>(packed, scale, off, out);
  return out;
}

}  // namespace llmquant_cpu
