"""The fused paged-attention decode kernel against an explicit softmax over each row's context,
against the gather + SDPA path it replaces, and in the engine (greedy = the plain loop on the
fast path, and on the fallback when the library is missing)."""
from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from lmstack import kernels
from lmstack.infer import LLM, SamplingParams
from lmstack.infer.paged_cache import PagedKVCache
from lmstack.kernels import build
from lmstack.model.attention import build_mask
from lmstack.model.positions import apply_rope
from tests.infer.conftest import plain_greedy, tiny_model

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels not built: {kernels.unavailable_reason()}")


def random_paged(B, H, KV, D, T, bs, ctx_lens, seed):
    """A cache whose rows own shuffled, interleaved blocks; row b holds positions 0..ctx_lens[b]-1.
    Returns q (B, H, T, D), k_cache, v_cache (slots, KV, D), tables (B, n_blk), q_pos (B, T)."""
    g = torch.Generator().manual_seed(seed)
    n_blk = max(math.ceil(c / bs) for c in ctx_lens)
    num_blocks = B * n_blk + 3
    perm = torch.randperm(num_blocks, generator=g)
    tables = perm[:B * n_blk].view(B, n_blk).contiguous()
    k_cache = torch.randn(num_blocks * bs, KV, D, generator=g)
    v_cache = torch.randn(num_blocks * bs, KV, D, generator=g)
    # the last T positions of each row are the queries (fewer for a short row: padding -1)
    q_pos = torch.full((B, T), -1, dtype=torch.long)
    for b, c in enumerate(ctx_lens):
        n = min(T, c - 1 if b % 2 else T)        # odd rows: one query fewer than T (padding)
        q_pos[b, :n] = torch.arange(c - n, c)
    q = torch.randn(B, H, T, D, generator=g)
    return q, k_cache, v_cache, tables, q_pos


