"""SFT, LoRA and QLoRA under torchrun DDP (2 gloo processes, 2 rows each) log the same losses,
step by step, as one process running the 4-row global batch: the source normalizes the loss by
the trained tokens of the whole global batch, so DDP's gradient average is the global
token-weighted mean (rows with more trained tokens weigh more, on whichever rank they are)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack.finetune.config import FinetuneConfig
from lmstack.finetune.run import finetune
from sft_helpers import chats, make_base, write_jsonl

WORKER = str(Path(__file__).with_name("sft_ddp_worker.py"))
METHODS = ("full", "lora", "qlora")


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft-ddp")
    base = make_base(root / "base")
    # uneven lengths, so ranks see different numbers of trained tokens
    data = write_jsonl(root / "chats.jsonl", [{**c, "prompt": c["prompt"] * (1 + i % 3)} if "prompt" in c else c
                                              for i, c in enumerate(chats(32))])
    env = {**os.environ, "LMSTACK_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER,
           str(base), str(data), str(root / "ddp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for method in METHODS:
            finetune(FinetuneConfig(model=str(base), data=str(data), out=str(root / "one" / method), method=method,
                                    max_steps=3, batch_size=4, seq_len=64, eval_every=0, ckpt_every=0,
                                    tensorboard=False, report=False, device="cpu", distributed="none",
                                    warmup_steps=1, val_fraction=0.0, lr=1e-2))
    finally:
        torch.set_num_threads(n)
    return root


@pytest.mark.parametrize("method", METHODS)
def test_ddp_losses_equal_one_process_with_twice_the_batch(runs, method):
    two, one = losses(runs / "ddp" / method), losses(runs / "one" / method)
    assert len(two) == len(one) == 3
    assert two == pytest.approx(one, abs=1e-5)
    assert one[-1] < one[0]          # the lr is high enough that the steps change the model
    s2 = json.loads((runs / "ddp" / method / "finetune.json").read_text())
    s1 = json.loads((runs / "one" / method / "finetune.json").read_text())
    assert s2["world_size"] == 2 and s1["world_size"] == 1 and s2["train"]["tokens"] == s1["train"]["tokens"]
