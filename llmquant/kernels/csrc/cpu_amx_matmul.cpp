// Many-row matmuls of 4-bit weights on AMX tiles, for batched decoding on CPU.
//
// The few-row VNNI kernels (cpu_decode_matmul.cpp) do one 64-value integer dot product per
// instruction, so their cost grows with every row of the batch: at 8 rows a 4-bit layer costs
// several times a one-row one. An AMX tile instruction (TDPBSUD) multiplies a 16 x 64 block of
// int8 activations by a 64 x 16 block of weights in one go, so a decode step of 2 to 16 rows (and
// more, 16 at a time) costs little more than one row: the weights are read once, unpacked once,
// and the rows ride along.
//
// The numbers are those of the few-row kernels: activations rounded to int8 per block of 64
// values (one float scale per block), each block's integer dot product scaled by the weight's
// and the activation's scale, the offset (8 + zero point) taken out with the block's activation
// sum. Only the order of the float additions differs.
//
// Weights are repacked once (int4_amx_pack) into the layout TDPBSUD reads: for each 16 output
// columns and 64 input values, 1024 4-bit values u = q + offset in tile order (row r of the
// tile holds, for each column c, the values of inputs 4r..4r+3), two per byte: byte t holds value
// t in its low nibble and value t + 512 in its high one, so 8 vector loads and two masks give the
// tile's 16 rows. Scales and offsets are stored 16 columns together, one vector per block.
//
// Linux hands a process the AMX register state only on request (arch_prctl); amx_ready() asks
// once. Compiled only where the compiler targets AMX (-march=native on a CPU with AMX), so the
// choice is made at run time on the user's machine.
#include "cpu_decode.h"

#if LLMQUANT_VNNI && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
#define LLMQUANT_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#else
#define LLMQUANT_AMX 0
#endif

namespace llmquant_cpu {

constexpr int64_t TILE_ROWS = 16;  // activation rows per tile; the batch is padded to a multiple
constexpr int64_t TILE_COLS = 16;  // output columns per tile
constexpr int64_t PACKED_BLOCK = TILE_COLS * BLOCK / 2;  // bytes per 16 columns x 64 inputs
constexpr int64_t BF16_TILE_K = 32;  // inputs per bf16 tile row block (16 rows of 2)
constexpr int64_t PREFETCH_BLOCKS = 4;  // 2 KiB ahead (measured: better than 8)

bool amx_ready() {
#if LLMQUANT_AMX
  static const bool ready = [] {
    constexpr int ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ready;
#else
  return false;
#endif
}

// (packed (N, K/64, 32) uint8 in the few-row layout, scale (N, K/64), offset (N, K/64) int32 or
// None) -> [packed (N/16, K/64, 512) uint8, scale (N/16, K/64, 16) float32, offset (N/16, K/64, 16)
// int32 (8 where None)].
std::vector<at::Tensor> int4_amx_pack(const at::Tensor& packed, const at::Tensor& scale,
                                      const c10::optional<at::Tensor>& offset) {
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == 32 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "int4_amx_pack: packed (N, K/64, 32) uint8");
  const int64_t n = packed.size(0), blocks = packed.size(1);
  TORCH_CHECK(n % TILE_COLS == 0, "int4_amx_pack: out_features must be a multiple of 16");
  at::Tensor s = scale.to(at::kFloat).contiguous().view({n / TILE_COLS, TILE_COLS, blocks});
  at::Tensor o = offset.has_value() ? offset->to(at::kInt).contiguous().view({n / TILE_COLS, TILE_COLS, blocks})
                                    : at::full({n / TILE_COLS, TILE_COLS, blocks}, 8, at::kInt);
  at::Tensor out = at::zeros({n / TILE_COLS, blocks, PACKED_BLOCK}, packed.options());
  const uint8_t* src = packed.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, n / TILE_COLS, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g)
      for (int64_t b = 0; b < blocks; ++b) {
        uint8_t* block = dst + (g * blocks + b) * PACKED_BLOCK;
        for (int64_t i = 0; i < 2 * PACKED_BLOCK; ++i) {  // tile order: i = r * 64 + c * 4 + j
          const int64_t r = i / 64, c = (i % 64) / 4, j = i % 4, k = 4 * r + j;
          const uint8_t byte = src[((g * TILE_COLS + c) * blocks + b) * 32 + (k % 32)];
          const uint8_t u = k < 32 ? (byte & 0x0F) : (byte >> 4);
          if (i < PACKED_BLOCK) block[i] |= u;
          else block[i - PACKED_BLOCK] |= static_cast<uint8_t>(u << 4);
        }
      }
  });
  return {out, s.transpose(1, 2).contiguous(), o.transpose(1, 2).contiguous()};
}

