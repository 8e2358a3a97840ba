"""An interrupted `lmstack run` continues: rerun after a kill mid-pretraining, the pretrain stage
resumes from its last checkpoint and ends with the metrics and weights of an uninterrupted run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

WORKER = Path(__file__).with_name("kill_worker.py")
RECIPE = {
    "size_mb": 0.1, "vocab_size": 300, "max_steps": 12, "batch_size": 4, "seq_len": 32, "lr": 0.01,
    "model_config": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 2, "context_length": 512},
    "train_config": {"eval_every": 3, "ckpt_every": 4, "sample_every": 4, "tensorboard": False,
                     "eval_batches": 1, "warmup_steps": 2},
    "sample_max_tokens": 6, "stages": ["corpus", "tokenizer", "shards", "pretrain"],
}
TIMING = ("tok_per_s", "mfu")     # wall-clock numbers differ between any two runs


def _run(root: Path, name: str, stop_at: int = 0, sig: str = "SIGKILL") -> subprocess.CompletedProcess:
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LMSTACK_TEST_STOP_AT": str(stop_at), "LMSTACK_TEST_SIGNAL": sig}
    return subprocess.run([sys.executable, str(WORKER), "run", "--recipe", str(recipe), "--out-dir", str(root),
                           "--name", name], env=env, capture_output=True, text=True, timeout=600)


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    r = _run(root, "whole")
    assert r.returncode == 0, r.stderr
    return root / "whole"


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
def test_rerun_after_interrupt_resumes_pretraining_exactly(uninterrupted, tmp_path, sig):
    first = _run(tmp_path, "cut", stop_at=6, sig=sig)
    run_dir = tmp_path / "cut"
    if sig == "SIGKILL":
        assert first.returncode == -9
    else:   # Ctrl-C: one line saying how to continue, no traceback
        assert first.returncode == 130 and "run the same command again" in first.stderr, first.stderr
        assert "Traceback" not in first.stderr
    assert not (run_dir / "model.safetensors").exists()
    assert [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")] == ["step_0000004"]

    second = _run(tmp_path, "cut")
    assert second.returncode == 0, second.stderr
    assert "[corpus] cached" in second.stderr and "resuming the interrupted run from checkpoints/step_0000004" \
        in second.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    pretrain = next(s for s in summary["stages"] if s["name"] == "pretrain")
    assert pretrain["numbers"]["resumed_from"] == 4 and pretrain["numbers"]["steps"] == 12

    want, got = _metrics(uninterrupted), _metrics(run_dir)
    assert [r["split"] for r in got].count("sample") == 3          # samples at steps 4, 8, 12
    assert got == want
    a, b = load_file(str(uninterrupted / "model.safetensors")), load_file(str(run_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    if sig == "SIGKILL":
        third = _run(tmp_path, "cut")                               # finished: nothing left to do
        assert third.returncode == 0 and "[pretrain] cached" in third.stderr
        # the last checkpoint is the final model, and loads like the run directory
        from lmstack.infer import LLM, SamplingParams
        sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        texts = [LLM(str(d)).generate("Once upon", sp)[0].outputs[0].text
                 for d in (run_dir, run_dir / "checkpoints" / "step_0000012")]
        assert texts[0] == texts[1]


def test_a_changed_recipe_starts_pretraining_over(tmp_path):
    assert _run(tmp_path, "x", stop_at=6).returncode == -9
    RECIPE["lr"] = 0.02
    try:
        r = _run(tmp_path, "x")
    finally:
        RECIPE["lr"] = 0.01
    assert r.returncode == 0, r.stderr
    assert "resuming" not in r.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "x" / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and steps == sorted(steps)
