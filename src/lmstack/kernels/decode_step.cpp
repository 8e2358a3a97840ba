// A whole decode step of a Llama-family model in one op: token ids in, logits out.
// Registered as torch.ops.lmstack.decode_step; built by `make install` (lmstack/kernels/build.py);
// the engine calls it through infer/fused_decode.py for rows of one new token each.
//
// Why: at batch-1 decode a small model's step is ~100 tiny ops, and in eager PyTorch each costs
// microseconds of Python, module calls and dispatch, far more than its arithmetic (issue 20:
// a 4 x 256 Llama spent ~2.2 ms a token in the engine, against ~0.4 ms for its weights' GEMVs).
// Here the step is a plain C++ loop over the layers:
//
//   x = wte[ids]                                                     (B, C)
//   per layer:  h = rmsnorm(x) * w_attn_norm
//               q, k, v = split(h @ W_qkv^T + b_qkv)                  rows [q (H*D) | k (KV*D) | v (KV*D)]
//               y = paged_attention_step(q, k, v, ...)               RoPE, K/V write, paged attention
//               x = x + y @ W_o^T + b_o
//               h = rmsnorm(x) * w_mlp_norm
//               g, u = split(h @ W_fc^T + b_fc)                      rows [gate (I) | up (I)]
//               x = x + (silu(g) * u) @ W_down^T + b_down
//   logits = (rmsnorm(x) * w_norm_f) @ W_head^T                       (B, V)
//
// exactly the model/transformer.py forward of a pre-norm RMSNorm + SwiGLU decoder (what
// infer/fused_decode.py checks before it calls this). The linears are the library's own
// lmstack::dense_linear GEMV for up to `gemv_rows` rows (dense_linear.cpp, called through the
// dispatcher: its internals are its own) and at::linear (MKL) beyond; the attention is
// paged_attention.cpp's step function. Norms and the residual adds are loops here.
// A linear may instead be model/quantized.py's IntLinear (codes + scales, `quant` / `quant_meta`):
// it then runs lmstack::quant_linear or lmstack::quant_linear_a8 (W8A8) through the dispatcher with
// the arguments its module's forward passes, so the op computes what the module computes.
// Measured (benchmarks/bench_engine.py --quick --only 6 --threads 1, load ~2): the engine's
// batch-1 step on that 4 x 256 Llama went from ~2.2 to 0.42 ms a token (llama.cpp F32: 0.37).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>

#include "paged_attention.h"

namespace {

constexpr int64_t kPerLayer = 6;   // weights: attn_norm, qkv, o, mlp_norm, fc, down
constexpr int64_t kBiases = 4;     // biases (None allowed): qkv, o, fc, down
constexpr int64_t kLinears = 4;    // linears a layer (qkv, o, fc, down); the head is linear kLinears * L

// y[b] = x[b] / sqrt(mean(x[b]^2) + eps) * w, float32 accumulation (F.rms_norm's arithmetic).
void rms_norm(const float* x, const float* w, float* y, int64_t B, int64_t C, float eps) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xr = x + b * C;
    float acc[16] = {};   // 16 partial sums: the compiler vectorises the loop
    int64_t c = 0;
    for (; c + 16 <= C; c += 16)
      for (int i = 0; i < 16; ++i) acc[i] += xr[c + i] * xr[c + i];
    float ss = 0.f;
    for (int i = 0; i < 16; ++i) ss += acc[i];
    for (; c < C; ++c) ss += xr[c] * xr[c];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
    float* yr = y + b * C;
    for (c = 0; c < C; ++c) yr[c] = xr[c] * inv * w[c];
  }
}

// x (M, K) @ w (N, K)^T + bias: the GEMV kernel for few rows, MKL's GEMM for more.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                  int64_t gemv_rows) {
  if (x.size(0) <= gemv_rows) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lmstack::dense_linear", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const c10::optional<at::Tensor>&)>();
    return op.call(x, w, bias);
  }
  return at::linear(x, w, bias);
}

// A quantized linear (model/quantized.py's IntLinear) as its module computes it: its statistics
// and settings, one entry per linear of the step.
struct Quant {
  int64_t bits = 0;                  // 0: a float32 weight (nn.Linear); 8 / 4: uint8 codes
  int64_t group = 0, act_block = 0;  // inputs per scale; act_block > 0: W8A8 (int8 inputs)
  c10::optional<at::Tensor> scale, zero, awq;
};

