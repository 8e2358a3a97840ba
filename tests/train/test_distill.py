"""Distillation: the loss equals KL(teacher_T || student_T) * T^2 (+ CE by alpha) computed by
hand, and a short distillation through the Trainer brings a student's distribution closer to
its frozen teacher's."""
import math

import pytest
import torch

from lmstack.model import ModelConfig, Transformer
from lmstack.train import IGNORE_INDEX, TrainConfig, Trainer
from lmstack.train.distill import DistillError, DistillObjective, distill_loss

CFG = dict(vocab_size=48, n_head=4, n_kv_head=2, n_embd=64, context_length=64)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (tests/conftest.py)."""


def tiny(seed=0, n_layer=2, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG, "n_layer": n_layer, **kw}))


def hand_kl(t_row, s_row, T):
    pt = [math.exp(v / T) for v in t_row]
    ps = [math.exp(v / T) for v in s_row]
    zt, zs = sum(pt), sum(ps)
    return sum(a / zt * math.log((a / zt) / (b / zs)) for a, b in zip(pt, ps))


def hand_ce(s_row, y):
    return -(s_row[y] - math.log(sum(math.exp(v) for v in s_row)))


def test_loss_matches_a_hand_computed_kl_and_ce():
    s = torch.tensor([[[1.0, -0.5, 2.0, 0.0], [0.3, 0.3, -1.0, 2.5], [-2.0, 1.0, 0.5, 0.1]]], dtype=torch.float64)
    t = torch.tensor([[[0.5, 0.5, 3.0, -1.0], [2.0, -0.3, 0.0, 1.0], [0.0, 0.0, 0.0, 4.0]]], dtype=torch.float64)
    y = torch.tensor([[2, IGNORE_INDEX, 1]])
    rows = [0, 2]                              # position 1 is ignored by both terms
    for T, alpha in ((1.0, 1.0), (2.0, 1.0), (3.0, 0.25), (0.5, 0.0)):
        kl = sum(hand_kl(t[0, i].tolist(), s[0, i].tolist(), T) for i in rows) / len(rows)
        ce = sum(hand_ce(s[0, i].tolist(), int(y[0, i])) for i in rows) / len(rows)
        loss, got_kl, got_ce = distill_loss(s, t, y, T, alpha)
        assert abs(got_kl.item() - kl) < 1e-6 and abs(got_ce.item() - ce) < 1e-6
        assert abs(loss.item() - (alpha * T * T * kl + (1 - alpha) * ce)) < 1e-6, (T, alpha)
    # no targets: every position counts, no CE
    loss, kl, ce = distill_loss(s, t, None, 2.0)
    want = sum(hand_kl(t[0, i].tolist(), s[0, i].tolist(), 2.0) for i in range(3)) / 3
    assert abs(kl.item() - want) < 1e-6 and abs(loss.item() - 4 * want) < 1e-6 and ce.item() == 0.0
    # identical distributions: zero
    assert distill_loss(t, t, None, 1.5)[1].item() == pytest.approx(0.0, abs=1e-12)


class Tokens:
    """Random windows of a repeating 23-token pattern with 10% noise: a teacher trained on it
    is confident and input-dependent, so its distribution is worth matching."""

    def __init__(self, seed=0, batch=8):
        g = torch.Generator().manual_seed(4)
        self.stream = torch.randint(0, 48, (23,), generator=g).repeat(120)
        noise = torch.rand(len(self.stream), generator=g) < 0.1
        self.stream[noise] = torch.randint(0, 48, (int(noise.sum()),), generator=g)
        self.gen, self.batch = torch.Generator().manual_seed(seed), batch

    def next_batch(self):
        s = torch.randint(0, len(self.stream) - 33, (self.batch,), generator=self.gen)
        w = torch.stack([self.stream[i:i + 33] for i in s.tolist()])
        return w[:, :-1], w[:, 1:]

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, sd):
        self.gen.set_state(sd["gen"])


def trained_teacher(steps=40):
    from lmstack.train import token_loss
    teacher, src = tiny(seed=1, n_layer=2), Tokens(seed=5)
    opt = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    for _ in range(steps):
        x, y = src.next_batch()
        opt.zero_grad()
        token_loss(teacher(x), y).backward()
        opt.step()
    teacher.zero_grad(set_to_none=True)
    return teacher.eval()


def kl_to_teacher(student, teacher, x):
    with torch.no_grad():
        return distill_loss(student.eval()(x), teacher(x), None, 1.0)[1].item()


def test_short_distillation_lowers_the_kl_and_leaves_the_teacher_alone(tmp_path):
    teacher = trained_teacher()
    student = tiny(seed=2, n_layer=1)
    frozen = {k: v.clone() for k, v in teacher.state_dict().items()}
    x, _ = Tokens(seed=99, batch=16).next_batch()
    before = kl_to_teacher(student, teacher, x)
    cfg = TrainConfig(out=str(tmp_path), max_steps=40, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2,
                      eval_every=0, ckpt_every=0, tensorboard=False, device="cpu")
    obj = DistillObjective(teacher, temperature=2.0, alpha=1.0)
    Trainer(cfg, student, obj, Tokens()).fit()
    after = kl_to_teacher(student, teacher, x)
    assert after < 0.5 * before, (before, after)
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in frozen.items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    from lmstack.train.metrics import read_metrics
    rows = [r for r in read_metrics(tmp_path) if r.get("split") == "train"]
    assert {"kl", "ce"} <= set(rows[-1]) and rows[-1]["kl"] < rows[0]["kl"]


def test_mismatched_teacher_and_bad_settings_are_clear_errors(tmp_path):
    teacher = tiny(seed=1)
    with pytest.raises(DistillError, match="temperature=0"):
        DistillObjective(teacher, temperature=0)
    with pytest.raises(DistillError, match="alpha=1.5"):
        DistillObjective(teacher, alpha=1.5)
    with pytest.raises(DistillError, match="nn.Module"):
        DistillObjective("runs/teacher")
    from lmstack.tokenizer import Tokenizer
    a = Tokenizer.train("the cat sat on the mat " * 20, vocab_size=270)
    b = Tokenizer.train("a dog ran in the fog " * 20, vocab_size=270)
    with pytest.raises(DistillError, match="tokenizers differ"):
        DistillObjective(teacher, tokenizer=a, teacher_tokenizer=b)
    DistillObjective(teacher, tokenizer=a, teacher_tokenizer=Tokenizer.train("the cat sat on the mat " * 20,
                                                                               vocab_size=270))
    cfg = TrainConfig(out=str(tmp_path), max_steps=2, batch_size=2, seq_len=16, eval_every=0, ckpt_every=0,
                      tensorboard=False, device="cpu")
    with pytest.raises(DistillError, match="vocabularies differ"):
        Trainer(cfg, tiny(seed=2, vocab_size=64), DistillObjective(teacher), Tokens()).fit()
