"""GRPO rollouts through the engine: recorded log-probs equal a fresh forward of the policy under
the sampling distribution, the engine follows the policy's weights, rewards are checked, and
GRPO raises a verifiable reward on held-out prompts."""
import pytest
import torch

from tests.align.conftest import tiny_model
from tests.align.toy import word_prompts
from lmstack.align import GRPOObjective, GRPOSource, RewardError, group_advantages, token_logps
from lmstack.train import TrainConfig, Trainer
from lmstack.utils import LmstackError


def prompts(n, seed=0):
    return [{"prompt": p, "answer": "yes"} for p in word_prompts(n, seed)]


def starts_with_y(prompt, completion, **fields):
    return 1.0 if completion.strip().startswith("y") else 0.0


def source(tok, model, **kw):
    args = dict(group_size=4, prompts_per_rollout=2, batch_size=4, grad_accum=2, max_completion_len=6,
                temperature=0.7, stop_token_ids=[tok.eot_token])
    args.update(kw)
    return GRPOSource(model, tok, kw.pop("records", prompts(16)), [starts_with_y], **{k: v for k, v in args.items()
                                                                                      if k != "records"})


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_recorded_logprobs_equal_a_fresh_forward_under_the_sampling_distribution(tok, temperature):
    model = tiny_model(0)
    src = source(tok, model, temperature=temperature)
    checked = 0
    for _ in range(2):                                              # both micro-batches of the rollout
        b = src.next_batch()
        with torch.no_grad():
            ref = torch.log_softmax(model(b.input_ids)[:, :-1].double() / temperature, -1)
            ref = ref.gather(-1, b.input_ids[:, 1:, None])[..., 0] * b.mask
        assert (ref - b.old_logps).abs().max() < 1e-5
        checked += int(b.mask.sum())
    assert checked >= 8


def test_engine_follows_the_policy_weights(tok):
    """After an optimizer step the next rollout samples the new policy (update_weights)."""
    model = tiny_model(0)
    src = source(tok, model, temperature=1.0)
    src.next_batch(), src.next_batch()                              # rollout 0 served
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    b = src.next_batch()                                            # rollout 1: after the change
    with torch.no_grad():
        fresh = token_logps(model(b.input_ids)[:, :-1], b.input_ids[:, 1:]) * b.mask
    assert (fresh - b.old_logps).abs().max() < 1e-5
    assert src.engine.llm.model is not model and src.engine.llm.stats()["weight_updates"] == 2


def test_group_advantages_and_stats_of_a_rollout(tok):
    model = tiny_model(0)
    src = source(tok, model)
    buf = src._rollout(0)
    rewards = torch.tensor([starts_with_y("", src.engine.tokenizer.decode(
        buf["input_ids"][i][buf["mask"][i].nonzero()[:, 0] + 1].tolist())) for i in range(8)])
    assert torch.allclose(buf["advantages"], group_advantages(rewards, 4), atol=1e-6)
    assert abs(buf["stats"]["reward"] - float(rewards.mean())) < 1e-6


@pytest.mark.parametrize("bad,match", [(lambda p, c, **f: 1 / 0, "raised ZeroDivisionError"),
                                       (lambda p, c, **f: float("nan"), "returned nan"),
                                       (lambda p, c, **f: "1", "returned '1'")])
def test_bad_reward_function_is_named_with_the_record(tok, bad, match):
    model = tiny_model(0)
    src = GRPOSource(model, tok, prompts(4), [bad], group_size=2, prompts_per_rollout=2, batch_size=4,
                     max_completion_len=3)
    with pytest.raises(RewardError, match=match) as e:
        src.next_batch()
    assert "<lambda>" in str(e.value) and "record prompt #" in str(e.value)


def test_prompt_longer_than_the_context_is_refused_by_name(tok):
    recs = prompts(4) + [{"prompt": "Q: " + "cat " * 200 + "?\nA:"}]
    with pytest.raises(LmstackError, match=r"prompt #4: the prompt has \d+ tokens"):
        GRPOSource(tiny_model(0), tok, recs, [starts_with_y], group_size=2, prompts_per_rollout=2, batch_size=4)