def reference(q, k_cache, v_cache, tables, q_pos, bs, scale, window):
    """float64, row by row: contiguous K/V of the row's positions, masked softmax, no tricks."""
    B, H, T, D = q.shape
    KV = k_cache.shape[1]
    out = torch.zeros(B, T, H, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            qp = int(q_pos[b, t])
            if qp < 0:
                continue
            pos = torch.arange(qp + 1)
            if window is not None:
                pos = pos[qp - pos < window]
            slots = tables[b, pos // bs] * bs + pos % bs
            for h in range(H):
                g = h // (H // KV)
                k, v = k_cache[slots, g].double(), v_cache[slots, g].double()
                p = torch.softmax(k @ q[b, h, t].double() * scale, 0)
                out[b, t, h] = p @ v
    return out


@needs_kernels
@pytest.mark.parametrize("H,KV", [(4, 4), (4, 2), (8, 1)])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("T", [1, 3])
def test_kernel_equals_reference(H, KV, window, T):
    bs, D = 4, 16
    ctx_lens = [1 + T, 7, 13, 30]              # not multiples of the block size
    q, kc, vc, tables, q_pos = random_paged(4, H, KV, D, T, bs, ctx_lens, seed=H * 10 + KV + T)
    scale = D ** -0.5
    out = kernels.paged_attention(q, kc, vc, tables, q_pos, bs, scale, window)
    want = reference(q, kc, vc, tables, q_pos, bs, scale, window)
    assert out.shape == (4, T, H, D) and out.dtype == torch.float32
    assert (out.double() - want).abs().max() < 1e-5
    assert (out[q_pos < 0] == 0).all()
    # a strided q (a transposed view, as attention passes it without RoPE) gives the same
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(kernels.paged_attention(q_strided, kc, vc, tables, q_pos, bs, scale, window), out)


@needs_kernels
def test_kernel_long_context_many_threads():
    """Enough work that helper threads join (pool.h); head_dim 64, 200 positions, GQA 4:1."""
    q, kc, vc, tables, q_pos = random_paged(6, 8, 2, 64, 1, 16, [200, 57, 129, 3, 90, 160], seed=7)
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = kernels.paged_attention(q, kc, vc, tables, q_pos, 16, 0.125, None)
    finally:
        torch.set_num_threads(n)
    assert (out.double() - reference(q, kc, vc, tables, q_pos, 16, 0.125, None)).abs().max() < 1e-5


@needs_kernels
def test_kernel_rejects_bad_input():
    q, kc, vc, tables, q_pos = random_paged(2, 4, 2, 8, 1, 4, [5, 9], seed=0)
    with pytest.raises(RuntimeError, match="no block in its table"):
        kernels.paged_attention(q, kc, vc, tables, q_pos + 100, 4, 1.0, None)
    with pytest.raises(RuntimeError, match="outside the cache"):
        kernels.paged_attention(q, kc, vc, tables + 1000, q_pos, 4, 1.0, None)
    with pytest.raises(RuntimeError, match="not a multiple"):
        kernels.paged_attention(q[:, :3], kc, vc, tables, q_pos, 4, 1.0, None)


def rope_tables(pos, rot, theta=10000.0):
    """cos, sin (B, 1, T, rot) of positions (B, T), the half-split layout of model/positions.py."""
    inv = theta ** (-torch.arange(0, rot, 2).float() / rot)
    ang = pos.clamp_min(0).float()[..., None] * inv                        # (B, T, rot/2)
    emb = torch.cat((ang, ang), -1)
    return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)


@needs_kernels
@pytest.mark.parametrize("window,rot", [(None, 16), (6, 8), (None, None)])
def test_cache_attend_equals_rope_gather_and_sdpa(window, rot):
    """PagedKVCache.attend (one op: RoPE, K/V write, attention) against RoPE + update() + mask +
    SDPA (the PyTorch path): same outputs, same cache contents. rot 8 of head_dim 16: partial RoPE."""
    B, H, KV, D, T, bs = 3, 4, 2, 16, 2, 4
    g = torch.Generator().manual_seed(1)
    start = torch.tensor([5, 0, 11])                       # row 1: its first two tokens (a tiny prompt)
    n_new = torch.tensor([2, 2, 1])                        # row 2: one token, one padding slot
    pos = torch.where(torch.arange(T)[None] < n_new[:, None], start[:, None] + torch.arange(T)[None], -1)
    tables = torch.tensor([[7, 2, 9, 0], [4, 0, 0, 0], [1, 8, 3, 5]])
    p = pos.clamp_min(0)
    slots = (tables.gather(1, p // bs) * bs + p % bs).flatten()
    write_rows = (pos >= 0).flatten().nonzero().squeeze(1)
    q, k, v = (torch.randn(B, T, n, D, generator=g) for n in (H, KV, KV))      # (B, T, heads, D)
    cos, sin = rope_tables(pos, rot) if rot else (None, None)
    outs, caches = [], []
    for fused in (True, False):
        cache = PagedKVCache(1, 10, bs, KV, D)
        cache.k.normal_(generator=g.manual_seed(2))        # the same older context in both caches
        cache.v.normal_(generator=g.manual_seed(3))
        cache.bind_tables(write_rows, slots[write_rows], tables, start + n_new)
        if fused:
            outs.append(cache.attend(0, q, k, v, pos, D ** -0.5, window, cos, sin).view(B, T, H, D))
        else:
            qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            if rot:
                qt, kt = apply_rope(qt, cos, sin), apply_rope(kt, cos, sin)
            k_all, v_all, k_pos = cache.update(0, kt, vt, pos)
            mask = build_mask(pos, k_pos, "causal", window)
            y = torch.nn.functional.scaled_dot_product_attention(qt, k_all, v_all, attn_mask=mask, enable_gqa=True)
            outs.append(y.transpose(1, 2))
        caches.append((cache.k.clone(), cache.v.clone()))
    valid = pos >= 0
    assert (outs[0][valid] - outs[1][valid]).abs().max() < 1e-5
    assert (outs[0][~valid] == 0).all()
    assert (caches[0][0] - caches[1][0]).abs().max() < 1e-6 and torch.equal(caches[0][1], caches[1][1])


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = kernels.paged_attention_step

    def counting(q, *a):
        calls.append(tuple(q.shape))       # (B, T, H, D)
        return real(q, *a)
    monkeypatch.setattr(kernels, "paged_attention_step", counting)
    return calls


_NOT_LLAMA = dict(pos_emb="learned", norm="layernorm", mlp="gelu", qk_norm=True)


@needs_kernels
@pytest.mark.parametrize("variant", [dict(), dict(sliding_window=6, n_kv_head=1), _NOT_LLAMA])
def test_engine_decodes_on_the_kernel_and_equals_the_plain_loop(variant, spy):
    model = tiny_model(3, **variant)
    llm = LLM(model, block_size=4, kv_cache_tokens=256, max_num_batched_tokens=16)
    prompts = [list(range(1, 12)), [5, 6, 7], list(range(30, 50))]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=10))
    for p, o in zip(prompts, outs):
        assert o.outputs[0].token_ids == plain_greedy(model, p, 10)
    fused = llm.engine.runner.fused
    if fused.why_not is None:            # Llama-family: whole decode steps in one op (fused_decode.py),
        assert fused.steps > 0 and variant != _NOT_LLAMA     # which calls the kernel from C++
    else:
        assert any(shape[1] == 1 for shape in spy)      # decode steps ran on the kernel
    with kernels.disabled():                            # and the PyTorch path gives the same tokens
        again = llm.generate(prompts, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=10))
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]


def test_engine_without_the_library_warns_once_and_decodes(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_loaded", None)
    monkeypatch.setattr(kernels, "_why_not", None)
    monkeypatch.delenv("LMSTACK_KERNELS", raising=False)
    info = tmp_path / "BUILD_INFO.json"
    info.write_text(json.dumps({"sources_sha256": "0" * 64, "torch": torch.__version__}))   # stale
    monkeypatch.setattr(build, "INFO", info)
    model = tiny_model(4)
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6))
    assert len([r for r in record if "kernels are unavailable" in str(r.message)]) == 1
    assert out[0].outputs[0].token_ids == plain_greedy(model, [1, 2, 3, 4, 5], 6)
