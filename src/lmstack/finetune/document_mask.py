"""Block-diagonal (document-masked) attention for packed SFT rows, without touching the model.

    with document_mask(model, segments):       # segments (B, T): example index in the row, -1 = padding
        logits = model(ids, positions=positions)   # positions restart at 0 for every example

Why this file exists. The model decides who attends to whom from positions alone (model/
cache.py): key s is visible to query t iff k_pos <= q_pos. No choice of positions can keep
two examples of one row apart: example 2's token at position 3 would see example 1's tokens
at positions 0..3. Proof: with examples a and b in one row, k(a0) <= q(a0) < k(b0) <=
q(b0) < k(a0) would be needed. So packing needs one more input than positions.

Until the model takes one (the change that would replace this file: an optional
`segment_ids (B, T)` on Transformer.forward carried in AttnContext, with
`visible &= seg_q == seg_k` in attention.build_mask), the mask enters through a documented
field of the attention context: `AttnContext.rel_bias`, an additive bias (q_pos, k_pos) ->
(B, H, T, S) that build_mask adds to the scores (and fills with -inf where the position
rule hides a key). A forward pre-hook on every attention module sets it, for the duration of
one forward, to 0 within an example and -inf across examples, added to whatever the model
itself uses there (T5's relative bias, ALiBi's slopes, which build_mask skips once a
rel_bias is present). The hooks are registered on the modules inside any wrapper (DDP,
torch.compile's OptimizedModule), so DDP's gradient hooks and forward see the normal call.

tests/finetune/test_sft.py checks the result against examples run one at a time, so a
change in how the model builds its masks that broke this shows up as a loss mismatch.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


class SegmentBias:
    """(q_pos, k_pos) -> additive bias (B, H or 1, T, T): 0 where query and key belong to the
    same example of the row, -inf elsewhere; plus the bias the model had there."""

    def __init__(self, segments: Tensor, inner=None, slopes: Tensor | None = None):
        self.segments, self.inner, self.slopes = segments, inner, slopes

    def __call__(self, q_pos: Tensor, k_pos: Tensor) -> Tensor:
        seg = self.segments
        if q_pos.shape != seg.shape or k_pos.shape != seg.shape:
            raise ValueError(f"document masking needs a forward without a KV cache: queries {tuple(q_pos.shape)} "
                             f"and keys {tuple(k_pos.shape)} must both match segments {tuple(seg.shape)}")
        same = seg[:, :, None] == seg[:, None, :]                                       # (B, T, T)
        bias = torch.zeros(same.shape, dtype=torch.float32, device=seg.device)
        bias = bias.masked_fill(~same, float("-inf")).unsqueeze(1)                      # (B, 1, T, T)
        if self.slopes is not None:   # ALiBi: -slope_h * |q_pos - k_pos|, as build_mask would add
            dist = (q_pos[:, :, None] - k_pos[:, None, :]).abs().unsqueeze(1).float()   # (B, 1, T, T)
            bias = bias - self.slopes.to(seg.device)[None, :, None, None] * dist        # (B, H, T, T)
        if self.inner is not None:    # the model's own relative-position bias (T5)
            bias = bias + self.inner(q_pos, k_pos).float()
        return bias


def attention_modules(model: nn.Module) -> list[nn.Module]:
    from lmstack.model.attention import Attention
    return [m for m in model.modules() if isinstance(m, Attention)]


@contextlib.contextmanager
def document_mask(model: nn.Module, segments: Tensor):
    """Within the block, forwards of `model` attend only within each example of a row."""
    mods = attention_modules(model)
    if not mods:
        raise TypeError(f"{type(model).__name__} has no lmstack attention modules to mask")

    def hook(module, args):
        ctx = args[1]
        if not isinstance(ctx.rel_bias, SegmentBias):   # once per forward: every layer shares ctx
            ctx.rel_bias = SegmentBias(segments, ctx.rel_bias, ctx.slopes)
    handles = [m.register_forward_pre_hook(hook) for m in mods]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
