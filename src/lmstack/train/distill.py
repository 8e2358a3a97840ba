"""Knowledge distillation (Hinton et al. 2015): train a student to match a teacher's
next-token distributions, as an objective for the one Trainer. It lives beside the other
objectives (floor 3, train/) so that compression (quant/), finetuning and the benchmarks' drafts
can all use it without quant/ importing train/.

    obj = DistillObjective(teacher, temperature=2.0, alpha=0.5, tokenizer=tok, teacher_tokenizer=t_tok)
    Trainer(cfg, student, obj, batches).fit()      # any student: smaller, pruned, fake-quantized ...

Per position t (targets != IGNORE_INDEX), with p = softmax(z_teacher / T), q = softmax(z_student / T):

    KL_t  = sum_v p_v (log p_v - log q_v)                          KL(teacher_T || student_T)
    CE_t  = -log softmax(z_student)[y_t]                            the hard label, at T = 1
    loss  = alpha * T^2 * mean_t KL_t + (1 - alpha) * mean_t CE_t

T^2 keeps the soft term's gradient on the scale of the hard one as T grows (its gradient
w.r.t. the logits shrinks as 1/T^2). alpha = 1 is pure distillation (no labels needed:
targets only mark which positions count); metrics "kl" (at T) and "ce" are logged either way.

The teacher is frozen (requires_grad False, eval mode) and run under no_grad, on the
student's device (moved there on first use). Both models must share one tokenizer, or the
distributions are over different things: given both tokenizers, they are compared at
construction (vocabulary, merges, specials, split pattern), and the logits' vocabulary sizes
at the first batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmstack.train.objectives import IGNORE_INDEX, Batch, CausalLM
from lmstack.utils import LmstackError


class DistillError(LmstackError, ValueError):
    """A teacher and student (or setting) that cannot be distilled."""


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor | None = None,
                 temperature: float = 1.0, alpha: float = 1.0) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, kl, ce) over positions whose target is not IGNORE_INDEX (all positions when
    targets is None; ce is then 0). Logits (..., V), targets (...)."""
    V = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, V)
    t = teacher_logits.float().reshape(-1, V)
    keep = None if targets is None else targets.reshape(-1) != IGNORE_INDEX
    if keep is not None:
        s, t, y = s[keep], t[keep], targets.reshape(-1)[keep]
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()   # p (log p - log q)
    ce = F.cross_entropy(s, y) if keep is not None else s.new_zeros(())
    loss = alpha * temperature ** 2 * kl + ((1.0 - alpha) * ce if alpha < 1.0 else 0.0)
    return loss, kl, ce


_PROBE = "The quick brown fox: 12 + 30 = 42.\n<|endoftext|>"


def _tokenizer_key(tok):
    if hasattr(tok, "vocab") and hasattr(tok, "merges"):
        return (dict(tok.vocab), [tuple(m) for m in tok.merges], dict(getattr(tok, "special_tokens", {})),
                getattr(tok, "pat_str", None))
    return getattr(tok, "n_vocab", None), tuple(tok.encode(_PROBE))


class DistillObjective(CausalLM):
    """KL(teacher_T || student_T) * T^2, mixed with the hard-label CE by alpha; see the module docstring."""
    name = "distill"
    token_nll = False

    def __init__(self, teacher: nn.Module, temperature: float = 2.0, alpha: float = 1.0,
                 tokenizer=None, teacher_tokenizer=None):
        if not isinstance(teacher, nn.Module):
            raise DistillError(f"the teacher must be a model (nn.Module), got {type(teacher).__name__}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
                not math.isfinite(temperature) or temperature <= 0:
            raise DistillError(f"temperature={temperature!r} must be a finite number > 0")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise DistillError(f"alpha={alpha!r} must be in [0, 1] (1 = pure distillation, 0 = labels only)")
        mask = getattr(getattr(teacher, "config", None), "mask", "causal")
        if mask != "causal":
            raise DistillError(f"the teacher has mask={mask!r}; next-token distillation needs a causal teacher")
        if (tokenizer is None) != (teacher_tokenizer is None):
            raise DistillError("pass both tokenizer= (the student's) and teacher_tokenizer=, or neither")
        if tokenizer is not None and _tokenizer_key(tokenizer) != _tokenizer_key(teacher_tokenizer):
            raise DistillError("the teacher's and the student's tokenizers differ; distillation compares "
                               "distributions over the same token ids, so both must use one tokenizer")
        self.teacher = teacher.requires_grad_(False).eval()
        self.temperature, self.alpha = float(temperature), float(alpha)

    def _teacher_logits(self, batch: Batch) -> Tensor:
        dev = batch.input_ids.device
        p = next(self.teacher.parameters(), None)
        if p is not None and p.device != dev:
            self.teacher.to(dev)
        self.teacher.eval()
        with torch.no_grad():
            return self.forward(self.teacher, batch)

    def loss(self, model, batch: Batch) -> tuple[Tensor, dict]:
        logits = self.forward(model, batch)                             # (B, T, V)
        teacher = self._teacher_logits(batch)
        if teacher.shape != logits.shape:
            raise DistillError(f"teacher logits {tuple(teacher.shape)} vs student logits {tuple(logits.shape)}: "
                               f"the vocabularies differ; teacher and student must share one tokenizer")
        loss, kl, ce = distill_loss(logits, teacher, batch.targets, self.temperature, self.alpha)
        return loss, {"kl": kl.detach(), "ce": ce.detach()}
