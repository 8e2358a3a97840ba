"""vLLM's `LLM.chat` (the model's chat template, as the server renders it, plus its end-of-turn
stop token) and `SamplingParams(include_stop_str_in_output=True)`."""
from __future__ import annotations

import json

import pytest

from lmstack.infer import LLM, SamplingParams
from lmstack.infer.engine import RequestError
from lmstack.tokenizer import Tokenizer
from tests.infer.conftest import tiny_model

TEXT = "the cat sat on the mat. the dog sat on the log. " * 20
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "where is the cat?"}]
JINJA = ("{% for m in messages %}[{{ m.role }}] {{ m.content }}{{ eos_token }}{% endfor %}"
         "{% if add_generation_prompt %}[assistant] {% endif %}")
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _run_dir(path, specials=True):
    tok = Tokenizer.train(TEXT, vocab_size=300, special_tokens=None if specials else ["<|endoftext|>"])
    tiny_model(2, vocab_size=tok.n_vocab, context_length=128).save_pretrained(path)
    tok.save(path / "tokenizer.json")
    return path


def _capture(llm):
    seen = {}
    generate = llm.generate

    def spy(prompts, params, **kw):
        seen["prompts"], seen["params"] = prompts, params
        return generate(prompts, params, **kw)

    llm.generate = spy
    return seen


def test_chat_uses_lmstacks_template_and_stops_at_end_of_turn(tmp_path):
    llm = LLM(str(_run_dir(tmp_path)))
    seen = _capture(llm)
    (out,) = llm.chat(MESSAGES, GREEDY)
    tok = llm.tokenizer
    assert seen["prompts"] == [tok.apply_chat_template(MESSAGES, add_generation_prompt=True)]
    assert seen["params"][0].stop_token_ids == [tok.special_tokens["<|end|>"]]
    # the same prompt and params through generate give the same text
    assert out.outputs[0].text == LLM.generate(llm, seen["prompts"], seen["params"])[0].outputs[0].text
    outs = llm.chat([MESSAGES, MESSAGES[1:]], [GREEDY, GREEDY])      # a batch of conversations
    assert len(outs) == 2 and outs[0].outputs[0].text == out.outputs[0].text


def test_chat_uses_the_folders_jinja_template_and_its_eos(tmp_path):
    d = _run_dir(tmp_path)
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": JINJA, "eos_token": "<|end|>"}))
    llm = LLM(str(d))
    seen = _capture(llm)
    llm.chat(MESSAGES, GREEDY)
    text = "[system] Be brief.<|end|>[user] where is the cat?<|end|>[assistant] "
    assert seen["prompts"] == [llm.tokenizer.encode(text, allowed_special="all")]
    assert seen["params"][0].stop_token_ids == [llm.tokenizer.special_tokens["<|end|>"]]
    llm.chat(MESSAGES, GREEDY, chat_template="{{ messages[-1].content }}")      # a template passed in
    assert seen["prompts"] == [llm.tokenizer.encode("where is the cat?", allowed_special="all")]


def test_chat_without_any_template_says_so(tmp_path):
    llm = LLM(str(_run_dir(tmp_path, specials=False)))
    with pytest.raises(RequestError, match="no chat template.*pass chat_template="):
        llm.chat(MESSAGES, GREEDY)
    with pytest.raises(RequestError, match="conversation"):
        llm.chat([], GREEDY)


def test_include_stop_str_in_output(tmp_path):
    llm = LLM(str(_run_dir(tmp_path)))
    free = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))[0].outputs[0].text
    stop = free.strip()[2:5]             # a piece of what the model writes anyway
    cut = free.index(stop)
    sp = dict(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop])
    plain = llm.generate("the cat", SamplingParams(**sp))[0].outputs[0]
    kept = llm.generate("the cat", SamplingParams(**sp, include_stop_str_in_output=True))[0].outputs[0]
    assert plain.text == free[:cut] and kept.text == free[:cut] + stop
    assert kept.finish_reason == plain.finish_reason == "stop" and kept.stop_reason == stop
    with pytest.raises(ValueError, match="include_stop_str_in_output"):
        SamplingParams(include_stop_str_in_output="yes")
