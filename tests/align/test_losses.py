"""Every loss, advantage and GAE computation against values worked out by hand (1e-6)."""
import math

import pytest
import torch

from lmstack.align import dpo_loss, gae, group_advantages, kl_k3, policy_loss, value_loss
from lmstack.align.losses import bradley_terry_loss, whiten

T = torch.tensor


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=tol, rtol=0)


PC, PR, RC, RR = T([-1.0, -2.0]), T([-3.0, -1.5]), T([-1.5, -2.0]), T([-2.0, -1.0])
# log-ratio margins: (0.5 - (-1.0)) = 1.5 and (0.0 - (-0.5)) = 0.5


def test_dpo_sigmoid_by_hand():
    losses, cr, rr = dpo_loss(PC, PR, RC, RR, beta=0.1)
    close(losses, [math.log1p(math.exp(-0.15)), math.log1p(math.exp(-0.05))])
    close(cr, [0.05, 0.0])
    close(rr, [-0.1, -0.05])


def test_ipo_by_hand():
    losses, _, _ = dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo")
    close(losses, [(1.5 - 5.0) ** 2, (0.5 - 5.0) ** 2])          # (margin - 1/(2*beta))^2


def test_dpo_equal_policy_and_reference_is_ln2_and_bad_args():
    losses, _, _ = dpo_loss(PC, PR, PC, PR)
    close(losses, [math.log(2)] * 2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(PC, PR, RC, RR, loss_type="hinge")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(PC, PR, RC, RR, beta=0)


def test_dpo_matches_trl_if_installed():
    """TRL before 1.0 had DPOTrainer.dpo_loss on tensors; 1.x folded it into _compute_loss."""
    trl = pytest.importorskip("trl")
    fn = getattr(trl.DPOTrainer, "dpo_loss", None)
    if fn is None:
        pytest.skip(f"trl {trl.__version__} has no DPOTrainer.dpo_loss (folded into _compute_loss in 1.x)")
    from types import SimpleNamespace
    me = SimpleNamespace(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reference_free=False,
                         f_divergence_type="reverse_kl", use_weighting=False, args=SimpleNamespace(use_weighting=False))
    ref = fn(me, PC, PR, RC, RR)
    close(ref[0], dpo_loss(PC, PR, RC, RR)[0])


def test_bradley_terry_by_hand():
    close(bradley_terry_loss(T([2.0, 0.0]), T([1.0, 0.5])), [math.log1p(math.exp(-1.0)), math.log1p(math.exp(0.5))])


def test_group_advantages_by_hand():
    r = T([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    std = math.sqrt((4 * 0.25) / 3)                                 # unbiased (n - 1), as TRL
    a = 0.5 / (std + 1e-4)
    close(group_advantages(r, 4), [a, -a, -a, a, 0, 0, 0, 0])
    close(group_advantages(r, 4, scale=False), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    close(group_advantages(T([3.0, 1.0, 2.0]), 3), [1 / 1.0001, -1 / 1.0001, 0.0])   # std 1
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(T([1.0, 2.0, 3.0]), 2)


def test_gae_by_hand():
    r, v = T([0.0, 0.0, 1.0]), T([0.5, 0.6, 0.7])
    adv, ret = gae(r, v, gamma=1.0, lam=0.95)
    # A2 = 1 - .7 = .3;  A1 = (.7 - .6) + .95 * .3 = .385;  A0 = (.6 - .5) + .95 * .385 = .46575
    close(adv, [0.46575, 0.385, 0.3])
    close(ret, [0.96575, 0.985, 1.0])
    adv, _ = gae(r, v, gamma=0.9, lam=0.8)
    # A2 = .3;  A1 = .9*.7 - .6 + .72*.3 = .246;  A0 = .9*.6 - .5 + .72*.246 = .21712
    close(adv, [0.21712, 0.246, 0.3])


def test_gae_batched_with_padding_equals_each_row_alone():
    r = T([[0.0, 0.0, 1.0, 0.0], [0.2, -1.0, 0.0, 0.0]])
    v = T([[0.5, 0.6, 0.7, 9.0], [0.1, 0.3, 9.0, 9.0]])            # 9.0: padding, must not leak in
    m = T([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    adv, ret = gae(r, v, 1.0, 0.95, m)
    a0, r0 = gae(r[0, :3], v[0, :3], 1.0, 0.95)
    a1, r1 = gae(r[1, :2], v[1, :2], 1.0, 0.95)
    close(adv[0, :3], a0)
    close(adv[1, :2], a1)
    close(adv[:, 3], [0, 0])
    close(ret[1, :2], r1)
    # row 1 by hand: A1 = -1 - .3 = -1.3; A0 = .2 + .3 - .1 + .95 * -1.3 = -0.835
    close(a1, [-0.835, -1.3])


def test_k3_kl_by_hand():
    close(kl_k3(T([-1.0, -2.0]), T([-1.5, -2.0])), [math.exp(-0.5) + 0.5 - 1, 0.0])


def test_policy_loss_types_by_hand():
    logps = T([[-1.0, -2.0], [-0.5, 0.0]])
    old = T([[-1.1, -1.5], [0.0, 0.0]])
    mask = T([[1.0, 1.0], [1.0, 0.0]])
    adv = T([1.0, -1.0])
    r = [math.exp(0.1), math.exp(-0.5), math.exp(-0.5)]
    row0 = [-min(r[0], 1.2), -min(r[1], 0.8)]                   # A = +1: -min(r, clip(r)); neither clip binds
    row1 = [-min(-r[2], -0.8)]                                   # A = -1, ratio .61 < .8: the clip binds -> .8
    loss, st = policy_loss(logps, old, adv, mask, 0.2, "grpo")
    close(loss, ((row0[0] + row0[1]) / 2 + row1[0]) / 2)
    close(st["clip_frac"], 1 / 3)
    loss, _ = policy_loss(logps, old, adv, mask, 0.2, "dapo")
    close(loss, (row0[0] + row0[1] + row1[0]) / 3)
    loss, _ = policy_loss(logps, old, adv, mask, 0.2, "dapo", n_tokens=6.0)
    close(loss, (row0[0] + row0[1] + row1[0]) / 6)
    loss, _ = policy_loss(logps, old, adv, mask, 0.2, "dr_grpo", max_completion_length=4)
    close(loss, (row0[0] + row0[1] + row1[0]) / (2 * 4))


def test_policy_loss_with_k3_kl_by_hand():
    logps, old, mask = T([[-1.0]]), T([[-1.0]]), T([[1.0]])
    loss, st = policy_loss(logps, old, T([0.0]), mask, 0.2, "grpo", ref_logps=T([[-1.5]]), beta=0.04)
    k = math.exp(-0.5) + 0.5 - 1
    close(loss, 0.04 * k)
    close(st["kl"], k)


def test_value_loss_by_hand():
    v, old, ret, m = T([[1.0, 0.0]]), T([[0.5, 0.1]]), T([[0.0, 1.0]]), T([[1.0, 1.0]])
    # token 0: unclipped (1-0)^2 = 1, clipped V = .5+.2 = .7 -> .49; max = 1
    # token 1: unclipped (0-1)^2 = 1, clipped V = 0 (within .1 +- .2) -> 1; max = 1
    close(value_loss(v, old, ret, m, 0.2), 0.5 * (1 + 1) / 2)
    v2 = T([[0.2, 1.0]])
    # token 0: (0.2)^2 = .04, clipped .5-.2=.3 -> .09 -> .09;  token 1: (1-1)^2 = 0, clipped .3 -> .49 -> .49
    close(value_loss(v2, old, ret, m, 0.2), 0.5 * (0.09 + 0.49) / 2)


def test_whiten_by_hand():
    x, m = T([1.0, 2.0, 3.0, 100.0]), T([1.0, 1.0, 1.0, 0.0])
    close(whiten(x, m), [-1.0 / math.sqrt(1 + 1e-8), 0.0, 1.0 / math.sqrt(1 + 1e-8), 0.0])   # var (n-1) = 1
