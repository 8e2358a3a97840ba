"""DPO / IPO on real models: ln 2 at step 0, the cached reference, a held-out effect in seconds,
LoRA policies, and the metrics the run logs."""
import json
import math

import pytest
import torch

from tests.align.toy import yes_no_pairs
from tests.align.conftest import tiny_model
from lmstack.align import DPOObjective, PairBatches, reference_logps, sequence_logps, tokenize_pairs
from lmstack.align.evaluate import preference_accuracy
from lmstack.train import TrainConfig, Trainer


def setup(tok, n=32, seed=0, **kw):
    model = tiny_model(seed, **kw)
    pairs = tokenize_pairs(tok, yes_no_pairs(n, 1), "plain", 96)
    return model, pairs, reference_logps(model, pairs)


@pytest.mark.parametrize("loss_type,want", [("sigmoid", math.log(2)), ("ipo", (1 / (2 * 0.1)) ** 2)])
def test_step0_loss_with_policy_equal_to_reference(tok, loss_type, want):
    model, pairs, ref = setup(tok)
    batch = PairBatches(pairs, 8, extras=ref).next_batch()
    loss, m = DPOObjective(0.1, loss_type).loss(model, batch)
    assert abs(float(loss) - want) < 1e-6
    assert float(m["reward_acc"]) == 0.0 and abs(float(m["margin"])) < 1e-6


def test_reference_logps_are_summed_response_token_logps(tok):
    model, pairs, ref = setup(tok, n=4)
    p = pairs[2]
    with torch.no_grad():
        ids = torch.tensor([p.chosen.ids])
        lp = model(ids)[0, :-1].log_softmax(-1)
        want = sum(float(lp[t - 1, ids[0, t]]) for t in range(p.prompt_len, len(p.chosen.ids)))
    assert abs(float(ref["ref_chosen"][2]) - want) < 1e-5
    assert p.chosen.loss_mask[:p.prompt_len] == [0] * p.prompt_len


def test_dpo_raises_held_out_preference_accuracy(tok, tmp_path):
    torch.set_num_threads(1)
    model, pairs, ref = setup(tok, n=64)
    # the direction the starting model gets wrong on held-out prompts, so there is room to improve
    held = tokenize_pairs(tok, yes_no_pairs(32, 2), "plain", 96)
    if preference_accuracy(model, held)["logp_acc"] > 0.5:
        pairs = tokenize_pairs(tok, yes_no_pairs(64, 1, " no", " yes"), "plain", 96)
        held = tokenize_pairs(tok, yes_no_pairs(32, 2, " no", " yes"), "plain", 96)
        ref = reference_logps(model, pairs)
    before = preference_accuracy(model, held)["logp_acc"]
    cfg = TrainConfig(out=str(tmp_path / "dpo"), max_steps=20, batch_size=8, seq_len=96, lr=3e-3, warmup_steps=0,
                      eval_every=10, eval_batches=4, ckpt_every=0, tensorboard=False, device="cpu")
    val = PairBatches(held, 8, shuffle=False, extras=reference_logps(model, held))
    Trainer(cfg, model, DPOObjective(0.1), PairBatches(pairs, 8, extras=ref), val_batches=val).fit()
    after = preference_accuracy(model, held)["logp_acc"]
    assert before <= 0.5 and after == 1.0
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    vals = [r for r in rows if r["split"] == "val"]
    assert abs(train[0]["loss"] - math.log(2)) < 1e-5                    # step 1's loss is taken before its update
    assert {"reward_acc", "margin", "logp_chosen", "logp_rejected", "logp_acc"} <= set(train[0])
    assert vals[-1]["margin"] > 0 and vals[-1]["reward_acc"] == 1.0 and vals[-1]["logp_acc"] == 1.0


def test_lora_policy_reference_is_the_base(tok, tmp_path):
    from lmstack.finetune import LoraConfig, add_lora
    model, pairs, _ = setup(tok, n=16)
    base_ref = reference_logps(model, pairs)
    add_lora(model, LoraConfig(r=4, alpha=8, targets=("q", "v")))
    ref = reference_logps(model, pairs)                      # adapters start at B = 0: the base itself
    assert torch.allclose(ref["ref_chosen"], base_ref["ref_chosen"], atol=1e-6)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    cfg = TrainConfig(out=str(tmp_path / "lora"), max_steps=3, batch_size=8, seq_len=96, lr=1e-2, warmup_steps=0,
                      eval_every=0, ckpt_every=0, tensorboard=False, device="cpu")
    Trainer(cfg, model, DPOObjective(0.1), PairBatches(pairs, 8, extras=ref)).fit()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n                 # the base never moves
    b = PairBatches(pairs, 8, extras=ref).next_batch()
    with torch.no_grad():
        assert not torch.allclose(sequence_logps(model, b)[:8], b.extras["ref_chosen"])   # the adapters did


def test_rpo_adds_the_chosen_mean_token_nll(tok):
    model, pairs, ref = setup(tok, n=16)
    batch = PairBatches(pairs, 8, extras=ref).next_batch()
    loss, _ = DPOObjective(0.1, rpo_alpha=0.5).loss(model, batch)
    n_tokens = float(batch.loss_mask[:8].sum())
    nll = -float(batch.extras["ref_chosen"].sum()) / n_tokens            # policy == reference at step 0
    assert abs(float(loss) - (math.log(2) + 0.5 * nll)) < 1e-5
