"""A fault in one request fails that request alone; padded vocabularies decode to nothing."""
from __future__ import annotations

import asyncio
import logging
import random

import pytest
import torch

import lmstack.infer.postprocess as postprocess
from lmstack.infer import LLM, AsyncLLM, SamplingParams
from lmstack.tokenizer import Tokenizer
from tests.infer.conftest import ByteTokenizer, ScriptedModel, tiny_model

BAD = 200                                    # the id our faulty tokenizer cannot decode
SCRIPT = list(b"abcdefgh") + [BAD] + [ord(" ")] * 40


class FaultyTokenizer(ByteTokenizer):
    """A tokenizer with a bug: decoding id 200 raises (not a padding id: a real fault)."""

    def decode_bytes(self, ids):
        if BAD in ids:
            raise RuntimeError(f"decoder blew up on {BAD}")
        return super().decode_bytes(ids)


def faulty_llm():
    return LLM(ScriptedModel(SCRIPT), tokenizer=FaultyTokenizer(), block_size=4, kv_cache_tokens=512)


def test_a_failing_request_ends_alone_with_an_error():
    llm = faulty_llm()
    greedy = dict(temperature=0, ignore_eos=True)
    # "abcdef" continues g, h, BAD (fails at its 3rd token); "ab" continues c, d, e, f and never meets BAD
    outs = llm.generate(["abcdef", "ab", "abcde"], [SamplingParams(max_tokens=10, **greedy),
                                                    SamplingParams(max_tokens=4, **greedy),
                                                    SamplingParams(max_tokens=10, n=2, **greedy)])
    bad, good, bad_n2 = outs
    assert bad.finished and bad.error == f"RuntimeError: decoder blew up on {BAD}"
    assert bad.outputs[0].finish_reason == "error" and bad.outputs[0].token_ids == list(b"gh") + [BAD]
    assert bad.outputs[0].text == "gh"
    assert good.error is None and good.outputs[0].text == "cdef" and good.outputs[0].finish_reason == "length"
    assert bad_n2.error is not None and [c.finish_reason for c in bad_n2.outputs] == ["error", "error"]
    llm.engine.block_manager.check_no_leaks()
    assert llm.generate("ab", SamplingParams(max_tokens=3, **greedy))[0].outputs[0].text == "cde"


def test_async_stream_of_a_failing_request_ends_with_its_error():
    async def main():
        engine = AsyncLLM(ScriptedModel(SCRIPT), tokenizer=FaultyTokenizer(), block_size=4, kv_cache_tokens=512)

        async def last(prompt, n):
            async for out in engine.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)):
                pass
            return out

        outs = await asyncio.gather(last("abcdef", 10), last("ab", 4))
        await engine.shutdown()
        return outs

    bad, good = asyncio.run(main())
    assert bad.finished and bad.error.startswith("RuntimeError") and bad.outputs[0].finish_reason == "error"
    assert good.error is None and good.outputs[0].text == "cdef"


def test_a_sampler_fault_is_isolated_to_its_row(monkeypatch):
    model = tiny_model(1)
    params = [SamplingParams(temperature=1.0, seed=13, max_tokens=8),
              SamplingParams(temperature=1.0, seed=1, max_tokens=8), SamplingParams(temperature=0, max_tokens=8)]
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    alone = LLM(model, block_size=4, kv_cache_tokens=512)
    want = [o.outputs[0].token_ids for o in alone.generate(prompts[1:], params[1:])]
    real = postprocess.sample

    def fragile(logits, params_list, *args, **kwargs):
        if any(p.seed == 13 for p in params_list):
            raise FloatingPointError("bad row")
        return real(logits, params_list, *args, **kwargs)

    monkeypatch.setattr(postprocess, "sample", fragile)
    llm = LLM(model, block_size=4, kv_cache_tokens=512)
    outs = llm.generate(prompts, params)
    assert outs[0].error == "FloatingPointError: bad row" and outs[0].outputs[0].token_ids == []
    assert [o.outputs[0].token_ids for o in outs[1:]] == want and all(o.error is None for o in outs[1:])
    llm.engine.block_manager.check_no_leaks()


def test_padded_vocab_ids_decode_to_nothing_and_the_batch_goes_on(tmp_path, caplog):
    """A Llama checkpoint with vocab_size=2048 and a 500-token tokenizer: ids >= 500 have no
    text. Greedy sampling hits them; every request must still finish with the right text."""
    transformers = pytest.importorskip("transformers")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randrange(2, 8))) for _ in range(300)]
    tok = Tokenizer.train(" ".join(rng.choice(words) for _ in range(6000)), vocab_size=500, show_progress=False)
    assert tok.n_vocab == 500
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=2048, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   initializer_range=0.3, tie_word_embeddings=False, eos_token_id=tok.eot_token,
                                   bos_token_id=None, pad_token_id=None)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path)       # safetensors + config.json
    tok.save(tmp_path / "tokenizer.json")
    with caplog.at_level(logging.WARNING, logger="lmstack.infer"):
        llm = LLM(str(tmp_path), block_size=8)
        prompts = [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 6))) for _ in range(12)]
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    warned = [r for r in caplog.records if "vocab_size=2048" in r.getMessage()]
    assert len(warned) == 1 and "n_vocab=500" in warned[0].getMessage()
    specials = set(tok.special_tokens.values())
    padded = 0
    for out in outs:
        comp = out.outputs[0]
        assert out.error is None and comp.finish_reason == "length" and len(comp.token_ids) == 16
        assert comp.text == tok.decode([t for t in comp.token_ids if t < tok.n_vocab and t not in specials])
        padded += sum(t >= tok.n_vocab for t in comp.token_ids)
    assert padded > 0                                                   # the padding ids were really sampled
