"""The encoder-decoder (arch="encoder-decoder", T5): an encoder stack, and the Transformer's own
blocks, built with cross-attention, as the decoder. One token embedding serves both.

    model = EncoderDecoder(ModelConfig.preset("t5-tiny"))
    logits = model(input_ids, decoder_input_ids=dec)                 # (B, T_dec, vocab_size)
    memory = model.encode(input_ids, attention_mask)                 # once per request
    logits = model.decode(dec_step, memory, positions=pos, cache=kv) # each step, KV-cached

What it adds to the Transformer is only the topology (STYLE.md §13):
  - `encoder`: n_encoder_layer Blocks over the shared embedding, always bidirectional, with
    the encoder's padding (attention_mask) hidden from every query, its own final norm and
    its own relative-bias table (bidirectional buckets; the decoder's is past-only);
  - the decoder blocks' cross-attention reads an `EncoderMemory`: the encoder's output and,
    per decoder layer, its K/V, projected once in `encode` (a request's decoding steps then
    reuse them; only the decoder's self-attention grows a KV cache).
The encoder has no LM head: the logits are the decoder's. Generation: seq2seq.py.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmstack.model.attention import AttnContext, EncoderMemory
from lmstack.model.config import ModelConfig
from lmstack.model.layers import make_norm
from lmstack.model.transformer import Block, Transformer, positions_from_mask, relative_bias
from lmstack.utils import LmstackError


class EncoderStack(nn.Module):
    """n_encoder_layer bidirectional Blocks, a final norm (pre-norm) and a relative-bias table."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_encoder_layer))
        self.norm_f = make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity()
        self.rel_bias = relative_bias(cfg, bidirectional=True)

    def forward(self, x: Tensor, ctx: AttnContext) -> Tensor:
        for block in self.blocks:
            x = block(x, ctx)
        return self.norm_f(x)


class EncoderDecoder(Transformer):
    ARCH = "encoder-decoder"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)          # the decoder: wte (shared), blocks with cross-attention, norm_f, lm_head
        self.encoder = EncoderStack(cfg)
        self._init_params(self.encoder, cfg.n_encoder_layer)

    def encode(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> EncoderMemory:
        """input_ids (B, S) [+ attention_mask (B, S), 1 = token, 0 = padding] -> the memory the
        decoder reads: the encoder's output and every decoder layer's cross-attention K/V."""
        positions = None if attention_mask is None else positions_from_mask(attention_mask, tuple(input_ids.shape))
        x, ctx = self._embed(input_ids, positions, None, None, encoder=self.encoder)
        hidden = self.encoder(x, ctx)                                              # (B, S, C)
        kv = [block.cross_attn.project_memory(hidden) for block in self.blocks]
        return EncoderMemory(ctx.positions, kv, hidden)

    def decode(self, decoder_input_ids: Tensor, memory: EncoderMemory, positions: Tensor | None = None,
               cache=None, logits_indices: Tensor | None = None) -> Tensor:
        """The decoder over `memory`: decoder_input_ids (B, T) -> logits (B, T, vocab_size).
        positions, cache, logits_indices: as Transformer.forward (a KV cache holds the decoder's
        self-attention only; cross-attention K/V are in `memory`)."""
        if not isinstance(memory, EncoderMemory):
            raise TypeError(f"memory must be the EncoderMemory that encode() returns, got {type(memory).__name__}")
        x, ctx = self._embed(decoder_input_ids, positions, cache, None, memory=memory)
        if memory.positions.shape[0] != x.shape[0]:
            raise ValueError(f"the encoder's output has {memory.positions.shape[0]} rows but decoder_input_ids has "
                             f"{x.shape[0]}; give each decoder row its encoder row (EncoderMemory.repeat_interleave)")
        return self._run_blocks(x, ctx, logits_indices)

    def forward(self, input_ids: Tensor, decoder_input_ids: Tensor | None = None,
                attention_mask: Tensor | None = None, decoder_positions: Tensor | None = None, cache=None,
                logits_indices: Tensor | None = None, memory: EncoderMemory | None = None) -> Tensor:
        """input_ids (B, S) for the encoder, decoder_input_ids (B, T) -> the decoder's logits
        (B, T, vocab_size). attention_mask (B, S): the encoder's padding (1 = token). `memory`:
        an encode() result to reuse instead of encoding input_ids again."""
        if decoder_input_ids is None:
            raise LmstackError("an encoder-decoder is called as model(input_ids, decoder_input_ids=...): the "
                               "logits are the decoder's (T5 starts decoder inputs with decoder_start_id="
                               f"{self.config.decoder_start_id}, then the targets shifted right)")
        if memory is None:
            memory = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, memory, decoder_positions, cache, logits_indices)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token as Transformer.flops_per_token counts them, with encoder and
        decoder inputs both seq_len long: 6 * N plus the attention of the encoder's layers, the
        decoder's self-attention and its cross-attention (12 * H * D * T each per layer)."""
        cfg = self.config
        T = cfg.context_length if seq_len is None else seq_len
        attn_layers = cfg.n_encoder_layer + 2 * cfg.n_layer
        return 6 * self.num_active_params() + 12 * attn_layers * cfg.n_head * cfg.head_dim * T

    @torch.no_grad()
    def introspect(self, ids: Tensor, positions: Tensor | None = None, prefix_lens: Tensor | None = None) -> dict:
        raise LmstackError("introspect() shows a decoder-only or encoder model's attention; an encoder-decoder "
                           "has two stacks and cross-attention, which it does not draw")

    def shift_right(self, labels: Tensor, ignore_index: int = -100) -> Tensor:
        """Targets (B, T) -> decoder inputs (B, T): decoder_start_id, then the targets but the
        last (teacher forcing). Ignored target positions (ignore_index) become decoder_start_id."""
        start = self.config.decoder_start_id
        out = torch.full_like(labels, start)
        out[:, 1:] = labels[:, :-1]
        return out.masked_fill(out == ignore_index, start)
