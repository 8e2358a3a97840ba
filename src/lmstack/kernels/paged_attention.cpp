// Paged-attention decode on CPU: each query row reads its keys and values in place, block by
// block through its block table, with an online softmax. Registered as
// torch.ops.lmstack.paged_attention (attention only) and torch.ops.lmstack.paged_attention_step
// (RoPE on the new q and k, the new k and v written into their cache slots, then attention:
// everything between the QKV and output projections of a decode step, in one op); built by
// `make install` (lmstack/kernels/build.py) and loaded by lmstack/kernels/__init__.py. The PyTorch path it replaces (infer/paged_cache.py)
// gathers every row's context into a contiguous (B, S, KV, D) copy per layer, builds a mask and
// calls SDPA: at decode that is several ops and a copy of the whole context per layer and step.
//
//   out[b, t, h] = sum_p softmax_p(q[b, h, t] . k[p, g] * scale) v[p, g]     g = h / (H / KV)
//   over the positions p the query at qp = q_pos[b, t] may see: 0 <= p <= qp, and with a
//   sliding window W > 0 also qp - p < W. Position p of row b lives in slot
//   block_tables[b, p / bs] * bs + p % bs of k_cache / v_cache (slots, KV, D).
//   A padding query (qp < 0) gets zeros (its output is discarded).
//
// The keys of a query are exactly 0..qp because the cache writes the step's new tokens before
// attention runs: the causal bound is the context bound, so no lengths are passed.
//
// Online softmax (Milakov & Gimelshein 2018, as in FlashAttention): per query a running max m,
// a running sum l and an unnormalised accumulator acc (D); each block of keys gives its scores
// s_i, m' = max(m, max_i s_i), acc = acc * e^(m - m') + sum_i e^(s_i - m') v_i, likewise l,
// and out = acc / l at the end. One pass over K and V, nothing of size S written.
//
// GQA: a work item is a row b and a run of its kv heads (the whole row unless the threads need
// more items); keys outer, heads inner, so each key and value vector is loaded once for the
// H / KV query heads that share it and each slot's heads are read as one contiguous run.
// AVX-512 where the compiler targets it (-march=native), else AVX2, else scalar loops. Items run in parallel on
// torch.get_num_threads() threads (pool.h) when there is enough work to pay for waking one.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "paged_attention.h"
#include "pool.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LMSTACK_AVX2 1
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

#ifdef LMSTACK_AVX2
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}
#endif

inline float dot(const float* a, const float* b, int64_t D) {
  int64_t d = 0;
  float s = 0.f;
#if defined(__AVX512F__)
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
  for (; d + 32 <= D; d += 32) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d + 16), _mm512_loadu_ps(b + d + 16), a1);
  }
  for (; d + 16 <= D; d += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), a0);
  s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(LMSTACK_AVX2)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; d + 16 <= D; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), a1);
  }
  for (; d + 8 <= D; d += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), a0);
  s = hsum8(_mm256_add_ps(a0, a1));
#endif
  for (; d < D; ++d) s += a[d] * b[d];
  return s;
}

// y = y * c   (the rescale of an accumulator when the running max grows)
inline void scale(float* y, float c, int64_t D) {
  int64_t d = 0;
#if defined(__AVX512F__)
  const __m512 cv = _mm512_set1_ps(c);
  for (; d + 16 <= D; d += 16) _mm512_storeu_ps(y + d, _mm512_mul_ps(cv, _mm512_loadu_ps(y + d)));
#elif defined(LMSTACK_AVX2)
  const __m256 cv = _mm256_set1_ps(c);
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(y + d, _mm256_mul_ps(cv, _mm256_loadu_ps(y + d)));
#endif
  for (; d < D; ++d) y[d] *= c;
}

// y = y + p * v
inline void axpy(float* y, float p, const float* v, int64_t D) {
  int64_t d = 0;
#if defined(__AVX512F__)
  const __m512 pv = _mm512_set1_ps(p);
  for (; d + 16 <= D; d += 16)
    _mm512_storeu_ps(y + d, _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + d), _mm512_loadu_ps(y + d)));
#elif defined(LMSTACK_AVX2)
  const __m256 pv = _mm256_set1_ps(p);
  for (; d + 8 <= D; d += 8)
    _mm256_storeu_ps(y + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + d), _mm256_loadu_ps(y + d)));
#endif
  for (; d < D; ++d) y[d] += p * v[d];
}