// weight (N, K) int8 -> (N/16, K/32, 512) int8 in the order of a bf16 weight tile: row r of a
// tile holds, for each of its 16 columns, inputs 2r and 2r + 1 (int8 values are exact in bf16).
at::Tensor int8_amx_pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.size(0) % TILE_COLS == 0 &&
              weight.size(1) % BF16_TILE_K == 0, "int8_amx_pack: weight (N, K) int8, N % 16 == 0, K % 32 == 0");
  const int64_t n = weight.size(0), k = weight.size(1);
  return weight.contiguous()
      .view({n / TILE_COLS, TILE_COLS, k / BF16_TILE_K, BF16_TILE_K / 2, 2})  // (g, c, kb, r, j)
      .permute({0, 2, 3, 1, 4})                                                // (g, kb, r, c, j)
      .contiguous()
      .view({n / TILE_COLS, k / BF16_TILE_K, TILE_COLS * BF16_TILE_K});
}

#if LLMQUANT_AMX
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// tmm0: the int32 products (16 rows x 16 columns); tmm1: activations (16 rows x 64 int8);
// tmm2: weights (16 rows of 4 inputs x 16 columns).
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 3; ++t) {
    config.rows[t] = 16;
    config.colsb[t] = 64;
  }
  _tile_loadconfig(&config);
}

struct AmxRows {
  std::vector<int8_t> q;     // (padded rows, K), zero rows past the batch
  std::vector<float> scale;  // (rows, K/64)
  std::vector<int32_t> sum;  // (rows, K/64)
};

// Activations to int8 per block of 64, exactly as quantize_rows (PER_BLOCK) does: scale amax/127
// (1 for an all-zero block), values divided by it and rounded half to even, vectorized.
template <typename T>
AmxRows quantize_for_tiles(const T* x, int64_t rows, int64_t k) {
  const int64_t blocks = k / BLOCK, padded = (rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
  AmxRows a;
  a.q.assign(padded * k, 0);
  a.scale.resize(rows * blocks);
  a.sum.resize(rows * blocks);
  at::parallel_for(0, rows * blocks, work_grain(BLOCK, 64), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m = i / blocks, b = i % blocks;
      const T* src = x + m * k + b * BLOCK;
      __m512 v[4];
      __m512 amax = _mm512_setzero_ps();
      for (int j = 0; j < 4; ++j) {
        v[j] = load16(src + 16 * j);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v[j]));
      }
      const float top = _mm512_reduce_max_ps(amax);
      const float scale = top > 0.f ? top / 127.f : 1.f;
      const __m512 s = _mm512_set1_ps(scale);
      __m512i total = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v[j], s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        r = _mm512_min_ps(_mm512_max_ps(r, _mm512_set1_ps(-128.f)), _mm512_set1_ps(127.f));
        const __m512i q = _mm512_cvtps_epi32(r);
        total = _mm512_add_epi32(total, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(a.q.data() + m * k + b * BLOCK + 16 * j),
                         _mm512_cvtsepi32_epi8(q));
      }
      a.scale[i] = scale;
      a.sum[i] = _mm512_reduce_add_epi32(total);
    }
  });
  return a;
}

