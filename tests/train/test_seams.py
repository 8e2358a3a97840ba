"""The Trainer's seams: a model passed in (partly frozen), a custom objective (metrics, state,
randomness) and a batch source; trainable-only checkpoints and their resume checks."""
import json

import pytest
import torch

from lmstack.train import CausalLM, Trainer, TrainConfig
from lmstack.train import checkpoint as ckpt
from lmstack.train.batches import move_to
from lmstack.train.distributed import enable_activation_checkpointing, find_blocks
from lmstack.utils import LmstackError
from train_toy import (ToySampler, frozen_model, frozen_objective, frozen_trainer, records, tiny_model_config,
                       toy_config)


class FixedBatches:
    def __init__(self, batches):
        self.batches, self.i = batches, 0

    def next_batch(self):
        self.i += 1
        return self.batches[self.i - 1]

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, sd):
        self.i = sd["i"]


def _pairs(n, B=2, T=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 97, (B, T), generator=g)
        out.append((x, torch.roll(x, -1, 1)))
    return out


def first_token_objective(model, batch):
    """A plain function objective: causal loss plus two hand-checkable metrics."""
    x, y = batch
    loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    return loss, {"first_token": x[0, 0].float(), "const": 2.5}


def test_function_objective_metrics_are_averaged_over_micro_batches_and_logged(tmp_path):
    train, val = _pairs(4, seed=0), _pairs(2, seed=1)
    cfg = toy_config(tmp_path, max_steps=2, grad_accum=2, batch_size=2, seq_len=8, eval_every=2, eval_batches=2,
                     ckpt_every=0)
    Trainer(cfg, tiny_model_config(), first_token_objective, FixedBatches(train),
            val_batches=FixedBatches(val)).fit()
    recs = records(tmp_path)
    for step in (1, 2):            # step s averages micro-batches 2s-2 and 2s-1
        want = (train[2 * step - 2][0][0, 0] + train[2 * step - 1][0][0, 0]).item() / 2
        assert recs[("train", step)]["first_token"] == want and recs[("train", step)]["const"] == 2.5
    assert recs[("train", 2)]["tokens"] == 2 * 2 * 2 * 8                    # input_ids of 2 steps x 2 micro
    val_rec = recs[("val", 2)]
    assert val_rec["first_token"] == (val[0][0][0, 0] + val[1][0][0, 0]).item() / 2
    assert "ppl" not in val_rec                      # the loss of a custom objective is not a token NLL


def test_frozen_parameters_get_no_optimizer_state_and_stay_put(tmp_path):
    model = frozen_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    t = Trainer(toy_config(tmp_path, max_steps=3), model, CausalLM(), ToySampler(4, 32))
    t._setup()
    assert t.raw_model is model                                        # used as is, not rebuilt
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    groups = {g["name"]: {id(p) for p in g["params"]} for g in t.optimizer.param_groups}
    assert groups["decay"] | groups["no_decay"] == trainable
    decay = {id(p) for n, p in model.named_parameters() if n.startswith("blocks.1.") and p.ndim == 2}
    assert groups["decay"] == decay                                     # norms are in no_decay
    for _ in range(2):
        t.train_step()
    assert {id(p) for p in t.optimizer.state} == trainable
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n          # trained moved, frozen did not


def test_trainable_only_checkpoints_and_their_resume_checks(tmp_path):
    frozen_trainer(tmp_path, max_steps=4, ckpt_every=2).fit()
    weights, state, meta = ckpt.load_checkpoint(tmp_path / "checkpoints" / "step_0000004")
    names = {n for n, p in frozen_model().named_parameters() if p.requires_grad}
    assert set(weights) == names and meta["trainable"] == sorted(names)
    assert state["objective"][0]["ema"] > 0                               # the objective's state is saved
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(LmstackError, match="another frozen base"):
        frozen_trainer(tmp_path, base_seed=7, max_steps=6, resume=True).fit()
    other = frozen_model()
    other.norm_f.weight.requires_grad = False
    cfg = toy_config(tmp_path, max_steps=6, resume=True, save_weights="trainable")
    with pytest.raises(LmstackError, match=r"trained other parameters \(only in the checkpoint: norm_f.weight"):
        Trainer(cfg, other, frozen_objective(), ToySampler(4, 32)).fit()
    result = frozen_trainer(tmp_path, max_steps=6, resume=True).fit()     # the same base resumes
    assert result["resumed_from"] == 4 and result["steps"] == 6


def test_stop_and_resume_restores_objective_state_and_generator(tmp_path):
    """Deterministic twin of the SIGKILL test: a run stopped at step 6 and resumed logs the
    same numbers as one that ran through (constant lr, so max_steps does not move the lr)."""
    kw = dict(schedule="constant", eval_every=4)
    frozen_trainer(tmp_path / "a", max_steps=12, **kw).fit()
    frozen_trainer(tmp_path / "b", max_steps=6, **kw).fit()
    frozen_trainer(tmp_path / "b", max_steps=12, resume=True, **kw).fit()
    a, b = records(tmp_path / "a"), records(tmp_path / "b")
    b.pop(("val", 6))                                           # the first run's final evaluation
    assert a == b


def test_model_passed_in_must_fit_the_objective(tmp_path):
    from lmstack.model import Transformer
    model = Transformer(tiny_model_config())                   # causal
    cfg = toy_config(tmp_path, objective="masked")
    with pytest.raises(LmstackError, match="needs a model with mask='bidirectional'.*has mask='causal'"):
        Trainer(cfg, model, batches=ToySampler(4, 32)).fit()
    for p in model.parameters():
        p.requires_grad = False
    with pytest.raises(LmstackError, match="no trainable parameters"):
        Trainer(toy_config(tmp_path / "b"), model, batches=ToySampler(4, 32)).fit()


