"""Span corruption: T5's pretraining objective (Raffel et al. 2020, §3.1.4) for an EncoderDecoder.

From each packed row of T tokens, round(T * noise_density) tokens are dropped, in spans of
mean length `mean_span`. The encoder reads the row with each dropped span replaced by one
sentinel; the decoder writes, for each span in order, its sentinel and then the span's
tokens, and a last sentinel to close (the paper's "Thank you <X> me to your party <Y> week."
-> "<X> for inviting <Y> last <Z>"). Sentinels are ids taken from the top of the vocabulary:
<extra_id_0> = vocab_size - 1, <extra_id_1> = vocab_size - 2, ...

The noise follows T5's `random_spans_noise_mask`: the number of noise tokens and of spans
depends only on T (so every row of a batch has the same encoder and decoder lengths and
nothing is padded); the noise and the kept tokens are each cut into that many non-empty
spans at random, and a row starts with kept tokens, then alternates.

    obj = SpanCorruption(vocab_size=4196, n_sentinels=100, text_vocab=4096)
    batch = obj.prepare((x, y), generator)       # Seq2SeqBatch: input_ids, decoder_input_ids, targets
    loss, metrics = obj.loss(model, batch)       # model(input_ids, decoder_input_ids=...) -> logits

The same Seq2SeqBatch carries plain input -> output pairs (`Seq2SeqLM`), e.g. tinyworld's
instruction tasks: targets are the output + EOS, padded with IGNORE_INDEX.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lmstack.train.objectives import IGNORE_INDEX, Objective, token_loss
from lmstack.utils import LmstackError


@dataclass
class Seq2SeqBatch:
    """One encoder-decoder input. The decoder reads decoder_input_ids (the targets shifted right
    behind decoder_start_id) and predicts targets (IGNORE_INDEX = no loss)."""
    input_ids: Tensor                        # (B, S) long, the encoder's input
    decoder_input_ids: Tensor                # (B, L) long
    targets: Tensor                          # (B, L) long
    attention_mask: Tensor | None = None     # (B, S) 1 = token, 0 = padding; None = no padding

    def to(self, device: torch.device) -> "Seq2SeqBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Seq2SeqBatch(move(self.input_ids), move(self.decoder_input_ids), move(self.targets),
                            move(self.attention_mask))


def shift_right(targets: Tensor, start_id: int) -> Tensor:
    """Teacher forcing: decoder inputs are start_id, then the targets but the last (an ignored
    target becomes start_id)."""
    out = torch.full_like(targets, start_id)
    out[:, 1:] = targets[:, :-1]
    return out.masked_fill(out == IGNORE_INDEX, start_id)


def noise_counts(T: int, noise_density: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of a row of T tokens, as T5 counts them."""
    n_noise = min(max(round(T * noise_density), 1), T - 1)
    n_spans = max(min(round(n_noise / mean_span), n_noise, T - n_noise), 1)
    return n_noise, n_spans


def _segment(n_items: int, n_segments: int, generator: torch.Generator) -> Tensor:
    """Lengths (n_segments,) of a uniformly random cut of n_items into non-empty segments."""
    cuts = torch.randperm(n_items - 1, generator=generator)[:n_segments - 1].sort().values + 1
    bounds = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([n_items])])
    return bounds.diff()


def noise_mask(T: int, noise_density: float, mean_span: float, generator: torch.Generator) -> Tensor:
    """(T,) bool: True where a token is dropped (part of a noise span)."""
    n_noise, n_spans = noise_counts(T, noise_density, mean_span)
    keep, noise = _segment(T - n_noise, n_spans, generator), _segment(n_noise, n_spans, generator)
    lengths = torch.stack([keep, noise], dim=1).flatten()                  # keep0 noise0 keep1 noise1 ...
    flags = torch.tensor([False, True]).repeat(n_spans)
    return flags.repeat_interleave(lengths)


