// Float32 linear for a few rows of x (decode): y = x @ W^T + bias, W (N, K) read once per call.
// Registered as torch.ops.lmstack.dense_linear; built by `make install` (lmstack/kernels/build.py).
//
// Why: at batch-1 decode every linear is a GEMV, bound by the bytes of weight read from memory
// (or cache). On our AMD EPYC machines F.linear (MKL) took 1.5x-2.7x this plain loop's time for
// one row of x (benchmarks/bench_engine.py prints both, and the machine's read rate): for these
// small shapes MKL's dispatch and blocking cost as much as the work.
//
// Loop: for one to three rows of x (decode), ONE weight row at a time, front to back: the
// weight is read as a single sequential stream (rows are contiguous, so consecutive rows
// continue it), each weight vector loaded serves every row of x, and x (a few KB) stays in L1.
// Measured on the 53.5M Llama's decode linears (214 MB, one thread, load ~3, thread CPU time):
// 20-22 GB/s, against 15 for the former loop that interleaved 4 weight rows (4 streams), 12-13
// for MKL and 25-27 for the read rate of a plain sum (benchmarks/_speed_of_light.py); on the
// small model's 13.5 MB (cache-resident) 2.2x the former loop. Each (x row, weight row) pair
// keeps U independent accumulator chains (U * pairs >= 4 hides the FMA latency), summed once
// per row. More rows of x: see kWeightRows. Output rows are split over torch.get_num_threads()
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
inline vec vadd(vec a, vec b) { return _mm512_add_ps(a, b); }
inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LMSTACK_VEC 8
using vec = __m256;
inline vec vzero() { return _mm256_setzero_ps(); }
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline vec vadd(vec a, vec b) { return _mm256_add_ps(a, b); }
inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
#endif

namespace {

// Weight rows per pass for MT <= 4 rows of x: one (a single stream) while the loop is bound by
// memory. At 4 rows of x, reloading x for every weight row costs more than the extra streams:
// R rows share each load of x, R x MT accumulators (AVX-512: 16 of its 32 registers; AVX2: 8
// of 16). 5-8 rows of x: two passes (4 + the rest) over each chunk of output rows, the second
// reading the weights from cache; one pass of 8 rows x 2 weight rows measured 6% slower.
#if defined(LMSTACK_VEC) && LMSTACK_VEC == 8
template <int MT>
constexpr int kWeightRows = MT <= 3 ? 1 : 2;
#else
template <int MT>
constexpr int kWeightRows = MT <= 3 ? 1 : 4;
#endif

// y[m, o .. o+R) for the MT rows of x starting at x (row stride K); w: weight row o (stride K).
template <int MT, int R>
inline void tile(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t o) {
  float s[MT][R] = {};
  int64_t k = 0;
#ifdef LMSTACK_VEC
  constexpr int V = LMSTACK_VEC;
  // U vectors of each weight row per step: U * R * MT independent chains (>= 4 hide the FMA
  // latency), at most 16 accumulators
  constexpr int U = MT * R >= 4 ? 1 : 4 / (MT * R);
  vec acc[MT][R][U];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) acc[t][r][u] = vzero();
  for (; k + U * V <= K; k += U * V) {
    vec wv[R][U];
    for (int r = 0; r < R; ++r)
      for (int u = 0; u < U; ++u) wv[r][u] = vload(w + r * K + k + u * V);
    for (int t = 0; t < MT; ++t)
      for (int u = 0; u < U; ++u) {
        const vec xv = vload(x + t * K + k + u * V);
        for (int r = 0; r < R; ++r) acc[t][r][u] = vfma(xv, wv[r][u], acc[t][r][u]);
      }
  }
  for (; k + V <= K; k += V) {
    vec wv[R];
    for (int r = 0; r < R; ++r) wv[r] = vload(w + r * K + k);
    for (int t = 0; t < MT; ++t) {
      const vec xv = vload(x + t * K + k);
      for (int r = 0; r < R; ++r) acc[t][r][0] = vfma(xv, wv[r], acc[t][r][0]);
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < R; ++r) {
      for (int u = 1; u < U; ++u) acc[t][r][0] = vadd(acc[t][r][0], acc[t][r][u]);
      s[t][r] = vsum(acc[t][r][0]);
    }
#endif
  for (; k < K; ++k)
    for (int t = 0; t < MT; ++t)
      for (int r = 0; r < R; ++r) s[t][r] += x[t * K + k] * w[r * K + k];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < R; ++r) y[t * N + o + r] = s[t][r];
}

// output rows [begin, end) for the MT rows of x starting at row m0
template <int MT>
void rows(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t begin, int64_t end) {
  constexpr int R = kWeightRows<MT>;
  int64_t o = begin;
  for (; o + R <= end; o += R) tile<MT, R>(x + m0 * K, w + o * K, y + m0 * N, K, N, o);
  for (; o < end; ++o) tile<MT, 1>(x + m0 * K, w + o * K, y + m0 * N, K, N, o);
}

void rows_any(int64_t mt, const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0, int64_t begin,
              int64_t end) {
  switch (mt) {
    case 1: rows<1>(x, w, y, K, N, m0, begin, end); break;
    case 2: rows<2>(x, w, y, K, N, m0, begin, end); break;
    case 3: rows<3>(x, w, y, K, N, m0, begin, end); break;
    default: rows<4>(x, w, y, K, N, m0, begin, end); break;
  }
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
  constexpr int64_t tile_m = 4;  // rows of x per pass over a chunk of the weight (kWeightRows)
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(K, 1));
  lmstack::parallel_rows(N, grain, [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < M; m += tile_m) rows_any(std::min(tile_m, M - m), xp, wp, yp, K, N, m, begin, end);
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
