// W_hat, the float32 weight of a quantized linear (formats: quant_codes.h), for the paths where
// a GEMM beats decoding codes in the GEMV's registers: quant_linear's many-row case (prefill)
// multiplies cached blocks of W_hat with MKL's GEMM (blocked_linear), and
// torch.ops.lmstack.quant_dequantize writes the whole (N, K) W_hat in one pass (QLoRA training,
// where autograd needs F.linear). Both round exactly as model/quantized.py's dequantize().
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "pool.h"
#include "quant_codes.h"

namespace lmstack::quant {

namespace {

// W_hat's row o into out (K floats), rounded exactly as model/quantized.py's dequantize():
// (q - z) is exact in float32 and the one product with s rounds once, so the two agree bit for bit.
template <int BITS, bool LUT>
void dequant_row(const Args& a, int64_t o, float* out) {
  const int64_t row_bytes = BITS == 8 ? a.K : a.K / 2, gb = BITS == 8 ? a.g : a.g / 2;
#ifdef LMSTACK_AVX2
  __m256 lut_lo = _mm256_setzero_ps(), lut_hi = lut_lo;
  if constexpr (LUT) {
    lut_lo = _mm256_loadu_ps(a.lut);
    lut_hi = _mm256_loadu_ps(a.lut + 8);
  }
#endif
  for (int64_t gi = 0; gi < a.G; ++gi) {
    const float s = a.scale[o * a.G + gi];
    const float z = a.zero ? static_cast<float>(a.zero[o * a.G + gi]) : a.zconst;
    const uint8_t* w = a.w + o * row_bytes + gi * gb;
    float* dst = out + gi * a.g;
    int64_t j = 0;
#ifdef LMSTACK_AVX2
    const __m256 zv = _mm256_set1_ps(8388608.0f + z), sv = _mm256_set1_ps(s);
    if constexpr (BITS == 8) {
      for (; j + 8 <= gb; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_mul_ps(decode<LUT>(load8_u8(w + j), zv, lut_lo, lut_hi), sv));
    } else {
      for (; j + 8 <= gb; j += 8) {  // 8 bytes -> 16 columns, high nibble first
        const __m256i b = load8_u8(w + j);
        const __m256 hi = _mm256_mul_ps(decode<LUT>(_mm256_srli_epi32(b, 4), zv, lut_lo, lut_hi), sv);
        const __m256i low = _mm256_and_si256(b, _mm256_set1_epi32(0xF));
        const __m256 lo = _mm256_mul_ps(decode<LUT>(low, zv, lut_lo, lut_hi), sv);
        // unpack interleaves within 128-bit lanes: [h0 l0 h1 l1 | h4 l4 h5 l5], [h2 l2 h3 l3 | h6 l6 h7 l7]
        const __m256 p0 = _mm256_unpacklo_ps(hi, lo), p1 = _mm256_unpackhi_ps(hi, lo);
        _mm256_storeu_ps(dst + 2 * j, _mm256_permute2f128_ps(p0, p1, 0x20));
        _mm256_storeu_ps(dst + 2 * j + 8, _mm256_permute2f128_ps(p0, p1, 0x31));
      }
    }
#endif
    for (; j < gb; ++j) {
      if constexpr (BITS == 8) {
        dst[j] = decode1<LUT>(w[j], z, a.lut) * s;
      } else {
        dst[2 * j] = decode1<LUT>(w[j] >> 4, z, a.lut) * s;
        dst[2 * j + 1] = decode1<LUT>(w[j] & 0xF, z, a.lut) * s;
      }
    }
  }
}

void dequant_rows(const Args& a, int64_t bits, bool lut, int64_t begin, int64_t end, float* out) {
  lmstack::parallel_rows(end - begin, row_grain(a.K), [&](int64_t b, int64_t e) {
    for (int64_t o = begin + b; o < begin + e; ++o) {
      float* dst = out + (o - begin) * a.K;
      if (bits == 8) dequant_row<8, false>(a, o, dst);
      else if (lut) dequant_row<4, true>(a, o, dst);
      else dequant_row<4, false>(a, o, dst);
    }
  });
}

}  // namespace

// Many rows of x (prefill): dequantize a block of output rows at a time into a buffer of
// ~1 MiB that stays in cache, and multiply it with MKL's GEMM into those columns of y. The
// float32 weight is never written to memory whole (a fresh 4 bytes x N x K allocation also
// pays a page fault per 4 KiB).
at::Tensor blocked_linear(const Args& a, const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t bits,
                          bool lut) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // the op is inference-only; GEMM must not record a graph
  const int64_t rows = std::min(a.N, std::max<int64_t>(16, (int64_t{1} << 18) / a.K / 16 * 16));
  at::Tensor buf = at::empty({rows, a.K}, x.options());
  at::Tensor y = at::empty({x.size(0), a.N}, x.options());
  for (int64_t o0 = 0; o0 < a.N; o0 += rows) {
    const int64_t n = std::min(rows, a.N - o0);
    dequant_rows(a, bits, lut, o0, o0 + n, buf.data_ptr<float>());
    at::Tensor w = buf.narrow(0, 0, n).t(), yb = y.narrow(1, o0, n);  // (K, n), (M, n) with row stride N
    if (bias) at::addmm_out(yb, bias->narrow(0, o0, n), x, w);
    else at::mm_out(yb, x, w);
  }
  return y;
}

namespace {

// (N, K) float32 W_hat, equal to model/quantized.py's dequantize(): the prefill path (many rows
// of x) dequantizes once in one pass over the codes, then multiplies with MKL's GEMM.
at::Tensor quant_dequantize(const at::Tensor& weight, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                            const c10::optional<at::Tensor>& codebook, int64_t bits, int64_t group_size) {
  TORCH_CHECK(weight.dim() == 2, "quant_dequantize: weight must be 2-D, got ", weight.sizes());
  const int64_t K = bits == 4 ? 2 * weight.size(1) : weight.size(1);
  const Args a = weight_args(weight, scale, zero, codebook, bits, group_size, K);
  at::Tensor w = at::empty({a.N, K}, scale.options());
  dequant_rows(a, bits, codebook.has_value(), 0, a.N, w.data_ptr<float>());
  return w;
}

}  // namespace

}  // namespace lmstack::quant

TORCH_LIBRARY_IMPL(lmstack, CPU, m) { m.impl("quant_dequantize", &lmstack::quant::quant_dequantize); }
