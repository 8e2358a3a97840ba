"""Several LoRA adapters over one base in one batch: every request's greedy output equals its
adapter merged (finetune.merge_lora) and run alone, base requests equal the base; the prefix
cache never shares KV across adapters; speculative decoding stays exact; bad adapters and
requests are refused by name."""
from __future__ import annotations

import random
import threading

import pytest
import torch

from lmstack.finetune import LoraConfig, add_lora, load_adapter, lora_modules, merge_lora, save_adapter
from lmstack.infer import LLM, AsyncLLM, LoRAError, LoRARequest, RequestError, SamplingParams
from lmstack.infer.block_manager import BlockManager
from lmstack.infer.lora import LoRAAdapters
from lmstack.infer.sequence import Sequence
from lmstack.model import Transformer
from lmstack.model.lora import MultiLoRALinear
from tests.infer.conftest import tiny_model

GREEDY = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=12)
ENGINE = dict(block_size=4, kv_cache_tokens=2048, device="cpu")
# three adapters of different ranks and targets: q/v only, every linear (rsLoRA), o/down on one layer
CONFIGS = {"qv": LoraConfig(r=2, alpha=4, targets=["q", "v"]),
           "all": LoraConfig(r=8, alpha=8, targets="all-linear", use_rslora=True),
           "od": LoraConfig(r=4, alpha=8, targets=["o", "down"], exclude=[r"blocks\.0\..*"])}


def make_adapter(base: Transformer, config: LoraConfig, seed: int, out) -> None:
    """A trained-looking adapter (random B, so it changes the outputs) saved as a PEFT folder."""
    add_lora(base, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(base).values():
            for p in m.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g))
    save_adapter(base, out)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_lora")
    tiny_model(0).save_pretrained(root / "base")
    out = {"base": root / "base"}
    for i, (name, cfg) in enumerate(CONFIGS.items()):
        make_adapter(tiny_model(0), cfg, seed=10 + i, out=root / name)
        out[name] = root / name
    return out


def merged(dirs, name: str | None) -> Transformer:
    m = Transformer.from_pretrained(dirs["base"])
    if name is not None:
        load_adapter(m, dirs[name])
        merge_lora(m)
    return m.eval()


def prompts():
    rng = random.Random(0)
    shared = [rng.randrange(96) for _ in range(14)]            # one prompt asked under every adapter
    return [shared] * 4 + [[rng.randrange(96) for _ in range(rng.randrange(3, 20))] for _ in range(8)]


@pytest.fixture(scope="module")
def reference(dirs):
    """Greedy tokens of every prompt under each adapter merged, and under the base, run alone."""
    return {name: [o.outputs[0].token_ids for o in LLM(merged(dirs, name), **ENGINE).generate(prompts(), GREEDY)]
            for name in [None, *CONFIGS]}


def test_references_differ(reference):
    """Each adapter changes the greedy output (else the equalities below prove nothing)."""
    outs = [tuple(map(tuple, reference[n])) for n in reference]
    assert len(set(outs)) == len(outs)


# unmerged vs merged adapters round differently in fp32: LoRALinear itself differs from its merged
# form by ~5e-5 on these logits (|logits| ~ 10), while an adapter moves them by ~10
TOL = dict(atol=2e-4, rtol=1e-4)


def test_mixed_batch_logits_equal_each_adapter_merged(dirs):
    model = Transformer.from_pretrained(dirs["base"]).eval()
    base_keys = set(model.state_dict())
    adapters = LoRAAdapters(model, {n: dirs[n] for n in CONFIGS})
    assert set(model.state_dict()) == base_keys                      # adapters are not weights
    assert sum(isinstance(m, MultiLoRALinear) for m in model.modules()) == 8   # qkv, o, fc, down x 2 layers
    ids = torch.randint(0, 96, (5, 9), generator=torch.Generator().manual_seed(0))
    row_ids = [adapters.ids["all"], 0, adapters.ids["qv"], adapters.ids["od"], adapters.ids["qv"]]
    refs = {0: merged(dirs, None)} | {adapters.ids[n]: merged(dirs, n) for n in CONFIGS}
    with torch.no_grad():
        with adapters.batch.rows(row_ids, 9, "cpu"):
            logits = model(ids)                                      # (5, 9, V)
            other_thread = []                                        # e.g. the dashboard's forward
            t = threading.Thread(target=lambda: other_thread.append(model(ids)))
            t.start()
            t.join()
        for b, a in enumerate(row_ids):
            torch.testing.assert_close(logits[b], refs[a](ids[b:b + 1])[0], **TOL)
        base = refs[0](ids)
        torch.testing.assert_close(other_thread[0], base, **TOL)
        torch.testing.assert_close(model(ids), base, **TOL)    # outside a batch: the base
        with adapters.batch.rows([adapters.ids["all"]] * 5, 9, "cpu"):       # one adapter for all rows
            torch.testing.assert_close(model(ids), refs[adapters.ids["all"]](ids), **TOL)