def test_rollout_source_resumes_inside_a_rollout(tok):
    a = source(tok, tiny_model(0))
    a.next_batch()
    sd = a.state_dict()
    b = source(tok, tiny_model(0))
    b.load_state_dict(sd)
    x, y = a.next_batch(), b.next_batch()
    assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.old_logps, y.old_logps)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_raises_the_reward_on_held_out_prompts(tok, tmp_path, loss_type):
    torch.manual_seed(0)
    model = tiny_model(0)
    train, held = prompts(64, 0), prompts(16, 99)
    src = source(tok, model, records=train, group_size=8, prompts_per_rollout=4, batch_size=16, temperature=1.0)
    held_ids = [tok.encode_ordinary(r["prompt"]) for r in held]

    def held_reward():
        groups = src.engine.sample(held_ids, 4, seed=7)
        return sum(starts_with_y("", r.text) for g in groups for r in g) / (4 * len(held))
    before = held_reward()
    cfg = TrainConfig(out=str(tmp_path / loss_type), max_steps=40, batch_size=16, grad_accum=2, seq_len=96, lr=2e-2,
                      warmup_steps=0, eval_every=0, ckpt_every=0, tensorboard=False, device="cpu")
    Trainer(cfg, model, GRPOObjective(loss_type, temperature=1.0, max_completion_len=6), src).fit()
    after = held_reward()
    assert after > before + 0.4, (before, after)


def test_lora_policy_rollouts_follow_the_adapters(tok):
    """A LoRA policy: only the adapters are sent to the engine, and its samples follow them."""
    from lmstack.finetune import LoraConfig, add_lora
    model = tiny_model(0)
    add_lora(model, LoraConfig(r=4, alpha=8, targets=("q", "v")))
    src = source(tok, model, temperature=1.0)
    src.next_batch(), src.next_batch()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    b = src.next_batch()
    with torch.no_grad():
        fresh = token_logps(model(b.input_ids)[:, :-1], b.input_ids[:, 1:]) * b.mask
    assert (fresh - b.old_logps).abs().max() < 1e-5


def test_completion_logps_equal_the_full_forward(tok):
    from lmstack.align.grpo import completion_logps
    model = tiny_model(0)
    b = source(tok, model).next_batch()
    with torch.no_grad():
        full = token_logps(model(b.input_ids)[:, :-1], b.input_ids[:, 1:], 0.7) * b.mask
        assert (completion_logps(model, b.input_ids, b.mask, 0.7) - full).abs().max() < 1e-6


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_skipping_zero_advantage_rows_keeps_the_loss_and_gradient(tok, loss_type):
    """Groups whose samples all score the same carry no gradient: leaving their rows out of the
    update gives the loss and gradient of the whole micro-batch."""
    def some_groups_flat(prompt, completion, **fields):       # prompts without "fox": every sample 0
        return float(len(completion) % 2) if "fox" in prompt else 0.0
    recs = [{"prompt": p} for p in word_prompts(40, 3)]
    recs = [r for r in recs if "fox" in r["prompt"]][:2] + [r for r in recs if "fox" not in r["prompt"]][:2]
    grads, losses, rows = [], [], []
    for skip in (True, False):
        model = tiny_model(0)
        src = GRPOSource(model, tok, recs, [some_groups_flat], group_size=4, prompts_per_rollout=4, batch_size=16,
                         max_completion_len=6, temperature=1.0, skip_zero_advantage=skip, seed=1)
        b = src.next_batch()
        loss, _ = GRPOObjective(loss_type, max_completion_len=6).loss(model, b)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        losses.append(float(loss))
        rows.append(b.input_ids.size(0))
    assert rows[1] == 16 and 0 < rows[0] <= 8                       # two groups of four have no signal
    assert abs(losses[0] - losses[1]) < 1e-6
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
