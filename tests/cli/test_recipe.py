"""One recipe file for `run`, `train` and `data build`: each reads the keys it needs, skips the
others with a note, refuses keys no command knows; the three build the same data directory
from one recipe, and `train` trains what the pipeline's pretrain stage trains."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from lmstack.cli.main import main
from lmstack.cli.recipe import read_recipe
from lmstack.pipeline import RunOptions
from lmstack.pipeline.options import train_config_for
from lmstack.utils import LmstackError

TINYWORLD = Path(__file__).resolve().parents[2] / "recipes" / "tinyworld.yaml"
SMALL = {"size_mb": 0.05, "vocab_size": 300, "dedupe": True, "seed": 3, "max_steps": 2, "batch_size": 2,
         "seq_len": 32, "lr": 0.01, "model_config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 2},
         "train_config": {"eval_every": 0, "ckpt_every": 0, "tensorboard": False, "eval_batches": 1,
                          "warmup_steps": 1}, "name": "r", "probe_limit": 3}


def test_train_reads_the_default_recipe_and_notes_what_it_skips():
    notes = []
    keys = read_recipe(TINYWORLD, "train", note=notes.append)
    assert keys["model_overrides"] == {} and keys["warmup_steps"] == 30 and keys["ckpt_every"] == 50
    assert keys["vocab_size"] == 2048 and keys["max_steps"] == 500
    assert "model_config" not in keys and "train_config" not in keys and "name" not in keys
    (note,) = notes
    assert note.startswith("note: lmstack train does not use the recipe key(s) base_model, dpo_config, "
                           "eval_max_tokens, ")
    assert ", name, out_dir, " in note


def test_each_command_reads_its_keys(tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("lr: 0.1\nwarmup_steps: 7\nvocab_size: 500\nout: x\n")
    notes = []
    assert read_recipe(r, "data build", note=notes.append) == {"vocab_size": 500, "out": "x"}
    assert "lr, warmup_steps" in notes[-1]
    run = read_recipe(r, "run", note=notes.append)             # a top-level TrainConfig key: train_config
    assert run == {"lr": 0.1, "vocab_size": 500, "train_config": {"warmup_steps": 7}}
    assert "key(s) out " in notes[-1]
    r.write_text("warmup_steps: 7\ntrain_config: {warmup_steps: 8}\n")
    for command in ("run", "train"):
        with pytest.raises(LmstackError, match="'warmup_steps' is given both at the top level and in train_config"):
            read_recipe(r, command)


@pytest.mark.parametrize("command", ["run", "train", "data build"])
def test_a_key_no_command_knows_is_an_error(tmp_path, command):
    r = tmp_path / "r.yaml"
    r.write_text("vocab_sise: 500\n")
    with pytest.raises(LmstackError, match=f"unknown recipe key 'vocab_sise' \\(did you mean 'vocab_size'\\?\\); "
                                           f"valid keys for lmstack {command}: "):
        read_recipe(r, command)


def test_train_defaults_are_the_default_recipes(tmp_path, monkeypatch):
    seen = {}

    class Capture:
        def __init__(self, cfg, model_transform=None):
            seen["cfg"], seen["transform"] = cfg, model_transform

        def fit(self):
            return {}

    monkeypatch.setattr("lmstack.cli.train.Trainer", Capture)
    data = tmp_path / "d"
    (data / "shards").mkdir(parents=True)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "o")]) == 0
    assert seen["cfg"] == train_config_for(RunOptions(), data=str(data), out=str(tmp_path / "o"))
    assert seen["cfg"].max_steps == 500 and seen["cfg"].batch_size == 8 and seen["cfg"].lr == 0.005
    assert seen["transform"] is None
    # --qat: the trainer gets quant's QAT transform (train/ itself never imports quant/)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "o"), "--qat", "{bits: 4, group_size: 32}"]) == 0
    assert (seen["transform"].config.bits, seen["transform"].config.group_size) == (4, 32)
    assert main(["train", "--recipe", str(TINYWORLD), "--data", str(data), "--out", "o2", "--lr", "0.01"]) == 0
    assert seen["cfg"] == dataclasses.replace(train_config_for(RunOptions(), data=str(data), out="o2"), lr=0.01)


def test_one_recipe_one_data_directory_whichever_command_builds_it(tmp_path, capsys):
    r = tmp_path / "small.yaml"
    r.write_text(yaml.safe_dump(SMALL))
    assert main(["data", "build", "--recipe", str(r), "--out", str(tmp_path / "built")]) == 0
    assert main(["train", "--recipe", str(r), "--out", str(tmp_path / "trained")]) == 0
    assert main(["run", "--recipe", str(r), "--out-dir", str(tmp_path), "--stages", "corpus,tokenizer,shards"]) == 0
    out = capsys.readouterr().out
    assert "no report written" in out and "report: " not in out       # no path to a file that does not exist
    dirs = [tmp_path / "built", tmp_path / "trained" / "data", tmp_path / "r" / "data"]
    for name in ("tokenizer.json", "docs/train.jsonl", "docs/val.jsonl", "shards/train_0000.bin"):
        first = (dirs[0] / name).read_bytes()
        assert all((d / name).read_bytes() == first for d in dirs[1:]), name
