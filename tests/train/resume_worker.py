"""Subprocess for the kill tests: train the toy run in argv[1], resuming whatever is there.

    python resume_worker.py OUT            train (resume=True) until done
    python resume_worker.py OUT frozen     the same on a partly frozen base with a custom
                                           objective, saving trainable weights only
    python resume_worker.py OUT hang N     as the first, but hang forever in the middle of
                                           writing checkpoint N (after model.safetensors, before
                                           the rename), touching OUT/HANGING first
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_toy import frozen_trainer, toy_trainer  # noqa: E402

out = Path(sys.argv[1])
if len(sys.argv) > 2 and sys.argv[2] == "hang":
    import lmstack.train.checkpoint as ckpt
    real_save, target = ckpt.save_file, f"step_{int(sys.argv[3]):07d}"

    def slow_save(tensors, path, *a, **kw):
        real_save(tensors, path, *a, **kw)
        if target in path and path.endswith("model.safetensors"):
            (out / "HANGING").write_text("1")
            time.sleep(600)
    ckpt.save_file = slow_save
(frozen_trainer if sys.argv[2:3] == ["frozen"] else toy_trainer)(out, resume=True).fit()
