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
// Formats: quant_codes.h (the layouts of lmstack/model/quantized.py).
//
// The sum is regrouped per group of g inputs:  y[m,o] = sum_groups s * sum_i (q - z) * x[m,i],
// accumulated in float32. For 4-bit weights x is split once per call into its even and odd
// columns (xe, xo), so the high nibbles of 8 bytes meet 8 consecutive xe values and the low
// nibbles 8 consecutive xo values: no shuffle is needed to put codes back in column order.
//
// For many rows of x (prefill, more than kSmallRows) decoding every weight once per 4 rows loses
// to MKL's GEMM: quant_linear then dequantizes blocks of output rows into a cached buffer and
// multiplies each with GEMM (quant_dequantize.cpp, which also registers quant_dequantize).
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
#include "quant_codes.h"

namespace {

using namespace lmstack::quant;

constexpr int kTile = 4;  // rows of x per pass over a weight row (8 vector accumulators + temporaries fit 16 ymm)
// Up to this many rows of x, quant_linear runs its GEMV tiles; beyond, the weight is dequantized
// block by block for MKL's GEMM (benchmarks/bench_quant.py --micro --rows ... measures the crossover).
constexpr int64_t kSmallRows = 8;

// One output row o against MT rows of x starting at m0.
template <int BITS, bool LUT, int MT>
void row_tile(const Args& a, int64_t o, int64_t m0) {
  const int64_t row_bytes = BITS == 8 ? a.K : a.K / 2;
  const int64_t xstride = row_bytes;  // floats per row of x (bits 8) or of xe / xo (bits 4)
  const int64_t gb = BITS == 8 ? a.g : a.g / 2;  // bytes per group
  const uint8_t* wrow = a.w + o * row_bytes;
  float total[MT] = {};
#ifdef LMSTACK_AVX512
  // 16 codes a step for one or two rows of x (decode: bound by the codes streaming in); from
  // 3 rows up the 8-wide loop measured faster on our AMD CPUs (512-bit ops run as two halves)
  constexpr bool kWide = MT <= 2;
  __m512 acc5[MT];
  for (int t = 0; t < MT; ++t) acc5[t] = _mm512_setzero_ps();
  const __m512 lut = LUT ? _mm512_loadu_ps(a.lut) : _mm512_setzero_ps();
#else
  [[maybe_unused]] constexpr bool kWide = false;
#endif
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
#ifdef LMSTACK_AVX512
    if constexpr (kWide) {
      // as the AVX2 loop below, 16 codes a vector: 4 instructions decode and multiply 16 INT8
      // weights (AVX2: 8 weights)
      const __m512i zi = _mm512_set1_epi32(static_cast<int32_t>(z));  // zero points are integers
      constexpr int U = 4;  // MT <= 2: 4-8 chains
      __m512 ga[MT][U];
      for (int t = 0; t < MT; ++t)
        for (int u = 0; u < U; ++u) ga[t][u] = _mm512_setzero_ps();
      if constexpr (BITS == 8) {
        for (; j + 16 * U <= gb; j += 16 * U) {
          __m512 wv[U];
          for (int u = 0; u < U; ++u) wv[u] = decode16<LUT>(load16_u8(w + j + 16 * u), zi, lut);
          for (int t = 0; t < MT; ++t) {
            const float* xp = a.x + (m0 + t) * xstride + off + j;
            for (int u = 0; u < U; ++u) ga[t][u] = _mm512_fmadd_ps(wv[u], _mm512_loadu_ps(xp + 16 * u), ga[t][u]);
          }
        }
        for (; j + 16 <= gb; j += 16) {
          const __m512 w0 = decode16<LUT>(load16_u8(w + j), zi, lut);
          for (int t = 0; t < MT; ++t)
            ga[t][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(a.x + (m0 + t) * xstride + off + j), ga[t][0]);
        }
      } else {
        // every 4-bit code is a lookup in a 16-float table: the codebook, or q - z for q = 0..15
        // (one subtraction a group); the permute reads only the low 4 bits of each lane, so the
        // low nibble needs no mask: 6 instructions decode and multiply 32 weights
        const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512 tab = LUT ? lut : _mm512_sub_ps(iota, _mm512_set1_ps(z));
        // 16 bytes at w + jj = 32 columns: high nibbles meet xe (chain 2h), low nibbles xo (2h + 1)
        auto bytes16 = [&](int64_t jj, int h) {
          const __m512i b = load16_u8(w + jj);
          const __m512 whi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab);
          const __m512 wlo = _mm512_permutexvar_ps(b, tab);
          for (int t = 0; t < MT; ++t) {
            const int64_t p = (m0 + t) * xstride + off + jj;
            ga[t][2 * h] = _mm512_fmadd_ps(whi, _mm512_loadu_ps(a.x + p), ga[t][2 * h]);
            ga[t][2 * h + 1] = _mm512_fmadd_ps(wlo, _mm512_loadu_ps(a.xo + p), ga[t][2 * h + 1]);
          }
        };
        for (; j + 8 * U <= gb; j += 8 * U)
          for (int h = 0; h < U / 2; ++h) bytes16(j + 16 * h, h);
        for (; j + 16 <= gb; j += 16) bytes16(j, 0);
      }
      const __m512 sv = _mm512_set1_ps(s);
      for (int t = 0; t < MT; ++t) {
        __m512 sum = ga[t][0];
        for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, ga[t][u]);
        acc5[t] = _mm512_fmadd_ps(sum, sv, acc5[t]);
      }
    }
#endif
#ifdef LMSTACK_AVX2
    if constexpr (!kWide) {
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
#ifdef LMSTACK_AVX512
    if constexpr (kWide) total[t] += _mm512_reduce_add_ps(acc5[t]);
#endif
#ifdef LMSTACK_AVX2
    if constexpr (!kWide) total[t] += hsum(acc[t]);
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

}  // namespace

TORCH_LIBRARY(lmstack, m) {
  m.def("quant_linear(Tensor x, Tensor weight, Tensor scale, Tensor? zero, Tensor? codebook, int bits, "
        "int group_size, Tensor? bias) -> Tensor");
  m.def("quant_dequantize(Tensor weight, Tensor scale, Tensor? zero, Tensor? codebook, int bits, "
        "int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmstack, CPU, m) { m.impl("quant_linear", &quant_linear); }