template <typename T>
void int4_amx_rows(const AmxRows& a, int64_t rows, int64_t k, const uint8_t* packed, const float* scale,
                   const int32_t* offset, const T* bias, T* out, int64_t n_out) {
  const int64_t blocks = k / BLOCK, chunks = (rows + TILE_ROWS - 1) / TILE_ROWS;
  at::parallel_for(0, n_out / TILE_COLS, work_grain(TILE_COLS * rows * k, 1), [&](int64_t g0, int64_t g1) {
    configure_tiles();
    alignas(64) uint8_t weights[TILE_ROWS * 64];
    alignas(64) int32_t products[TILE_ROWS * TILE_COLS];
    std::vector<float> acc(chunks * TILE_ROWS * TILE_COLS);
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t g = g0; g < g1; ++g) {
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* src = packed + (g * blocks + b) * PACKED_BLOCK;
        // The weights stream from memory once per step: ask for them a few blocks ahead (the
        // layout is contiguous across blocks and column groups), with their scales and offsets.
        for (int j = 0; j < 8; ++j)
          _mm_prefetch(reinterpret_cast<const char*>(src + PREFETCH_BLOCKS * PACKED_BLOCK + 64 * j), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(scale + (g * blocks + b + PREFETCH_BLOCKS) * TILE_COLS), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(offset + (g * blocks + b + PREFETCH_BLOCKS) * TILE_COLS), _MM_HINT_T0);
        for (int j = 0; j < 8; ++j) {
          const __m512i bytes = _mm512_load_si512(src + 64 * j);
          _mm512_store_si512(weights + 64 * j, _mm512_and_si512(bytes, low));
          _mm512_store_si512(weights + 64 * (j + 8), _mm512_and_si512(_mm512_srli_epi16(bytes, 4), low));
        }
        _tile_loadd(2, weights, 64);
        const __m512 wscale = _mm512_loadu_ps(scale + (g * blocks + b) * TILE_COLS);
        const __m512i woffset = _mm512_loadu_si512(offset + (g * blocks + b) * TILE_COLS);
        for (int64_t c = 0; c < chunks; ++c) {
          _tile_zero(0);
          _tile_loadd(1, a.q.data() + c * TILE_ROWS * k + b * BLOCK, k);
          _tile_dpbsud(0, 1, 2);
          _tile_stored(0, products, 64);
          const int64_t in_chunk = std::min(TILE_ROWS, rows - c * TILE_ROWS);
          for (int64_t r = 0; r < in_chunk; ++r) {
            const int64_t m = c * TILE_ROWS + r;
            const __m512i dot = _mm512_sub_epi32(_mm512_load_si512(products + r * TILE_COLS),
                                                 _mm512_mullo_epi32(woffset, _mm512_set1_epi32(a.sum[m * blocks + b])));
            float* row = acc.data() + m * TILE_COLS;
            _mm512_storeu_ps(row, _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                                                  _mm512_mul_ps(wscale, _mm512_set1_ps(a.scale[m * blocks + b])),
                                                  _mm512_loadu_ps(row)));
          }
        }
      }
      for (int64_t m = 0; m < rows; ++m)
        for (int64_t c = 0; c < TILE_COLS; ++c) {
          const int64_t n = g * TILE_COLS + c;
          float y = acc[m * TILE_COLS + c];
          if (bias) y += to_float(bias[n]);
          out[m * n_out + n] = static_cast<T>(y);
        }
    }
    _tile_release();
  });
}

// 8-bit weights (per-row scale) times bf16 activations on bf16 tiles, float32 results: each 16
// columns' weights are widened to bf16 once (exact) into a buffer that stays in L1, then every
// 16 rows of the batch take one tile product per 32 inputs, accumulated in float32 over the whole
// row (the scale is per row of weights, so it applies once at the end).
template <typename T>
void int8_amx_rows(const c10::BFloat16* x, int64_t rows, int64_t k, const int8_t* packed, const float* scale,
                   const T* bias, float* out, int64_t n_out) {
  const int64_t kblocks = k / BF16_TILE_K, chunks = (rows + TILE_ROWS - 1) / TILE_ROWS;
  const int64_t tile_bytes = TILE_COLS * BF16_TILE_K;  // int8 weights per tile
  at::parallel_for(0, n_out / TILE_COLS, work_grain(TILE_COLS * rows * k, 1), [&](int64_t g0, int64_t g1) {
    configure_tiles();
    std::vector<c10::BFloat16> widened(kblocks * TILE_COLS * BF16_TILE_K);
    alignas(64) float products[TILE_ROWS * TILE_COLS];
    for (int64_t g = g0; g < g1; ++g) {
      const int8_t* src = packed + g * kblocks * tile_bytes;
      for (int64_t i = 0; i < kblocks * tile_bytes; i += 32) {
        if (i % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(src + i + 4 * tile_bytes), _MM_HINT_T0);
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
        const __m512 hi =
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i + 16))));
        _mm512_storeu_si512(widened.data() + i, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo)));
      }
      for (int64_t c = 0; c < chunks; ++c) {
        _tile_zero(0);
        for (int64_t kb = 0; kb < kblocks; ++kb) {
          _tile_loadd(1, x + c * TILE_ROWS * k + kb * BF16_TILE_K, k * 2);
          _tile_loadd(2, widened.data() + kb * TILE_COLS * BF16_TILE_K, 64);
          _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, products, 64);
        const int64_t in_chunk = std::min(TILE_ROWS, rows - c * TILE_ROWS);
        const __m512 s = _mm512_loadu_ps(scale + g * TILE_COLS);
        __m512 b = _mm512_setzero_ps();
        if (bias) {
          alignas(64) float bias16[TILE_COLS];
          for (int64_t j = 0; j < TILE_COLS; ++j) bias16[j] = to_float(bias[g * TILE_COLS + j]);
          b = _mm512_load_ps(bias16);
        }
        for (int64_t r = 0; r < in_chunk; ++r)
          _mm512_storeu_ps(out + (c * TILE_ROWS + r) * n_out + g * TILE_COLS,
                           _mm512_fmadd_ps(_mm512_load_ps(products + r * TILE_COLS), s, b));
      }
    }
    _tile_release();
  });
}

}  // namespace
#endif

