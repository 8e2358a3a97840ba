"""Run under torchrun by test_distributed.py, in two launches:

    torchrun --standalone --nproc-per-node 2 ddp_worker.py OUT
      1. one DDP forward/backward with per-rank batch 2 of OUT/batch.pt -> OUT/grads_rank{r}.safetensors
      2. 4 steps of DDP training into OUT/ddp (checkpoints at steps 2 and 4)
      3. 2 steps on a partly frozen base (train_toy.frozen_model), trainable weights saved, into OUT/frozen
      (the process group, created by job 1's trainer, must outlive job 2's: a trainer tears
      down only a group it created; re-creating one after a teardown hung now and then)
    torchrun --standalone --nproc-per-node 2 ddp_worker.py OUT fsdp
      the same 4 steps under FSDP (FSDP2 fully_shard) into OUT/fsdp, in a launch of its own
      like the CLI's: the trainer creates the process group and destroys it at the end
"""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_toy import ToySampler, frozen_model, frozen_objective, tiny_model_config, toy_config  # noqa: E402

from lmstack.train import Trainer  # noqa: E402

out = Path(sys.argv[1])
torch.set_num_threads(1)


def train_4_steps(mode: str) -> None:
    """4 steps on per-rank toy data into OUT/<mode>, checkpoints at steps 2 and 4."""
    cfg = toy_config(out / mode, max_steps=4, ckpt_every=2, batch_size=2, distributed=mode)
    Trainer(cfg, tiny_model_config(), batches=ToySampler(2, cfg.seq_len, seed=int(os.environ["RANK"])),
            val_batches=ToySampler(2, cfg.seq_len, seed=99)).fit()


if sys.argv[2:] == ["fsdp"]:
    train_4_steps("fsdp")
    import torch.distributed as dist
    assert not dist.is_initialized(), "the trainer left its own process group behind"
    sys.exit(0)
from safetensors.torch import save_file
x = torch.load(out / "batch.pt", weights_only=True)           # (4, T): the single-process batch
rank = int(os.environ["RANK"])

class Fixed:
    def next_batch(self):
        part = x[2 * rank:2 * rank + 2]
        return part[:, :-1], part[:, 1:]

    def state_dict(self):
        return {}

    def load_state_dict(self, sd):
        pass

t = Trainer(toy_config(out / "run", batch_size=2, seq_len=x.shape[1] - 1, grad_clip=0.0),
            tiny_model_config(), batches=Fixed())
t._setup()
# one forward/backward exactly as train_step does, then read the all-reduced gradients
batch = t._prepare(Fixed().next_batch(), t.gen)
loss, _, _ = t._micro_loss(t.model, batch)
loss.backward()
save_file({n: p.grad.contiguous() for n, p in t.raw_model.named_parameters()},
          str(out / f"grads_rank{rank}.safetensors"))

train_4_steps("ddp")
# 3. a partly frozen base with a custom objective under DDP, saving trainable weights only
cfg = toy_config(out / "frozen", max_steps=2, ckpt_every=2, batch_size=2, distributed="ddp", save_weights="trainable")
Trainer(cfg, frozen_model(), frozen_objective(), ToySampler(2, cfg.seq_len, seed=rank),
        val_batches=ToySampler(2, cfg.seq_len, seed=99)).fit()
import torch.distributed as dist  # noqa: E402
assert dist.is_initialized(), "job 2's trainer destroyed a process group it did not create"
