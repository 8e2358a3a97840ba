// Weight-only quantized linear on CPU: y = x @ W_hat^T + bias, without the float32 W_hat ever
// written to memory whole. Registered as torch.ops.lmstack.quant_linear; built ahead of time by
// `make install` (lmstack/kernels/build.py) and loaded by lmstack/kernels/__init__.py.
//
// Why: at batch-1 decode a linear is a GEMV, bound by the bytes of weight read from memory.
// Dequantizing the whole weight to float32 first (the pure-PyTorch path) reads the codes,
// writes 4 bytes per weight and reads them back: slower than the float32 model it replaces.
// Here each weight is read once as its code (1 byte for INT8, half a byte for INT4/NF4),
// decoded in registers and multiplied into float32 accumulators.
//
// Formats (the layouts of lmstack/model/quantized.py):
//   bits 8        weight (N, K)   uint8 codes, W_hat[o,i] = (q - z) * s
//   bits 4        weight (N, K/2) two codes a byte, column 2j in the high nibble, 2j+1 in the low
//   bits 4 + LUT  as bits 4, W_hat[o,i] = codebook[q] * s  (NF4: s = the block absmax)
//   s = scale[o, i / g], z = zero[o, i / g] (asymmetric) or 2^(bits-1) (symmetric).
//
// The sum is regrouped per group of g inputs:  y[m,o] = sum_groups s * sum_i (q - z) * x[m,i],
// accumulated in float32. For 4-bit weights x is split once per call into its even and odd
// columns (xe, xo), so the high nibbles of 8 bytes meet 8 consecutive xe values and the low
// nibbles 8 consecutive xo values: no shuffle is needed to put codes back in column order.
//
// For many rows of x (prefill, more than kSmallRows) decoding every weight once per 4 rows loses
// to MKL's GEMM: quant_linear then dequantizes blocks of output rows into a cached buffer and
// multiplies each with GEMM. quant_dequantize writes the whole (N, K) float32 W_hat, equal bit
// for bit to the Python dequantize() (for QLoRA training, where autograd needs F.linear).
//
// Work split: output rows in parallel on torch.get_num_threads() threads (pool.h: the caller
// never waits for a thread that has not started, which OpenMP's barrier does); inside a row,
// the M rows of x in tiles of up to 4, so a weight is decoded once per tile.
// AVX2 + FMA when the compiler targets them (build.py passes -march=native); otherwise the
// scalar loops below do all the work (they are also the tails of the vector loops).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "pool.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LMSTACK_AVX2 1
#endif

namespace {

constexpr int kTile = 4;  // rows of x per pass over a weight row (8 vector accumulators + temporaries fit 16 ymm)
// Up to this many rows of x, quant_linear runs its GEMV tiles; beyond, the weight is dequantized
// block by block for MKL's GEMM (benchmarks/bench_quant.py --micro --rows ... measures the crossover).
constexpr int64_t kSmallRows = 8;

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
int64_t row_grain(int64_t K) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1)); }

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

template <bool LUT>
inline float decode1(int q, float z, const float* lut) {
  return LUT ? lut[q] : static_cast<float>(q) - z;
}

