"""DDP and FSDP on 2 CPU processes (gloo, launched by torchrun): DDP gradients equal the
single-process gradients of the combined batch, a DDP checkpoint resumes on one process,
and FSDP (sharded parameters and optimizer state) trains to the same weights as DDP."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmstack.train import Trainer
from lmstack.train import checkpoint as ckpt
from train_toy import ToySampler, frozen_model, frozen_trainer, tiny_model_config, toy_config

WORKER = str(Path(__file__).with_name("ddp_worker.py"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Two torchrun launches of 2 gloo processes: ddp_worker.py's DDP jobs, then its FSDP job."""
    out = tmp_path_factory.mktemp("ddp")
    x = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(0))
    torch.save(x, out / "batch.pt")
    env = {**os.environ, "LMSTACK_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER, str(out)]
    for extra in ([], ["fsdp"]):
        proc = subprocess.run(cmd + extra, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out, x


def test_ddp_gradients_equal_single_process_big_batch(ddp_run):
    tmp_path, x = ddp_run
    g0, g1 = (load_file(str(tmp_path / f"grads_rank{r}.safetensors")) for r in (0, 1))

    class Fixed:
        def next_batch(self):
            return x[:, :-1], x[:, 1:]

        def state_dict(self):
            return {}

        def load_state_dict(self, sd):
            pass
    t = Trainer(toy_config(tmp_path / "single", batch_size=4, seq_len=16, grad_clip=0.0), tiny_model_config(),
                batches=Fixed())
    t._setup()
    loss, _, _ = t._micro_loss(t.model, t._prepare(Fixed().next_batch(), t.gen))
    loss.backward()
    for n, p in t.raw_model.named_parameters():
        assert torch.equal(g0[n], g1[n]), n                    # all-reduced: identical on both ranks
        # fp32, different summation order: agree to 1e-6 absolute / 1e-4 relative
        torch.testing.assert_close(g0[n], p.grad, atol=1e-6, rtol=1e-4, msg=n)


def test_ddp_checkpoint_resumes_on_one_process(ddp_run):
    tmp_path = ddp_run[0] / "ddp"
    meta = ckpt.read_meta(tmp_path / "checkpoints" / "step_0000004")
    assert meta["world_size"] == 2 and meta["tokens_seen"] == 4 * 2 * 2 * 32
    weights, _, _ = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_0000004")
    cfg = toy_config(tmp_path, max_steps=6, ckpt_every=2, batch_size=4, resume=True)
    t = Trainer(cfg, tiny_model_config(), batches=ToySampler(4, 32), val_batches=ToySampler(4, 32, seed=99))
    t._setup()
    assert t.step == 4
    for n, p in t.raw_model.state_dict().items():
        assert torch.equal(p, weights[n]), n
    state = t.optimizer.state_dict()["state"]
    assert all(int(s["step"]) == 4 for s in state.values())    # AdamW moments continue from step 4
    result = t._fit()
    assert result["steps"] == 6 and result["resumed_from"] == 4


def test_fsdp_trains_like_ddp(ddp_run):
    """Same data, same steps (with grad clipping, which under FSDP needs the global norm over
    shards): identical losses and weights, and the sharded run saves a whole checkpoint."""
    import json
    out = ddp_run[0]
    step = "checkpoints/step_0000004"
    ddp, _, _ = ckpt.load_checkpoint(out / "ddp" / step)
    fsdp, _, _ = ckpt.load_checkpoint(out / "fsdp" / step)
    assert ckpt.read_meta(out / "fsdp" / step)["config"]["distributed"] == "fsdp"
    assert sorted(ddp) == sorted(fsdp)
    for n in ddp:
        torch.testing.assert_close(fsdp[n], ddp[n], atol=1e-6, rtol=1e-5, msg=n)

    def losses(run):
        recs = [json.loads(line) for line in (out / run / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if r.get("split") == "train"]
    assert len(losses("fsdp")) == 4      # (the resume test may have appended steps 5-6 to ddp's)
    assert losses("fsdp") == pytest.approx(losses("ddp")[:4], abs=1e-6)


def test_ddp_on_a_frozen_base_saves_trainable_weights_and_resumes_on_one_process(ddp_run):
    root = ddp_run[0] / "frozen"
    weights, state, meta = ckpt.load_checkpoint(root / "checkpoints" / "step_0000002")
    base = frozen_model()
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert set(weights) == trainable and meta["world_size"] == 2 and len(state["objective"]) == 2
    t = frozen_trainer(root, max_steps=3, batch_size=2, resume=True)
    t._setup()                                # same base on one process: the fingerprint matches
    assert t.step == 2
    for n, p in t.raw_model.named_parameters():
        want = weights[n] if n in trainable else base.state_dict()[n]
        assert torch.equal(p, want), n
    assert t._fit()["steps"] == 3
