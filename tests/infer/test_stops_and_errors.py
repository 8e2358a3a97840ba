"""Stop strings (multi-byte safe), stop tokens, EOS, min_tokens, abort, and bad input."""
from __future__ import annotations

import pytest

from lmstack.infer import LLM, RequestError, SamplingParams
from lmstack.infer.detokenizer import split_complete_utf8
from lmstack.utils import LmstackError
from tests.infer.conftest import ByteTokenizer, ScriptedModel, tiny_model

TEXT = "héllo wörld 🙂 end"
PROMPT = "ab"


def scripted_llm(text=TEXT, extra=(), **kw):
    script = list(PROMPT.encode()) + list(text.encode()) + list(extra) + [ord(" ")] * 40
    return LLM(ScriptedModel(script), tokenizer=ByteTokenizer(), block_size=4, **kw)


def test_split_complete_utf8():
    smile = "🙂".encode()
    assert split_complete_utf8(b"a" + smile[:2]) == (b"a", smile[:2])
    assert split_complete_utf8(b"a" + smile) == (b"a" + smile, b"")
    assert split_complete_utf8("é".encode()) == ("é".encode(), b"")


def test_plain_text_and_length():
    out = scripted_llm().generate(PROMPT, SamplingParams(max_tokens=len(TEXT.encode())))[0].outputs[0]
    assert out.text == TEXT and out.finish_reason == "length"


@pytest.mark.parametrize("stop,want", [("ö", "héllo w"), ("🙂 e", "héllo wörld "), (["zz", "llo"], "hé"),
                                       ("é", "h")])
def test_stop_strings_across_multibyte_characters(stop, want):
    out = scripted_llm().generate(PROMPT, SamplingParams(max_tokens=40, stop=stop))[0].outputs[0]
    assert out.text == want and out.finish_reason == "stop"
    assert out.stop_reason in (stop if isinstance(stop, list) else [stop])


def test_streamed_text_never_splits_a_character_nor_shows_stop_text():
    llm = scripted_llm()
    eng = llm.engine
    rid = eng.add_request(PROMPT, SamplingParams(max_tokens=40, stop="🙂"))
    seen = []
    while eng.has_unfinished_requests():
        for out in eng.step():
            seen.append(out.outputs[0].text)
    final = seen[-1]
    assert final == "héllo wörld "
    for s in seen:
        assert "\ufffd" not in s and final.startswith(s)


def test_eos_stop_token_ids_and_min_tokens():
    eot = ByteTokenizer.eot_token
    llm = scripted_llm("hi", extra=[eot, ord("x")])
    out = llm.generate(PROMPT, SamplingParams(max_tokens=10))[0].outputs[0]
    assert out.text == "hi" and out.finish_reason == "stop" and out.token_ids[-1] == eot
    out = llm.generate(PROMPT, SamplingParams(max_tokens=4, ignore_eos=True))[0].outputs[0]
    assert out.text == "hix" and out.finish_reason == "length"
    out = llm.generate(PROMPT, SamplingParams(max_tokens=10, stop_token_ids=[ord("i")]))[0].outputs[0]
    assert out.text == "h" and out.stop_reason == ord("i")
    # min_tokens: the scripted model puts all mass on EOS, so min_tokens forces something else
    out = llm.generate(PROMPT, SamplingParams(max_tokens=10, min_tokens=4, temperature=0))[0].outputs[0]
    assert len(out.token_ids) >= 4 and eot not in out.token_ids[:3]


def test_abort_frees_blocks_at_once(model):
    llm = LLM(model, block_size=4, kv_cache_tokens=256)
    eng = llm.engine
    rid = eng.add_request(list(range(30)), SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    other = eng.add_request([5, 6, 7], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.block_manager.num_used_blocks > 0
    out = eng.abort_request(rid)
    assert out.finished and out.outputs[0].finish_reason == "abort"
    while eng.has_unfinished_requests():
        eng.step()
    eng.block_manager.check_no_leaks()
    assert eng.stats()["kv_blocks_used"] == 0


def test_bad_requests_fail_alone_and_engine_keeps_serving(model):
    llm = LLM(model, block_size=4, kv_cache_tokens=512)
    ctx = model.config.context_length
    with pytest.raises(RequestError, match="prompt has 256 tokens.*context is 256"):
        llm.generate([[1] * ctx], SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]])
    with pytest.raises(RequestError, match="tokenizer"):
        llm.generate("text needs a tokenizer")
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10_000]])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    eng = llm.engine
    good = eng.add_request([1, 2, 3], SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
    with pytest.raises(RequestError):
        eng.add_request([1] * ctx, SamplingParams())
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert outs[-1].request_id == good and len(outs[-1].outputs[0].token_ids) == 3


def test_bad_engine_arguments(model, tmp_path):
    with pytest.raises(LmstackError, match="does not exist"):
        LLM(str(tmp_path / "missing"))
    with pytest.raises(LmstackError, match="no config.json"):
        LLM(str(tmp_path))
    with pytest.raises(LmstackError, match="cannot hold one request.*kv_cache_tokens to >= 256"):
        LLM(model, block_size=16, kv_cache_tokens=100)
    with pytest.raises(LmstackError, match="not both"):
        LLM(model, kv_cache_tokens=1000, kv_cache_bytes=10**6)
    with pytest.raises(LmstackError, match="max_num_seqs"):
        LLM(model, max_num_seqs=0)
    llm = LLM(model, kv_cache_bytes=10**6)     # sized in bytes: 2 * 2 layers * 2 heads * 16 * 4 B = 512 B/token
    assert llm.stats()["kv_blocks_total"] == 10**6 // (512 * 16)
