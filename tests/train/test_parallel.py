"""Parallel modes (ZeRO-1/2/3, tensor, pipeline, tensor x data) on 2 and 4 gloo CPU processes
against one process: from the same init and data, 4 steps with gradient clipping give the same
losses (1e-5) and weights (1e-6); every mode's checkpoint is whole and resumes on one process
and in another mode; bad launches fail at the door. Two torchrun launches run all the modes."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack.train import Trainer
from lmstack.train import checkpoint as ckpt
from lmstack.train.metrics import read_metrics
from lmstack.train.parallel import check_model, degrees
from lmstack.train.parallel_pp import stage_bounds
from lmstack.train.parallel_tp import permute_state, row_orders
from lmstack.utils import LmstackError
from parallel_toy import CLIP, STEPS, Float64, GlobalBatches, model_config, run_config
from train_toy import tiny_model_config

WORKER = str(Path(__file__).with_name("parallel_worker.py"))
MODES_2 = {"zero1": "zero1", "zero2": "zero2", "zero3": "zero3", "tp": "tp", "pp_gpipe": "pp,pp_schedule=gpipe",
           "pp_1f1b": "pp"}
MODES_4 = {"tp+dp": "tp+dp,tp_size=2", "pp4": "pp", "zero1_4": "zero1"}


def launch(n: int, out: Path, jobs: list[str]) -> None:
    env = {**os.environ, "LMSTACK_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), WORKER, str(out)]
    proc = subprocess.run(cmd + jobs, env=env, capture_output=True, text=True, timeout=900)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("[rank") and "Error" in line]
    assert proc.returncode == 0, "\n".join(errors[:8]) or proc.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    launch(2, out, [f"{k}={v}" for k, v in MODES_2.items()] + ["zero3_to_tp=tp,resume_from=zero3", "bad"])
    launch(4, out, [f"{k}={v}" for k, v in MODES_4.items()])
    with Float64():
        Trainer(run_config(out / "single", 1), model_config(), batches=GlobalBatches(),
                val_batches=GlobalBatches(seed=1)).fit()
    return out


def train_records(run: Path, split: str = "train") -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run) if r.get("split") == split}


def weights(run: Path, step: int = STEPS) -> dict:
    return ckpt.load_checkpoint(run / "checkpoints" / f"step_{step:07d}")[0]


@pytest.mark.parametrize("mode", [*MODES_2, *MODES_4])
def test_mode_trains_like_one_process(runs, mode):
    ref, got = train_records(runs / "single"), train_records(runs / mode)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert min(r["grad_norm"] for r in ref.values()) > CLIP          # clipping acted at every step
    for s in ref:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], abs=1e-5), s
        assert got[s]["grad_norm"] == pytest.approx(ref[s]["grad_norm"], rel=1e-5), s
        assert got[s]["tokens"] == ref[s]["tokens"]
    # the evaluation at the end (pp: a forward-only pass of the schedule)
    assert train_records(runs / mode, "val")[STEPS]["loss"] == pytest.approx(
        train_records(runs / "single", "val")[STEPS]["loss"], abs=1e-5)
    want, have = weights(runs / "single"), weights(runs / mode)
    assert sorted(have) == sorted(want)                              # whole, in the model's own names
    for n in want:
        torch.testing.assert_close(have[n], want[n], atol=1e-6, rtol=0, msg=n)


def test_zero3_checkpoint_resumes_under_tp_and_on_one_process(runs, tmp_path):
    zero3 = train_records(runs / "zero3")
    assert ckpt.read_meta(runs / "zero3" / "checkpoints" / "step_0000002")["config"]["distributed"] == "zero3"
    under_tp = train_records(runs / "zero3_to_tp")
    assert sorted(under_tp) == [3, 4]
    shutil.copytree(runs / "zero3" / "checkpoints" / "step_0000002", tmp_path / "checkpoints" / "step_0000002")
    with Float64():
        Trainer(run_config(tmp_path, 1, resume=True), model_config(), batches=GlobalBatches()).fit()
    alone = train_records(tmp_path)
    for s in (3, 4):
        assert under_tp[s]["loss"] == pytest.approx(zero3[s]["loss"], abs=1e-5)
        assert alone[s]["loss"] == pytest.approx(zero3[s]["loss"], abs=1e-5)


@pytest.mark.parametrize("mode", ["zero1", "pp4", "tp+dp"])   # (zero3 -> tp, one process: below)
def test_checkpoint_of_mode_resumes_on_one_process(runs, tmp_path, mode):
    """The optimizer state each mode saves (ZeRO's consolidated, the stages' merged, the
    tensor-parallel shards' un-permuted) continues the run: same weights after 2 more steps."""
    shutil.copytree(runs / mode / "checkpoints" / "step_0000002", tmp_path / "checkpoints" / "step_0000002")
    with Float64():
        Trainer(run_config(tmp_path, 1, resume=True), model_config(), batches=GlobalBatches()).fit()
    want, have = weights(runs / "single"), weights(tmp_path)
    for n in want:
        torch.testing.assert_close(have[n], want[n], atol=1e-6, rtol=0, msg=n)


def test_bad_launches_fail_before_any_model_is_built(runs):
    lines = (runs / "bad_inputs.txt").read_text().splitlines()
    assert len(lines) == 3 and "n_head=3 is not divisible by the tensor-parallel degree 2" in lines[0]
    assert "with 2 stages needs at least 2 blocks" in lines[1] and "--tp-size" in lines[2]


def test_world_size_door_checks():
    with pytest.raises(LmstackError, match="at least 2 processes"):
        degrees("tp", 1)
    with pytest.raises(LmstackError, match="at least 2 processes"):
        degrees("pp", 1)
    with pytest.raises(LmstackError, match="tp_size=2, world size 2"):
        degrees("tp+dp", 2, 2)
    with pytest.raises(LmstackError, match="world size 6"):
        degrees("tp+dp", 6, 4)
    assert degrees("tp+dp", 8, 2) == (2, 1) and degrees("tp", 4) == (4, 1) and degrees("pp", 3) == (1, 3)
    assert degrees("zero2", 3) == (1, 1)


def test_model_door_checks():
    cfg = tiny_model_config(n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    check_model("tp", cfg, 2, 1)
    with pytest.raises(LmstackError, match="n_kv_head=2 is not divisible by the tensor-parallel degree 4"):
        check_model("tp", cfg, 4, 1)
    with pytest.raises(LmstackError, match="intermediate_size=101"):
        check_model("tp", tiny_model_config(n_head=2, intermediate_size=101), 2, 1)
    with pytest.raises(LmstackError, match="3 stages needs at least 3 blocks"):
        check_model("pp", cfg, 1, 3)
    with pytest.raises(LmstackError, match="not 'prefix'"):
        check_model("pp", cfg, 1, 2, "prefix", 2)
    with pytest.raises(LmstackError, match="--grad-accum, now 1"):
        check_model("pp", cfg, 1, 2, "causal", 1, "1f1b")
    check_model("pp", cfg, 1, 2, "causal", 1, "gpipe")
    with pytest.raises(LmstackError, match="alibi"):
        check_model("tp", cfg.replace(pos_emb="alibi"), 2, 1)


def test_fused_rows_go_to_their_ranks():
    """Shard order of attn.qkv with H=4 query and KV=2 kv heads of D=1 on t=2: rank 0 gets query
    heads 0,1, kv head 0 (k and v); rank 1 query heads 2,3, kv head 1. Gated fc: [gate_r | up_r]."""
    cfg = tiny_model_config(n_head=4, n_kv_head=2, n_embd=4, intermediate_size=4, pos_emb="none")
    assert cfg.head_dim == 1
    # rows: q0 q1 q2 q3 | k0 k1 | v0 v1  ->  q0 q1 k0 v0 | q2 q3 k1 v1
    assert row_orders(cfg, 2)["attn.qkv"].tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    # rows: g0 g1 g2 g3 | u0 u1 u2 u3  ->  g0 g1 u0 u1 | g2 g3 u2 u3
    assert row_orders(cfg, 2)["mlp.fc"].tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    sd = {"blocks.0.attn.qkv.weight": torch.arange(8.0)[:, None], "wte.weight": torch.ones(3, 4)}
    moved = permute_state(sd, cfg, 2)
    assert moved["blocks.0.attn.qkv.weight"][:, 0].tolist() == [0, 1, 4, 6, 2, 3, 5, 7]
    back = permute_state(moved, cfg, 2, inverse=True)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_stage_bounds_cover_the_blocks_evenly():
    assert [stage_bounds(10, 4, s) for s in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert [stage_bounds(4, 4, s) for s in range(4)] == [(0, 1), (1, 2), (2, 3), (3, 4)]


@pytest.mark.parametrize("world, flags, expect", [
    ("2", ["--distributed", "tp", "--model-overrides", "{n_head: 3, n_kv_head: 3, n_embd: 48}"],
     "n_head=3 is not divisible by the tensor-parallel degree 2"),
    ("4", ["--distributed", "tp+dp"], "tp+dp needs --tp-size"),
    ("2", ["--distributed", "pp", "--model-overrides", "{n_layer: 1}"], "needs at least 2 blocks"),
    ("", ["--distributed", "zero2"], "needs a launcher")])
def test_cli_checks_the_launch_before_building_data(tmp_path, monkeypatch, capsys, world, flags, expect):
    from lmstack.cli.main import main
    if world:
        monkeypatch.setenv("WORLD_SIZE", world)
    else:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--out", str(tmp_path / "run"), *flags]) == 1
    assert expect in capsys.readouterr().err
    assert not (tmp_path / "run" / "data").exists()          # failed before the default corpus
