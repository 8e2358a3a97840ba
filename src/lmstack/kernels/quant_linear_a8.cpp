// INT8 weights x INT8 activations (W8A8) on CPU: y = x_hat @ W_hat^T + bias, where x_hat is x
// rounded to int8 in blocks of act_block inputs (a multiple of 32; one absmax scale per block, as
// llama.cpp rounds activations for its quantized matmuls) and W_hat the INT8 layer's weight.
// Registered as torch.ops.lmstack.quant_linear_a8.
//
// Why: the weight-only kernel (quant_linear.cpp) turns every code into a float before its FMA,
// four vector instructions per 8 weights. With the activations in int8 too, one VNNI
// instruction (vpdpbusd) multiplies 32 weight codes by 32 activation codes and adds them in
// 32-bit integers, exactly; a block's integer sum becomes a float once (cvt + FMA by its scale),
// so longer blocks cost less: 128 measured 2x faster than 32. That is how llama.cpp computes its
// quantized matmuls, and what an INT8 layer created with act_bits=8 computes.
//
// The arithmetic (model/quantized.py's IntLinear.forward does the same in PyTorch):
//   per row m of x and block b of act_block inputs:  sx = max|x[b]| / 127,  q = round(x / sx) in [-127, 127]
//   y[m,o] = sum_groups s[o,g] * sum_{b in g} sx[m,b] * (sum_{i in b} code[o,i] * q[i] - z[o,g] * sum_{i in b} q[i])
// The integer dot of codes (unsigned, 0..255) and q (signed) is exact; vpdpbusd takes exactly
// that pair (u8 x s8). The zero-point term only depends on x: it is summed once per row and group.
// Rounding: round-half-to-even of the float32 quotient x / sx, like torch.round(x / sx).
//
// Work split as quant_linear: output rows in parallel (pool.h); rows of x in tiles of up to 4
// against 2-4 outputs at a time (each 32-byte piece of weight or x loaded once per tile), rows of
// x in chunks of 64 (their codes stay in cache). Up to 8 rows (decode, kGemvRows) take
// gemv_rows: one weight row at a time, front to back (a single stream from memory, as in
// dense_linear.cpp; the tiles' 2-4 rows at a time are 2-4 streams), 64 codes per vpdpbusd on
// 512-bit registers. Without AVX512-VNNI + AVX512VL (build.py passes -march=native) the scalar
// loops do the tiles' work and one or two rows take the weight-only kernel on x_hat.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "pool.h"

#if defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__FMA__)
#include <immintrin.h>
#define LMSTACK_VNNI 1
#if defined(__AVX512BW__)
#define LMSTACK_VNNI512 1  // 64 codes per vpdpbusd: the one- or two-row GEMV below
#endif
#endif

