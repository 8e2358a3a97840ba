"""The whole-step decode op (infer/fused_decode.py, kernels/decode_step.cpp) against the model's
own forward: logits and K/V writes for Llama-family variants, and the fallbacks that keep it
from running whenever it would not compute what the modules compute."""
from __future__ import annotations

import pytest
import torch

from lmstack import kernels
from lmstack.infer import LLM, SamplingParams, fused_decode
from lmstack.infer.runner import RunnerRow
from lmstack.model.ablate import lesion_qkv
from tests.infer.conftest import plain_greedy, tiny_model

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="compiled kernels not built")


def _rows(n: int, g: torch.Generator) -> list[RunnerRow]:
    """n decode rows at random positions, each over its own random (distinct) blocks."""
    perm = torch.randperm(128, generator=g).tolist()         # the cache's 128 blocks of 4
    rows = []
    for i in range(n):
        pos = int(torch.randint(0, 20, (), generator=g))      # <= 5 blocks a row
        rows.append(RunnerRow([int(torch.randint(0, 96, (), generator=g))], pos, perm[i * 5:i * 5 + pos // 4 + 1], 1))
    return rows


def _both(llm: LLM, rows: list[RunnerRow]):
    """(logits, k, v) of the whole-step op and of the module forward, from one random cache state."""
    runner, cache = llm.engine.runner, llm.engine.cache
    g = torch.Generator().manual_seed(1)
    cache.k.normal_(generator=g)
    cache.v.normal_(generator=g)
    k0, v0 = cache.k.clone(), cache.v.clone()
    out = []
    for why_not in (None, "reference"):
        cache.k.copy_(k0)
        cache.v.copy_(v0)
        runner.fused.why_not = why_not
        steps = runner.fused.steps
        with torch.inference_mode():
            logits = runner._decode_forward(rows)
        assert runner.fused.steps == steps + (why_not is None)     # each side took the path meant
        out.append((logits, cache.k.clone(), cache.v.clone()))
    runner.fused.why_not = None
    return out


@needs_kernels
@pytest.mark.parametrize("variant,n_rows", [
    (dict(), 1),
    (dict(), 3),
    (dict(), 11),                                                  # dense_linear's multi-row tiles
    (dict(), 17),                                                  # > GEMV_ROWS (set to 16 here): MKL's GEMM
    (dict(), 24),                                                  # dense_linear's tiles for many rows
    (dict(qkv_bias=True, bias=True, tie_embeddings=False), 2),     # every bias (Qwen2 has the qkv one)
    (dict(sliding_window=5, n_kv_head=1, rotary_fraction=0.5), 3),
    (dict(pos_emb="none", n_kv_head=4, head_dim=8, attn_scale=0.2), 2),
])
def test_whole_step_equals_the_module_forward(variant, n_rows, monkeypatch):
    if n_rows == 17:
        monkeypatch.setattr(fused_decode, "GEMV_ROWS", 16)
    model = tiny_model(5, **variant)
    with torch.no_grad():                   # biases are zero-initialised: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    llm = LLM(model, block_size=4, kv_cache_tokens=512)
    assert llm.engine.runner.fused.why_not is None
    (got, k1, v1), (want, k2, v2) = _both(llm, _rows(n_rows, torch.Generator().manual_seed(n_rows)))
    assert got.shape == want.shape == (n_rows, 96)
    # logits of magnitude ~5 summed in another order (its GEMV for up to GEMV_ROWS rows, the module
    # forward's MKL beyond MAX_ROWS): equal to float32 rounding, 1e-5 relative
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    assert torch.allclose(k1, k2, rtol=1e-5, atol=1e-5) and torch.allclose(v1, v2, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("fmt", [None, "int8", "w8a8", "int4-g32-asym"])
def test_engine_takes_it_and_equals_the_plain_loop(fmt):
    """float32 and the quantized formats the op runs (their kernels called as the modules call them)."""
    model = tiny_model(6) if fmt is None else _quantized(12, fmt)
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    prompts = [list(range(1, 12)), [5, 6, 7]]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12))
    assert llm.engine.runner.fused.steps >= 11
    assert [o.outputs[0].token_ids for o in outs] == [plain_greedy(model, p, 12) for p in prompts]


@needs_kernels
def test_hooks_replaced_weights_and_kernels_off_fall_back():
    """A lesion hook, a re-assigned weight and kernels.disabled() each take effect at once."""
    model = tiny_model(7)
    llm = LLM(model, block_size=4, kv_cache_tokens=256, enable_prefix_caching=False)   # K/V of the new model only
    fused, prompt = llm.engine.runner.fused, [3, 1, 4, 1, 5]
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8)

    def run():
        steps = fused.steps
        return llm.generate([prompt], params)[0].outputs[0].token_ids, fused.steps > steps

    base = plain_greedy(model, prompt, 8)
    assert run() == (base, True)
    hooks = lesion_qkv(model, "zero_v")                 # forward hooks on every qkv
    lesioned = plain_greedy(model, prompt, 8)
    assert lesioned != base and run() == (lesioned, False)
    hooks.remove()
    assert run() == (plain_greedy(model, prompt, 8), True)
    with torch.no_grad():                                # a new Parameter object, not an in-place copy
        model.blocks[1].mlp.proj.weight = torch.nn.Parameter(torch.randn_like(model.blocks[1].mlp.proj.weight))
    assert run() == (plain_greedy(model, prompt, 8), True)
    with kernels.disabled():
        assert run() == (plain_greedy(model, prompt, 8), False)


def test_other_architectures_say_why():
    model = tiny_model(8, norm="layernorm", mlp="gelu")
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    why = llm.engine.runner.fused.why_not
    assert "norm='layernorm'" in why and "mlp='gelu'" in why
    assert LLM(tiny_model(8), block_size=4, kv_cache_tokens=256,
               kv_cache_dtype="int8").engine.runner.fused.why_not == "the KV cache is not float32 on the CPU"


@needs_kernels
def test_decode_step_rejects_bad_input():
    model = tiny_model(9)
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    c = llm.engine.cache
    from lmstack.infer.fused_decode import _gather
    plan = _gather(model)
    args = dict(q_pos=torch.tensor([[0]]), block_tables=torch.tensor([[0]]), k_cache=c.k, v_cache=c.v,
                rope_cos=None, rope_sin=None, wte=plan.wte, weights=plan.weights, biases=plan.biases,
                norm_f=plan.norm_f, lm_head=plan.head, n_head=4, n_kv_head=2, eps=1e-5, block_size=4, scale=0.125,
                window=None, gemv_rows=8)
    with pytest.raises(RuntimeError, match="outside the vocabulary"):
        kernels.decode_step(torch.tensor([96]), **args)
    with pytest.raises(RuntimeError, match="expected 12 weights"):
        kernels.decode_step(torch.tensor([1]), **{**args, "weights": plan.weights[:-1]})
    with pytest.raises(RuntimeError, match="qkv must be"):
        kernels.decode_step(torch.tensor([1]), **{**args, "n_head": 2})


@needs_kernels
def test_an_instance_forward_is_respected():
    """A forward replaced on a module instance (a wrapper, a probe) is called: the op steps aside."""
    model = tiny_model(10)
    llm = LLM(model, block_size=4, kv_cache_tokens=256, enable_prefix_caching=False)
    fused, params = llm.engine.runner.fused, SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=4)
    mlp = model.blocks[0].mlp
    mlp.forward = lambda x: type(mlp).forward(mlp, x) * 0.0      # the MLP of layer 0 silenced
    steps = fused.steps
    got = llm.generate([[1, 2, 3]], params)[0].outputs[0].token_ids
    assert fused.steps == steps and got == plain_greedy(model, [1, 2, 3], 4)
    del mlp.forward
    assert llm.generate([[1, 2, 3]], params)[0].outputs[0].token_ids == plain_greedy(model, [1, 2, 3], 4)
    assert fused.steps > steps


