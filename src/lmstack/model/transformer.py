"""The one Transformer: token (+ position) embeddings, n_layer Blocks, final norm, LM head.

It is the decoder-only model (arch="decoder") and the base of the other two architecture
types, which add only what their topology adds (STYLE.md §1, §13): `Encoder` (encoder.py)
its masked-LM head, pooling and classifier; `EncoderDecoder` (encoder_decoder.py) an encoder
stack, while this class's own blocks, built with cross-attention, become the decoder.

    model = Transformer(ModelConfig.preset("tiny"))
    logits = model(ids)                                   # (B, T) -> (B, T, vocab_size)
    logits = model(ids, positions=pos, cache=kv)          # incremental decoding, see cache.py
    logits = model(ids, logits_indices=idx)               # (N,) flat b*T+t -> (N, vocab_size)
    logits = model(ids, positions=pos, segment_ids=seg)   # packed documents, each attending to itself
    model.introspect(ids)["attentions"][layer]            # (B, H, T, T) attention weights

Every family difference is a config field (config.py). Init follows GPT-2: weights
N(0, init_std), biases 0, and the two residual output projections of each block (attention
`proj`, MLP `proj`) N(0, init_std / sqrt(2 * n_layer)) so the residual stream's variance
does not grow with depth (GPT-2 paper §2.3).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from lmstack.model import checkpoint
from lmstack.model.attention import Attention, AttnContext, CrossAttention, EncoderMemory, make_slopes
from lmstack.model.config import ConfigError, ModelConfig, check_arch
from lmstack.model.layers import MLP, make_norm
from lmstack.model.moe import MoE, load_balancing_loss, router_z_loss
from lmstack.model.positions import RelativePositionBias, RotaryEmbedding, sinusoidal_embedding
from lmstack.utils import LmstackError


class Block(nn.Module):
    """Self-attention and MLP sublayers (and, in an encoder-decoder's decoder, cross-attention
    between them), each with a residual connection.

    pre-norm:  x = x + attn(norm1(x));  [x = x + cross(norm_c(x))];  x = x + mlp(norm2(x))
    post-norm: x = norm1(x + attn(x));  [x = norm_c(x + cross(x))];  x = norm2(x + mlp(x))
    (post-norm is the original Add & Norm)
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, cross_attention: bool = False):
        super().__init__()
        if cross_attention and not cfg.cross_attention:
            raise ConfigError(f"a Block with cross-attention needs an encoder to attend to, and arch={cfg.arch!r} "
                              f"has none; set arch='encoder-decoder'")
        self.pre_norm = cfg.norm_placement == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx)
        if cross_attention:
            self.cross_norm = make_norm(cfg)
            self.cross_attn = CrossAttention(cfg, layer_idx)
        else:
            self.cross_attn = None
        self.mlp_norm = make_norm(cfg)
        self.mlp = MoE(cfg) if cfg.n_expert else MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, ctx: AttnContext, keep: Tensor | None = None) -> Tensor:
        """x (B, T, C) -> (B, T, C); with `keep` (N,) flat indices b * T + t, only those rows
        go on after the attention sublayers: (1, N, C). Exact, since everything after
        attention is per token (Transformer.forward's prune_last_block); with plain causal
        self-attention (pre-norm, no cross-attention) only those rows' queries attend too,
        while every row's keys and values are computed (and cached)."""
        drop = _dropout_or_identity(self.drop, self.training)
        if keep is not None and self.pre_norm and self.cross_attn is None and ctx.plain_causal:
            # the kept rows' queries only: keys and values of every row still reach the cache
            x = _rows(x, keep) + drop(self.attn(self.attn_norm(x), ctx, keep=keep))
            return x + drop(self.mlp(self.mlp_norm(x)))
        if self.pre_norm:
            x = x + drop(self.attn(self.attn_norm(x), ctx))
            if self.cross_attn is not None:
                x = x + drop(self.cross_attn(self.cross_norm(x), ctx))
            x = x if keep is None else _rows(x, keep)
            return x + drop(self.mlp(self.mlp_norm(x)))
        x = self.attn_norm(x + drop(self.attn(x, ctx)))
        if self.cross_attn is not None:
            x = self.cross_norm(x + drop(self.cross_attn(x, ctx)))
        x = x if keep is None else _rows(x, keep)
        return self.mlp_norm(x + drop(self.mlp(x)))