class BadObjective(CausalLM):
    def __init__(self, kind):
        self.kind, self.calls = kind, 0

    def loss(self, model, batch):
        self.calls += 1
        loss, _ = super().loss(model, batch)
        if self.kind == "tensor":
            return loss
        if self.kind == "reserved":
            return loss, {"lr": 1.0}
        return loss, ({"a": 1.0} if self.calls == 1 else {"b": 1.0})


@pytest.mark.parametrize("kind,match", [("tensor", r"must return \(a 0-dim loss tensor, a dict of metrics\), "
                                                   r"got Tensor"),
                                        ("reserved", r"reserved metric names \['lr'\]"),
                                        ("keys", r"returned metrics \['b'\], earlier \['a'\]")])
def test_objective_protocol_errors(tmp_path, kind, match):
    t = Trainer(toy_config(tmp_path, grad_accum=2), tiny_model_config(), BadObjective(kind), ToySampler(4, 32))
    t._setup()
    with pytest.raises(LmstackError, match=match):
        t.train_step()


def test_arguments_are_checked_at_the_door():
    cfg = TrainConfig(out="x")

    class NoResume:
        def next_batch(self):
            return None

        def state_dict(self):
            return {}
    with pytest.raises(TypeError, match="batches must be a batch source.*lacks load_state_dict"):
        Trainer(cfg, None, None, NoResume())
    with pytest.raises(TypeError, match="objective must be an Objective or a function"):
        Trainer(cfg, None, objective=3)
    with pytest.raises(TypeError, match="model must be an nn.Module, a ModelConfig or None"):
        Trainer(cfg, "tiny")
    with pytest.raises(ValueError, match="save_weights='some'.*valid: all, trainable"):
        TrainConfig(save_weights="some")


def test_move_to_reaches_nested_tensors():
    from lmstack.train import Batch
    b = Batch(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long))
    moved = move_to({"pair": (b, [torch.zeros(2)]), "n": 3}, torch.device("meta"))
    assert moved["n"] == 3 and moved["pair"][0].input_ids.is_meta and moved["pair"][1][0].is_meta


def test_find_blocks_picks_the_blocks_not_the_experts():
    """An MoE model with more experts (8) than blocks (2): the longest ModuleList is a block's
    experts, but the blocks are what FSDP shards and activation checkpointing recomputes."""
    from lmstack.model import Transformer
    model = Transformer(tiny_model_config(n_expert=8, n_expert_per_token=2))
    assert max(len(m) for m in model.modules() if isinstance(m, torch.nn.ModuleList)) == 8
    assert find_blocks(model) == list(model.blocks)

    class RewardModel(torch.nn.Module):                  # a wrapper, e.g. a scalar head on a Transformer
        def __init__(self):
            super().__init__()
            self.body, self.head = model, torch.nn.Linear(64, 1)
    assert find_blocks(RewardModel()) == list(model.blocks)

    class Foreign(torch.nn.Module):                      # not ours: the outermost list named `layers`
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.ModuleDict({"experts": torch.nn.ModuleList(
                torch.nn.Linear(2, 2) for _ in range(5))}) for _ in range(2))
    f = Foreign()
    assert find_blocks(f) == list(f.layers)
    assert enable_activation_checkpointing(Transformer(tiny_model_config(n_expert=8))) == 2


def test_metrics_file_has_objective_metrics_for_a_frozen_run(tmp_path):
    frozen_trainer(tmp_path, max_steps=2, eval_every=2, ckpt_every=0).fit()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert list(line)[:5] == ["step", "split", "loss", "acc", "loss_ema"]
    assert 0 <= line["acc"] <= 1 and line["loss_ema"] == pytest.approx(0.1 * line["loss"])


def test_full_disk_at_the_final_export_is_a_one_line_error(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from lmstack.model import Transformer

    def full(self, path):
        raise SafetensorError("Error while serializing: IoError(No space left on device)\ndetails")
    monkeypatch.setattr(Transformer, "save_pretrained", full)
    t = Trainer(toy_config(tmp_path, max_steps=1), tiny_model_config(), batches=ToySampler(4, 32))
    with pytest.raises(LmstackError) as e:
        t.fit()
    assert str(e.value) == (f"could not write the final model to {tmp_path}: Error while serializing: IoError(No "
                            f"space left on device); the last checkpoint is intact; free disk space and resume")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "checkpoints")] == ["step_0000001"]


def test_a_model_config_field_added_since_the_checkpoint_does_not_block_resume(tmp_path):
    """A run saved before ModelConfig gained a field (here: its state.json lacks qk_norm) resumes,
    the missing field taking its default; a real difference is still refused."""
    from train_toy import toy_trainer
    toy_trainer(tmp_path, max_steps=3).fit()
    meta_path = tmp_path / "checkpoints" / "step_0000003" / "state.json"
    meta = json.loads(meta_path.read_text())
    del meta["model_config"]["qk_norm"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(LmstackError, match=r"another model config \(qk_norm: False -> True\)"):
        toy_trainer(tmp_path, model_kw={"qk_norm": True}, max_steps=4, resume=True).fit()
    assert toy_trainer(tmp_path, max_steps=4, resume=True).fit()["resumed_from"] == 3
