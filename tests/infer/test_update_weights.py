"""`update_weights`: new weights in place, no stale prefix K/V, clear errors that change nothing,
requests in flight preempted by recompute, models whose linears were replaced."""
from __future__ import annotations

import asyncio
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack.infer import LLM, AsyncLLM, SamplingParams, WeightsError
from tests.infer.conftest import plain_greedy, tiny_model

GREEDY = dict(temperature=0.0, ignore_eos=True)
SHARED = list(range(20, 45))                      # 25 tokens: 6 full blocks of 4 in the prefix cache
PROMPTS = [SHARED + [1, 2], SHARED + [3], SHARED + [50, 51, 52]]


class LoRALinear(nn.Module):
    """Stand-in for a LoRA adapter: keeps the base's `weight`/`bias` names, adds x A^T B^T."""

    def __init__(self, base: nn.Linear, seed: int, r: int = 4):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        g = torch.Generator().manual_seed(seed)
        self.lora_a = nn.Parameter(0.2 * torch.randn(r, base.in_features, generator=g))
        self.lora_b = nn.Parameter(0.2 * torch.randn(base.out_features, r, generator=g))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + (x @ self.lora_a.t()) @ self.lora_b.t()


def with_lora(model: nn.Module, seed: int) -> nn.Module:
    model = copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, LoRALinear(module, seed))
    return model


def generate(llm, prompts=PROMPTS, n=10):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, SamplingParams(max_tokens=n, **GREEDY))]


def test_new_weights_give_the_new_models_greedy_output_and_no_stale_prefix():
    old, new = tiny_model(1), tiny_model(2)
    llm = LLM(copy.deepcopy(old), block_size=4, kv_cache_tokens=512)
    before = llm.generate(PROMPTS, SamplingParams(max_tokens=10, **GREEDY))
    assert [o.outputs[0].token_ids for o in before] == [plain_greedy(old, p, 10) for p in PROMPTS]
    assert llm.engine.block_manager.hash_to_block                       # the shared prefix is cached
    llm.update_weights(new.state_dict())
    assert not llm.engine.block_manager.hash_to_block
    after = llm.generate(PROMPTS, SamplingParams(max_tokens=10, **GREEDY))
    want = [plain_greedy(new, p, 10) for p in PROMPTS]
    assert want != [o.outputs[0].token_ids for o in before]             # the models really differ
    assert [o.outputs[0].token_ids for o in after] == want
    assert generate(LLM(new, block_size=4, kv_cache_tokens=512)) == want    # = a fresh engine
    assert after[0].num_cached_tokens == 0                              # nothing computed by the old weights
    llm.engine.block_manager.check_no_leaks()
    assert llm.stats()["weight_updates"] == 1


def test_module_subset_dtype_and_device_conversion():
    old, new = tiny_model(1), tiny_model(2)
    llm = LLM(copy.deepcopy(old), block_size=4, kv_cache_tokens=512)
    generate(llm)
    llm.update_weights(new)                                             # a module with the same names
    assert generate(llm) == [plain_greedy(new, p, 10) for p in PROMPTS]
    # a subset (only block 1), in float64: the rest keep their values, dtype stays float32
    subset = {k: v.double() for k, v in old.state_dict().items() if k.startswith("blocks.1.")}
    llm.update_weights(subset)
    mixed = copy.deepcopy(new)
    mixed.load_state_dict({k: v.float() for k, v in subset.items()}, strict=False)
    assert generate(llm) == [plain_greedy(mixed, p, 10) for p in PROMPTS]
    assert all(p.dtype == torch.float32 for p in llm.model.parameters())


def test_bad_weights_name_the_tensor_and_change_nothing():
    llm = LLM(tiny_model(1), block_size=4, kv_cache_tokens=512)
    generate(llm)
    snapshot = {k: v.clone() for k, v in llm.model.state_dict().items()}
    cached = dict(llm.engine.block_manager.hash_to_block)
    good = {k: v + 1 for k, v in tiny_model(2).state_dict().items()}
    cases = [
        ({**good, "blocks.0.attn.qkvv.weight": torch.zeros(1)},
         r"'blocks.0.attn.qkvv.weight' is not a tensor of the model \(did you mean 'blocks.0.attn.qkv.weight'\?\)"),
        ({**good, "wte.weight": torch.zeros(3, 3)}, r"'wte.weight' has shape \(3, 3\), the model's is \(96, 64\)"),
        ({**good, "norm_f.weight": [1.0] * 64}, r"'norm_f.weight' is a list, not a tensor"),
        ({**good, "norm_f.weight": torch.ones(64, dtype=torch.int64)}, r"'norm_f.weight' is torch.int64"),
        ({}, "empty"),
    ]
    for weights, match in cases:
        with pytest.raises(WeightsError, match=match):
            llm.update_weights(weights)
    with pytest.raises(WeightsError, match="state dict .* or an nn.Module, got str"):
        llm.update_weights("model.safetensors")
    assert all(torch.equal(v, snapshot[k]) for k, v in llm.model.state_dict().items())
    assert llm.engine.block_manager.hash_to_block == cached             # the prefix cache is untouched too


