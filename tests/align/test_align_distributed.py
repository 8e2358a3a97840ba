"""DPO and GRPO under torchrun DDP on 2 gloo processes: `lmstack align dpo` on 2 ranks trains
exactly like one process on the combined batch; GRPO ranks roll out disjoint prompts and
normalize dapo's loss by the token count of both ranks."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmstack.cli.main import main

WORKER = str(Path(__file__).with_name("ddp_worker.py"))
ENV = {**os.environ, "LMSTACK_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
DPO = ["--format", "plain", "--max-steps", "2", "--n-train", "32", "--n-eval", "16", "--eval-every", "0", "--lr",
       "1e-3", "--device", "cpu"]


def losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_dpo_ddp_equals_one_process_on_the_combined_batch(run_dir, tmp_path):
    proc = subprocess.run(TORCHRUN + ["-m", "lmstack.cli.main", "align", "dpo", str(run_dir), "--out",
                                      str(tmp_path / "ddp"), "--batch-size", "4"] + DPO,
                          env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["align", "dpo", str(run_dir), "--out", str(tmp_path / "one"), "--batch-size", "8"] + DPO) == 0
    a, b = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert len(a) == 2 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ddp", "one"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_grpo_ranks_roll_out_their_own_prompts(run_dir, tmp_path):
    proc = subprocess.run(TORCHRUN + [WORKER, str(tmp_path), str(run_dir)], env=ENV, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"grpo_rank{r}.json").read_text()) for r in (0, 1))
    assert len(r0["prompts"]) == 2 and not set(r0["prompts"]) & set(r1["prompts"])
    # dapo: both ranks use the step's token count over both ranks / (grad_accum * W)
    total = r0["step_tokens_here"] + r1["step_tokens_here"]
    assert r0["n_tokens"] == r1["n_tokens"] == total / 4
    assert (tmp_path / "grpo" / "model.safetensors").is_file()