// y = x @ W_hat^T + bias by the kernel the module's forward calls, with the same arguments
// (quant_linear_a8 for W8A8, else quant_linear on x / awq_scale for AWQ, x otherwise).
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias,
                        const Quant& q, int64_t gemv_rows) {
  if (q.bits == 0) return linear(x, w, bias, gemv_rows);
  if (q.act_block > 0) {
    static auto a8 = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("lmstack::quant_linear_a8", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           const c10::optional<at::Tensor>&, int64_t, int64_t,
                                           const c10::optional<at::Tensor>&)>();
    return a8.call(x, w, *q.scale, q.zero, q.group, q.act_block, bias);
  }
  static auto wo = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("lmstack::quant_linear", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t,
                                         int64_t, const c10::optional<at::Tensor>&)>();
  return wo.call(q.awq.has_value() ? x.div(*q.awq) : x, w, *q.scale, q.zero, c10::nullopt, q.bits, q.group, bias);
}

void check_weight(const at::Tensor& t, int64_t rows, int64_t cols, const char* what, int64_t layer) {
  const bool ok = t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu() &&
                  (cols < 0 ? t.dim() == 1 && t.size(0) == rows
                            : t.dim() == 2 && t.size(0) == rows && t.size(1) == cols);
  TORCH_CHECK(ok, "decode_step: layer ", layer, " ", what, " must be a contiguous float32 CPU tensor of shape (", rows,
              cols < 0 ? "" : ", ", cols < 0 ? "" : std::to_string(cols), "), got ", t.sizes(), " ", t.scalar_type());
}

// A linear's weight: float32 (rows, cols), or uint8 codes (rows, cols) / (rows, cols / 2) for 8 / 4 bits
// with float32 scales (rows, cols / group) (the kernel checks the rest: zero points, act_block ...).
void check_linear(const at::Tensor& w, int64_t rows, int64_t cols, const Quant& q, const char* what, int64_t layer) {
  if (q.bits == 0) return check_weight(w, rows, cols, what, layer);
  const int64_t codes = q.bits == 4 ? cols / 2 : cols;
  const bool ok = w.scalar_type() == at::kByte && w.is_contiguous() && w.device().is_cpu() && w.dim() == 2 &&
                  w.size(0) == rows && w.size(1) == codes && q.group > 0 && cols % q.group == 0 &&
                  q.scale.has_value() && q.scale->scalar_type() == at::kFloat && q.scale->dim() == 2 &&
                  q.scale->size(0) == rows && q.scale->size(1) == cols / q.group;
  TORCH_CHECK(ok, "decode_step: layer ", layer, " ", what, " (", q.bits, "-bit) must be contiguous uint8 codes of shape (",
              rows, ", ", codes, ") with float32 scales (", rows, ", ", cols, " / group_size), got ", w.sizes(), " ",
              w.scalar_type());
  TORCH_CHECK(!q.awq.has_value() || (q.awq->scalar_type() == at::kFloat && q.awq->numel() == cols),
              "decode_step: layer ", layer, " ", what, " awq_scale must be float32 of ", cols, " values");
}

// Linear i's Quant from quant (3 tensors a linear: scale, zero, awq_scale) and quant_meta (3 ints:
// bits, group_size, act_block); both empty: every linear float32.
Quant quant_at(const c10::List<c10::optional<at::Tensor>>& quant, at::IntArrayRef meta, int64_t i) {
  Quant q;
  if (meta.empty()) return q;
  q.bits = meta[3 * i];
  q.group = meta[3 * i + 1];
  q.act_block = meta[3 * i + 2];
  TORCH_CHECK(q.bits == 0 || q.bits == 4 || q.bits == 8, "decode_step: linear ", i, " has bits=", q.bits,
              " (0: float32, 4 or 8)");
  TORCH_CHECK(q.act_block == 0 || q.bits == 8, "decode_step: act_block goes with 8-bit codes");
  auto get = [&](int64_t j) -> c10::optional<at::Tensor> {
    c10::optional<at::Tensor> t = quant.get(3 * i + j);
    return t.has_value() && t->defined() ? t : c10::nullopt;
  };
  q.scale = get(0);
  q.zero = get(1);
  q.awq = get(2);
  return q;
}

c10::optional<at::Tensor> bias_at(const c10::List<c10::optional<at::Tensor>>& biases, int64_t i, int64_t n,
                                  const char* what, int64_t layer) {
  c10::optional<at::Tensor> b = biases.get(i);
  if (b.has_value() && b->defined()) {
    check_weight(*b, n, -1, what, layer);
    return b;
  }
  return c10::nullopt;
}

