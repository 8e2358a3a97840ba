"""`LLM(run_dir)` with a real tokenizer, and `lmstack generate` end to end on a toy run dir."""
from __future__ import annotations

import pytest

from lmstack.cli.main import main
from lmstack.infer import LLM, SamplingParams
from lmstack.tokenizer import Tokenizer
from tests.infer.conftest import tiny_model

TEXT = "the cat sat on the mat. the dog sat on the log. héllo wörld 🙂 " * 20


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    tok = Tokenizer.train(TEXT, vocab_size=300)
    model = tiny_model(4, vocab_size=tok.n_vocab, context_length=64)
    model.save_pretrained(d)
    tok.save(d / "tokenizer.json")
    return d


def test_llm_loads_run_dir_and_detokenizes(run_dir):
    llm = LLM(str(run_dir), block_size=8)
    out = llm.generate("the cat", SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    comp = out.outputs[0]
    assert out.prompt == "the cat" and out.prompt_token_ids == llm.tokenizer.encode("the cat")
    assert comp.text == llm.tokenizer.decode(comp.token_ids)   # incremental == one-shot decode
    assert llm.engine.eos_token_id == llm.tokenizer.eot_token


def test_cli_generate_streams_same_text(run_dir, capsys):
    llm = LLM(str(run_dir), block_size=8)
    want = llm.generate("the dog", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0].text
    rc = main(["generate", str(run_dir), "the dog", "--temperature", "0", "--max-tokens", "12",
               "--ignore-eos", "true", "--stats", "true"])
    captured = capsys.readouterr()
    assert rc == 0 and captured.out == want + "\n"
    assert "ttft=" in captured.err and "tokens/s=" in captured.err
    rc = main(["generate", str(run_dir), "the dog", "--temperature", "0", "--max-tokens", "12",
               "--ignore-eos", "true", "--speculative", "ngram"])
    assert rc == 0 and capsys.readouterr().out == want + "\n"


def test_cli_generate_errors(run_dir, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "hi"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", str(run_dir), "hi", "--top-p", "2"]) == 1
    assert "top_p" in capsys.readouterr().err
