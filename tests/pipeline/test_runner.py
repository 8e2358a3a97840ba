"""The stage machinery on toy stages: cache keys, skip-if-done, invalidation, --force, bad input."""
import json
import os

import pytest

from lmstack.pipeline import RunOptions, format_table
from lmstack.pipeline.runner import Stage, run_stages
from lmstack.utils import LmstackError


def toy_stages(calls: list[str]) -> list[Stage]:
    """corpus -> tokenizer -> pretrain; each writes one file and logs its call."""
    def make(name, out):
        def run(r):
            calls.append(name)
            (r.dir / out).write_text(name)
            return {"value": len(calls)}
        return run

    return [
        Stage("corpus", "c", (), lambda o: {"size_mb": o.size_mb}, make("corpus", "c.txt"),
              lambda r: [r.dir / "c.txt"]),
        Stage("tokenizer", "t", ("corpus",), lambda o: {"vocab_size": o.vocab_size}, make("tokenizer", "t.txt"),
              lambda r: [r.dir / "t.txt"]),
        Stage("pretrain", "p", ("tokenizer",), lambda o: {"lr": o.lr}, make("pretrain", "p.txt"),
              lambda r: [r.dir / "p.txt"]),
    ]


def opts(tmp_path, **kw):
    return RunOptions(name="toy", out_dir=str(tmp_path), stages=["corpus", "tokenizer", "pretrain"], **kw)


def test_cache_and_invalidation(tmp_path, monkeypatch):
    monkeypatch.setattr("lmstack.pipeline.runner.check_nested", lambda o: None)
    calls: list[str] = []
    s1 = run_stages(toy_stages(calls), opts(tmp_path), log=lambda m: None)
    assert calls == ["corpus", "tokenizer", "pretrain"]
    assert [r["status"] for r in s1["stages"]] == ["ran"] * 3

    calls.clear()                                            # same inputs: everything cached
    s2 = run_stages(toy_stages(calls), opts(tmp_path), log=lambda m: None)
    assert calls == [] and [r["status"] for r in s2["stages"]] == ["cached"] * 3
    assert [r["numbers"] for r in s2["stages"]] == [r["numbers"] for r in s1["stages"]]

    run_stages(toy_stages(calls), opts(tmp_path, vocab_size=999), log=lambda m: None)
    assert calls == ["tokenizer", "pretrain"]                # downstream of the change only

    calls.clear()
    run_stages(toy_stages(calls), opts(tmp_path, vocab_size=999, lr=0.5), log=lambda m: None)
    assert calls == ["pretrain"]

    calls.clear()
    (tmp_path / "toy" / "t.txt").unlink()                     # a missing output re-runs its stage
    run_stages(toy_stages(calls), opts(tmp_path, vocab_size=999, lr=0.5), log=lambda m: None)
    assert calls == ["tokenizer"]

    calls.clear()
    summary = run_stages(toy_stages(calls), opts(tmp_path, vocab_size=999, lr=0.5), force=True,
                         log=lambda m: None)
    assert calls == ["corpus", "tokenizer", "pretrain"]
    on_disk = json.loads((tmp_path / "toy" / "summary.json").read_text())
    assert on_disk["stages"] == summary["stages"]
    assert (tmp_path / "toy" / "recipe.yaml").read_text().startswith("name: toy")
    table = format_table(summary)
    assert "pretrain" in table and "ran" in table and "run dir:" in table


def test_unselected_stage_must_be_done(tmp_path, monkeypatch):
    monkeypatch.setattr("lmstack.pipeline.runner.check_nested", lambda o: None)
    calls: list[str] = []
    with pytest.raises(LmstackError, match="stage 'tokenizer' needs the output of stage 'corpus'"):
        run_stages(toy_stages(calls), RunOptions(name="toy", out_dir=str(tmp_path), stages=["tokenizer"]),
                   log=lambda m: None)
    assert calls == []
    run_stages(toy_stages(calls), opts(tmp_path), log=lambda m: None)
    calls.clear()
    o = RunOptions(name="toy", out_dir=str(tmp_path), stages=["pretrain"], lr=0.1)
    s = run_stages(toy_stages(calls), o, log=lambda m: None)
    assert calls == ["pretrain"]
    assert [r["status"] for r in s["stages"]] == ["not selected", "not selected", "ran"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out_dir_non_root(tmp_path, monkeypatch):
    monkeypatch.setattr("lmstack.pipeline.runner.check_nested", lambda o: None)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(LmstackError, match="writable"):
        run_stages(toy_stages([]), RunOptions(name="x", out_dir=str(ro / "sub")), log=lambda m: None)


@pytest.mark.parametrize("where", ["file", "proc"])
def test_unwritable_out_dir(tmp_path, monkeypatch, where):
    monkeypatch.setattr("lmstack.pipeline.runner.check_nested", lambda o: None)
    (tmp_path / "f").write_text("x")
    out = {"file": tmp_path / "f", "proc": "/proc/lmstack-not-here"}[where]   # /proc refuses even root
    calls: list[str] = []
    with pytest.raises(LmstackError, match="not writable.*--out-dir"):
        run_stages(toy_stages(calls), RunOptions(name="x", out_dir=str(out)), log=lambda m: None)
    assert calls == []


def test_options_validation():
    with pytest.raises(LmstackError, match="unknown stage 'train'; valid stages: import, corpus"):
        RunOptions(stages=["train"])
    with pytest.raises(LmstackError, match="max_steps"):
        RunOptions(max_steps=0)
    with pytest.raises(LmstackError, match="plain folder name"):
        RunOptions(name="a/b")
    with pytest.raises(LmstackError, match="stage 'report' is listed before 'corpus' but must run after it"):
        RunOptions(stages=["report", "corpus"])


@pytest.mark.parametrize("flags,message", [
    (["--seq-len", "4096", "--model-config", "{context_length: 256}"],
     "seq_len=4096 exceeds the context_length=256 of model 'tiny' (with model_config {'context_length': 256}); "
     "lower --seq-len or set model_config: {context_length: 4096}"),
    (["--seq-len", "1024"], "seq_len=1024 exceeds the context_length=512 of model 'tiny'"),   # the preset's
    (["--vocab-size", "200"], "vocab_size=200 is too small: the tokenizer needs at least 256 byte tokens + 5 "
                              "special tokens = 261"),
    (["--train-config", "{save_weights: trainable}"], "save_weights='trainable': the evaluate and sample stages"),
])
def test_cross_field_limits_fail_before_any_file_is_written(tmp_path, capsys, flags, message):
    from lmstack.cli.main import main
    assert main(["run", "--out-dir", str(tmp_path / "runs"), "--name", "x", *flags]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