struct Args {
  const float* q;          // (B, H, T, D) with strides qs_b, qs_h, qs_t (last dim contiguous)
  int64_t qs_b, qs_h, qs_t;
  const float* k;          // (slots, KV, D) contiguous
  const float* v;
  const int64_t* tables;   // (B, n_blk)
  const int64_t* q_pos;    // (B, T)
  float* out;              // (B, T, H, D) contiguous
  int64_t B, T, H, KV, D, n_blk, bs, window;
  float scale;
};

// Keys per pass: the scores of one block (or this many keys of it) for every query head of the group.
constexpr int64_t kKeys = 32;

// One work item: row b, kv heads g0..g1 (and their query heads h = g * rep .. (g + 1) * rep - 1,
// rep = H / KV), all T queries. Slots outer, heads inner: one pass over a block reads each
// slot's keys (and then values) of the item's kv heads as one contiguous run, which the
// hardware prefetcher streams (measured 1.5-1.8x faster than a pass per kv head when the
// cache is not in L2), and loads each key and value vector once for the rep heads sharing it.
void item(const Args& a, int64_t b, int64_t g0, int64_t g1) {
  const int64_t rep = a.H / a.KV, D = a.D, h0 = g0 * rep, nh = (g1 - g0) * rep;
  std::vector<float> acc(nh * D), run_max(nh), run_sum(nh), scores(nh * kKeys);
  std::vector<const float*> qv(nh);
  for (int64_t t = 0; t < a.T; ++t) {
    const int64_t qp = a.q_pos[b * a.T + t];
    float* out_t = a.out + ((b * a.T + t) * a.H + h0) * D;   // the item's heads, contiguous
    if (qp < 0) {
      std::fill(out_t, out_t + nh * D, 0.f);
      continue;
    }
    const int64_t lo = a.window > 0 ? std::max<int64_t>(0, qp - a.window + 1) : 0;
    for (int64_t h = 0; h < nh; ++h) qv[h] = a.q + b * a.qs_b + (h0 + h) * a.qs_h + t * a.qs_t;
    std::fill(acc.begin(), acc.end(), 0.f);
    std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<float>::infinity());
    std::fill(run_sum.begin(), run_sum.end(), 0.f);
    // positions lo..qp, in runs that stay inside one block (contiguous slots)
    for (int64_t p0 = lo; p0 <= qp;) {
      const int64_t blk = p0 / a.bs, off = p0 % a.bs;
      const int64_t n = std::min({a.bs - off, qp + 1 - p0, kKeys});
      const int64_t slot0 = a.tables[b * a.n_blk + blk] * a.bs + off;
      const int64_t stride = a.KV * D;   // next slot
      const float* kp = a.k + (slot0 * a.KV + g0) * D;
      const float* vp = a.v + (slot0 * a.KV + g0) * D;
      for (int64_t i = 0; i < n; ++i)
        for (int64_t h = 0; h < nh; ++h)
          scores[h * kKeys + i] = dot(qv[h], kp + i * stride + (h / rep) * D, D) * a.scale;
      for (int64_t h = 0; h < nh; ++h) {
        float* s = scores.data() + h * kKeys;
        float mb = run_max[h];
        for (int64_t i = 0; i < n; ++i) mb = std::max(mb, s[i]);
        const float c = std::exp(run_max[h] - mb);   // -inf the first time: c = 0 on a zero acc and sum
        float l = run_sum[h] * c;
        for (int64_t i = 0; i < n; ++i) {
          s[i] = std::exp(s[i] - mb);
          l += s[i];
        }
        if (c != 1.f) scale(acc.data() + h * D, c, D);
        run_max[h] = mb;
        run_sum[h] = l;
      }
      for (int64_t i = 0; i < n; ++i)
        for (int64_t h = 0; h < nh; ++h)
          axpy(acc.data() + h * D, scores[h * kKeys + i], vp + i * stride + (h / rep) * D, D);
      p0 += n;
    }
    for (int64_t h = 0; h < nh; ++h) {
      const float inv = 1.f / run_sum[h];
      const float* ac = acc.data() + h * D;
      float* o = out_t + h * D;
      for (int64_t d = 0; d < D; ++d) o[d] = ac[d] * inv;
    }
  }
}

