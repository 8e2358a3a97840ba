"""Transformer behaviour: masks, positions, KV cache, MoE, init, sizes, against references."""
import math

import pytest
import torch
import torch.nn.functional as F

from lmstack.model import ContiguousKVCache, ModelConfig, Transformer
from lmstack.model.attention import AttnContext, attention_math, build_mask
from lmstack.model.positions import RotaryEmbedding, alibi_slopes, apply_rope, sinusoidal_embedding
from lmstack.model.transformer import Block
from lmstack.utils import LmstackError

V = 128


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, context_length=64)
    base.update(kw)
    return ModelConfig(**base)


def model(**kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny(**kw)).eval()


def ids(B=2, T=20, seed=1):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


VARIANTS = {
    "rope-gqa": dict(),
    "mqa-qknorm-bias": dict(n_kv_head=1, qk_norm=True, qkv_bias=True, bias=True),
    "partial-rope-linear": dict(rotary_fraction=0.5, rope_scaling={"type": "linear", "factor": 2.0}),
    "learned-gelu-layernorm": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, tie_embeddings=False),
    "sinusoidal-relu-postnorm": dict(pos_emb="sinusoidal", mlp="relu", norm_placement="post", norm="layernorm"),
    "alibi": dict(pos_emb="alibi", n_kv_head=4),
    "none-window": dict(pos_emb="none", sliding_window=5),
    "moe": dict(n_expert=4, n_expert_per_token=2, intermediate_size=32),
}


# ---- the explicit math path equals SDPA -------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_equals_math_path(variant):
    m = model(**VARIANTS[variant])
    x = ids()
    with torch.no_grad():
        fast = m(x)
    slow = m.introspect(x)
    assert (fast - slow["logits"]).abs().max().item() < 1e-5
    att = slow["attentions"]
    assert len(att) == 2 and att[0].shape == (2, 4, 20, 20)
    assert torch.allclose(att[0].sum(-1), torch.ones(2, 4, 20), atol=1e-5)
    assert len(slow["hidden_states"]) == 3


@pytest.mark.parametrize("kind,window,prefix,alibi", [
    ("causal", None, None, False), ("causal", 3, None, False), ("bidirectional", None, None, False),
    ("bidirectional", 4, None, True), ("prefix", None, torch.tensor([5, 0]), False), ("causal", None, None, True)])