namespace {

constexpr int64_t kSub = 32;     // bytes per vpdpbusd (one ymm); activation blocks are multiples
constexpr int kTileA8 = 4;       // rows of x per pass over a weight row
constexpr int64_t kChunk = 64;   // rows of x quantized and multiplied at a time
// Up to this many rows (decode of up to 8 sequences) gemv_rows below: measured on the 53.5M
// Llama's decode linears (one thread) 1.3-1.4x the weight-only kernel on x_hat at one row, 1.7x
// at two, and 1.9x / 1.7x / 1.85x / 1.36x the tiles at 3 / 4 / 6 / 8 rows (the tiles measured
// 0.7x the weight-only kernel at one row; they read 2-4 weight rows at a time). Without 512-bit
// VNNI up to 2 rows go to the weight-only kernel on x_hat = q * sx (kGemvRowsX), more to the tiles.
constexpr int64_t kGemvRows = 8;
constexpr int64_t kGemvRowsX = 2;

struct A8 {
  const uint8_t* w;     // (N, K) codes
  const float* scale;   // (N, G)
  const uint8_t* zero;  // (N, G) or nullptr (symmetric: 128)
  const float* bias;    // (N,) or nullptr
  const int8_t* q;      // (M, K) activation codes
  const float* sx;      // (M, K/32) activation scales
  const float* zsum;    // (M, G) sum over the group's blocks of sx * sum(q): the zero-point term
  float* y;             // (M, N)
  int64_t M, N, K, G, g, ab;  // ab: inputs per activation block
};

// Row m of x -> q (K int8), sx (K/32), zsum (G): rounded as the PyTorch path rounds.
void quantize_row(const float* x, int64_t K, int64_t g, int64_t ab, int8_t* q, float* sx, float* zsum) {
  const int64_t nb = K / ab, per_group = g / ab;
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * ab;
    float amax = 0.0f;
    for (int64_t i = 0; i < ab; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float s = amax / 127.0f;
    const float d = s > 0.0f ? s : 1.0f;  // an all-zero block: codes 0
    int32_t sum = 0;
    for (int64_t i = 0; i < ab; ++i) {
      const float r = std::nearbyint(xb[i] / d);  // half to even (the default rounding mode)
      const int32_t c = static_cast<int32_t>(std::min(127.0f, std::max(-127.0f, r)));
      q[b * ab + i] = static_cast<int8_t>(c);
      sum += c;
    }
    sx[b] = s;
    if (b % per_group == 0) zsum[b / per_group] = 0.0f;
    zsum[b / per_group] += s * static_cast<float>(sum);
  }
}

// Outputs o .. o + NT - 1 against rows m0 .. m0 + MT - 1 of x: each 32-byte piece of a weight
// row is loaded once per MT rows, each piece of x once per NT outputs; MT x NT independent
// integer chains keep the VNNI unit busy.
template <int MT, int NT>
void tile(const A8& a, int64_t o, int64_t m0) {
  const int64_t nab = a.K / a.ab, ab_per_group = a.g / a.ab, subs = a.ab / kSub;
  float total[MT][NT] = {};
  for (int64_t gi = 0; gi < a.G; ++gi) {
    float part[MT][NT] = {};
#ifdef LMSTACK_VNNI
    __m256 acc[MT][NT];
    for (int t = 0; t < MT; ++t)
      for (int n = 0; n < NT; ++n) acc[t][n] = _mm256_setzero_ps();
#endif
    for (int64_t b = gi * ab_per_group; b < (gi + 1) * ab_per_group; ++b) {
#ifdef LMSTACK_VNNI
      __m256i d[MT][NT];
      for (int t = 0; t < MT; ++t)
        for (int n = 0; n < NT; ++n) d[t][n] = _mm256_setzero_si256();
      for (int64_t j = 0; j < subs; ++j) {
        const int64_t col = b * a.ab + j * kSub;
        __m256i wv[NT];
        for (int n = 0; n < NT; ++n)
          wv[n] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.w + (o + n) * a.K + col));
        for (int t = 0; t < MT; ++t) {
          const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + (m0 + t) * a.K + col));
          for (int n = 0; n < NT; ++n) d[t][n] = _mm256_dpbusd_epi32(d[t][n], wv[n], qv);
        }
      }
      for (int t = 0; t < MT; ++t) {
        const __m256 sv = _mm256_set1_ps(a.sx[(m0 + t) * nab + b]);
        for (int n = 0; n < NT; ++n) acc[t][n] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[t][n]), sv, acc[t][n]);
      }
#else
      for (int t = 0; t < MT; ++t) {
        const int8_t* qb = a.q + (m0 + t) * a.K + b * a.ab;
        for (int n = 0; n < NT; ++n) {
          const uint8_t* wb = a.w + (o + n) * a.K + b * a.ab;
          int32_t dot = 0;
          for (int64_t i = 0; i < a.ab; ++i) dot += static_cast<int32_t>(wb[i]) * qb[i];
          part[t][n] += static_cast<float>(dot) * a.sx[(m0 + t) * nab + b];
        }
      }
#endif
    }
#ifdef LMSTACK_VNNI
    for (int t = 0; t < MT; ++t)
      for (int n = 0; n < NT; ++n) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[t][n]), _mm256_extractf128_ps(acc[t][n], 1));
        s = _mm_hadd_ps(s, s);
        part[t][n] = _mm_cvtss_f32(_mm_hadd_ps(s, s));
      }
#endif
    for (int n = 0; n < NT; ++n) {
      const float s = a.scale[(o + n) * a.G + gi];
      const float z = a.zero ? static_cast<float>(a.zero[(o + n) * a.G + gi]) : 128.0f;
      for (int t = 0; t < MT; ++t) total[t][n] += s * (part[t][n] - z * a.zsum[(m0 + t) * a.G + gi]);
    }
  }
  for (int n = 0; n < NT; ++n) {
    const float bias = a.bias ? a.bias[o + n] : 0.0f;
    for (int t = 0; t < MT; ++t) a.y[(m0 + t) * a.N + o + n] = total[t][n] + bias;
  }
}