def _rows(x: Tensor, keep: Tensor) -> Tensor:
    """(B, T, C) -> (1, N, C): the rows at flat indices `keep` (a batch of one row, the
    shape an MoE layer takes)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, keep).unsqueeze(0)


def _identity(x: Tensor) -> Tensor:
    return x


def _dropout_or_identity(drop: nn.Module, training: bool):
    """The dropout module, or a plain function when it would be a no-op (eval, or p = 0): at
    batch-1 decode each module call costs microseconds of Python, a tiny model's step ~50 of them."""
    return drop if training and getattr(drop, "p", 1.0) > 0 else _identity


def relative_bias(cfg: ModelConfig, bidirectional: bool) -> RelativePositionBias | None:
    """A stack's relative-position table (pos_emb="relative"), or None."""
    if cfg.pos_emb != "relative":
        return None
    return RelativePositionBias(cfg.n_head, cfg.rel_num_buckets, cfg.rel_max_distance, bidirectional, cfg.init_std)


def positions_from_mask(attention_mask: Tensor, shape: tuple[int, int]) -> Tensor:
    """A Hugging Face style attention_mask (B, T) of 1 (token) / 0 (padding) -> positions
    (B, T): 0..T-1 where there is a token, -1 at padding (never attended). Tokens keep their
    index as position whichever side the padding is on, as Hugging Face's BERT and T5 do."""
    if tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(shape)}, got "
                         f"{tuple(attention_mask.shape)}")
    if not torch.compiler.is_compiling() and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError("attention_mask must hold 1 (attend) and 0 (padding) only")
    T = shape[1]
    pos = torch.arange(T, device=attention_mask.device).expand(shape)
    return torch.where(attention_mask.bool(), pos, torch.full_like(pos, -1))


def _check_logits_indices(idx: Tensor, n_positions: int) -> None:
    if idx.dim() != 1 or idx.dtype not in (torch.long, torch.int32):
        raise ValueError(f"logits_indices must be a 1-D integer tensor of flat indices b * T + t, got "
                         f"{tuple(idx.shape)} of {idx.dtype}")
    if not torch.compiler.is_compiling() and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_positions):
        raise ValueError(f"logits_indices must lie in [0, B*T={n_positions}); got values from {int(idx.min())} "
                         f"to {int(idx.max())}")


