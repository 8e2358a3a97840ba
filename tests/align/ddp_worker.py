"""Run under torchrun (2 gloo processes) by test_distributed.py:

    torchrun --standalone --nproc-per-node 2 ddp_worker.py OUT RUN_DIR

GRPO with each rank rolling out its own share of the prompts (dapo, whose token normalizer is
all-reduced over ranks): 2 optimizer steps; each rank writes the prompts of its first rollout
and the normalizer it used to OUT/grpo_rank{r}.json.
"""
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from lmstack.align import GRPOObjective, GRPOSource  # noqa: E402
from lmstack.align.runner import load_policy  # noqa: E402
from lmstack.train import TrainConfig, Trainer  # noqa: E402

torch.set_num_threads(1)
out, run_dir = Path(sys.argv[1]), sys.argv[2]
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
policy, tok, _ = load_policy(run_dir)
prompts = [{"prompt": f"Q: what is {a}+{a}?\nA: {a}+{a}=", "answer": str(2 * a)} for a in range(16)]
src = GRPOSource(policy, tok, prompts, [lambda p, c, answer, **f: float(c.strip() == answer)], group_size=4,
                 prompts_per_rollout=2, batch_size=4, grad_accum=2, max_completion_len=4, seed=0, rank=rank,
                 world_size=world, stop_token_ids=[tok.eot_token])
seen = {"prompts": src.prompt_indices(0)}
orig = src._micro


def spy(rows, step_rows):
    b = orig(rows, step_rows)
    seen.setdefault("n_tokens", float(b.n_tokens))
    seen.setdefault("step_tokens_here", float(step_rows["mask"].sum()))
    return b


src._micro = spy
cfg = TrainConfig(out=str(out / "grpo"), max_steps=2, batch_size=4, grad_accum=2, seq_len=96, lr=1e-3, warmup_steps=0,
                  eval_every=0, ckpt_every=0, tensorboard=False, device="cpu")
Trainer(cfg, policy, GRPOObjective("dapo"), src).fit()
(out / f"grpo_rank{rank}.json").write_text(json.dumps(seen))
