"""Exact resume after SIGKILL at a random instant, and kills during a checkpoint write."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmstack.train import checkpoint as ckpt
from train_toy import frozen_model, frozen_trainer, losses, records, toy_trainer

WORKER = str(Path(__file__).with_name("resume_worker.py"))


RUNS = {"pretrain": toy_trainer, "frozen": frozen_trainer}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Losses of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref")
    toy_trainer(out).fit()
    return losses(out)


@pytest.fixture(scope="module")
def references(tmp_path_factory, reference):
    """Every metrics record (losses, objective metrics, lr, grad norm, tokens) of an
    uninterrupted run of each kind."""
    out = {}
    for kind, make in RUNS.items():
        d = tmp_path_factory.mktemp(kind)
        make(d).fit()
        out[kind] = records(d)
    return out


def _spawn(out, *extra):
    env = {**os.environ, "LMSTACK_NO_PROGRESS": "1"}
    return subprocess.Popen([sys.executable, WORKER, str(out), *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _n_lines(path):
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.parametrize("kind", ["pretrain", "frozen"])
def test_sigkill_at_random_point_then_resume_gives_identical_metrics(tmp_path, references, kind):
    """pretrain: the built-in causal objective, all weights. frozen: a base passed in with all
    but the last block frozen, a custom objective with randomness, metrics and state, and
    checkpoints holding only the trainable weights."""
    rng = random.Random()
    seed = rng.randrange(10**6)
    rng = random.Random(seed)
    # Kill once a random number of metrics lines exist, plus a random sub-step delay, so the
    # kill lands anywhere: mid-step, mid-eval or mid-checkpoint-write.
    kill_after = rng.randint(1, 13)   # 12 train + 3 val lines in all
    proc = _spawn(tmp_path, *([kind] if kind == "frozen" else []))
    deadline = time.time() + 120
    while _n_lines(tmp_path / "metrics.jsonl") < kill_after and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(rng.uniform(0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = len(ckpt.list_checkpoints(tmp_path / "checkpoints"))
    result = RUNS[kind](tmp_path, resume=True).fit()         # resume in this process to the end
    got = records(tmp_path)
    assert got == references[kind], f"seed {seed}, killed after {kill_after} lines ({killed_at} checkpoints)"
    if kind == "frozen":
        assert {"acc", "loss_ema"} <= set(got[("train", 12)]) and {"acc", "loss_ema"} <= set(got[("val", 12)])
        weights, _, meta = ckpt.load_checkpoint(result["checkpoint"])
        assert meta["save_weights"] == "trainable"
        assert sorted(weights) == sorted(n for n, p in frozen_model().named_parameters() if p.requires_grad)
        assert not (tmp_path / "model.safetensors").exists()     # the base is the caller's


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path, reference):
    proc = _spawn(tmp_path, "hang", "6")
    deadline = time.time() + 120
    while not (tmp_path / "HANGING").exists() and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    root = tmp_path / "checkpoints"
    leftovers = [p.name for p in root.iterdir() if p.name.startswith(".step_0000006")]
    assert leftovers, "the kill should have left the half-written checkpoint 6 in a temp dir"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_0000003"]
    weights, state, meta = ckpt.load_checkpoint(root / "step_0000003")   # the previous one is whole
    assert meta["step"] == 3 and "wte.weight" in weights
    toy_trainer(tmp_path, resume=True).fit()
    assert not any(p.name.startswith(".") for p in root.iterdir())        # temp dir cleaned up
    assert losses(tmp_path) == reference
