"""Objectives: what the one Trainer minimises. Every training method is an objective plus a
batch source (batches.py) handed to `Trainer(cfg, model, objective, batches)`; none is a loop.

The protocol. Subclass `Objective` (or pass a plain function `fn(model, batch) -> (loss,
metrics)`, wrapped by `as_objective`); only `loss` is required:

    class MyObjective(Objective):
        model_mask = "causal"   # ModelConfig.mask the Trainer builds the model with (None: as given)
        token_nll = False       # True if loss is a mean token NLL: val lines then log ppl = exp(loss)

        def prepare(self, raw, generator):       # CPU, once per micro-batch; default: raw as is
            # raw = whatever the batch source's next_batch() returned. The one place for the
            # objective's randomness (MLM masking, prefix lengths): draw only from `generator`,
            # which the Trainer seeds per rank and saves in every checkpoint (exact resume).
            return batch        # tensors in dicts/lists/tuples/dataclasses, or anything with .to(device)

        def loss(self, model, batch):            # on the device, under autocast
            return loss, {"acc": acc}           # loss: 0-dim tensor; metrics: floats / 0-dim tensors

        def tokens(self, batch) -> int           # tokens processed (tok/s, MFU); default: input_ids.numel()
        def state_dict(self) / load_state_dict(sd)   # state that evolves in training (an adaptive
                                                 # KL coefficient, a running reward baseline); default none

Metrics are averaged over the micro-batches of a step and over ranks, and logged next to the
loss in every train line of metrics.jsonl (and in val lines, averaged over the val batches).
They must have the same keys on every call; "loss", "lr", "grad_norm", ... are reserved.
`loss` also scores the val batches, under no_grad with `model.training` False: change the
objective's state only when `model.training`. The model's own MoE auxiliary loss is added by
the Trainer, not by objectives.

How the methods still to come fit (the Trainer does not change for any of them):
    SFT      source yields `Batch(input_ids, targets)` with IGNORE_INDEX where the loss mask is
             0 (prompt, padding); `CausalLM` as is.
    DPO      source yields chosen/rejected pairs with the frozen reference's log-probs computed
             once and cached with the examples; loss -logsigmoid(beta * margin), metrics
             reward accuracy and margin. `model` may carry LoRA with a frozen base.
    reward   `model` = a Transformer with a scalar head (any nn.Module); pairwise loss.
    GRPO/PPO source holds the engine and the policy (the module passed as `model`): each
             next_batch() pushes the policy's weights to the engine (update_weights), samples
             a group of rollouts per prompt, scores them and returns tokens, old log-probs and
             advantages; the objective computes the clipped policy loss + KL.

Pretraining is four built-in objectives over packed `(x, y)` batches (y = x shifted by one):
    causal   next-token prediction on every position, causal attention (GPT).
    masked   BERT-style masked LM: 15% of positions are chosen; of those 80% become the mask
             token, 10% a random token, 10% stay as they are; attention is bidirectional and
             the loss is taken on the chosen positions only (predicting the original token).
    span     T5's span corruption for an encoder-decoder (span.py): 15% of tokens in spans of
             mean length 3 become sentinels in the encoder's input; the decoder writes the spans.
    prefix   prefix LM (T5/UniLM style): a prefix length L is drawn per row; attention is
             bidirectional over x[:L] and causal after it; the loss covers only the tokens
             after the prefix, i.e. positions L-1 .. T-1 (position t predicts token t+1, and
             position L-1 is the last one that has not seen token L).
The mask token for MLM: if the tokenizer defines "<|mask|>" we use its id; otherwise the
model's vocabulary gets one extra row and the mask id is the tokenizer's `n_vocab` (an id no
text can ever encode to).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # targets with this value carry no loss (F.cross_entropy's convention)
MASK_TOKEN = "<|mask|>"


@dataclass
class Batch:
    """One LM input. `targets[b, t]` is the token position t must predict, or IGNORE_INDEX."""
    input_ids: Tensor                 # (B, T) long
    targets: Tensor                   # (B, T) long
    prefix_lens: Tensor | None = None  # (B,) long, only for the prefix LM

    def to(self, device: torch.device) -> "Batch":
        pl = None if self.prefix_lens is None else self.prefix_lens.to(device, non_blocking=True)
        return Batch(self.input_ids.to(device, non_blocking=True), self.targets.to(device, non_blocking=True), pl)

    @property
    def n_loss_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy over positions whose target is not IGNORE_INDEX. logits (B, T, V)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


class Objective:
    """The protocol with its defaults (see the module docstring). Subclasses define `loss`."""
    name = "custom"
    model_mask: str | None = None
    token_nll = False

    def prepare(self, raw: Any, generator: torch.Generator) -> Any:
        return raw

    def loss(self, model, batch) -> tuple[Tensor, dict]:
        raise NotImplementedError(f"{type(self).__name__} must define loss(model, batch) -> (loss, metrics)")

    def tokens(self, batch) -> int:
        """Input tokens of `batch`: its `input_ids` (attribute or key), else the first tensor of
        an (x, y, ...) tuple; 0 when neither is there (override it for other batch types)."""
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
            return batch[0].numel()
        ids = batch.get("input_ids") if isinstance(batch, dict) else getattr(batch, "input_ids", None)
        return ids.numel() if isinstance(ids, Tensor) else 0

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass


class _FunctionObjective(Objective):
    def __init__(self, fn: Callable):
        self.fn, self.name = fn, getattr(fn, "__name__", "custom")

    def loss(self, model, batch):
        return self.fn(model, batch)


def as_objective(obj) -> Objective:
    """An `Objective` as is; a plain function `fn(model, batch) -> (loss, metrics)` wrapped."""
    if isinstance(obj, Objective):
        return obj
    if callable(obj):
        return _FunctionObjective(obj)
    raise TypeError(f"objective must be an Objective or a function (model, batch) -> (loss, metrics), "
                    f"got {type(obj).__name__}")


class CausalLM(Objective):
    """Next-token prediction. Also the SFT objective: pass `Batch`es with IGNORE_INDEX targets."""
    name = "causal"
    model_mask = "causal"
    token_nll = True

    def make_batch(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Batch:
        return Batch(x, y)

    def prepare(self, raw, generator: torch.Generator) -> Batch:
        if isinstance(raw, Batch):
            return raw
        x, y = raw
        return self.make_batch(x, y, generator)

    def forward(self, model, batch: Batch) -> Tensor:
        """Run the model and return logits (B, T, V)."""
        if batch.prefix_lens is not None:
            return model(batch.input_ids, prefix_lens=batch.prefix_lens)
        return model(batch.input_ids)

    def loss(self, model, batch: Batch) -> tuple[Tensor, dict]:
        return token_loss(self.forward(model, batch), batch.targets), {}


class MaskedLM(CausalLM):
    """BERT-style masked LM. `vocab_size` bounds the random replacement tokens."""
    name = "masked"
    model_mask = "bidirectional"

    def __init__(self, mask_id: int, vocab_size: int, mask_prob: float = 0.15):
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        self.mask_id, self.vocab_size, self.mask_prob = mask_id, vocab_size, mask_prob

    @staticmethod
    def corrupt(x: Tensor, selected: Tensor, action: Tensor, random_tokens: Tensor, mask_id: int) -> Batch:
        """The pure part: apply chosen positions and actions. Shapes all (B, T).

        selected: bool, positions that get a loss; action: 0 = replace by mask_id,
        1 = replace by random_tokens, 2 = keep. Targets are the originals at selected positions."""
        inputs = x.clone()
        inputs = torch.where(selected & (action == 0), torch.full_like(x, mask_id), inputs)
        inputs = torch.where(selected & (action == 1), random_tokens, inputs)
        targets = torch.where(selected, x, torch.full_like(x, IGNORE_INDEX))
        return Batch(inputs, targets)

    def make_batch(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Batch:
        B, T = x.shape
        # Exactly round(p*T) positions per row (at least 1), so every row has a loss.
        k = max(1, round(self.mask_prob * T))
        order = torch.rand(B, T, generator=generator).argsort(dim=1)
        selected = torch.zeros(B, T, dtype=torch.bool)
        selected.scatter_(1, order[:, :k], True)
        u = torch.rand(B, T, generator=generator)
        action = torch.where(u < 0.8, 0, torch.where(u < 0.9, 1, 2))  # 80 / 10 / 10
        random_tokens = torch.randint(0, self.vocab_size, (B, T), generator=generator)
        return self.corrupt(x, selected, action, random_tokens, self.mask_id)


class PrefixLM(CausalLM):
    """Prefix LM: prefix length L ~ Uniform{1, ..., T-1} per row; loss on positions >= L-1."""
    name = "prefix"
    model_mask = "prefix"

    @staticmethod
    def targets_for(y: Tensor, prefix_lens: Tensor) -> Tensor:
        """Keep y[b, t] for t >= L_b - 1 (predicting tokens after the prefix), ignore the rest."""
        T = y.size(1)
        t = torch.arange(T).unsqueeze(0)                    # (1, T)
        keep = t >= (prefix_lens.unsqueeze(1) - 1)          # (B, T)
        return torch.where(keep, y, torch.full_like(y, IGNORE_INDEX))

    def make_batch(self, x: Tensor, y: Tensor, generator: torch.Generator) -> Batch:
        B, T = x.shape
        if T < 2:
            raise ValueError("the prefix LM needs seq_len >= 2")
        prefix_lens = torch.randint(1, T, (B,), generator=generator)
        return Batch(x, self.targets_for(y, prefix_lens), prefix_lens)


def attention_allowed(kind: str, T: int, prefix_lens: Tensor | None = None) -> Tensor:
    """Reference mask (B or 1, T, T): query i may attend key j. Used by tests and docs."""
    i = torch.arange(T).view(T, 1)
    j = torch.arange(T).view(1, T)
    causal = (j <= i).unsqueeze(0)
    if kind == "causal":
        return causal
    if kind == "bidirectional":
        return torch.ones(1, T, T, dtype=torch.bool)
    if kind == "prefix":
        return causal | (j.unsqueeze(0) < prefix_lens.view(-1, 1, 1))
    raise ValueError(f"unknown mask kind {kind!r}")


OBJECTIVES = ("causal", "masked", "prefix", "span")
SPAN_SENTINELS = 100   # span: T5's <extra_id_0..99>, extra rows at the top of the vocabulary


def build_objective(name: str, tokenizer_specials: dict[str, int] | None, n_vocab: int,
                    mask_prob: float = 0.15) -> tuple[Objective, int]:
    """The pretraining objective `name` and the model vocabulary size it needs (MLM may add a row)."""
    if name == "causal":
        return CausalLM(), n_vocab
    if name == "prefix":
        return PrefixLM(), n_vocab
    if name == "span":       # an encoder-decoder objective (span.py): the sentinels get rows of their own
        from lmstack.train.span import SpanCorruption
        return SpanCorruption(n_vocab + SPAN_SENTINELS, SPAN_SENTINELS, text_vocab=n_vocab), n_vocab + SPAN_SENTINELS
    if name == "masked":
        specials = tokenizer_specials or {}
        if MASK_TOKEN in specials:
            return MaskedLM(specials[MASK_TOKEN], n_vocab, mask_prob), n_vocab
        return MaskedLM(n_vocab, n_vocab, mask_prob), n_vocab + 1
    raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