// The checks shared by both ops: k_cache / v_cache (slots, KV, D), block_tables (B, n_blk),
// q_pos (B, T); every position a query reads has a table entry and every entry a slot (O(B*T +
// B*n_blk), so the loops never read out of bounds).
void check_paged(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& block_tables,
                 const at::Tensor& q_pos, int64_t B, int64_t H, int64_t T, int64_t D, int64_t block_size) {
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  k_cache.sizes() == v_cache.sizes() && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat,
              "paged_attention: k_cache and v_cache must be contiguous float32 (slots, KV, D) of one shape, got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t KV = k_cache.size(1);
  TORCH_CHECK(k_cache.size(2) == D, "paged_attention: head_dim of q (", D, ") and the cache (", k_cache.size(2),
              ") differ");
  TORCH_CHECK(KV > 0 && H % KV == 0, "paged_attention: ", H, " query heads are not a multiple of ", KV, " kv heads");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == B && block_tables.scalar_type() == at::kLong &&
                  block_tables.is_contiguous(),
              "paged_attention: block_tables must be a contiguous int64 (B=", B, ", n_blk) tensor, got ",
              block_tables.sizes());
  TORCH_CHECK(q_pos.dim() == 2 && q_pos.size(0) == B && q_pos.size(1) == T && q_pos.scalar_type() == at::kLong &&
                  q_pos.is_contiguous(),
              "paged_attention: q_pos must be a contiguous int64 (B=", B, ", T=", T, ") tensor, got ", q_pos.sizes());
  TORCH_CHECK(block_size > 0, "paged_attention: block_size must be positive, got ", block_size);
  const int64_t n_blk = block_tables.size(1);
  const int64_t slots = k_cache.size(0);
  const int64_t* qp = q_pos.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i)
    TORCH_CHECK(qp[i] < n_blk * block_size, "paged_attention: query position ", qp[i], " has no block in its table (",
                n_blk, " blocks of ", block_size, ")");
  const int64_t* tb = block_tables.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * n_blk; ++i)
    TORCH_CHECK(tb[i] >= 0 && (tb[i] + 1) * block_size <= slots, "paged_attention: block id ", tb[i],
                " is outside the cache (", slots / block_size, " blocks)");
}

// Attention of q (B, H, T, D) (strides qs_*) over the cache; out (B, T, H, D).
void attend(const float* q, int64_t qs_b, int64_t qs_h, int64_t qs_t, const at::Tensor& k_cache,
            const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& q_pos, int64_t H,
            int64_t block_size, double scale, int64_t window, at::Tensor& out) {
  const int64_t B = q_pos.size(0), T = q_pos.size(1), KV = k_cache.size(1), D = k_cache.size(2);
  const int64_t* qp = q_pos.data_ptr<int64_t>();
  Args a{q, qs_b, qs_h, qs_t, k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
         block_tables.data_ptr<int64_t>(), qp, out.data_ptr<float>(), B, T, H, KV, D, block_tables.size(1),
         block_size, window, static_cast<float>(scale)};
  // work ~ the keys read: wake helpers only when an item's share is worth microseconds
  int64_t keys = 0;
  for (int64_t i = 0; i < B * T; ++i) keys += window > 0 ? std::min(qp[i] + 1, window) : qp[i] + 1;
  // items: each row's kv heads cut into `parts` runs, just enough items for the threads (whole
  // rows when there are as many rows as threads: the longest contiguous reads)
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t parts = std::min(KV, (threads + B - 1) / B);
  const int64_t n_items = B * parts;
  const int64_t work = keys * H * D;   // multiply-adds, both passes
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) * n_items / std::max<int64_t>(work, 1));
  lmstack::parallel_rows(n_items, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / parts, part = i % parts;
      item(a, b, part * KV / parts, (part + 1) * KV / parts);
    }
  });
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& q_pos, int64_t block_size,
                           double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kFloat && q.stride(3) == 1,
              "paged_attention: q must be a float32 (B, H, T, D) tensor with a contiguous last dim, got ",
              q.sizes(), " ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3);
  check_paged(k_cache, v_cache, block_tables, q_pos, B, H, T, D, block_size);
  auto out = at::empty({B, T, H, D}, q.options());
  attend(q.data_ptr<float>(), q.stride(0), q.stride(1), q.stride(2), k_cache, v_cache, block_tables, q_pos, H,
         block_size, scale, window, out);
  return out;
}

// y = RoPE(x) in the half-split layout of model/positions.py: pairs (i, i + rot/2) rotate by
// the angle whose cos / sin are c[i] (= c[i + rot/2]); dims >= rot are copied. c == nullptr: copy.
inline void rope(float* y, const float* x, const float* c, const float* s, int64_t rot, int64_t D) {
  int64_t d = 0;
  if (c != nullptr) {
    const int64_t h = rot / 2;
    for (int64_t i = 0; i < h; ++i) {
      y[i] = x[i] * c[i] - x[i + h] * s[i];
      y[i + h] = x[i + h] * c[i + h] + x[i] * s[i + h];
    }
    d = rot;
  }
  for (; d < D; ++d) y[d] = x[d];
}