// ids (B,) long; q_pos (B, 1) long positions; block_tables (B, n_blk) long; k_cache / v_cache
// (n_layer, slots, KV, D) float32; rope_cos / rope_sin: the RoPE tables (P, rot), row p for
// position p (model/positions.py), or None; weights: 6 per layer (see kPerLayer), biases: 4 per
// layer (None: no bias). Returns logits (B, V) float32.
at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& q_pos, const at::Tensor& block_tables,
                       at::Tensor k_cache, at::Tensor v_cache, const c10::optional<at::Tensor>& rope_cos,
                       const c10::optional<at::Tensor>& rope_sin, const at::Tensor& wte, at::TensorList weights,
                       const c10::List<c10::optional<at::Tensor>>& biases, const at::Tensor& norm_f,
                       const at::Tensor& lm_head, const c10::List<c10::optional<at::Tensor>>& quant,
                       at::IntArrayRef quant_meta, int64_t n_head, int64_t n_kv_head, double eps, int64_t block_size,
                       double scale, int64_t window, int64_t gemv_rows) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == at::kLong && ids.is_contiguous(),
              "decode_step: ids must be a contiguous int64 (B,) tensor, got ", ids.sizes());
  const int64_t B = ids.size(0), V = wte.size(0), C = wte.size(1);
  TORCH_CHECK(wte.dim() == 2 && wte.scalar_type() == at::kFloat && wte.is_contiguous(),
              "decode_step: wte must be a contiguous float32 (V, C) tensor, got ", wte.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "decode_step: k_cache and v_cache must be (n_layer, slots, KV, D) of one shape, got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  const int64_t L = k_cache.size(0), KV = k_cache.size(2), D = k_cache.size(3), H = n_head;
  TORCH_CHECK(KV == n_kv_head && H % KV == 0, "decode_step: the cache has ", KV, " kv heads, the model ", n_kv_head,
              " of ", H, " heads");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == kPerLayer * L &&
                  biases.size() == static_cast<size_t>(kBiases * L),
              "decode_step: expected ", kPerLayer * L, " weights and ", kBiases * L, " biases for ", L,
              " layers, got ", weights.size(), " and ", biases.size());
  TORCH_CHECK((quant.size() == 0 && quant_meta.empty()) ||
                  (quant.size() == static_cast<size_t>(3 * (kLinears * L + 1)) &&
                   static_cast<int64_t>(quant_meta.size()) == 3 * (kLinears * L + 1)),
              "decode_step: quant and quant_meta must hold 3 entries for each of the ", kLinears * L + 1,
              " linears (or be empty: all float32), got ", quant.size(), " and ", quant_meta.size());
  check_weight(norm_f, C, -1, "norm_f", L);
  const Quant q_head = quant_at(quant, quant_meta, kLinears * L);
  check_linear(lm_head, lm_head.size(0), C, q_head, "lm_head", L);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(id[b] >= 0 && id[b] < V, "decode_step: token id ", id[b], " is outside the vocabulary [0, ", V, ")");
  TORCH_CHECK(q_pos.dim() == 2 && q_pos.size(0) == B && q_pos.size(1) == 1 && q_pos.scalar_type() == at::kLong &&
                  q_pos.is_contiguous(),
              "decode_step: q_pos must be a contiguous int64 (B=", B, ", 1) tensor, got ", q_pos.sizes());
  // this step's rows of the RoPE tables: cos / sin (B, 1, rot), what paged_attention_step takes
  c10::optional<at::Tensor> cos, sin;
  if (rope_cos.has_value() && rope_cos->defined()) {
    TORCH_CHECK(rope_sin.has_value() && rope_sin->defined() && rope_cos->dim() == 2 &&
                    rope_cos->sizes() == rope_sin->sizes() && rope_cos->is_contiguous() && rope_sin->is_contiguous() &&
                    rope_cos->scalar_type() == at::kFloat && rope_sin->scalar_type() == at::kFloat,
                "decode_step: rope_cos and rope_sin must be contiguous float32 (P, rot) tables of one shape");
    const int64_t P = rope_cos->size(0), rot = rope_cos->size(1);
    cos = at::empty({B, 1, rot}, wte.options());
    sin = at::empty({B, 1, rot}, wte.options());
    const int64_t* qp = q_pos.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
      TORCH_CHECK(qp[b] >= 0 && qp[b] < P, "decode_step: position ", qp[b], " is outside the RoPE tables (", P,
                  " positions)");
      const float* c = rope_cos->data_ptr<float>() + qp[b] * rot;
      const float* s = rope_sin->data_ptr<float>() + qp[b] * rot;
      std::copy(c, c + rot, cos->data_ptr<float>() + b * rot);
      std::copy(s, s + rot, sin->data_ptr<float>() + b * rot);
    }
  }

  at::Tensor x = at::empty({B, C}, wte.options());   // the residual stream
  at::Tensor h = at::empty({B, C}, wte.options());   // its normed copy, input of the next linear
  float* xp = x.data_ptr<float>();
  float* hp = h.data_ptr<float>();
  const float* wp = wte.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) std::copy(wp + id[b] * C, wp + (id[b] + 1) * C, xp + b * C);
  const float feps = static_cast<float>(eps);

  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w_attn_norm = weights[kPerLayer * l + 0];
    const at::Tensor& w_qkv = weights[kPerLayer * l + 1];
    const at::Tensor& w_o = weights[kPerLayer * l + 2];
    const at::Tensor& w_mlp_norm = weights[kPerLayer * l + 3];
    const at::Tensor& w_fc = weights[kPerLayer * l + 4];
    const at::Tensor& w_down = weights[kPerLayer * l + 5];
    const Quant q_qkv = quant_at(quant, quant_meta, kLinears * l + 0), q_o = quant_at(quant, quant_meta, kLinears * l + 1),
                q_fc = quant_at(quant, quant_meta, kLinears * l + 2), q_down = quant_at(quant, quant_meta, kLinears * l + 3);
    const int64_t I = w_fc.size(0) / 2;
    check_weight(w_attn_norm, C, -1, "attn_norm", l);
    check_linear(w_qkv, (H + 2 * KV) * D, C, q_qkv, "qkv", l);
    check_linear(w_o, C, H * D, q_o, "o proj", l);
    check_weight(w_mlp_norm, C, -1, "mlp_norm", l);
    check_linear(w_fc, 2 * I, C, q_fc, "fc (gate | up)", l);
    check_linear(w_down, C, I, q_down, "down proj", l);

    // attention sublayer
    rms_norm(xp, w_attn_norm.data_ptr<float>(), hp, B, C, feps);
    at::Tensor qkv = quant_linear(h, w_qkv, bias_at(biases, kBiases * l + 0, (H + 2 * KV) * D, "qkv bias", l), q_qkv,
                                  gemv_rows)
                         .view({B, 1, H + 2 * KV, D});
    at::Tensor y = lmstack::paged_attention_step(qkv.narrow(2, 0, H), qkv.narrow(2, H, KV), qkv.narrow(2, H + KV, KV),
                                                 k_cache[l], v_cache[l], block_tables, q_pos, cos, sin, block_size,
                                                 scale, window);   // (B, 1, H, D)
    at::Tensor o =
        quant_linear(y.view({B, H * D}), w_o, bias_at(biases, kBiases * l + 1, C, "o bias", l), q_o, gemv_rows);
    const float* op = o.data_ptr<float>();
    for (int64_t i = 0; i < B * C; ++i) xp[i] += op[i];

    // MLP sublayer
    rms_norm(xp, w_mlp_norm.data_ptr<float>(), hp, B, C, feps);
    at::Tensor gu = quant_linear(h, w_fc, bias_at(biases, kBiases * l + 2, 2 * I, "fc bias", l), q_fc, gemv_rows);   // (B, 2I)
    at::Tensor act = at::silu(gu.narrow(1, 0, I)).mul_(gu.narrow(1, I, I));   // torch's silu: the model's arithmetic
    at::Tensor d = quant_linear(act.contiguous(), w_down, bias_at(biases, kBiases * l + 3, C, "down bias", l), q_down,
                                gemv_rows);
    const float* dp = d.data_ptr<float>();
    for (int64_t i = 0; i < B * C; ++i) xp[i] += dp[i];
  }
  rms_norm(xp, norm_f.data_ptr<float>(), hp, B, C, feps);
  return quant_linear(h, lm_head, c10::nullopt, q_head, gemv_rows);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lmstack, m) {
  m.def("decode_step(Tensor ids, Tensor q_pos, Tensor block_tables, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor? rope_cos, Tensor? rope_sin, Tensor wte, Tensor[] weights, Tensor?[] biases, Tensor norm_f, "
        "Tensor lm_head, Tensor?[] quant, int[] quant_meta, "
        "int n_head, int n_kv_head, float eps, int block_size, float scale, int window, int gemv_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmstack, CPU, m) { m.impl("decode_step", &decode_step); }