// rows of x m0 .. m0 + mt - 1 (mt <= 4) against outputs [begin, end): NT outputs at a time
// (4 for one or two rows, 2 for three or four: at most 8 integer + 8 float accumulators)
template <int MT>
void rows_tile(const A8& a, int64_t begin, int64_t end, int64_t m0) {
  constexpr int NT = MT <= 2 ? 4 : 2;
  int64_t o = begin;
  for (; o + NT <= end; o += NT) tile<MT, NT>(a, o, m0);
  for (; o < end; ++o) tile<MT, 1>(a, o, m0);
}

#ifdef LMSTACK_VNNI512
// y[m, o] for the MT (1 to 8) rows of x, one weight row o: 64 codes per instruction, two
// integer chains (alternate 64-byte steps) per row of x, each activation block's integer sum
// converted once into a float accumulator scaled by sx * s; one horizontal sum per row.
template <int MT>
void gemv_row(const A8& a, int64_t o) {
  const uint8_t* w = a.w + o * a.K;
  const int64_t nab = a.K / a.ab, ab_per_group = a.g / a.ab;
  __m512 acc[MT];
  float zterm[MT] = {};
  for (int t = 0; t < MT; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t gi = 0; gi < a.G; ++gi) {
    const float s = a.scale[o * a.G + gi];
    const float z = a.zero ? static_cast<float>(a.zero[o * a.G + gi]) : 128.0f;
    for (int t = 0; t < MT; ++t) zterm[t] += s * z * a.zsum[t * a.G + gi];
    for (int64_t b = gi * ab_per_group; b < (gi + 1) * ab_per_group; ++b) {
      __m512i d0[MT], d1[MT];
      for (int t = 0; t < MT; ++t) d0[t] = d1[t] = _mm512_setzero_si512();
      int64_t j = b * a.ab;
      const int64_t end = j + a.ab;
      for (; j + 128 <= end; j += 128) {
        const __m512i w0 = _mm512_loadu_si512(w + j), w1 = _mm512_loadu_si512(w + j + 64);
        for (int t = 0; t < MT; ++t) {
          d0[t] = _mm512_dpbusd_epi32(d0[t], w0, _mm512_loadu_si512(a.q + t * a.K + j));
          d1[t] = _mm512_dpbusd_epi32(d1[t], w1, _mm512_loadu_si512(a.q + t * a.K + j + 64));
        }
      }
      if (j + 64 <= end) {
        const __m512i w0 = _mm512_loadu_si512(w + j);
        for (int t = 0; t < MT; ++t) d0[t] = _mm512_dpbusd_epi32(d0[t], w0, _mm512_loadu_si512(a.q + t * a.K + j));
        j += 64;
      }
      if (j < end) {  // 32 codes left (blocks are multiples of 32): the upper half zero
        const __m512i w0 = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j)));
        for (int t = 0; t < MT; ++t) {
          const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q + t * a.K + j));
          d1[t] = _mm512_dpbusd_epi32(d1[t], w0, _mm512_zextsi256_si512(q));
        }
      }
      for (int t = 0; t < MT; ++t) {
        const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(d0[t], d1[t]));
        acc[t] = _mm512_fmadd_ps(f, _mm512_set1_ps(a.sx[t * nab + b] * s), acc[t]);
      }
    }
  }
  const float bias = a.bias ? a.bias[o] : 0.0f;
  for (int t = 0; t < MT; ++t) a.y[t * a.N + o] = _mm512_reduce_add_ps(acc[t]) - zterm[t] + bias;
}

// Up to 8 rows of x: quantized once, then every output row on the pool's threads.
void gemv_rows(const float* x, int64_t M, A8 a, std::vector<int8_t>& q, std::vector<float>& sx,
               std::vector<float>& zsum) {
  for (int64_t m = 0; m < M; ++m)
    quantize_row(x + m * a.K, a.K, a.g, a.ab, q.data() + m * a.K, sx.data() + m * (a.K / a.ab), zsum.data() + m * a.G);
  a.q = q.data();
  a.sx = sx.data();
  a.zsum = zsum.data();
  a.M = M;
  lmstack::parallel_rows(a.N, std::max<int64_t>(1, (int64_t{1} << 16) / a.K), [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      switch (M) {
        case 1: gemv_row<1>(a, o); break;
        case 2: gemv_row<2>(a, o); break;
        case 3: gemv_row<3>(a, o); break;
        case 4: gemv_row<4>(a, o); break;
        case 5: gemv_row<5>(a, o); break;
        case 6: gemv_row<6>(a, o); break;
        case 7: gemv_row<7>(a, o); break;
        default: gemv_row<8>(a, o); break;
      }
    }
  });
}
#endif

