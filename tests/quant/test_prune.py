"""Pruning: the exact magnitude pattern, valid 2:4 groups, a recorded transform that reloads,
a recovery finetune through the Trainer that never revives a pruned weight, clear errors."""
import itertools
import json

import pytest
import torch
from torch import nn

from lmstack.model import ModelConfig, Transformer, get_transforms
from lmstack.quant import QuantConfig, quantize_model
from lmstack.quant.prune import (PruneConfig, PruneError, hold_masks, magnitude_mask, prune_model, pruning_masks,
                                 semi_structured_mask, sparsity_of)

CFG = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, context_length=64)
NAMES = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (tests/conftest.py)."""


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG, **kw}))


def test_magnitude_mask_is_the_k_smallest_by_hand():
    w = torch.tensor([[0.5, -0.1, 0.3, 0.0],
                      [-0.7, 0.2, -0.2, 0.9]])
    # |w| ascending (ties by row-major index): 0.0@3, 0.1@1, 0.2@5, 0.2@6, 0.3@2, 0.5@0, 0.7@4, 0.9@7
    expect = {0.25: [3, 1], 0.5: [3, 1, 5, 6], 0.625: [3, 1, 5, 6, 2], 0.0: []}
    for s, pruned in expect.items():
        keep = torch.ones(8, dtype=torch.bool)
        keep[pruned] = False
        assert torch.equal(magnitude_mask(w, s), keep.view(2, 4)), s


def test_magnitude_pruning_zeroes_exactly_the_smallest_of_each_layer():
    m = tiny()
    before = {n: m.get_submodule(n).weight.detach().clone() for n in NAMES}
    masks = prune_model(m, PruneConfig("magnitude", sparsity=0.3))
    assert list(masks) == NAMES
    for n in NAMES:
        w0, w = before[n], m.get_submodule(n).weight
        k = round(0.3 * w0.numel())
        assert int((w == 0).sum()) == k                               # the per-layer sparsity, exactly
        thresh = w0.abs().flatten().sort().values[k - 1]
        assert bool((w0.abs()[w == 0] <= thresh).all()) and bool((w0.abs()[w != 0] >= thresh).all())
        assert torch.equal(w[w != 0], w0[w != 0])                      # kept weights untouched
    assert sparsity_of(m) == pytest.approx({n: round(0.3 * before[n].numel()) / before[n].numel() for n in NAMES})
    assert m.lm_head.weight.ne(0).all()                               # all-linear leaves the tied head alone


def test_two_four_keeps_the_two_largest_of_every_four_inputs():
    w = torch.tensor([[0.1, -0.4, 0.3, 0.2, 1.0, 1.0, 1.0, -1.0]])
    # group 0: |.4| and |.3| stay; group 1: all tie, the first two inputs stay
    assert semi_structured_mask(w).tolist() == [[False, True, True, False, True, True, False, False]]
    m = tiny()
    before = {n: m.get_submodule(n).weight.detach().clone() for n in NAMES}
    prune_model(m, PruneConfig("2:4"))
    for n in NAMES:
        w, w0 = m.get_submodule(n).weight, before[n]
        groups, g0 = w.view(w.shape[0], -1, 4), w0.view(w.shape[0], -1, 4)
        assert bool(((groups != 0).sum(-1) == 2).all())                # valid 2:4 in every group
        kept_min = torch.where(groups != 0, g0.abs(), torch.inf).amin(-1)
        dropped_max = torch.where(groups == 0, g0.abs(), -torch.inf).amax(-1)
        assert bool((kept_min >= dropped_max).all())                  # and the two largest are kept
    # check one row by brute force over the 6 ways to keep 2 of 4
    g0, g = before[NAMES[0]][0, :4], m.get_submodule(NAMES[0]).weight[0, :4]
    best = max(itertools.combinations(range(4), 2), key=lambda c: sum(abs(float(g0[i])) for i in c))
    assert sorted(int(i) for i in g.nonzero()) == sorted(best)


def test_record_saves_and_reloads_the_pruned_run(tmp_path):
    m = tiny()
    prune_model(m, PruneConfig("2:4", targets=("blocks\\.0\\..*",)))
    rec = get_transforms(m)
    assert rec == [{"kind": "prune", "method": "2:4", "sparsity": 0.5, "targets": ["blocks\\.0\\..*"],
                    "exclude": [], "modules": NAMES[:4]}]
    m.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["transforms"] == rec
    back = Transformer.from_pretrained(tmp_path)
    assert get_transforms(back) == rec
    assert all(torch.equal(back.get_submodule(n).weight, m.get_submodule(n).weight) for n in NAMES)
    assert list(pruning_masks(back)) == NAMES[:4]
    from lmstack.infer import LLM, SamplingParams     # the engine loads it too
    out = LLM(str(tmp_path), kv_cache_tokens=256, device="cpu").generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4
    # RTN after pruning keeps every zero exactly (0.0 is on the grid)
    quantize_model(back, QuantConfig("rtn", 4, 32))
    assert all(bool((back.get_submodule(n).dequantize()[m.get_submodule(n).weight == 0] == 0).all())
               for n in NAMES[:4])


class Tokens:
    def __init__(self, seed=0):
        self.stream = torch.randint(0, 64, (31,), generator=torch.Generator().manual_seed(5)).repeat(100)
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self):
        s = torch.randint(0, len(self.stream) - 33, (4,), generator=self.gen)
        w = torch.stack([self.stream[i:i + 33] for i in s.tolist()])
        return w[:, :-1], w[:, 1:]

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, sd):
        self.gen.set_state(sd["gen"])


@pytest.mark.parametrize("method", ["magnitude", "2:4"])
def test_recovery_finetune_does_not_revive_pruned_weights(tmp_path, method):
    from lmstack.train import TrainConfig, Trainer
    from lmstack.train.objectives import token_loss
    m = tiny()
    masks = prune_model(m, PruneConfig(method, sparsity=0.5))
    before = {n: m.get_submodule(n).weight.detach().clone() for n in NAMES}
    x, y = Tokens(seed=9).next_batch()
    with torch.no_grad():
        loss_pruned = token_loss(m(x), y).item()
    hold = hold_masks(m)
    cfg = TrainConfig(out=str(tmp_path / method), max_steps=15, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1,
                      weight_decay=0.1, grad_clip=1.0, eval_every=0, ckpt_every=0, tensorboard=False, device="cpu")
    Trainer(cfg, m, batches=Tokens()).fit()
    for n in NAMES:
        w = m.get_submodule(n).weight
        assert torch.equal(w == 0, ~masks[n]), n                    # exactly the pruned set is 0
        assert not torch.equal(w, before[n])                         # and the rest did train
    with torch.no_grad():
        assert token_loss(m(x), y).item() < loss_pruned
    # without the hooks the same finetune revives them (the test above can fail)
    hold.remove()
    Trainer(TrainConfig(**{**cfg.__dict__, "out": str(tmp_path / "free")}), m, batches=Tokens()).fit()
    assert any(bool((m.get_submodule(n).weight[~masks[n]] != 0).any()) for n in NAMES)


def test_bad_settings_are_clear_errors_and_change_nothing():
    for s in (1.0, -0.1, 1.5, "half", True):
        with pytest.raises(PruneError, match="sparsity"):
            PruneConfig("magnitude", sparsity=s)
    with pytest.raises(PruneError, match="is 0.5"):
        PruneConfig("2:4", sparsity=0.7)
    with pytest.raises(PruneError, match="unknown"):
        PruneConfig("random")
    m = tiny()
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(PruneError, match="tie_embeddings"):
        prune_model(m, PruneConfig(targets=("all-linear", "lm_head")))
    with pytest.raises(PruneError, match="fused linear"):
        prune_model(m, PruneConfig(targets="q"))
    odd = tiny(n_embd=64, intermediate_size=90)     # mlp.proj has in_features 90
    with pytest.raises(PruneError, match="in_features divisible by 4, got 90"):
        prune_model(odd, PruneConfig("2:4"))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items()) and not get_transforms(m)
    assert not get_transforms(odd) and all(odd.get_submodule(n).weight.ne(0).all() for n in NAMES)
    q = tiny()
    quantize_model(q, QuantConfig("rtn", 8))
    with pytest.raises(PruneError, match="quantized"):
        prune_model(q, PruneConfig())
    with pytest.raises(PruneError, match="no 'prune' transform"):
        hold_masks(tiny())
    lin = nn.Linear(4, 4)
    with pytest.raises(PruneError, match="PruneConfig"):
        prune_model(lin, {"method": "2:4"})