def test_attention_math_equals_sdpa_for_masks(kind, window, prefix, alibi):
    g = torch.Generator().manual_seed(0)
    B, H, KV, T, D = 2, 4, 2, 9, 8
    q, k, v = (torch.randn(B, n, T, D, generator=g) for n in (H, KV, KV))
    pos = torch.arange(T).expand(B, T).clone()
    pos[1, :2] = -1  # left padding in row 1: keys hidden, padded queries see everything
    mask = build_mask(pos, pos, kind, window, prefix, alibi_slopes(H) if alibi else None)
    out, probs = attention_math(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert (out - ref).abs().max().item() < 1e-5
    assert not probs.isnan().any()
    if kind == "causal":  # every probability above the diagonal is exactly zero
        assert probs[0].triu(1).abs().max().item() == 0.0


def test_mask_semantics():
    pos = torch.arange(6)[None]
    causal = build_mask(pos, pos, "causal")[0, 0]
    assert torch.equal(causal, torch.ones(6, 6, dtype=torch.bool).tril())
    win = build_mask(pos, pos, "causal", window=2)[0, 0]
    assert win[5].tolist() == [False, False, False, False, True, True]
    pre = build_mask(pos, pos, "prefix", prefix_lens=torch.tensor([3]))[0, 0]
    assert pre[0].tolist() == [True, True, True, False, False, False]
    assert pre[4].tolist() == [True, True, True, True, True, False]


def test_causality_and_bidirectionality():
    x, y = ids(), ids(seed=2)
    y[:, :10] = x[:, :10]  # same first 10 tokens, different future
    with torch.no_grad():
        m = model()
        assert torch.allclose(m(x)[:, :10], m(y)[:, :10], atol=1e-6)
        b = model(mask="bidirectional")
        assert not torch.allclose(b(x)[:, :10], b(y)[:, :10], atol=1e-3)
        p = model(mask="prefix")
        pl = torch.tensor([6, 6])
        x2 = x.clone()
        x2[:, 4] = (x[:, 4] + 1) % V  # change a token inside the prefix
        assert not torch.allclose(p(x, prefix_lens=pl)[:, 2], p(x2, prefix_lens=pl)[:, 2], atol=1e-4)
        assert torch.allclose(p(x, prefix_lens=pl)[:, :10], p(y, prefix_lens=pl)[:, :10], atol=1e-6)
        # without prefix_lens the prefix model is plain causal
        assert torch.allclose(p(x)[:, 2], p(x2)[:, 2], atol=1e-6)


# ---- KV cache ---------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cache_prefill_decode_equals_full_forward(variant):
    m = model(**VARIANTS[variant])
    cfg, x = m.config, ids(T=16)
    with torch.no_grad():
        full = m(x)
        cache = ContiguousKVCache(cfg.n_layer, 2, 32, cfg.n_kv_head, cfg.head_dim)
        outs = [m(x[:, :7], positions=torch.arange(7).expand(2, 7), cache=cache)]
        outs.append(m(x[:, 7:10], positions=torch.arange(7, 10).expand(2, 3), cache=cache))  # chunked prefill
        for t in range(10, 16):
            outs.append(m(x[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache))
    assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-4


def test_cache_with_left_padding():
    """Rows of different lengths in one batch: padding slots (-1) are never attended."""
    m = model()
    cfg = m.config
    a, b = ids(1, 12, seed=2), ids(1, 8, seed=3)
    with torch.no_grad():
        ref_a, ref_b = m(a)[0, -1], m(b)[0, -1]
        batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
        pos = torch.stack([torch.arange(12), torch.cat([torch.full((4,), -1), torch.arange(8)])])
        cache = ContiguousKVCache(cfg.n_layer, 2, 16, cfg.n_kv_head, cfg.head_dim)
        out = m(batch, positions=pos, cache=cache)
    assert (out[0, -1] - ref_a).abs().max() < 1e-4 and (out[1, -1] - ref_b).abs().max() < 1e-4
    assert not out.isnan().any()


# ---- positions --------------------------------------------------------------------
def test_sinusoidal_formula():
    pe = sinusoidal_embedding(torch.arange(7)[None], 16)[0]
    for p in (0, 3, 6):
        for i in range(8):
            angle = p / 10000 ** (2 * i / 16)
            assert math.isclose(pe[p, 2 * i].item(), math.sin(angle), abs_tol=1e-6)
            assert math.isclose(pe[p, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-6)


def test_rope_relative_and_partial():
    cfg = tiny(rotary_fraction=0.5)
    rope = RotaryEmbedding(cfg)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16, generator=g), torch.randn(1, 1, 1, 16, generator=g)

    def dot(m, n):
        cq, sq = rope.cos_sin(torch.tensor([[m]]), torch.float32)
        ck, sk = rope.cos_sin(torch.tensor([[n]]), torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()

    assert math.isclose(dot(5, 2), dot(13, 10), rel_tol=1e-5)  # depends only on m - n
    c, s = rope.cos_sin(torch.tensor([[9]]), torch.float32)
    r = apply_rope(q, c, s)
    assert torch.equal(r[..., 8:], q[..., 8:])                 # un-rotated half passes through
    assert math.isclose(r.norm().item(), q.norm().item(), rel_tol=1e-5)
    scaled = RotaryEmbedding(tiny(rope_scaling={"type": "linear", "factor": 2.0}))
    plain = RotaryEmbedding(tiny())
    assert torch.allclose(scaled.cos_sin(torch.tensor([[8]]), torch.float32)[0],
                          plain.cos_sin(torch.tensor([[4]]), torch.float32)[0], atol=1e-6)


def test_alibi_slopes_match_bloom():
    bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    for n in (6, 12):
        ref = bloom.build_alibi_tensor(torch.ones(1, 2), n, torch.float32)[:, 0, 1]  # slope * position 1
        assert torch.allclose(alibi_slopes(n), ref)


# ---- norms and blocks against torch's TransformerEncoderLayer ---------------------
@pytest.mark.parametrize("placement,mask", [("post", "bidirectional"), ("pre", "causal")])
def test_block_matches_torch_encoder_layer(placement, mask):
    torch.manual_seed(0)
    cfg = tiny(n_kv_head=4, pos_emb="none", norm="layernorm", mlp="relu", bias=True, qkv_bias=True,
               norm_placement=placement, mask=mask, intermediate_size=96)
    ref = torch.nn.TransformerEncoderLayer(64, 4, 96, dropout=0.0, batch_first=True,
                                           norm_first=placement == "pre").eval()
    blk = Block(cfg, 0).eval()
    with torch.no_grad():
        for norm in (ref.norm1, ref.norm2):  # not the trivial 1/0 init
            norm.weight.add_(0.1 * torch.randn_like(norm.weight))
            norm.bias.add_(0.1 * torch.randn_like(norm.bias))
        for ours, theirs in ((blk.attn.qkv.weight, ref.self_attn.in_proj_weight),
                             (blk.attn.qkv.bias, ref.self_attn.in_proj_bias),
                             (blk.attn.proj.weight, ref.self_attn.out_proj.weight),
                             (blk.attn.proj.bias, ref.self_attn.out_proj.bias),
                             (blk.mlp.fc.weight, ref.linear1.weight), (blk.mlp.fc.bias, ref.linear1.bias),
                             (blk.mlp.proj.weight, ref.linear2.weight), (blk.mlp.proj.bias, ref.linear2.bias),
                             (blk.attn_norm.weight, ref.norm1.weight), (blk.attn_norm.bias, ref.norm1.bias),
                             (blk.mlp_norm.weight, ref.norm2.weight), (blk.mlp_norm.bias, ref.norm2.bias)):
            ours.copy_(theirs)
        x = torch.randn(2, 10, 64)
        pos = torch.arange(10).expand(2, 10)
        ctx = AttnContext(positions=pos, causal_fast=mask == "causal", no_mask=mask == "bidirectional")
        causal = torch.nn.Transformer.generate_square_subsequent_mask(10) if mask == "causal" else None
        expected = ref(x, src_mask=causal, is_causal=mask == "causal")
        assert (blk(x, ctx) - expected).abs().max().item() < 1e-5


# ---- MoE --------------------------------------------------------------------------
def test_moe_counts_aux_and_z_loss():
    m = model(n_expert=4, n_expert_per_token=2, intermediate_size=32, moe_z_loss_coef=1e-3)
    m.train()
    x = ids()
    logits = m(x)
    counts = m.expert_counts()
    assert counts.shape == (2, 4) and counts.sum(1).tolist() == [2 * 20 * 2] * 2
    aux = m.aux_loss()
    assert aux.dim() == 0 and aux.item() > 0
    (F.cross_entropy(logits.flatten(0, 1), x.flatten()) + aux).backward()
    assert m.blocks[0].mlp.router.weight.grad.abs().sum() > 0
    assert model().aux_loss().item() == 0.0
    with pytest.raises(LmstackError, match="expert_counts"):
        model().expert_counts()


# ---- sizes and init ---------------------------------------------------------------
def params_by_hand(c: ModelConfig) -> int:
    """The parameter count a config implies, written out from the architecture (not the code)."""
    C, V, H, KV, D, I = c.n_embd, c.vocab_size, c.n_head, c.n_kv_head, c.head_dim, c.intermediate_size
    norm = 2 * C if c.norm == "layernorm" else C                     # LayerNorm has a bias
    qkv = (H + 2 * KV) * D
    attn = C * qkv + qkv * c.qkv_bias + H * D * C + C * c.bias + 2 * D * c.qk_norm
    up = 2 * I if c.mlp == "swiglu" else I                           # SwiGLU: gate and up
    mlp = C * up + up * c.bias + I * C + C * c.bias
    if c.n_expert:
        mlp = c.n_expert * mlp + c.n_expert * C                      # experts + router (no bias)
    block = 2 * norm + attn + mlp
    embed = V * C + (c.context_length * C if c.pos_emb == "learned" else 0)
    return embed + c.n_layer * block + (norm if c.norm_placement == "pre" else 0) + (0 if c.tie_embeddings else V * C)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_param_count_by_hand(variant):
    for tie in (True, False):
        cfg = tiny(**{**VARIANTS[variant], "tie_embeddings": tie})
        assert Transformer(cfg).num_params() == params_by_hand(cfg)


def test_presets_and_param_counts():
    # tiny by hand: 4096*256 + 4 * (2*256 + 256*768 + 256*256 + 3*256*704) + 256 = 4,262,144
    assert params_by_hand(ModelConfig.preset("tiny")) == 4_262_144
    for name in ("tiny", "llama-tiny", "mixtral-tiny"):
        cfg = ModelConfig.preset(name, vocab_size=512, n_layer=1)
        assert Transformer(cfg).num_params() == params_by_hand(cfg)
    with torch.device("meta"):  # sizes only: no memory, no init time
        gpt2 = Transformer(ModelConfig.preset("gpt2-124m"))
    assert gpt2.num_params() == 124_439_808 == params_by_hand(gpt2.config)  # HF GPT2LMHeadModel: 124,439,808
    assert gpt2.num_params(non_embedding=True) == 123_653_376  # nanoGPT's "123.65M"


def test_num_params_matches_hf_and_flops_formula():
    transformers = pytest.importorskip("transformers")
    for tie in (True, False):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=tie))
        ours = model(intermediate_size=96, tie_embeddings=tie)
        assert ours.num_params() == hf.num_parameters()
    m = model(intermediate_size=96)
    n = m.num_params(non_embedding=True)
    assert m.flops_per_token(32) == 6 * n + 12 * 2 * 4 * 16 * 32
    moe = model(n_expert=4, n_expert_per_token=1, intermediate_size=32)
    per_expert = 64 * 64 + 32 * 64
    assert moe.num_active_params() == moe.num_params(non_embedding=True) - 2 * 3 * per_expert


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    m = Transformer(tiny(n_layer=8, n_embd=256, n_head=4, n_kv_head=4))
    assert abs(m.blocks[0].attn.qkv.weight.std().item() - 0.02) < 1e-3
    assert abs(m.blocks[0].mlp.proj.weight.std().item() - 0.02 / math.sqrt(16)) < 5e-4
    assert m.lm_head.weight is m.wte.weight


def test_dropout_only_in_training():
    m = model(dropout=0.5)
    x = ids()
    with torch.no_grad():
        assert torch.equal(m(x), m(x))
        m.train()
        assert not torch.equal(m(x), m(x))


def test_autocast_bf16_close_to_fp32():
    m = model()
    x = ids()
    cfg = m.config
    with torch.no_grad():
        ref = m(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x)
            cache = ContiguousKVCache(cfg.n_layer, 2, 32, cfg.n_kv_head, cfg.head_dim)  # float32 cache
            cached = m(x, positions=torch.arange(20).expand(2, 20), cache=cache)
    assert low.dtype == torch.bfloat16
    tol = 0.05 * ref.abs().max().item() + 0.05
    assert (low.float() - ref).abs().max().item() < tol
    assert (cached.float() - ref).abs().max().item() < tol


# ---- bad input --------------------------------------------------------------------
def test_bad_forward_inputs():
    m = model(pos_emb="learned", context_length=16)
    with pytest.raises(LmstackError, match=f"token id {V} is outside the vocabulary"):
        m(torch.tensor([[1, V]]))
    with pytest.raises(LmstackError, match="longer than context_length=16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(LmstackError, match="position 16 is beyond context_length=16"):
        m(torch.zeros(1, 1, dtype=torch.long), positions=torch.tensor([[16]]))
    with pytest.raises(ValueError, match="ids must be a"):
        m(torch.zeros(4, dtype=torch.long))
    with pytest.raises(LmstackError, match="prefix_lens given but mask='causal'"):
        m(torch.zeros(1, 4, dtype=torch.long), prefix_lens=torch.tensor([2]))
    wrong = ContiguousKVCache(2, 1, 16, n_kv_head=3, head_dim=16)
    with pytest.raises(ValueError, match="KV cache built for"):
        m(torch.zeros(1, 4, dtype=torch.long), positions=torch.arange(4)[None], cache=wrong)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_bf16_cache():
    m = model()
    x = ids()
    with torch.no_grad():
        ref = m(x)
        g = m.to("cuda")
        assert (g(x.cuda()).cpu() - ref).abs().max().item() < 1e-4
        cfg = m.config
        with torch.autocast("cuda", dtype=torch.bfloat16):
            cache = ContiguousKVCache(cfg.n_layer, 2, 32, cfg.n_kv_head, cfg.head_dim, torch.bfloat16, "cuda")
            step = g(x[:, :19].cuda(), positions=torch.arange(19, device="cuda").expand(2, 19), cache=cache)
            last = g(x[:, 19:].cuda(), positions=torch.full((2, 1), 19, device="cuda"), cache=cache)
        assert step.shape == (2, 19, V)
        assert (last[:, 0].float().cpu() - ref[:, 19]).abs().max().item() < 0.1


# ---- logits_indices: the head only where logits are wanted ---------------------------
@pytest.mark.parametrize("prune", [False, True])     # the last block (queries, MLP) at the picked rows only, or not
@pytest.mark.parametrize("variant", ["rope-gqa", "learned-gelu-layernorm", "sinusoidal-relu-postnorm", "moe",
                                     "mqa-qknorm-bias", "partial-rope-linear", "none-window", "alibi"])
def test_logits_indices_pick_rows_of_full_forward(variant, prune):
    m = model(**VARIANTS[variant])
    x = ids(B=3, T=11)
    idx = torch.tensor([10, 0, 21, 21, 32, 15])          # flat b * T + t, any order, repeats allowed
    with torch.no_grad():
        full = m(x).reshape(3 * 11, V)
        picked = m(x, logits_indices=idx, prune_last_block=prune)
        empty = m(x, logits_indices=torch.zeros(0, dtype=torch.long), prune_last_block=prune)
    assert picked.shape == (6, V) and empty.shape == (0, V)
    # per-row math is the same; a GEMM with fewer rows may block its sums differently
    assert (picked - full[idx]).abs().max().item() < 1e-6


@pytest.mark.parametrize("prune", [False, True])
def test_logits_indices_with_cache_and_padding(prune):
    m = model()
    x = ids(B=2, T=9)
    pos = torch.arange(9).expand(2, 9).clone()
    pos[1, 6:] = -1                                        # row 1 is 6 tokens, padded
    idx = torch.tensor([8, 9 + 5])                          # last real token of each row
    with torch.no_grad():
        full = m(x, positions=pos, cache=ContiguousKVCache(2, 2, 16, 2, 16)).reshape(18, V)
        cache = ContiguousKVCache(2, 2, 16, 2, 16)
        picked = m(x, positions=pos, cache=cache, logits_indices=idx, prune_last_block=prune)
        # the pruned forward still wrote every position's keys: the next token reads them
        nxt = m(x[:, :1], positions=torch.tensor([[9], [6]]), cache=cache)[:, 0]
        ref = m(torch.cat([x[:, :9], x[:, :1]], 1), positions=torch.cat([pos, torch.tensor([[9], [6]])], 1),
                cache=ContiguousKVCache(2, 2, 16, 2, 16)).reshape(2, 10, V)
    assert (picked - full[idx]).abs().max().item() < 1e-6
    assert (nxt - ref[:, 9]).abs().max().item() < 1e-5


def test_logits_indices_rejects_bad_input():
    m = model()
    x = ids(B=2, T=5)
    with pytest.raises(ValueError, match=r"\[0, B\*T=10\)"):
        m(x, logits_indices=torch.tensor([10]))
    with pytest.raises(ValueError, match="1-D integer"):
        m(x, logits_indices=torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="1-D integer"):
        m(x, logits_indices=torch.tensor([0.0]))


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_split_views_match_fused_matmul(bias):
    # MLP runs gate and up as two views of the fused fc weight; same values and gradients
    # as one fused matmul split afterwards
    from lmstack.model.layers import MLP
    torch.manual_seed(0)
    mlp = MLP(tiny(bias=bias, intermediate_size=48))
    x = torch.randn(3, 7, 64, requires_grad=True)
    y = mlp(x)
    y.square().sum().backward()
    got = (y.detach(), x.grad.clone(), mlp.fc.weight.grad.clone())
    x.grad = None
    mlp.zero_grad()
    gate, up = F.linear(x, mlp.fc.weight, mlp.fc.bias).chunk(2, dim=-1)
    ref = mlp.proj(F.silu(gate) * up)
    ref.square().sum().backward()
    for a, b in zip(got, (ref.detach(), x.grad, mlp.fc.weight.grad)):
        assert (a - b).abs().max().item() < 1e-5
