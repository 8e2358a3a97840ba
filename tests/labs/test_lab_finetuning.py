"""Lab 12: plain finetuning, instruction tuning and PPO from one pretrained model."""
import pytest
import torch

from lmstack.labs.finetuning import STAGES, masked_nll, stream_windows
from lmstack.model import ModelConfig, Transformer


def test_helpers_compute_what_they_say():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=32, n_layer=1, n_head=2, n_embd=16, context_length=16)).eval()
    ids = torch.randint(0, 32, (10,)).tolist()
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(model(torch.tensor([ids[:-1]]))[0], torch.tensor(ids[1:]),
                                               reduction="none")
    assert masked_nll(model, [(ids, [1] * 10)]) == pytest.approx(float(ce.mean()), rel=1e-5)
    mask = [0] * 6 + [1] * 4                                  # only the last 4 tokens are scored
    assert masked_nll(model, [(ids, mask)]) == pytest.approx(float(ce[5:].mean()), rel=1e-5)
    stream = torch.arange(100)
    b = stream_windows(stream, 8)(torch.Generator().manual_seed(0), 4)
    assert b.input_ids.shape == (4, 8) and torch.equal(b.targets, b.input_ids + 1)   # next-token targets


def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("finetuning")
    assert_page(lab)
    n = lab["numbers"]
    st = n["stages"]
    assert list(st) == list(STAGES)
    base, plain, sft, ppo = (st[k] for k in STAGES)
    assert plain["plain_text_loss"] < base["plain_text_loss"]           # finetuning fits its own text
    assert sft["chat_answer_loss"] < min(base["chat_answer_loss"], plain["chat_answer_loss"])
    assert sft["stop_rate"] > plain["stop_rate"]                        # ...but only SFT ends a chat turn
    assert plain["changed_vs_base"] > 0 and ppo["changed_vs_instruction tuning"] > 0
    p = n["ppo"]
    assert len(p["score"]) == len(p["kl"]) == n["steps"]["ppo"]
    assert abs(p["kl"][0]) < 1e-3           # the first rollout is sampled by the reference itself
    per_rollout = 4                         # 16 prompts, batch 8, 2 epochs: one rollout serves 4 steps
    assert len(set(p["score"][:per_rollout])) == 1 and p["score"][per_rollout] != p["score"][0]
    assert p["kl_last"] > 0
    # before/after PPO on the fixed prompts: the instruction-tuned model is the reference (KL 0)
    assert abs(sft["sampled_kl"]) < 1e-3 and ppo["sampled_kl"] > 0.01
    assert ppo["sampled_rm_score"] > sft["sampled_rm_score"]
    assert 0.5 < n["reward_model_heldout_acc"] <= 1
    assert all(set(STAGES) <= set(s) for s in n["samples"])
    assert lab["record"]["insight"]["holds"]
