"""Run under torchrun by test_sft_ddp.py:

    torchrun --standalone --nproc-per-node 2 sft_ddp_worker.py BASE DATA OUT

Three finetunes in one launch (full, lora, qlora), each 3 steps of DDP with 2 rows per rank
into OUT/<method>. The process group is created here, before the first Trainer, so no Trainer
owns it and the three share it (re-creating one after a teardown hung now and then).
"""
import sys

import torch
import torch.distributed as dist

from lmstack.finetune.config import FinetuneConfig
from lmstack.finetune.run import finetune

base, data, out = sys.argv[1:4]
torch.set_num_threads(1)
dist.init_process_group("gloo")
for method in ("full", "lora", "qlora"):
    finetune(FinetuneConfig(model=base, data=data, out=f"{out}/{method}", method=method, max_steps=3, batch_size=2,
                            seq_len=64, eval_every=0, ckpt_every=0, tensorboard=False, report=False, device="cpu",
                            distributed="ddp", warmup_steps=1, val_fraction=0.0, lr=1e-2))
dist.destroy_process_group()