// One output row o against MT rows of x starting at m0.
template <int BITS, bool LUT, int MT>
void row_tile(const Args& a, int64_t o, int64_t m0) {
  const int64_t row_bytes = BITS == 8 ? a.K : a.K / 2;
  const int64_t xstride = row_bytes;  // floats per row of x (bits 8) or of xe / xo (bits 4)
  const int64_t gb = BITS == 8 ? a.g : a.g / 2;  // bytes per group
  const uint8_t* wrow = a.w + o * row_bytes;
  float total[MT] = {};
#ifdef LMSTACK_AVX2
  __m256 acc[MT];
  for (int t = 0; t < MT; ++t) acc[t] = _mm256_setzero_ps();
  __m256 lut_lo = _mm256_setzero_ps(), lut_hi = lut_lo;
  if constexpr (LUT) {
    lut_lo = _mm256_loadu_ps(a.lut);
    lut_hi = _mm256_loadu_ps(a.lut + 8);
  }
#endif
  for (int64_t gi = 0; gi < a.G; ++gi) {
    const float s = a.scale[o * a.G + gi];
    const float z = a.zero ? static_cast<float>(a.zero[o * a.G + gi]) : a.zconst;
    const uint8_t* w = wrow + gi * gb;
    const int64_t off = gi * gb;  // this group's first float in x (bits 8) or in xe / xo (bits 4)
    float part[MT] = {};
    int64_t j = 0;
#ifdef LMSTACK_AVX2
    const __m256 zv = _mm256_set1_ps(8388608.0f + z);  // 2^23 + z, exact
    // U weight vectors per step and one accumulator chain per (x row, vector): at least 4
    // chains in flight hide the FMA's 4-cycle latency (2 chains made MT = 1 latency-bound)
    constexpr int U = MT <= 2 ? 4 : 2;
    __m256 ga[MT][U];
    for (int t = 0; t < MT; ++t)
      for (int u = 0; u < U; ++u) ga[t][u] = _mm256_setzero_ps();
    if constexpr (BITS == 8) {
      for (; j + 8 * U <= gb; j += 8 * U) {
        __m256 wv[U];
        for (int u = 0; u < U; ++u) wv[u] = decode<LUT>(load8_u8(w + j + 8 * u), zv, lut_lo, lut_hi);
        for (int t = 0; t < MT; ++t) {
          const float* xp = a.x + (m0 + t) * xstride + off + j;
          for (int u = 0; u < U; ++u) ga[t][u] = _mm256_fmadd_ps(wv[u], _mm256_loadu_ps(xp + 8 * u), ga[t][u]);
        }
      }
      for (; j + 8 <= gb; j += 8) {
        const __m256 w0 = decode<LUT>(load8_u8(w + j), zv, lut_lo, lut_hi);
        for (int t = 0; t < MT; ++t)
          ga[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(a.x + (m0 + t) * xstride + off + j), ga[t][0]);
      }
    } else {
      const __m256i low4 = _mm256_set1_epi32(0xF);
      // 8 bytes at w + jj = 16 columns: high nibbles meet xe (chain 2h), low nibbles xo (chain 2h + 1)
      auto bytes8 = [&](int64_t jj, int h) {
        const __m256i b = load8_u8(w + jj);
        const __m256 whi = decode<LUT>(_mm256_srli_epi32(b, 4), zv, lut_lo, lut_hi);
        const __m256 wlo = decode<LUT>(_mm256_and_si256(b, low4), zv, lut_lo, lut_hi);
        for (int t = 0; t < MT; ++t) {
          const int64_t p = (m0 + t) * xstride + off + jj;
          ga[t][2 * h] = _mm256_fmadd_ps(whi, _mm256_loadu_ps(a.x + p), ga[t][2 * h]);
          ga[t][2 * h + 1] = _mm256_fmadd_ps(wlo, _mm256_loadu_ps(a.xo + p), ga[t][2 * h + 1]);
        }
      };
      for (; j + 4 * U <= gb; j += 4 * U)
        for (int h = 0; h < U / 2; ++h) bytes8(j + 8 * h, h);
      for (; j + 8 <= gb; j += 8) bytes8(j, 0);
    }
    const __m256 sv = _mm256_set1_ps(s);
    for (int t = 0; t < MT; ++t) {
      __m256 sum = ga[t][0];
      for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, ga[t][u]);
      acc[t] = _mm256_fmadd_ps(sum, sv, acc[t]);
    }
#endif
    // scalar: the tail of the vector loop, or the whole group without AVX2
    for (; j < gb; ++j) {
      if constexpr (BITS == 8) {
        const float wv = decode1<LUT>(w[j], z, a.lut);
        for (int t = 0; t < MT; ++t) part[t] += wv * a.x[(m0 + t) * xstride + off + j];
      } else {
        const float whi = decode1<LUT>(w[j] >> 4, z, a.lut), wlo = decode1<LUT>(w[j] & 0xF, z, a.lut);
        for (int t = 0; t < MT; ++t) {
          const int64_t p = (m0 + t) * xstride + off + j;
          part[t] += whi * a.x[p] + wlo * a.xo[p];
        }
      }
    }
    for (int t = 0; t < MT; ++t) total[t] += part[t] * s;
  }
  const float b = a.bias ? a.bias[o] : 0.0f;
  for (int t = 0; t < MT; ++t) {
#ifdef LMSTACK_AVX2
    total[t] += hsum(acc[t]);
#endif
    a.y[(m0 + t) * a.N + o] = total[t] + b;
  }
}

