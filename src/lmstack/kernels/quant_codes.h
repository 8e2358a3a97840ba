// The weight formats of the quantized linears and their decoding, shared by quant_linear.cpp
// (the GEMV of decode) and quant_dequantize.cpp (W_hat for prefill's GEMM and for training).
//
// Formats (the layouts of lmstack/model/quantized.py):
//   bits 8        weight (N, K)   uint8 codes, W_hat[o,i] = (q - z) * s
//   bits 4        weight (N, K/2) two codes a byte, column 2j in the high nibble, 2j+1 in the low
//   bits 4 + LUT  as bits 4, W_hat[o,i] = codebook[q] * s  (NF4: s = the block absmax)
//   s = scale[o, i / g], z = zero[o, i / g] (asymmetric) or 2^(bits-1) (symmetric).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LMSTACK_AVX2 1
#endif
#if defined(LMSTACK_AVX2) && defined(__AVX512F__)
#define LMSTACK_AVX512 1  // the decode GEMV 16 codes a step (dequant_row stays on AVX2)
#endif

namespace lmstack::quant {

struct Args {
  const float* x;       // bits 8: (M, K) x;  bits 4: (M, K/2) even columns of x
  const float* xo;      // bits 4: (M, K/2) odd columns of x; unused for bits 8
  const uint8_t* w;     // (N, K) or (N, K/2) codes
  const float* scale;   // (N, G)
  const uint8_t* zero;  // (N, G) or nullptr
  const float* lut;     // (16,) codebook or nullptr
  const float* bias;    // (N,) or nullptr
  float* y;             // (M, N)
  int64_t M, N, K, G, g;
  float zconst;         // the zero point of a symmetric grid
};

// each chunk of rows holds at least ~64k weights, so small layers stay on the calling thread
// (waking a helper costs microseconds; a 64x64 layer takes less than one)
inline int64_t row_grain(int64_t K) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1)); }

#ifdef LMSTACK_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

// 8 codes (int32 lanes) -> 8 floats: a codebook lookup, or q - z.
// q - z without an int->float conversion: the bits 0x4B000000 | q are the float 2^23 + q
// (q < 2^23 sits in the mantissa), so one exact subtraction of zv = 2^23 + z gives q - z.
template <bool LUT>
inline __m256 decode(__m256i q, __m256 zv, __m256 lut_lo, __m256 lut_hi) {
  if constexpr (LUT) {
#ifdef __AVX512VL__
    return _mm256_permutex2var_ps(lut_lo, q, lut_hi);  // 16-entry table in one instruction (low 4 bits)
#else
    // permutevar8x32 reads the low 3 bits of q; bit 3 (moved to the sign bit) picks the table half
    __m256 lo = _mm256_permutevar8x32_ps(lut_lo, q);
    __m256 hi = _mm256_permutevar8x32_ps(lut_hi, q);
    return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
#endif
  } else {
    return _mm256_sub_ps(_mm256_castsi256_ps(_mm256_or_si256(q, _mm256_set1_epi32(0x4B000000))), zv);
  }
}

inline __m256i load8_u8(const uint8_t* p) {
  return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
#endif

#ifdef LMSTACK_AVX512
// 16 codes (int32 lanes) -> 16 floats: the codebook (one 16-entry register, one permute), or
// q - z subtracted in integers (exact) and converted
template <bool LUT>
inline __m512 decode16(__m512i q, __m512i zi, __m512 lut) {
  if constexpr (LUT) return _mm512_permutexvar_ps(q, lut);
  else return _mm512_cvtepi32_ps(_mm512_sub_epi32(q, zi));
}

inline __m512i load16_u8(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
#endif

template <bool LUT>
inline float decode1(int q, float z, const float* lut) {
  return LUT ? lut[q] : static_cast<float>(q) - z;
}

inline void check_u8(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.scalar_type() == at::kByte && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols &&
                  t.is_contiguous(), name, " must be a contiguous (", rows, ", ", cols, ") uint8 tensor, got ",
              t.scalar_type(), " ", t.sizes());
}

// Checks a quantized weight of K inputs and returns its pointers (x, y and bias left empty).
inline Args weight_args(const at::Tensor& weight, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                        const c10::optional<at::Tensor>& codebook, int64_t bits, int64_t group_size, int64_t K) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4, got ", bits);
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D, got ", weight.sizes());
  const int64_t N = weight.size(0);
  TORCH_CHECK(group_size > 0 && K % group_size == 0 && (bits == 8 || group_size % 2 == 0), "group_size=",
              group_size, " must divide K=", K, " (and be even for 4 bits)");
  const int64_t G = K / group_size;
  check_u8(weight, "weight", N, bits == 8 ? K : K / 2);
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == N && scale.size(1) == G,
              "scale must be a contiguous (", N, ", ", G, ") float32 tensor, got ", scale.scalar_type(), " ",
              scale.sizes());
  if (zero) check_u8(*zero, "zero", N, G);
  const bool lut = codebook.has_value();
  TORCH_CHECK(!lut || (bits == 4 && !zero && codebook->scalar_type() == at::kFloat &&
                       codebook->numel() == 16 && codebook->is_contiguous()),
              "a codebook is 16 contiguous float32 values, for 4-bit codes without zero points");
  return Args{nullptr, nullptr, weight.data_ptr<uint8_t>(), scale.data_ptr<float>(),
              zero ? zero->data_ptr<uint8_t>() : nullptr, lut ? codebook->data_ptr<float>() : nullptr, nullptr,
              nullptr, 0, N, K, G, group_size, static_cast<float>(int64_t{1} << (bits - 1))};
}

// Many rows of x (prefill; quant_dequantize.cpp): y = x @ W_hat^T + bias by blocks of W_hat and GEMM.
at::Tensor blocked_linear(const Args& a, const at::Tensor& x, const c10::optional<at::Tensor>& bias, int64_t bits,
                          bool lut);

}  // namespace lmstack::quant