def test_interleaved_requests_equal_each_adapter_merged_alone(dirs, reference):
    llm = LLM(str(dirs["base"]), lora={n: dirs[n] for n in CONFIGS}, **ENGINE)
    assert llm.lora_names == ["qv", "all", "od"]
    names = [None, "qv", "all", "od"] + ["od", None, "qv", "all"] * 2      # the shared prompt under each
    reqs = [n if i % 2 else (LoRARequest(n) if n else None) for i, n in enumerate(names)]
    outs = llm.generate(prompts(), GREEDY, lora_request=reqs)
    for i, (name, out) in enumerate(zip(names, outs)):
        assert out.outputs[0].token_ids == reference[name][i], (i, name)
        assert (out.lora_request.lora_name if out.lora_request else None) == name
    # n > 1: the forked siblings keep the adapter
    two = llm.generate([prompts()[5]], SamplingParams(n=2, temperature=0, ignore_eos=True, max_tokens=12),
                       lora_request="all")[0]
    assert [c.token_ids for c in two.outputs] == [reference["all"][5]] * 2
    llm.engine.block_manager.check_no_leaks()


def test_prefix_cache_is_per_adapter(dirs, reference):
    llm = LLM(str(dirs["base"]), lora={n: dirs[n] for n in CONFIGS}, **ENGINE)
    p = prompts()[0]                                                  # 14 tokens: 3 full blocks of 4
    first = llm.generate([p], GREEDY, lora_request="qv")[0]
    assert first.num_cached_tokens == 0
    for name in ("all", None, "od"):          # same tokens, other adapter (or none): nothing to share
        out = llm.generate([p], GREEDY, lora_request=name)[0]
        assert out.num_cached_tokens == 0 and out.outputs[0].token_ids == reference[name][0]
    again = llm.generate([p], GREEDY, lora_request="qv")[0]          # same adapter: its own blocks
    assert again.num_cached_tokens == 12 and again.outputs[0].token_ids == reference["qv"][0]


def test_block_manager_keeps_adapters_apart_even_when_hashes_collide():
    bm = BlockManager(16, block_size=4, hash_fn=lambda parent, tokens: 0)   # every block collides
    tokens = list(range(13))
    sp = SamplingParams()

    def seq(i, lora_id):
        return Sequence(i, f"r{i}", 0, tokens, sp, lora_id=lora_id)

    a = seq(0, 1)
    bm.allocate(a, len(tokens))
    a.num_computed_tokens = len(tokens)
    bm.register_full_blocks(a)
    assert bm.match_prefix(seq(1, 2)) == 0 and bm.match_prefix(seq(2, 0)) == 0
    assert bm.match_prefix(seq(3, 1)) == 4     # same adapter: block 0 hits (later ones collide with it)


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_speculative_decoding_with_adapters_stays_exact(dirs, reference, method):
    spec = {"method": "ngram", "num_speculative_tokens": 3} if method == "ngram" else \
        {"method": "draft", "model": str(dirs["base"]), "num_speculative_tokens": 3}
    llm = LLM(str(dirs["base"]), lora={n: dirs[n] for n in CONFIGS}, speculative=spec, **ENGINE)
    names = ["all", "qv", None, "od"] * 3
    outs = llm.generate(prompts(), GREEDY, lora_request=names)
    assert [o.outputs[0].token_ids for o in outs] == [reference[n][i] for i, n in enumerate(names)]
    assert llm.stats()["spec_proposed_tokens"] > 0


def test_beam_search_under_an_adapter_equals_merged(dirs):
    llm = LLM(str(dirs["base"]), lora={n: dirs[n] for n in CONFIGS}, **ENGINE)
    got = llm.beam_search(prompts()[4:6], beam_width=3, max_tokens=6, lora_request="od")
    want = LLM(merged(dirs, "od"), **ENGINE).beam_search(prompts()[4:6], beam_width=3, max_tokens=6)
    base = LLM(merged(dirs, None), **ENGINE).beam_search(prompts()[4:6], beam_width=3, max_tokens=6)
    tokens = [[s.token_ids for s in o.sequences] for o in got]
    assert tokens == [[s.token_ids for s in o.sequences] for o in want]
    assert tokens != [[s.token_ids for s in o.sequences] for o in base]


