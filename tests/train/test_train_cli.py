"""`lmstack train` end to end on a small tinyworld data dir, and bad input caught before step 1."""
import shutil

import pytest
import torch

from lmstack.cli.main import main
from lmstack.train import checkpoint as ckpt

MODEL = "{n_layer: 2, n_embd: 64, n_head: 2, n_kv_head: 2, context_length: 64}"
FLAGS = ["--model-overrides", MODEL, "--batch-size", "4", "--seq-len", "32", "--eval-every", "2",
         "--eval-batches", "2", "--ckpt-every", "2", "--tensorboard", "false", "--warmup-steps", "1"]


def _data(root, pattern="gpt4"):
    from lmstack.data import CorpusOptions, build_corpus, iter_texts, write_shards
    from lmstack.tokenizer import Tokenizer
    build_corpus(CorpusOptions(corpus="tinyworld", out=str(root), size_mb=0.15, seed=0))
    tok = Tokenizer.train(list(iter_texts(root, "train")), vocab_size=300, pattern=pattern)
    tok.save(root / "tokenizer.json")
    write_shards(root, tok, splits=("train", "val"))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _data(tmp_path_factory.mktemp("data"))


def test_train_end_to_end_then_resume(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--max-steps", "4", *FLAGS]) == 0
    assert (out / "tokenizer.json").read_bytes() == (data / "tokenizer.json").read_bytes()
    from lmstack.model import Transformer
    model = Transformer.from_pretrained(out)
    weights, _, meta = ckpt.load_checkpoint(out / "checkpoints" / "step_0000004")
    for name, t in model.state_dict().items():       # the final model is the last checkpoint's
        assert torch.equal(t, weights[name]), name
    assert meta["model_config"]["vocab_size"] == 300 and meta["step"] == 4
    # a bare --resume continues to a later max_steps
    assert main(["train", "--data", str(data), "--out", str(out), "--max-steps", "6", "--resume", *FLAGS]) == 0
    assert [p.name for p in ckpt.list_checkpoints(out / "checkpoints")] == ["step_0000004", "step_0000006"]


def test_unknown_recipe_key_and_flag(tmp_path, data, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_step: 3\n")
    assert main(["train", "--recipe", str(recipe), "--data", str(data), "--out", str(tmp_path / "x")]) == 1
    assert "unknown recipe key 'max_step' (did you mean 'max_steps'?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--max-step", "3"])
    assert "unknown option --max-step" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_truncated_shard_is_caught_before_training(tmp_path, data, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    shard = bad / "shards" / "train_0000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "run"), "--max-steps", "2", *FLAGS]) == 1
    assert "truncated" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_with_another_tokenizer_is_refused(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--max-steps", "2", *FLAGS]) == 0
    other = _data(tmp_path / "other", pattern="gpt2")      # same vocab size, other merges
    before = (out / "metrics.jsonl").read_text()
    assert main(["train", "--data", str(other), "--out", str(out), "--max-steps", "4", "--resume", *FLAGS]) == 1
    assert "another tokenizer" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before


def test_seq_len_beyond_the_context_fails_before_the_default_corpus_is_built(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--seq-len", "4096", "--model-overrides", "{context_length: 256}"]) == 1
    assert ("seq_len=4096 exceeds the model's context_length=256; lower --seq-len or set model_overrides: "
            "{context_length: 4096}") in capsys.readouterr().err
    assert not (out / "data").exists()