QUANTIZED = {   # IntLinear formats the op runs with the module's own kernels (name -> QuantConfig fields)
    "int8": dict(method="rtn", bits=8, targets=("all-linear", "lm_head")),
    "w8a8": dict(method="rtn", bits=8, act_bits=8, targets=("all-linear", "lm_head")),
    "int4-g32-asym": dict(method="rtn", bits=4, group_size=32, symmetric=False),          # the head stays float32
    "awq-int4-g32": dict(method="awq", bits=4, group_size=32, calib_samples=2, calib_seq_len=16, awq_grid=2),
}


def _quantized(seed: int, fmt: str, **variant):
    from lmstack.quant import QuantConfig, quantize_model
    model = tiny_model(seed, tie_embeddings=False, **variant)
    calib = torch.randint(0, 96, (64,), generator=torch.Generator().manual_seed(seed)).tolist()
    quantize_model(model, QuantConfig(**QUANTIZED[fmt]), calib=calib if fmt.startswith("awq") else None)
    return model


@needs_kernels
@pytest.mark.parametrize("fmt", list(QUANTIZED))
@pytest.mark.parametrize("n_rows", [1, 5])
def test_quantized_whole_step_equals_the_module_forward(fmt, n_rows):
    """The quantized linears run inside the op by the kernel (and arguments) of their module's forward."""
    from lmstack.model.quantized import IntLinear
    model = _quantized(11, fmt, qkv_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    assert isinstance(model.blocks[0].attn.qkv, IntLinear)
    llm = LLM(model, block_size=4, kv_cache_tokens=512)
    (got, k1, v1), (want, k2, v2) = _both(llm, _rows(n_rows, torch.Generator().manual_seed(n_rows)))
    assert got.shape == want.shape == (n_rows, 96)
    # the linears are the same kernel calls; only the norms / attention arithmetic differ (float32 rounding)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
    assert torch.allclose(k1, k2, rtol=1e-5, atol=1e-5) and torch.allclose(v1, v2, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_nf4_and_replaced_statistics_fall_back_or_regather():
    """NF4 is not in the op (the module forward runs); a re-assigned scale buffer is picked up at once."""
    from lmstack.quant import QuantConfig, quantize_model
    model = tiny_model(13)
    quantize_model(model, QuantConfig(method="nf4", group_size=32))
    llm = LLM(model, block_size=4, kv_cache_tokens=256, enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=6)
    assert llm.generate([[2, 7, 1]], params)[0].outputs[0].token_ids == plain_greedy(model, [2, 7, 1], 6)
    assert llm.engine.runner.fused.steps == 0
    model = _quantized(14, "int8")
    llm = LLM(model, block_size=4, kv_cache_tokens=256, enable_prefix_caching=False)
    fused = llm.engine.runner.fused
    assert llm.generate([[2, 7, 1]], params)[0].outputs[0].token_ids == plain_greedy(model, [2, 7, 1], 6)
    steps = fused.steps
    assert steps > 0
    fc = model.blocks[0].mlp.fc
    fc.weight_scale = fc.weight_scale * 3.0                  # a new buffer object, not an in-place update
    assert llm.generate([[2, 7, 1]], params)[0].outputs[0].token_ids == plain_greedy(model, [2, 7, 1], 6)
    assert fused.steps > steps


@needs_kernels
def test_a_model_it_does_not_cover_is_gathered_once(monkeypatch):
    """An NF4 model falls back every step without walking the model again."""
    from lmstack.infer import fused_decode
    from lmstack.quant import QuantConfig, quantize_model
    model = tiny_model(16)
    quantize_model(model, QuantConfig(method="nf4", group_size=32))
    llm = LLM(model, block_size=4, kv_cache_tokens=256, enable_prefix_caching=False)
    calls = []
    gather = fused_decode._gather
    monkeypatch.setattr(fused_decode, "_gather", lambda m: calls.append(1) or gather(m))
    llm.generate([[2, 7, 1]], SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=8))
    assert len(calls) == 1 and llm.engine.runner.fused.steps == 0


@needs_kernels
def test_decode_step_rejects_bad_quantized_input():
    model = _quantized(15, "int8")
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    c = llm.engine.cache
    from lmstack.infer.fused_decode import _gather
    plan = _gather(model)
    assert plan.quantized and len(plan.quant) == len(plan.quant_meta) == 3 * (4 * 2 + 1)
    args = dict(q_pos=torch.tensor([[0]]), block_tables=torch.tensor([[0]]), k_cache=c.k, v_cache=c.v,
                rope_cos=None, rope_sin=None, wte=plan.wte, weights=plan.weights, biases=plan.biases,
                norm_f=plan.norm_f, lm_head=plan.head, n_head=4, n_kv_head=2, eps=1e-5, block_size=4, scale=0.125,
                window=None, gemv_rows=8, quant=plan.quant, quant_meta=plan.quant_meta)
    assert kernels.decode_step(torch.tensor([1]), **args).shape == (1, 96)
    with pytest.raises(RuntimeError, match="3 entries for each of the 9 linears"):
        kernels.decode_step(torch.tensor([1]), **{**args, "quant": plan.quant[:-3]})
    with pytest.raises(RuntimeError, match="lm_head must be a contiguous float32"):   # codes read as float32
        kernels.decode_step(torch.tensor([1]), **{**args, "quant": None, "quant_meta": None})
    with pytest.raises(RuntimeError, match=r"qkv \(4-bit\) must be contiguous uint8 codes"):
        kernels.decode_step(torch.tensor([1]), **{**args, "quant_meta": [4] + plan.quant_meta[1:]})