void check_qkv(const at::Tensor& t, const char* name, int64_t B, int64_t T, int64_t heads, int64_t D) {
  TORCH_CHECK(t.dim() == 4 && t.size(0) == B && t.size(1) == T && t.size(2) == heads && t.size(3) == D &&
                  t.scalar_type() == at::kFloat && t.stride(3) == 1,
              "paged_attention_step: ", name, " must be float32 (B=", B, ", T=", T, ", ", heads, ", D=", D,
              ") with a contiguous last dim, got ", t.sizes(), " ", t.scalar_type());
}

}  // namespace

namespace lmstack {

// Declared in paged_attention.h (decode_step.cpp calls it too).
at::Tensor paged_attention_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor k_cache,
                                at::Tensor v_cache, const at::Tensor& block_tables, const at::Tensor& q_pos,
                                const c10::optional<at::Tensor>& cos, const c10::optional<at::Tensor>& sin,
                                int64_t block_size, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 4, "paged_attention_step: q must be (B, T, H, D), got ", q.sizes());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), KV = k_cache.size(1);
  check_qkv(q, "q", B, T, H, D);
  check_qkv(k, "k", B, T, KV, D);
  check_qkv(v, "v", B, T, KV, D);
  check_paged(k_cache, v_cache, block_tables, q_pos, B, H, T, D, block_size);
  const bool has_rope = cos.has_value() && cos->defined();
  int64_t rot = 0;
  const float *cp = nullptr, *sp = nullptr;
  if (has_rope) {
    TORCH_CHECK(sin.has_value() && sin->defined() && cos->is_contiguous() && sin->is_contiguous() &&
                    cos->sizes() == sin->sizes() && cos->dim() == 3 && cos->size(0) == B && cos->size(1) == T &&
                    cos->size(2) <= D && cos->size(2) % 2 == 0 && cos->scalar_type() == at::kFloat &&
                    sin->scalar_type() == at::kFloat,
                "paged_attention_step: cos and sin must be contiguous float32 (B, T, rot <= D, even), got ",
                cos->sizes());
    rot = cos->size(2);
    cp = cos->data_ptr<float>();
    sp = sin->data_ptr<float>();
  }
  const int64_t* qp = q_pos.data_ptr<int64_t>();
  const int64_t* tb = block_tables.data_ptr<int64_t>();
  const int64_t n_blk = block_tables.size(1);
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  auto q_rot = at::empty({B, T, H, D}, q.options());
  float* qr = q_rot.data_ptr<float>();
  const float *qd = q.data_ptr<float>(), *kd = k.data_ptr<float>(), *vd = v.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t p = qp[b * T + t];
      if (p < 0) continue;   // padding: nothing written, its query gets zeros
      const float* c = has_rope ? cp + (b * T + t) * rot : nullptr;
      const float* s = has_rope ? sp + (b * T + t) * rot : nullptr;
      const int64_t slot = tb[b * n_blk + p / block_size] * block_size + p % block_size;
      for (int64_t g = 0; g < KV; ++g) {
        rope(kc + (slot * KV + g) * D, kd + b * k.stride(0) + t * k.stride(1) + g * k.stride(2), c, s, rot, D);
        const float* vs = vd + b * v.stride(0) + t * v.stride(1) + g * v.stride(2);
        std::copy(vs, vs + D, vc + (slot * KV + g) * D);
      }
      for (int64_t h = 0; h < H; ++h)
        rope(qr + ((b * T + t) * H + h) * D, qd + b * q.stride(0) + t * q.stride(1) + h * q.stride(2), c, s, rot, D);
    }
  auto out = at::empty({B, T, H, D}, q.options());
  attend(qr, T * H * D, D, H * D, k_cache, v_cache, block_tables, q_pos, H, block_size, scale, window, out);
  return out;
}

}  // namespace lmstack

TORCH_LIBRARY_FRAGMENT(lmstack, m) {
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor q_pos, "
        "int block_size, float scale, int window) -> Tensor");
  m.def("paged_attention_step(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor block_tables, Tensor q_pos, Tensor? cos, Tensor? sin, int block_size, float scale, int window) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(lmstack, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("paged_attention_step", &lmstack::paged_attention_step);
}