class Transformer(nn.Module):
    ARCH = "decoder"   # the ModelConfig.arch this class builds (subclasses: their own)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_arch(cfg, self.ARCH, type(self).__name__)
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.context_length, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.wtt = nn.Embedding(cfg.n_token_types, cfg.n_embd) if cfg.n_token_types else None  # token types
        self.norm_emb = make_norm(cfg) if cfg.embed_norm else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i, cross_attention=cfg.cross_attention) for i in range(cfg.n_layer))
        # post-norm blocks end in a norm already; pre-norm needs one before the head
        self.norm_f = make_norm(cfg) if cfg.norm_placement == "pre" else nn.Identity()
        self.rel_bias = relative_bias(cfg, bidirectional=cfg.mask != "causal")
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg) if cfg.pos_emb == "rope" else None
        self._init_params(self, cfg.n_layer)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight

    def _init_params(self, module: nn.Module, n_layer: int) -> None:
        """GPT-2's init of `module`'s linears and embeddings (see the file's docstring)."""
        module.apply(self._init_weights)
        resid_std = self.config.init_std / math.sqrt(2 * n_layer)
        for name, p in module.named_parameters():
            if name.endswith("proj.weight"):  # attn.proj, cross_attn.proj, mlp.proj, experts' proj
                nn.init.normal_(p, mean=0.0, std=resid_std)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)

    # ---- forward -------------------------------------------------------------------
    def forward(self, ids: Tensor, positions: Tensor | None = None, cache=None,
                prefix_lens: Tensor | None = None, logits_indices: Tensor | None = None,
                segment_ids: Tensor | None = None, *, prune_last_block: bool = False) -> Tensor:
        """ids (B, T) long -> logits (B, T, vocab_size).

        positions (B, T) long: absolute position of each token, -1 = padding (default
        0..T-1 for every row). cache: an object with the KV-cache protocol (cache.py).
        prefix_lens (B,) long: with mask="prefix", how many leading positions of each row
        attend bidirectionally (None = 0, plain causal).
        logits_indices (N,) long: flat indices b * T + t into the B*T positions; the final
        norm and LM head then run only there and the result is (N, vocab_size), row i being
        the logits of position logits_indices[i] (the same rows as the full forward's
        logits.reshape(B * T, -1)[logits_indices]). An inference engine wants logits at a
        few positions of a long prefill, and with a large vocabulary the head over every
        position can cost more than all the blocks.
        segment_ids (B, T) long: which document of the row each token belongs to, when several
        are packed in one row (SFT packing); a token then attends only within its document.
        Positions alone cannot say this (two documents' positions overlap), so give both:
        positions restarting at 0 for each document, and segment_ids. No cache.
        prune_last_block (keyword, with logits_indices): the last block's MLP runs only at
        those positions too, and with plain causal attention so do its queries (attention and
        output projection); its keys and values are still computed at every position (a KV
        cache keeps every key).
        The same logits, and on a short model a good part of a prefill saved (4 blocks: the
        MLP is ~2/3 of a block). Off by default: a linear that must see every token of the
        forward (multi-LoRA rows, model/lora.py) cannot run on a subset."""
        x, ctx = self._embed(ids, positions, cache, prefix_lens, segment_ids=segment_ids)   # checks ids first
        return self._run_blocks(x, ctx, logits_indices, prune_last_block)

    def _run_blocks(self, x: Tensor, ctx: AttnContext, logits_indices: Tensor | None,
                    prune_last_block: bool = False) -> Tensor:
        """The blocks, then the head (at logits_indices only, when given)."""
        B, T, C = x.shape
        if logits_indices is not None:  # before the blocks run: fail before the work
            _check_logits_indices(logits_indices, B * T)
        keep_at = len(self.blocks) - 1 if prune_last_block and logits_indices is not None else -1
        for i, block in enumerate(self.blocks):
            x = block(x, ctx, logits_indices) if i == keep_at else block(x, ctx)
        if logits_indices is not None:
            x = x.reshape(-1, C) if keep_at >= 0 else x.reshape(B * T, C).index_select(0, logits_indices)  # (N, C)
        return self.logits(self.norm_f(x))

    def logits(self, h: Tensor) -> Tensor:
        """Final hidden states (after norm_f) (..., C) -> (..., vocab_size)."""
        if self.config.scale_head:  # T5: a tied head reads h / sqrt(n_embd)
            h = h * self.config.n_embd ** -0.5
        return self.lm_head(h)

    def _embed(self, ids: Tensor, positions: Tensor | None, cache, prefix_lens: Tensor | None,
               record: list | None = None, *, token_type_ids: Tensor | None = None,
               memory: EncoderMemory | None = None, encoder: nn.Module | None = None,
               segment_ids: Tensor | None = None) -> tuple[Tensor, AttnContext]:
        """Check the inputs, embed them, and build the attention context of one stack's forward:
        this model's own blocks, or the `encoder` stack of an encoder-decoder (bidirectional,
        its own relative-bias table) when given. `memory`: what cross-attention reads."""
        cfg = self.config
        if ids.dim() != 2 or ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(f"ids must be a (B, T) integer tensor, got {tuple(ids.shape)} of {ids.dtype}")
        B, T = ids.shape
        # value checks read the data (a host sync, a graph break under torch.compile): eager only
        checking = not torch.compiler.is_compiling()
        lo, hi = torch.aminmax(ids) if checking and ids.numel() else (0, 0)     # one reduction for both
        if int(lo) < 0 or int(hi) >= cfg.vocab_size:
            bad = ids[(ids < 0) | (ids >= cfg.vocab_size)][0].item()
            raise LmstackError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}); check that "
                               f"the tokenizer matches the model (vocab_size={cfg.vocab_size})")
        default_positions = positions is None
        if default_positions:
            if T > cfg.context_length:
                raise LmstackError(f"sequence of {T} tokens is longer than context_length={cfg.context_length}; "
                                   f"truncate the input or use a model with a longer context")
            positions = torch.arange(T, device=ids.device).expand(B, T)
        else:
            if positions.shape != (B, T):
                raise ValueError(f"positions must have the shape of ids {(B, T)}, got {tuple(positions.shape)}")
            if checking and positions.numel() and int(positions.max()) >= cfg.context_length:
                raise LmstackError(f"position {int(positions.max())} is beyond context_length="
                                   f"{cfg.context_length}; the model has no position {int(positions.max())}")
        if cache is not None and not hasattr(cache, "update"):
            raise TypeError(f"cache must follow the KV-cache protocol (an update() method); got {type(cache)}")
        if prefix_lens is not None:
            if cfg.mask != "prefix":
                raise LmstackError(f"prefix_lens given but mask={cfg.mask!r}; build the model with mask='prefix'")
            if prefix_lens.shape != (B,):
                raise ValueError(f"prefix_lens must have shape ({B},), got {tuple(prefix_lens.shape)}")
        if segment_ids is not None:
            if segment_ids.shape != (B, T):
                raise ValueError(f"segment_ids must have the shape of ids {(B, T)}, got {tuple(segment_ids.shape)}")
            if cache is not None:
                raise LmstackError("segment_ids (packed documents) are for forwards without a KV cache; generate "
                                   "each document in its own row")
        if token_type_ids is not None:
            if self.wtt is None:
                raise LmstackError("token_type_ids given but the model has n_token_types=0 (no segment embeddings)")
            if token_type_ids.shape != (B, T):
                raise ValueError(f"token_type_ids must have the shape of ids {(B, T)}, got "
                                 f"{tuple(token_type_ids.shape)}")
            if checking and token_type_ids.numel() and not 0 <= int(token_type_ids.min()) <= \
                    int(token_type_ids.max()) < cfg.n_token_types:
                raise LmstackError(f"token_type_ids must lie in [0, n_token_types={cfg.n_token_types})")

        x = self.wte(ids)                                                   # (B, T, C)
        if cfg.pos_emb == "learned":
            x = x + self.wpe(positions.clamp(min=0))
        elif cfg.pos_emb == "sinusoidal":
            x = x + sinusoidal_embedding(positions, cfg.n_embd).to(x.dtype)
        if self.wtt is not None:  # BERT's segments; type 0 when not given, as Hugging Face does
            x = x + (self.wtt(token_type_ids) if token_type_ids is not None else self.wtt.weight[0])
        if self.norm_emb is not None:
            x = self.norm_emb(x)
        x = _dropout_or_identity(self.drop, self.training)(x)

        mask = "bidirectional" if encoder is not None else cfg.mask
        rel_bias = (self if encoder is None else encoder).rel_bias
        no_extra = cache is None and default_positions and segment_ids is None and \
            cfg.pos_emb not in ("alibi", "relative") and (cfg.sliding_window is None or cfg.sliding_window >= T)
        ctx = AttnContext(
            positions=positions, cache=cache, mask_kind=mask, window=cfg.sliding_window,
            prefix_lens=prefix_lens, slopes=make_slopes(cfg), rel_bias=rel_bias, memory=memory, record=record,
            segments=segment_ids,
            causal_fast=no_extra and (mask == "causal" or (mask == "prefix" and prefix_lens is None)),
            no_mask=no_extra and mask == "bidirectional")
        if self.rope is not None:
            ctx.cos, ctx.sin = self.rope.cos_sin(positions, x.dtype if x.is_floating_point() else torch.float32)
        if torch.is_autocast_enabled(x.device.type) and ctx.cos is not None:
            dt = torch.get_autocast_dtype(x.device.type)
            ctx.cos, ctx.sin = ctx.cos.to(dt), ctx.sin.to(dt)
        return x, ctx

    # ---- introspection -------------------------------------------------------------
    @torch.no_grad()
    def introspect(self, ids: Tensor, positions: Tensor | None = None,
                   prefix_lens: Tensor | None = None) -> dict[str, list[Tensor] | Tensor]:
        """Attention weights and activations for one input, through the explicit math path.

        Returns {"attentions": n_layer x (B, H, T, T) softmax weights,
                 "hidden_states": n_layer+1 x (B, T, C) (embeddings, then each block's output;
                 the last one after the final norm, as Hugging Face reports it),
                 "logits": (B, T, vocab_size)}. The normal forward pays nothing for this hook."""
        record: list[Tensor] = []
        x, ctx = self._embed(ids, positions, None, prefix_lens, record=record)
        hidden = [x]
        for block in self.blocks:
            x = block(x, ctx)
            hidden.append(x)
        hidden[-1] = self.norm_f(x)
        return {"attentions": record, "hidden_states": hidden, "logits": self.logits(hidden[-1])}

    # ---- MoE -----------------------------------------------------------------------
    def _moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]   # every stack's, in model order

    def aux_loss(self) -> Tensor:
        """Weighted MoE auxiliary loss of the last forward (0 for a dense model): a 0-dim tensor
        moe_aux_loss_coef * load_balancing + moe_z_loss_coef * router_z, over all MoE layers."""
        layers = [m for m in self._moe_layers() if m.last_logits is not None]
        if not layers:
            return torch.zeros((), device=self.wte.weight.device)
        logits = torch.cat([m.last_logits for m in layers])
        experts = torch.cat([m.last_experts for m in layers])
        cfg = self.config
        loss = cfg.moe_aux_loss_coef * load_balancing_loss(logits, experts, cfg.n_expert)
        if cfg.moe_z_loss_coef:
            loss = loss + cfg.moe_z_loss_coef * router_z_loss(logits)
        return loss

    def expert_counts(self) -> Tensor:
        """(n_layer_moe, n_expert) long: tokens routed to each expert in the last forward."""
        layers = self._moe_layers()
        if not layers or layers[0].last_counts is None:
            raise LmstackError("expert_counts() needs a forward pass of a model with n_expert > 0 first")
        return torch.stack([m.last_counts for m in layers])

    # ---- sizes ---------------------------------------------------------------------
    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied embedding counted once). non_embedding=True leaves out the
        lookup-only tables: the position table and, when untied, the token table (a tied token
        table is the LM head's matmul, so it stays, as in nanoGPT)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.wpe is not None:
                n -= self.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.wte.weight.numel()
        return n

    def num_active_params(self) -> int:
        """Non-embedding parameters one token actually passes through (MoE: k of n experts)."""
        n = self.num_params(non_embedding=True)
        for m in self._moe_layers():
            per_expert = sum(p.numel() for p in m.experts[0].parameters())
            n -= (m.n_expert - m.top_k) * per_expert
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token (forward + backward), as in PaLM (App. B) / nanoGPT MFU:
        6 * N_active + 12 * n_layer * n_head * head_dim * T_attended, where T_attended is the
        sequence length (capped by a sliding window). Multiply by tokens/s for FLOP/s."""
        cfg = self.config
        T = cfg.context_length if seq_len is None else seq_len
        if cfg.sliding_window is not None:
            T = min(T, cfg.sliding_window)
        return 6 * self.num_active_params() + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * T

    # ---- checkpoints ---------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write path/model.safetensors + path/config.json (other files in path are kept)."""
        checkpoint.save_pretrained(self, path)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None,
                        dtype: torch.dtype | str | None = None) -> "Transformer":
        """Load our checkpoint folder or a Hugging Face one (config.json with `model_type`).
        The sizes config.json declares are checked against the weights before building."""
        return checkpoint.load_pretrained(path, cls, device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"params={self.num_params():,}"