template <int BITS, bool LUT>
void run(const Args& a) {
  lmstack::parallel_rows(a.N, row_grain(a.K), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      for (int64_t m0 = 0; m0 < a.M; m0 += kTile) {
        switch (std::min<int64_t>(kTile, a.M - m0)) {
          case 1: row_tile<BITS, LUT, 1>(a, o, m0); break;
          case 2: row_tile<BITS, LUT, 2>(a, o, m0); break;
          case 3: row_tile<BITS, LUT, 3>(a, o, m0); break;
          default: row_tile<BITS, LUT, 4>(a, o, m0); break;
        }
      }
    }
  });
}

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

void check_u8(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.scalar_type() == at::kByte && t.dim() == 2 && t.size(0) == rows && t.size(1) == cols &&
                  t.is_contiguous(), name, " must be a contiguous (", rows, ", ", cols, ") uint8 tensor, got ",
              t.scalar_type(), " ", t.sizes());
}

// Checks a quantized weight of K inputs and returns its pointers (x, y and bias left empty).
Args weight_args(const at::Tensor& weight, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
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

at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                        const c10::optional<at::Tensor>& zero, const c10::optional<at::Tensor>& codebook,
                        int64_t bits, int64_t group_size, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "quant_linear: x must be a contiguous (M, K) float32 CPU tensor, got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  Args a = weight_args(weight, scale, zero, codebook, bits, group_size, K);
  if (bias) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == a.N && bias->is_contiguous(),
                "quant_linear: bias must be a contiguous (", a.N, ",) float32 tensor");
    a.bias = bias->data_ptr<float>();
  }
  if (M > kSmallRows) return blocked_linear(a, x, bias, bits, codebook.has_value());
  at::Tensor y = at::empty({M, a.N}, x.options());
  a.M = M;
  a.y = y.data_ptr<float>();
  a.x = x.data_ptr<float>();
  if (M == 0 || a.N == 0) return y;
  if (bits == 8) {
    run<8, false>(a);
    return y;
  }
  // split x into its even and odd columns once: (M, K) -> xe, xo (M, K/2) each
  // (a plain loop: a torch permute + contiguous costs more than the copy itself at M = 1)
  at::Tensor xs = at::empty({2, M, K / 2}, x.options());
  float* xe = xs.data_ptr<float>();
  float* xo = xe + M * (K / 2);
  const float* xp = x.data_ptr<float>();
  for (int64_t i = 0; i < M * (K / 2); ++i) {
    xe[i] = xp[2 * i];
    xo[i] = xp[2 * i + 1];
  }
  a.x = xe;
  a.xo = xo;
  if (codebook) run<4, true>(a); else run<4, false>(a);
  return y;
}

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

TORCH_LIBRARY(lmstack, m) {
  m.def("quant_linear(Tensor x, Tensor weight, Tensor scale, Tensor? zero, Tensor? codebook, int bits, "
        "int group_size, Tensor? bias) -> Tensor");
  m.def("quant_dequantize(Tensor weight, Tensor scale, Tensor? zero, Tensor? codebook, int bits, "
        "int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmstack, CPU, m) {
  m.impl("quant_linear", &quant_linear);
  m.impl("quant_dequantize", &quant_dequantize);
}
