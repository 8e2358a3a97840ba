"""SFT batches: tokenized chats laid out in rows, by padding or by packing, as tensors.

    rows = pack_rows([len(ex) - 1 for ex in examples], seq_len)   # [[0, 1], [2], [3, 4, 5]]: indices per row
    batch = collate([[examples[i] for i in row] for row in rows[:8]], loss_scale=1 / n, packed=True)
    loss = (sum over trained positions of -log p(target)) * batch.loss_scale

An example (lmstack.data.SFTExample) of n ids trains as x = ids[:-1], y = labels[1:]: n - 1
positions, with IGNORE_INDEX where the loss mask is 0 (prompt, headers, glue).

Padding: one example per row, rows right-padded to the longest in the batch. Nothing needs
masking: under causal attention a real token never sees the padding after it, and padding
carries no loss. The model runs with its default positions and its fast causal path.

Packing: several examples share a row, one after another, so short chats do not pay for
padding. Each example must still see only itself: its positions restart at 0 (`positions`)
and attention is block-diagonal (`segments`: which example of the row a token belongs to,
-1 on padding), which the model applies from its `segment_ids` argument.

Either way the batch's loss is the token-weighted mean over its examples, exactly what the
examples give one at a time (tests check it to 1e-5): the loss is a sum of token NLLs times
`loss_scale`, and the batch source (sft.py) sets loss_scale from the number of trained
tokens in the whole global batch, so accumulation and DDP ranks average like one big batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from lmstack.data.chat_examples import IGNORE_INDEX, SFTExample

PAD_ID = 0  # any valid id: padding is never attended to by a real token and carries no loss


@dataclass
class SFTBatch:
    """One micro-batch. All tensors (B, T) long."""
    input_ids: Tensor
    targets: Tensor                  # token to predict at each position, IGNORE_INDEX where no loss
    positions: Tensor | None         # packing: per-example positions, -1 on padding; None: 0..T-1
    segments: Tensor | None          # packing: example index within the row, -1 on padding
    loss_scale: float                # loss = (sum of token NLLs) * loss_scale
    n_tokens: int                    # real (non-padding) input tokens, for tokens/s
    loss_index: Tensor | None = None  # (N,) flat indices b * T + t of the trained positions

    def __post_init__(self):
        if self.loss_index is None:
            self.loss_index = (self.targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)

    def to(self, device: torch.device) -> "SFTBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return SFTBatch(move(self.input_ids), move(self.targets), move(self.positions), move(self.segments),
                        self.loss_scale, self.n_tokens, move(self.loss_index))

    @property
    def packed(self) -> bool:
        return self.segments is not None

    @property
    def n_loss_tokens(self) -> int:
        return int((self.targets != IGNORE_INDEX).sum())


def trained_positions(ex: SFTExample) -> int:
    """Positions of `ex` that carry a loss (its labels[1:] that are not IGNORE_INDEX)."""
    return sum(ex.loss_mask[1:])


def pack_rows(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Examples (input lengths, in the order given) packed greedily into rows of <= seq_len
    positions: each goes into the current row if it fits, else starts the next one. Keeping
    the order (no bin-packing search) keeps the data order the sampler decided."""
    rows, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if n > seq_len:
            raise ValueError(f"example {i} has {n} input positions, more than seq_len={seq_len}")
        if current and used + n > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows


def collate(rows: Sequence[Sequence[SFTExample]], loss_scale: float, packed: bool) -> SFTBatch:
    """Rows of examples -> an SFTBatch right-padded to its longest row. With packed=False each
    row must hold one example and no positions/segments are made."""
    inputs = [[ex.inputs_and_targets() for ex in row] for row in rows]
    T = max(sum(len(x) for x, _ in row) for row in inputs)
    B = len(rows)
    ids = torch.full((B, T), PAD_ID, dtype=torch.long)
    tgt = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    pos = torch.full((B, T), -1, dtype=torch.long) if packed else None
    seg = torch.full((B, T), -1, dtype=torch.long) if packed else None
    n_tokens = 0
    for b, row in enumerate(inputs):
        if not packed and len(row) != 1:
            raise ValueError(f"row {b} holds {len(row)} examples; padding puts one example per row")
        t = 0
        for s, (x, y) in enumerate(row):
            n = len(x)
            ids[b, t:t + n] = torch.tensor(x)
            tgt[b, t:t + n] = torch.tensor(y)
            if packed:
                pos[b, t:t + n] = torch.arange(n)
                seg[b, t:t + n] = s
            t += n
        n_tokens += t
    return SFTBatch(ids, tgt, pos, seg, loss_scale, n_tokens)
