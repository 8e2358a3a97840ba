"""The training loop: accumulation, checkpointing of activations, MoE aux loss, NaN stop,
samples that do not disturb training, and bad input caught before step 1."""
import copy
import json
import math
import shutil

import pytest
import torch

from lmstack.train import CausalLM, NonFiniteLossError, Trainer
from lmstack.train import checkpoint as ckpt
from lmstack.utils import LmstackError
from train_toy import ToySampler, losses, tiny_model_config, toy_config, toy_trainer


class FixedBatches:
    """Replays the given (x, y) batches in order."""

    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        self.i += 1
        return self.batches[self.i - 1]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, sd):
        self.i = sd["i"]


def _setup(tmp_path, sampler, model_kw=None, **kw):
    t = Trainer(toy_config(tmp_path, **kw), tiny_model_config(**(model_kw or {})), batches=sampler)
    t._setup()
    return t


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    x = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    big = _setup(tmp_path / "a", FixedBatches([(x, y)]), batch_size=4, seq_len=16, grad_clip=0.0)
    small = _setup(tmp_path / "b", FixedBatches([(x[:2], y[:2]), (x[2:], y[2:])]), batch_size=2, grad_accum=2,
                   seq_len=16, grad_clip=0.0)
    ra, rb = big.train_step(), small.train_step()
    assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
    for (n, pa), pb in zip(big.raw_model.named_parameters(), small.raw_model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6), n


def test_activation_checkpointing_gives_same_gradients(tmp_path):
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    batches = [(x, torch.roll(x, -1, 1))]
    plain = _setup(tmp_path / "a", FixedBatches(batches), seq_len=16, model_kw={"dropout": 0.1})
    ac = _setup(tmp_path / "b", FixedBatches(list(batches)), seq_len=16, model_kw={"dropout": 0.1},
                activation_checkpointing=True)
    torch.manual_seed(1)
    ra = plain.train_step()
    torch.manual_seed(1)                                   # same dropout masks in both runs
    rb = ac.train_step()
    assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-5)
    for pa, pb in zip(plain.raw_model.parameters(), ac.raw_model.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_moe_aux_loss_is_added_to_the_loss(tmp_path):
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, 1)
    t = _setup(tmp_path, FixedBatches([(x, y)]), seq_len=16, grad_clip=0.0, model_kw={"n_expert": 4},
               lr=1e-3)
    ref = copy.deepcopy(t.raw_model)
    rec = t.train_step()
    logits = ref(x)
    main = torch.nn.functional.cross_entropy(logits.view(-1, 97), y.view(-1))
    aux = ref.aux_loss()
    assert aux.item() > 0 and rec["aux_loss"] == pytest.approx(aux.item(), rel=1e-5)
    (main + aux).backward()
    # the router only gets gradient from the aux term through routing weights; compare all grads
    # via the norm the trainer measured
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))
    assert rec["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
    assert rec["loss"] == pytest.approx(main.item(), rel=1e-6)


class NanAt(CausalLM):
    def __init__(self, step):
        self.calls, self.step = 0, step

    def loss(self, model, batch):
        self.calls += 1
        loss, metrics = super().loss(model, batch)
        return (loss * float("nan") if self.calls == self.step else loss), metrics


def test_nan_loss_stops_with_diagnostic_and_keeps_good_checkpoint(tmp_path):
    cfg = toy_config(tmp_path, ckpt_every=3, eval_every=0)
    t = Trainer(cfg, tiny_model_config(), NanAt(5), ToySampler(4, 32))
    with pytest.raises(NonFiniteLossError, match=r"loss=nan at step 5.*Last good checkpoint: .*step_0000003"):
        t.fit()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_0000003"]
    assert max(s for _, s in losses(tmp_path)) == 4
    assert not (tmp_path / "model.safetensors").exists()


def test_samples_are_called_and_do_not_change_training(tmp_path):
    calls = []

    def on_sample(model, step):
        assert not model.training
        calls.append(step)
        torch.randn(100)   # consuming RNG here must not change the training stream
        return {"text": f"sample at {step}"}

    plain = toy_trainer(tmp_path / "a", max_steps=4, ckpt_every=0)
    plain.fit()
    t = toy_trainer(tmp_path / "b", max_steps=4, ckpt_every=0, sample_every=2)
    t.on_sample = on_sample
    t.fit()
    assert calls == [2, 4]
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    recs = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 4, "split": "sample", "text": "sample at 4"} in recs



@pytest.mark.parametrize("objective,mask,steps", [("masked", "bidirectional", 150), ("prefix", "prefix", 50)])
def test_other_objectives_learn_from_context(tmp_path, objective, mask, steps, one_thread):
    """The toy stream (a 37-token pattern, 10% noise) has a unigram entropy H of about 3.67
    nats: no predictor that ignores context beats it. Training starts at ln(vocab) and must
    end at least 0.5 nats below H on val, so the objective and its mask let the model learn
    from context. (Seeds 0-2 end at val 1.7-2.5 (masked, 150 steps; it first sits on the
    unigram plateau for 60-100 steps) and 1.5-1.7 (prefix, 50 steps).)"""
    t = Trainer(toy_config(tmp_path, objective=objective, max_steps=steps, batch_size=8, warmup_steps=5,
                           ckpt_every=0, eval_every=0), tiny_model_config(), batches=ToySampler(8, 32),
                val_batches=ToySampler(8, 32, seed=5))
    result = t.fit()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["mask"] == mask
    # no "<|mask|>" in the vocabulary: the MLM gets one extra row, the mask id 97
    assert saved["vocab_size"] == (98 if objective == "masked" else 97)
    tokens = ToySampler(1, 32).tokens
    p = torch.bincount(tokens).double() / len(tokens)
    unigram_entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    assert 3.6 < unigram_entropy < 3.7
    first = losses(tmp_path)[("train", 1)]
    assert abs(first - math.log(saved["vocab_size"])) < 0.3              # started at chance
    assert result["val_loss"] < unigram_entropy - 0.5, result["val_loss"]
    assert result["val_ppl"] == pytest.approx(math.exp(result["val_loss"]))


def test_refuses_to_clobber_a_run_and_checks_resume_compatibility(tmp_path):
    toy_trainer(tmp_path, max_steps=3).fit()
    before = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(LmstackError, match="already has checkpoints.*--resume"):
        toy_trainer(tmp_path, max_steps=3).fit()
    with pytest.raises(LmstackError, match=r"another model config \(.*n_embd: 64 -> 32"):
        toy_trainer(tmp_path, model_kw={"n_embd": 32}, max_steps=6, resume=True).fit()
    assert (tmp_path / "metrics.jsonl").read_text() == before          # nothing lost
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_0000003"]


def test_unwritable_or_full_out_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LmstackError, match="not writable|is a file"):
        toy_trainer(blocker / "run").fit()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(LmstackError, match="MiB free but checkpoints need"):
        toy_trainer(tmp_path / "full").fit()
    assert not (tmp_path / "full" / "metrics.jsonl").exists()