at::Tensor quant_linear_a8(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& zero, int64_t group_size, int64_t act_block,
                           const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
              "quant_linear_a8: x must be a contiguous (M, K) float32 CPU tensor, got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(act_block > 0 && act_block % kSub == 0, "quant_linear_a8: act_block=", act_block,
              " must be a multiple of ", kSub);
  TORCH_CHECK(group_size > 0 && K % group_size == 0 && group_size % act_block == 0, "quant_linear_a8: group_size=",
              group_size, " must divide K=", K, " and be a multiple of act_block=", act_block);
  TORCH_CHECK(weight.scalar_type() == at::kByte && weight.dim() == 2 && weight.size(1) == K && weight.is_contiguous(),
              "quant_linear_a8: weight must be a contiguous (N, ", K, ") uint8 tensor, got ", weight.sizes());
  const int64_t N = weight.size(0), G = K / group_size;
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2 && scale.size(0) == N &&
                  scale.size(1) == G,
              "quant_linear_a8: scale must be a contiguous (", N, ", ", G, ") float32 tensor");
  if (zero)
    TORCH_CHECK(zero->scalar_type() == at::kByte && zero->is_contiguous() && zero->dim() == 2 && zero->size(0) == N &&
                    zero->size(1) == G,
                "quant_linear_a8: zero must be a contiguous (", N, ", ", G, ") uint8 tensor");
  if (bias)
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->numel() == N && bias->is_contiguous(),
                "quant_linear_a8: bias must be a contiguous (", N, ",) float32 tensor");
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
#ifdef LMSTACK_VNNI512
  if (M <= kGemvRows) {
    std::vector<int8_t> q(M * K);
    std::vector<float> sx(M * (K / act_block)), zsum(M * G);
    A8 a{weight.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero ? zero->data_ptr<uint8_t>() : nullptr,
         bias ? bias->data_ptr<float>() : nullptr, nullptr, nullptr, nullptr, y.data_ptr<float>(), M, N, K, G,
         group_size, act_block};
    gemv_rows(x.data_ptr<float>(), M, a, q, sx, zsum);
    return y;
  }
#endif
  if (M <= kGemvRowsX) {
    std::vector<int8_t> q1(K);
    std::vector<float> sx1(K / act_block), zs1(G);
    at::Tensor xh = at::empty({M, K}, x.options());
    for (int64_t m = 0; m < M; ++m) {
      quantize_row(x.data_ptr<float>() + m * K, K, group_size, act_block, q1.data(), sx1.data(), zs1.data());
      float* dst = xh.data_ptr<float>() + m * K;
      for (int64_t i = 0; i < K; ++i) dst[i] = static_cast<float>(q1[i]) * sx1[i / act_block];
    }
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lmstack::quant_linear", "").typed<
        at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&,
                   const c10::optional<at::Tensor>&, int64_t, int64_t, const c10::optional<at::Tensor>&)>();
    return op.call(xh, weight, scale, zero, c10::nullopt, 8, group_size, bias);
  }
  const int64_t chunk = std::min(M, kChunk);
  std::vector<int8_t> q(chunk * K);
  std::vector<float> sx(chunk * (K / act_block)), zsum(chunk * G);
  A8 a{weight.data_ptr<uint8_t>(), scale.data_ptr<float>(), zero ? zero->data_ptr<uint8_t>() : nullptr,
       bias ? bias->data_ptr<float>() : nullptr, q.data(), sx.data(), zsum.data(), nullptr, 0, N, K, G, group_size,
       act_block};
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / K);
  for (int64_t c0 = 0; c0 < M; c0 += chunk) {
    const int64_t mc = std::min(chunk, M - c0);
    for (int64_t m = 0; m < mc; ++m)
      quantize_row(xp + (c0 + m) * K, K, group_size, act_block, q.data() + m * K, sx.data() + m * (K / act_block),
                   zsum.data() + m * G);
    a.M = mc;
    a.y = yp + c0 * N;
    lmstack::parallel_rows(N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t m0 = 0; m0 < mc; m0 += kTileA8) {
        switch (std::min<int64_t>(kTileA8, mc - m0)) {
          case 1: rows_tile<1>(a, begin, end, m0); break;
          case 2: rows_tile<2>(a, begin, end, m0); break;
          case 3: rows_tile<3>(a, begin, end, m0); break;
          default: rows_tile<4>(a, begin, end, m0); break;
        }
      }
    });
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmstack, m) {
  m.def("quant_linear_a8(Tensor x, Tensor weight, Tensor scale, Tensor? zero, int group_size, int act_block, "
        "Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmstack, CPU, m) {
  m.impl("quant_linear_a8", &quant_linear_a8);
}
