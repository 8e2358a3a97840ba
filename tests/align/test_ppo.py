"""PPO: the rollout's per-token rewards (KL penalty + the reward model's score at the last token),
GAE and values as the formulas say; training raises the reward model's score with KL bounded."""
import torch

from tests.align.conftest import tiny_model
from tests.align.toy import word_prompts
from lmstack.align import PolicyAndValue, PPOObjective, PPOSource, gae, reward_model_from, score_sequences
from lmstack.align.rollout import response_logps
from lmstack.align.runner import frozen_copy
from lmstack.train import TrainConfig, Trainer


def build(tok, seed=0, **kw):
    policy = tiny_model(seed)
    rm = reward_model_from(tiny_model(5), seed=3).eval()
    with torch.no_grad():
        rm.lm_head.weight.mul_(10)                          # a wider spread of scores than a fresh head's
    model = PolicyAndValue(policy, reward_model_from(rm))
    ref = frozen_copy(policy)
    args = dict(prompts_per_rollout=8, batch_size=4, grad_accum=2, ppo_epochs=2, max_completion_len=5,
                temperature=1.0, stop_token_ids=[tok.eot_token], kl_coef=0.1, gamma=0.9, lam=0.8)
    args.update(kw)
    src = PPOSource(model, tok, [{"prompt": p} for p in word_prompts(64, 0)], rm, ref, **args)
    return model, rm, ref, src


def test_rollout_rewards_values_and_gae_follow_the_formulas(tok):
    model, rm, ref, src = build(tok, whiten_advantages=False)
    with torch.no_grad():                                   # make the policy differ from the reference
        for p in model.policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    buf = src._rollout(0)
    ids, mask = buf["input_ids"], buf["mask"]
    lengths = (mask.sum(1) + torch.tensor([int(m.nonzero()[0]) + 1 for m in mask])).long()   # prompt + completion
    seqs = [ids[i, :lengths[i]].tolist() for i in range(len(ids))]
    scores = score_sequences(rm, seqs)
    ref_lp = response_logps(ref, ids, mask)
    kl = (buf["old_logps"] - ref_lp) * mask
    assert kl.abs().sum() > 0
    rewards = -0.1 * kl
    for i in range(len(ids)):
        rewards[i, lengths[i] - 2] += scores[i]             # the target position of the last response token
    with torch.no_grad():
        values = model.value(ids)[:, :-1, 0] * mask
    adv, ret = gae(rewards, values, 0.9, 0.8, mask)
    assert torch.allclose(buf["advantages"], adv, atol=1e-5)
    assert torch.allclose(buf["returns"], ret, atol=1e-5)
    assert abs(buf["stats"]["score"] - float(scores.mean())) < 1e-5
    assert abs(buf["stats"]["kl"] - float(kl.sum(1).mean())) < 1e-5


def test_ppo_raises_the_reward_model_score_with_kl_bounded(tok, tmp_path):
    torch.manual_seed(0)
    model, rm, ref, src = build(tok, prompts_per_rollout=16, batch_size=8, ppo_epochs=2, kl_coef=0.05)
    from lmstack.align.evaluate import rm_score_and_kl
    held = [tok.encode_ordinary(p) for p in word_prompts(16, 9)]
    before = rm_score_and_kl(src.engine, rm, ref, held)
    cfg = TrainConfig(out=str(tmp_path / "ppo"), max_steps=24, batch_size=8, grad_accum=2, seq_len=96, lr=3e-3,
                      warmup_steps=0, eval_every=0, ckpt_every=0, tensorboard=False, device="cpu")
    Trainer(cfg, model, PPOObjective(), src).fit()
    after = rm_score_and_kl(src.engine, rm, ref, held)
    assert after["rm_score"] > before["rm_score"] + 0.5, (before, after)     # 3.41 -> 4.18 here
    assert 0 < after["kl"] < 10, after


def test_adaptive_kl_controller_follows_the_formula_and_resumes(tok):
    """kl_coef *= 1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon after each rollout batch."""
    _, _, _, src = build(tok, kl_coef=0.1, kl_target=2.0, kl_horizon=40)
    src.adapt_kl(3.0, 8)                                         # 3/2 - 1 = 0.5 -> clipped to 0.2
    assert abs(src.kl_coef - 0.1 * (1 + 0.2 * 8 / 40)) < 1e-12
    src.adapt_kl(1.8, 8)                                         # -0.1
    assert abs(src.kl_coef - 0.1 * 1.04 * (1 - 0.1 * 8 / 40)) < 1e-12
    coef = src.kl_coef
    buf = src._rollout(0)                                        # the rollout records the coefficient it used
    assert buf["stats"]["kl_coef"] == coef
    expect = coef * (1 + min(max(buf["stats"]["kl"] / 2.0 - 1, -0.2), 0.2) * 8 / 40)
    assert abs(src.kl_coef - expect) < 1e-9
    other = build(tok, kl_coef=0.1, kl_target=2.0, kl_horizon=40)[3]
    other.load_state_dict(src.state_dict())
    assert other.kl_coef == src.kl_coef
    fixed = build(tok, kl_coef=0.1)[3]                           # no target: the coefficient stays
    fixed._rollout(0)
    assert fixed.kl_coef == 0.1