def test_async_engine_streams_per_adapter(dirs, reference):
    import asyncio

    async def main():
        engine = AsyncLLM(str(dirs["base"]), lora={n: dirs[n] for n in CONFIGS}, **ENGINE)
        try:
            async def run(i, name):
                last = None
                async for out in engine.generate(prompts()[i], GREEDY, f"r{i}", lora_request=name):
                    last = out
                return last.outputs[0].token_ids
            return await asyncio.gather(*(run(i, n) for i, n in enumerate(["od", "qv", None, "all"])))
        finally:
            await engine.shutdown()

    got = asyncio.run(main())
    assert got == [reference[n][i] for i, n in enumerate(["od", "qv", None, "all"])]


def test_bad_requests_are_refused_by_name(dirs):
    llm = LLM(str(dirs["base"]), lora={"qv": dirs["qv"], "all": dirs["all"]}, **ENGINE)
    with pytest.raises(RequestError, match=r"prompt 1: unknown LoRA adapter 'nope'; this engine serves \['qv', "
                                           r"'all'\]"):
        llm.generate([[1, 2], [3, 4]], GREEDY, lora_request=["qv", "nope"])
    with pytest.raises(RequestError, match="has id 1 here"):
        llm.generate([[1, 2]], GREEDY, lora_request=LoRARequest("qv", 2))
    with pytest.raises(RequestError, match="was loaded from"):
        llm.generate([[1, 2]], GREEDY, lora_request=LoRARequest("qv", 1, str(dirs["all"])))
    with pytest.raises(RequestError, match="2 prompts but 3 lora_request"):
        llm.generate([[1, 2], [3, 4]], GREEDY, lora_request=["qv", None, "all"])
    assert llm.generate([[1, 2]], GREEDY, lora_request=LoRARequest("qv", 1, str(dirs["qv"])))[0].finished
    with pytest.raises(RequestError, match="serves no LoRA adapters"):
        LLM(tiny_model(0), **ENGINE).generate([[1, 2]], GREEDY, lora_request="qv")


def test_adapters_that_do_not_fit_fail_at_construction_and_leave_the_model(dirs, tmp_path):
    other = tiny_model(0, n_embd=32)                                 # another base: other shapes
    make_adapter(other, LoraConfig(r=2, targets=["q", "v"]), seed=0, out=tmp_path / "other")
    model = tiny_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError, match=r"LoRA adapter 'x' \(.*other\): .*trained on another base model"):
        LLM(model, lora={"qv": dirs["qv"], "x": tmp_path / "other"}, **ENGINE)
    assert not lora_modules(model) and not any(isinstance(m, MultiLoRALinear) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()) and not getattr(model, "transforms", [])
    with pytest.raises(LoRAError, match="is not a folder"):
        LLM(tiny_model(0), lora={"x": tmp_path / "missing"}, **ENGINE)
    make_adapter(tiny_model(0), LoraConfig(r=2, targets=["q", "lm_head"]), seed=0, out=tmp_path / "head")
    with pytest.raises(LoRAError, match="LM head"):
        LLM(tiny_model(0), lora={"h": tmp_path / "head"}, **ENGINE)
    own = tiny_model(0)
    add_lora(own, LoraConfig(r=2))
    with pytest.raises(LoRAError, match="adapter of its own"):
        LLM(own, lora={"qv": dirs["qv"]}, **ENGINE)


def test_adapters_over_a_quantized_base_equal_qlora(tmp_path):
    """A quantized base (here RTN int8) serves adapters too; reference: the QLoRA model itself."""
    from lmstack.quant.config import QuantConfig
    from lmstack.quant.quantize import quantize_model

    q = tiny_model(0)
    quantize_model(q, QuantConfig(method="rtn", bits=8))
    q.save_pretrained(tmp_path / "q")
    qlora = Transformer.from_pretrained(tmp_path / "q")
    make_adapter(qlora, LoraConfig(r=2, targets="all-linear"), seed=3, out=tmp_path / "a")
    want = LLM(qlora.eval(), **ENGINE).generate(prompts()[4:8], GREEDY)
    llm = LLM(str(tmp_path / "q"), lora={"a": tmp_path / "a"}, **ENGINE)
    got = llm.generate(prompts()[4:8] * 2, GREEDY, lora_request=["a"] * 4 + [None] * 4)
    assert [o.outputs[0].token_ids for o in got[:4]] == [o.outputs[0].token_ids for o in want]
    plain = LLM(str(tmp_path / "q"), **ENGINE).generate(prompts()[4:8], GREEDY)
    assert [o.outputs[0].token_ids for o in got[4:]] == [o.outputs[0].token_ids for o in plain]
    assert got[0].outputs[0].token_ids != plain[0].outputs[0].token_ids
