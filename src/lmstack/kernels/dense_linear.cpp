// Float32 linear for a few rows of x (decode): y = x @ W^T + bias, W (N, K) read once per call.
// Registered as torch.ops.lmstack.dense_linear; built by `make install` (lmstack/kernels/build.py).
//
// Why: at batch-1 decode every linear is a GEMV, bound by the bytes of weight read from memory
// (or cache). On our AMD EPYC machines F.linear (MKL) took 1.5x-2.7x this plain loop's time for
// one row of x (benchmarks/bench_engine.py prints both, and the machine's copy rate): for these
// small shapes MKL's dispatch and blocking cost as much as the work.
//
// Loop: 4 weight rows at a time against MT <= 4 rows of x, one vector accumulator per pair, so
// each weight vector loaded serves MT rows of x and each x vector 4 weight rows (16 accumulators
// at MT = 4: half the AVX-512 register file). Output rows are split over torch.get_num_threads()
// threads with pool.h (the caller never waits for a thread that has not started); a layer of
// less than ~64k weights stays on the calling thread. AVX-512 or AVX2 + FMA where the compiler
// targets them (-march=native), scalar loops otherwise (and for the tails).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "pool.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#define LMSTACK_VEC 16
using vec = __m512;
inline vec vzero() { return _mm512_setzero_ps(); }
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LMSTACK_VEC 8
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
#endif

namespace {

constexpr int kRows = 4;  // weight rows per pass
// rows of x per pass: 4 x 4 accumulators fit AVX-512's 32 registers, AVX2's 16 take 2 x 4
#if defined(LMSTACK_VEC) && LMSTACK_VEC == 8
constexpr int kTileM = 2;
#else
constexpr int kTileM = 4;
#endif

// y[m, o0 .. o0+R) for the MT rows of x starting at m0; R <= kRows weight rows.
template <int MT, int R>
inline void tile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t o0) {
  float s[MT][R] = {};
  int64_t k = 0;
#ifdef LMSTACK_VEC
  vec acc[MT][R];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = vzero();
  for (; k + LMSTACK_VEC <= K; k += LMSTACK_VEC) {
    vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = vload(w + (o0 + r) * K + k);
    for (int t = 0; t < MT; ++t) {
      const vec xv = vload(x + (m0 + t) * K + k);
      for (int r = 0; r < R; ++r) acc[t][r] = vfma(xv, wv[r], acc[t][r]);
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < R; ++r) s[t][r] = vsum(acc[t][r]);
#endif
  for (; k < K; ++k)
    for (int t = 0; t < MT; ++t)
      for (int r = 0; r < R; ++r) s[t][r] += x[(m0 + t) * K + k] * w[(o0 + r) * K + k];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < R; ++r) y[(m0 + t) * N + o0 + r] = s[t][r];
}

template <int MT>
void rows(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t begin, int64_t end) {
  int64_t o = begin;
  for (; o + kRows <= end; o += kRows) tile<MT, kRows>(x, w, y, K, N, m0, o);
  for (; o < end; ++o) tile<MT, 1>(x, w, y, K, N, m0, o);
}

at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "dense_linear: x must be a contiguous float32 (M, K) tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.size(1) == x.size(1),
              "dense_linear: weight must be a contiguous float32 (N, K=", x.size(1), ") tensor, got ", weight.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias)
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat && bias->is_contiguous(),
                "dense_linear: bias must be a contiguous float32 (N=", N, ") tensor, got ", bias->sizes());
  auto y = at::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(kRows, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  lmstack::parallel_rows(N, grain, [&](int64_t begin, int64_t end) {
    int64_t m = 0;
    for (; m + kTileM <= M; m += kTileM) rows<kTileM>(xp, wp, yp, K, N, m, begin, end);
    switch (M - m) {
      case 3: rows<3>(xp, wp, yp, K, N, m, begin, end); break;
      case 2: rows<2>(xp, wp, yp, K, N, m, begin, end); break;
      case 1: rows<1>(xp, wp, yp, K, N, m, begin, end); break;
      default: break;
    }
    if (has_bias) {
      const float* b = bias->data_ptr<float>();
      for (int64_t r = 0; r < M; ++r)
        for (int64_t o = begin; o < end; ++o) yp[r * N + o] += b[o];
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmstack, m) { m.def("dense_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(lmstack, CPU, m) { m.impl("dense_linear", &dense_linear); }
