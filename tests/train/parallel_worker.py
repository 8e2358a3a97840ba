"""Run under torchrun by test_parallel.py: several parallel modes in one launch, in sequence.

    torchrun --standalone --nproc-per-node N parallel_worker.py OUT JOB [JOB ...]

JOB is MODE or NAME=MODE[,key=value...] (TrainConfig fields): 4 steps of parallel_toy's run
into OUT/NAME. The key `resume_from=SRC` copies OUT/SRC's step-2 checkpoint first and resumes it.
`bad` checks that door errors come before any model is built. The worker creates the process
group, so the trainers leave it up for the next job.
"""
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from parallel_toy import GlobalBatches, model_config, run_config  # noqa: E402

from lmstack.train import Trainer  # noqa: E402
from lmstack.utils import LmstackError  # noqa: E402

out = Path(sys.argv[1])
torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)   # parallel_toy: the runs compare in float64
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


def run(name: str, mode: str, **kw) -> None:
    src = kw.pop("resume_from", None)
    if src is not None and rank == 0:
        shutil.copytree(out / src / "checkpoints" / "step_0000002", out / name / "checkpoints" / "step_0000002")
    dist.barrier()
    tp = int(kw.get("tp_size", 0)) or (world if mode == "tp" else 1)
    dp = 1 if mode == "pp" else world // tp
    cfg = run_config(out / name, dp, distributed=mode, resume=src is not None, **kw)
    d = rank // tp % dp if mode != "pp" else 0
    Trainer(cfg, model_config(), batches=GlobalBatches(d, dp), val_batches=GlobalBatches(d, dp, seed=1)).fit()


def bad_inputs() -> None:
    """Each bad launch raises LmstackError naming the problem, and no Transformer is built."""
    from lmstack.model import transformer
    built = []
    real_init = transformer.Transformer.__init__
    transformer.Transformer.__init__ = lambda self, *a, **k: (built.append(1), real_init(self, *a, **k))[1]
    cases = [("tp", dict(n_head=3, n_kv_head=3, n_embd=48), "n_head=3"),
             ("pp", dict(n_layer=world - 1), f"needs at least {world} blocks"),
             ("tp+dp", {}, "tp+dp needs --tp-size")]
    lines = []
    for mode, over, expect in cases:
        cfg = run_config(out / f"bad_{mode}", world, distributed=mode)
        try:
            Trainer(cfg, model_config().replace(**over), batches=GlobalBatches()).fit()
        except LmstackError as e:
            assert expect in str(e), (mode, str(e))
            lines.append(f"{mode}: {e}")
        else:
            raise AssertionError(f"{mode} with {over} did not fail")
    transformer.Transformer.__init__ = real_init
    assert not built, "a model was built before the door check failed"
    if rank == 0:
        (out / "bad_inputs.txt").write_text("\n".join(lines) + "\n")


for job in sys.argv[2:]:
    if job == "bad":
        bad_inputs()
        continue
    name, _, spec = job.partition("=")
    mode, *pairs = (spec or name).split(",")
    kw = dict(p.split("=") for p in pairs)
    kw = {k: int(v) if v.isdigit() else v for k, v in kw.items()}
    run(name, mode, **kw)
    if rank == 0:
        print(f"done {name}", flush=True)
dist.barrier()
dist.destroy_process_group()