def test_requests_in_flight_are_recomputed_under_the_new_weights():
    old, new = tiny_model(1), tiny_model(2)
    llm = LLM(copy.deepcopy(old), block_size=4, kv_cache_tokens=512)
    eng = llm.engine
    rids = [eng.add_request(p, SamplingParams(max_tokens=12, **GREEDY)) for p in PROMPTS]
    for _ in range(4):                                                  # prefill + 3 decode steps
        eng.step()
    done = {rid: list(eng.requests[rid].seqs[0].output_token_ids) for rid in rids}
    assert all(len(d) == 4 for d in done.values())
    llm.update_weights(new.state_dict())
    assert eng.stats()["num_preemptions"] == 3 and not eng.scheduler.running
    final = {}
    while eng.has_unfinished_requests():
        final.update({o.request_id: o for o in eng.step() if o.finished})
    for rid, p in zip(rids, PROMPTS):
        toks = final[rid].outputs[0].token_ids
        assert toks[:4] == done[rid] == plain_greedy(old, p, 4)         # tokens from before are kept
        assert toks[4:] == plain_greedy(new, p + done[rid], 8)          # later ones come from the new model
    eng.block_manager.check_no_leaks()


def test_in_flight_update_with_the_model_as_its_own_draft():
    """The draft is the engine's own model, so its weights change too: after the preemption
    its K/V must be recomputed (all drafts are accepted only if they are) and the output is
    the plain greedy one of the new model."""
    old, new = tiny_model(1), tiny_model(2)
    model = copy.deepcopy(old)
    llm = LLM(model, block_size=4, kv_cache_tokens=512,
              speculative={"method": "draft", "model": model, "num_speculative_tokens": 3})
    eng = llm.engine
    rids = [eng.add_request(p, SamplingParams(max_tokens=16, **GREEDY)) for p in PROMPTS]
    for _ in range(3):
        eng.step()
    done = {rid: list(eng.requests[rid].seqs[0].output_token_ids) for rid in rids}
    assert all(len(d) >= 2 for d in done.values())
    llm.update_weights(new)
    final = {}
    while eng.has_unfinished_requests():
        final.update({o.request_id: o for o in eng.step() if o.finished})
    for rid, p in zip(rids, PROMPTS):
        k = len(done[rid])
        assert final[rid].outputs[0].token_ids == done[rid] + plain_greedy(new, p + done[rid], 16 - k)
    assert llm.stats()["spec_acceptance_rate"] == 1.0
    eng.block_manager.check_no_leaks()


def test_models_with_replaced_linears_run_and_update():
    base = tiny_model(1)
    old, new = with_lora(base, seed=0), with_lora(tiny_model(2), seed=1)
    assert not any(type(m) is nn.Linear for m in old.modules())
    llm = LLM(copy.deepcopy(old), block_size=4, kv_cache_tokens=512, max_num_batched_tokens=16)
    want_old = [plain_greedy(old, p, 10) for p in PROMPTS]
    assert want_old != [plain_greedy(base, p, 10) for p in PROMPTS]     # the adapters matter
    assert generate(llm) == want_old
    sd = new.state_dict()
    assert any(k.endswith("lora_a") for k in sd)
    llm.update_weights(sd)
    assert generate(llm) == [plain_greedy(new, p, 10) for p in PROMPTS]


def test_async_update_weights_between_steps():
    old, new = tiny_model(1), tiny_model(2)

    async def main():
        engine = AsyncLLM(copy.deepcopy(old), block_size=4, kv_cache_tokens=512)

        async def run(prompt):
            async for out in engine.generate(prompt, SamplingParams(max_tokens=8, **GREEDY)):
                pass
            return out.outputs[0].token_ids

        a = await run(PROMPTS[0])
        await engine.update_weights(new.state_dict())
        b = await run(PROMPTS[0])
        with pytest.raises(WeightsError, match="not a tensor of the model"):
            await engine.update_weights({"nope": torch.zeros(1)})
        c = await run(PROMPTS[1])                                       # still serving after a bad update
        await engine.shutdown()
        return a, b, c

    a, b, c = asyncio.run(main())
    assert a == plain_greedy(old, PROMPTS[0], 8)
    assert b == plain_greedy(new, PROMPTS[0], 8) != a
    assert c == plain_greedy(new, PROMPTS[1], 8)
