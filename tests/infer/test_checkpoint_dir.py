"""A training checkpoint folder (RUN/checkpoints/step_N) loads wherever a run directory does:
the model from state.json's config and model.safetensors (tied weights restored), the
tokenizer from the run directory above, picked by the hash the checkpoint records."""
from __future__ import annotations

import hashlib

import pytest
import torch

from lmstack.cli.main import main
from lmstack.infer import LLM, SamplingParams
from lmstack.tokenizer import Tokenizer
from lmstack.train.checkpoint import save_checkpoint
from lmstack.utils import LmstackError
from tests.infer.conftest import tiny_model

TEXT = "the cat sat on the mat. the dog sat on the log. " * 20


def _run(root, tie=True, tokenizer_hash=True, **meta_extra):
    tok = Tokenizer.train(TEXT, vocab_size=300)
    run = root / "run"
    run.mkdir()
    tok.save(run / "tokenizer.json")
    model = tiny_model(3, vocab_size=tok.n_vocab, context_length=64, tie_embeddings=tie)
    model.save_pretrained(run)                                   # the run's final model, for comparison
    sha = hashlib.sha256((run / "tokenizer.json").read_bytes()).hexdigest() if tokenizer_hash else "0" * 64
    meta = {"model_config": model.config.to_dict(), "tokenizer": sha, "config": {"data": None}, **meta_extra}
    path = save_checkpoint(run / "checkpoints", 40, model.state_dict(), {"x": torch.zeros(1)}, meta)
    return run, path


@pytest.mark.parametrize("tie", [True, False])
def test_checkpoint_loads_like_its_run_dir(tmp_path, tie):
    run, ckpt = _run(tmp_path, tie)
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    a, b = LLM(str(run)), LLM(str(ckpt))
    assert b.tokenizer is not None and b.tokenizer.encode("the cat") == a.tokenizer.encode("the cat")
    assert b.generate("the cat", sp)[0].outputs[0].text == a.generate("the cat", sp)[0].outputs[0].text
    for name, t in a.model.state_dict().items():
        assert torch.equal(t, b.model.state_dict()[name]), name


def test_generate_cli_takes_a_checkpoint(tmp_path, capsys):
    run, ckpt = _run(tmp_path)
    args = ["the dog", "--temperature", "0", "--max-tokens", "8", "--ignore-eos", "true"]
    assert main(["generate", str(run), *args]) == 0
    want = capsys.readouterr().out
    assert main(["generate", str(ckpt), *args]) == 0
    assert capsys.readouterr().out == want


def test_a_tokenizer_with_another_hash_is_not_taken(tmp_path, caplog):
    _, ckpt = _run(tmp_path, tokenizer_hash=False)
    llm = LLM(str(ckpt))
    assert llm.tokenizer is None and "no tokenizer.json matching checkpoint" in caplog.text


def test_partial_checkpoint_is_refused(tmp_path):
    _, ckpt = _run(tmp_path, save_weights="trainable")
    with pytest.raises(LmstackError, match="only the trained parameters"):
        LLM(str(ckpt))