// x (..., K) float32 or bfloat16, any number of rows; weights from int4_amx_pack.
at::Tensor int4_linear_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                           const at::Tensor& offset, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_ready(), "int4_linear_amx: AMX is not available on this CPU or build");
  const int64_t k = x.size(-1), n_out = packed.size(0) * TILE_COLS;
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) * BLOCK == k && packed.size(2) == PACKED_BLOCK &&
              packed.scalar_type() == at::kByte && packed.is_contiguous(), "int4_linear_amx: bad packed weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == n_out * (k / BLOCK) &&
              offset.scalar_type() == at::kInt && offset.is_contiguous() && offset.numel() == scale.numel(),
              "int4_linear_amx: bad scales or offsets");
  at::Tensor x2 = x.reshape({-1, k}).contiguous();
  TORCH_CHECK(x2.scalar_type() == at::kFloat || x2.scalar_type() == at::kBFloat16, "activations: float32 or bfloat16");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n_out;
  at::Tensor out = at::empty(shape, x.options());
  at::Tensor b = bias.has_value() ? bias->to(x.scalar_type()).contiguous() : at::Tensor();
#if LLMQUANT_AMX
  const int64_t rows = x2.size(0);
  if (x2.scalar_type() == at::kBFloat16) {
    auto a = quantize_for_tiles(x2.data_ptr<c10::BFloat16>(), rows, k);
    int4_amx_rows<c10::BFloat16>(a, rows, k, packed.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                                 offset.data_ptr<int32_t>(), b.defined() ? b.data_ptr<c10::BFloat16>() : nullptr,
                                 out.data_ptr<c10::BFloat16>(), n_out);
  } else {
    auto a = quantize_for_tiles(x2.data_ptr<float>(), rows, k);
    int4_amx_rows<float>(a, rows, k, packed.data_ptr<uint8_t>(), scale.data_ptr<float>(),
                         offset.data_ptr<int32_t>(), b.defined() ? b.data_ptr<float>() : nullptr,
                         out.data_ptr<float>(), n_out);
  }
#endif
  return out;
}

// x (..., K) bfloat16, any number of rows; weight from int8_amx_pack, scale (N,) float32. float32 out.
at::Tensor int8_linear_amx(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(amx_ready(), "int8_linear_amx: AMX is not available on this CPU or build");
  const int64_t k = x.size(-1), n_out = packed.size(0) * TILE_COLS;
  TORCH_CHECK(packed.dim() == 3 && packed.size(1) * BF16_TILE_K == k && packed.size(2) == TILE_COLS * BF16_TILE_K &&
              packed.scalar_type() == at::kChar && packed.is_contiguous(), "int8_linear_amx: bad packed weight");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == n_out,
              "int8_linear_amx: bad scale");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "int8_linear_amx: bfloat16 activations");
  at::Tensor x2 = x.reshape({-1, k});
  const int64_t rows = x2.size(0), padded = (rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
  at::Tensor a = at::zeros({padded, k}, x.options());  // whole tiles of rows: the padding rows are zero
  a.narrow(0, 0, rows).copy_(x2);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n_out;
  at::Tensor out = at::empty(shape, x.options().dtype(at::kFloat));
  at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
#if LLMQUANT_AMX
  int8_amx_rows<float>(a.data_ptr<c10::BFloat16>(), rows, k, packed.data_ptr<int8_t>(), scale.data_ptr<float>(),
                       b.defined() ? b.data_ptr<float>() : nullptr, out.data_ptr<float>(), n_out);
#endif
  return out;
}

}  // namespace llmquant_cpu
