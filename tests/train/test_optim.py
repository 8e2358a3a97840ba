"""AdamW parameter groups and lr schedules against hand-computed values."""
import math

import pytest
import torch

from lmstack.train.optim import build_optimizer, lr_multiplier, param_groups
from train_toy import tiny_model_config


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_groups_no_decay_on_norms_biases_embeddings():
    from lmstack.model import Transformer
    model = Transformer(tiny_model_config(bias=True, qkv_bias=True, norm="layernorm", pos_emb="learned"))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    for n in _names(model, decay):
        assert n.endswith(".weight") and "norm" not in n and not n.startswith(("wte", "wpe")), n
    nd = _names(model, no_decay)
    assert "wte.weight" in nd and "wpe.weight" in nd                  # embeddings (tied head included)
    assert any(n.endswith(".bias") for n in nd) and any("norm" in n for n in nd)
    # every parameter in exactly one group, the tied head once
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_decay_applies_only_to_the_decay_group():
    from lmstack.model import Transformer
    model = Transformer(tiny_model_config())
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    assert opt.defaults["fused"] is True                                # CPU has a fused AdamW in torch>=2.4
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)                                    # zero grad: only decay moves weights
    opt.step()
    decayed = set(_names(model, opt.param_groups[0]))
    for n, p in model.named_parameters():
        want = before[n] * (1 - 0.1 * 0.5) if n in decayed else before[n]
        assert torch.allclose(p, want, atol=1e-7), n


@pytest.mark.parametrize("schedule,step,want", [
    ("cosine", 0, 0.5), ("cosine", 1, 1.0), ("cosine", 2, 1.0),
    ("cosine", 5, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7))), ("cosine", 9, 0.1),
    ("linear", 2, 1.0), ("linear", 5, 1 - 0.9 * 3 / 7), ("linear", 9, 0.1),
    ("wsd", 1, 1.0), ("wsd", 6, 1.0), ("wsd", 7, 0.7), ("wsd", 8, 0.4), ("wsd", 9, 0.1),
    ("constant", 0, 0.5), ("constant", 9, 1.0),
])
def test_schedules_hand_computed(schedule, step, want):
    # 10 steps, 2 warmup steps, final ratio 0.1, WSD decays over the last 30% (3 steps)
    got = lr_multiplier(step, 10, schedule, warmup=2, min_ratio=0.1, decay_frac=0.3)
    assert got == pytest.approx(want, abs=1e-12)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="valid: cosine"):
        lr_multiplier(0, 10, "exp")