def corrupt(x: Tensor, noise: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """The pure part, for one row: tokens x (T,) and noise (T,) bool -> (encoder input, targets).
    Span k's sentinel is vocab_size - 1 - k."""
    starts = noise & ~torch.cat([torch.zeros(1, dtype=torch.bool), noise[:-1]])   # each span's first token
    n_spans = int(starts.sum())
    sentinel = vocab_size - starts.long().cumsum(0)             # vocab_size - 1 - (span index), in a span
    enc = torch.where(starts, sentinel, x)[~noise | starts]     # a span collapses to its sentinel
    # targets: the noise tokens in order, each span's sentinel in front of its first token
    at = noise.nonzero()[:, 0]                                  # positions of the noise tokens
    first = starts[at]
    slot = torch.arange(at.numel()) + first.long().cumsum(0)    # token i lands after the sentinels so far
    tgt = torch.empty(at.numel() + n_spans + 1, dtype=torch.long)
    tgt[slot] = x[at]
    tgt[slot[first] - 1] = sentinel[at][first]
    tgt[-1] = vocab_size - 1 - n_spans                          # the closing sentinel
    return enc, tgt


class Seq2SeqObjective(Objective):
    """Cross-entropy of an encoder-decoder's logits on Seq2SeqBatch targets (the base of both)."""
    model_mask = "causal"              # the decoder's self-attention
    model_arch = "encoder-decoder"     # the Trainer builds an EncoderDecoder for it
    token_nll = True

    def loss(self, model, batch: Seq2SeqBatch) -> tuple[Tensor, dict]:
        logits = model(batch.input_ids, decoder_input_ids=batch.decoder_input_ids,
                       attention_mask=batch.attention_mask)
        return token_loss(logits, batch.targets), {}


class Seq2SeqLM(Seq2SeqObjective):
    """Plain input -> output pairs: the batch source yields Seq2SeqBatch (see `pairs_batch`)."""
    name = "seq2seq"

    def prepare(self, raw, generator: torch.Generator) -> Seq2SeqBatch:
        if not isinstance(raw, Seq2SeqBatch):
            raise LmstackError(f"the seq2seq objective needs Seq2SeqBatch inputs (pairs_batch), got "
                               f"{type(raw).__name__}")
        return raw


class SpanCorruption(Seq2SeqObjective):
    """T5's span corruption over packed `(x, y)` rows (y is unused: the targets are the spans)."""
    name = "span"

    def __init__(self, vocab_size: int, n_sentinels: int = 100, text_vocab: int | None = None,
                 noise_density: float = 0.15, mean_span: float = 3.0, decoder_start_id: int = 0):
        text_vocab = vocab_size - n_sentinels if text_vocab is None else text_vocab
        if not isinstance(n_sentinels, int) or n_sentinels < 2:
            raise LmstackError(f"n_sentinels={n_sentinels!r} must be an int >= 2 (one per span and one to close)")
        if n_sentinels > vocab_size - text_vocab:
            raise LmstackError(f"n_sentinels={n_sentinels} does not fit: the sentinels take the top ids of "
                               f"vocab_size={vocab_size} and the text uses ids [0, {text_vocab}), which leaves room "
                               f"for {max(vocab_size - text_vocab, 0)}; lower n_sentinels or grow the vocabulary")
        if not 0.0 < noise_density < 1.0:
            raise LmstackError(f"noise_density={noise_density} must be in (0, 1) (T5: 0.15)")
        if mean_span < 1.0:
            raise LmstackError(f"mean_span={mean_span} must be >= 1 (T5: 3)")
        self.vocab_size, self.n_sentinels = vocab_size, n_sentinels
        self.noise_density, self.mean_span, self.decoder_start_id = noise_density, mean_span, decoder_start_id

    def make_batch(self, x: Tensor, generator: torch.Generator) -> Seq2SeqBatch:
        B, T = x.shape
        if T < 2:
            raise LmstackError(f"span corruption needs seq_len >= 2, got {T}")
        _, n_spans = noise_counts(T, self.noise_density, self.mean_span)
        if n_spans + 1 > self.n_sentinels:
            raise LmstackError(f"seq_len={T} gives {n_spans} noise spans per row, which need {n_spans + 1} "
                               f"sentinels, but n_sentinels={self.n_sentinels}; lower seq_len or raise n_sentinels")
        first_sentinel = self.vocab_size - self.n_sentinels
        if x.numel() and int(x.max()) >= first_sentinel:
            raise LmstackError(f"token id {int(x.max())} collides with the sentinel ids [{first_sentinel}, "
                               f"{self.vocab_size}); the data's vocabulary is larger than the text vocabulary")
        rows = [corrupt(x[b], noise_mask(T, self.noise_density, self.mean_span, generator), self.vocab_size)
                for b in range(B)]
        enc, tgt = torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])
        return Seq2SeqBatch(enc, shift_right(tgt, self.decoder_start_id), tgt)

    def prepare(self, raw, generator: torch.Generator) -> Seq2SeqBatch:
        if isinstance(raw, Seq2SeqBatch):
            return raw
        return self.make_batch(raw[0], generator)


def pairs_batch(pairs: list[tuple[list[int], list[int]]], eos_id: int, decoder_start_id: int = 0,
                pad_id: int = 0) -> Seq2SeqBatch:
    """Input -> output id lists -> one padded Seq2SeqBatch (targets = output + EOS)."""
    S = max(len(a) for a, _ in pairs)
    L = max(len(b) for _, b in pairs) + 1
    x = torch.full((len(pairs), S), pad_id, dtype=torch.long)
    mask = torch.zeros(len(pairs), S, dtype=torch.long)
    y = torch.full((len(pairs), L), IGNORE_INDEX, dtype=torch.long)
    for i, (a, b) in enumerate(pairs):
        x[i, :len(a)], mask[i, :len(a)] = torch.tensor(a, dtype=torch.long), 1
        y[i, :len(b) + 1] = torch.tensor(list(b) + [eos_id], dtype=torch.long)
    return Seq2SeqBatch(x, shift_right(y, decoder_start_id), y, mask)
