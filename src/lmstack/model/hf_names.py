"""The name table: every tensor a checkpoint of a config holds, with its shape and its
Hugging Face name(s). One table per family serves import, export, header checks, PEFT
adapter export and GGUF export.

Families: gpt2, llama, qwen2, qwen3, mistral, mixtral (decoders), bert (BertForMaskedLM), t5
(T5ForConditionalGeneration: our `encoder.*` is its encoder stack, our own blocks its decoder).
Our layout differs from Hugging Face's in three ways, all recorded in the table:
  - q, k, v live in one `attn.qkv` linear, rows [q | k | v] (a cross-attention's k, v in one
    `cross_attn.kv`, rows [k | v]); a gated `mlp.fc` (SwiGLU, T5's gated-gelu) holds rows
    [gate | up]. Each such tensor has one HFPart per HF tensor, with the row slice it holds.
  - GPT-2's Conv1D stores its weights as (in, out): `transposed`.
  - transformers 5 holds Mixtral's experts in memory as two stacked tensors per layer
    (`mlp.experts.gate_up_proj` (E, 2I, C), `mlp.experts.down_proj` (E, C, I)); its files, and
    our exports, use the per-expert w1/w3/w2 names. `fused_experts=True` gives the former
    (an HFPart with `index` = the expert's position in the stack).
RoPE uses the same half-split layout as HF Llama, so q/k rows need no permutation.

    for e in hf_name_table(cfg, "llama"):
        e.ours, e.shape        # "blocks.0.attn.qkv.weight", ((H + 2*KV) * D, C)
        e.parts                # (HFPart("model.layers.0.self_attn.q_proj.weight", "q", (0, H*D)), ...)
    hf_module_name(cfg, "blocks.3.attn.qkv", "q")  # "model.layers.3.self_attn.q_proj"

`stored_tensors(cfg)` is the same table for our own format (identity names), for any config.
The table states our shapes from the config; tests keep it equal to the model's state_dict.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from lmstack.model.config import GATED_MLPS, ModelConfig
from lmstack.model.hf_config import check_exportable, pick_family
from lmstack.utils import LmstackError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class HFPart:
    """One Hugging Face tensor holding (part of) one of ours.

    name:  the HF state-dict name
    role:  which projection it is, in replace.py's vocabulary (q k v o gate up down router
           lm_head; "q+k+v" / "gate+up" for a fused HF tensor); None for norms and embeddings
    rows:  (start, stop) rows of OUR tensor it holds; None = all of them
    index: its position in a stacked HF tensor (fused experts); None = a tensor of its own
    """
    name: str
    role: str | None
    rows: tuple[int, int] | None = None
    index: int | None = None


@dataclass(frozen=True)
class NameEntry:
    """One of our stored tensors: name, shape, and the HF tensors that hold it. Concatenating
    the parts along dim 0 (each transposed first if `transposed`) gives ours."""
    ours: str
    shape: Shape
    parts: tuple[HFPart, ...]
    transposed: bool = False

    def part_shape(self, part: HFPart) -> Shape:
        """The shape of `part` as HF stores it (for a stacked part: one slice of the stack)."""
        shape = self.shape if part.rows is None else (part.rows[1] - part.rows[0], *self.shape[1:])
        return shape[::-1] if self.transposed else shape


def _ours(cfg: ModelConfig) -> Iterator[tuple[str, Shape, list[tuple[str | None, tuple[int, int] | None]]]]:
    """(name, shape, [(role, rows)]) of every tensor our checkpoint of `cfg` stores, in the
    model's state_dict order. A tied LM head is not stored (it is wte.weight)."""
    C, V = cfg.n_embd, cfg.vocab_size
    H, KV, D, I = cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.intermediate_size
    params = ("weight", "bias") if cfg.norm == "layernorm" else ("weight",)
    plain = [(None, None)]
    qkv = [("q", (0, H * D)), ("k", (H * D, (H + KV) * D)), ("v", ((H + KV) * D, (H + 2 * KV) * D))]
    gated = cfg.mlp in GATED_MLPS
    fc = [("gate", (0, I)), ("up", (I, 2 * I))] if gated else [("up", None)]
    fc_rows = 2 * I if gated else I

    def linear(name, out_f, in_f, roles, bias):
        yield f"{name}.weight", (out_f, in_f), roles
        if bias:
            yield f"{name}.bias", (out_f,), roles

    def norm(name):
        for p in params:
            yield f"{name}.{p}", (C,), plain

    def mlp(m):
        yield from linear(m + "fc", fc_rows, C, fc, cfg.bias)
        yield from linear(m + "proj", C, I, [("down", None)], cfg.bias)

    def block(b, cross):
        yield from norm(b + "attn_norm")
        yield from linear(b + "attn.qkv", (H + 2 * KV) * D, C, qkv, cfg.qkv_bias)
        yield from linear(b + "attn.proj", C, H * D, [("o", None)], cfg.bias)
        if cfg.qk_norm:
            yield f"{b}attn.q_norm.weight", (D,), plain
            yield f"{b}attn.k_norm.weight", (D,), plain
        if cross:
            yield from norm(b + "cross_norm")
            yield from linear(b + "cross_attn.q", H * D, C, [("q", None)], cfg.qkv_bias)
            yield from linear(b + "cross_attn.kv", 2 * KV * D, C, [("k", (0, KV * D)), ("v", (KV * D, 2 * KV * D))],
                              cfg.qkv_bias)
            yield from linear(b + "cross_attn.proj", C, H * D, [("o", None)], cfg.bias)
        yield from norm(b + "mlp_norm")
        if cfg.n_expert:
            yield f"{b}mlp.router.weight", (cfg.n_expert, C), [("router", None)]
            for e in range(cfg.n_expert):
                yield from mlp(f"{b}mlp.experts.{e}.")
        else:
            yield from mlp(b + "mlp.")

    yield "wte.weight", (V, C), plain
    if cfg.pos_emb == "learned":
        yield "wpe.weight", (cfg.context_length, C), plain
    if cfg.n_token_types:
        yield "wtt.weight", (cfg.n_token_types, C), plain
    if cfg.embed_norm:
        yield from norm("norm_emb")
    for i in range(cfg.n_layer):
        yield from block(f"blocks.{i}.", cfg.cross_attention)
    if cfg.norm_placement == "pre":
        yield from norm("norm_f")
    if cfg.pos_emb == "relative":
        yield "rel_bias.weight", (cfg.rel_num_buckets, H), plain
    if not cfg.tie_embeddings:
        yield "lm_head.weight", (V, C), [("lm_head", None)]
    if cfg.arch == "encoder":            # encoder.py: the MLM head's bias and transform, the classifier
        yield "lm_head.bias", (V,), [("lm_head", None)]
        yield from linear("head_transform", C, C, [("transform", None)], True)
        yield from norm("head_norm")
        if cfg.n_labels:
            yield from linear("score", cfg.n_labels, C, [("score", None)], True)
    if cfg.arch == "encoder-decoder":    # encoder_decoder.py: the encoder stack
        for i in range(cfg.n_encoder_layer):
            yield from block(f"encoder.blocks.{i}.", False)
        if cfg.norm_placement == "pre":
            yield from norm("encoder.norm_f")
        if cfg.pos_emb == "relative":
            yield "encoder.rel_bias.weight", (cfg.rel_num_buckets, H), plain


def stored_tensors(cfg: ModelConfig) -> Iterator[NameEntry]:
    """Our own format's table (lazily, in model order): each entry's one part is itself, its
    role the linear's roles joined ("q+k+v")."""
    for name, shape, roles in _ours(cfg):
        role = "+".join(r for r, _ in roles) if roles[0][0] else None
        yield NameEntry(name, shape, (HFPart(name, role),))


# ---- Hugging Face names ---------------------------------------------------------------------
_LAYER = {"gpt2": "transformer.h.{i}.", "bert": "bert.encoder.layer.{i}.", "t5": "decoder.block.{i}.",
          None: "blocks.{i}."}   # the others: model.layers.{i}.
_ENCODER_LAYER = {"t5": "encoder.block.{i}.", None: "encoder.blocks.{i}."}
_GPT2 = {"wte": "transformer.wte", "wpe": "transformer.wpe", "norm_f": "transformer.ln_f", "lm_head": "lm_head",
         "attn_norm": "ln_1", "mlp_norm": "ln_2", "attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
         "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
_LLAMA = {"wte": "model.embed_tokens", "norm_f": "model.norm", "lm_head": "lm_head",
          "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm", "attn.proj": "self_attn.o_proj",
          "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm", "mlp.proj": "mlp.down_proj",
          "attn.qkv": "self_attn.{role}_proj", "mlp.fc": "mlp.{role}_proj"}
# BERT: post-norm, so each sublayer's output "LayerNorm" is our norm after it. The MLM decoder's
# weight is the tied word embedding (or its own); its bias lives one module up (see _PARAMS).
_BERT = {"wte": "bert.embeddings.word_embeddings", "wpe": "bert.embeddings.position_embeddings",
         "wtt": "bert.embeddings.token_type_embeddings", "norm_emb": "bert.embeddings.LayerNorm",
         "lm_head": "cls.predictions.decoder", "head_transform": "cls.predictions.transform.dense",
         "head_norm": "cls.predictions.transform.LayerNorm",
         "attn.qkv": "attention.self.{role}", "attn.proj": "attention.output.dense",
         "attn_norm": "attention.output.LayerNorm", "mlp.fc": "intermediate.dense", "mlp.proj": "output.dense",
         "mlp_norm": "output.LayerNorm"}
# T5: each stack's block i holds sublayers layer.0 (self-attention), [layer.1 (cross-attention),]
# then the feed-forward; the relative-bias table of a stack sits in its first block.
_T5 = {"wte": "shared", "lm_head": "lm_head", "norm_f": "decoder.final_layer_norm",
       "encoder.norm_f": "encoder.final_layer_norm",
       "rel_bias": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias",
       "encoder.rel_bias": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
       "attn_norm": "layer.0.layer_norm", "attn.qkv": "layer.0.SelfAttention.{role}",
       "attn.proj": "layer.0.SelfAttention.o", "cross_norm": "layer.1.layer_norm",
       "cross_attn.q": "layer.1.EncDecAttention.q", "cross_attn.kv": "layer.1.EncDecAttention.{role}",
       "cross_attn.proj": "layer.1.EncDecAttention.o", "mlp_norm": "layer.{ff}.layer_norm",
       "mlp.fc": "layer.{ff}.DenseReluDense.{role}", "mlp.proj": "layer.{ff}.DenseReluDense.wo"}
_TABLES = {"gpt2": _GPT2, "bert": _BERT, "t5": _T5}                       # the others: _LLAMA
_ROLE_NAMES = {"bert": {"q": "query", "k": "key", "v": "value"},
               "t5": {"gate": "wi_0", "up": "wi_1"}}                      # a plain (ungated) T5 "up" is "wi"
# Tensors named apart from their module. BERT's tied decoder takes its bias from
# cls.predictions.bias (decoder.bias is tied to it); an untied one (transformers 5) keeps its own
# cls.predictions.decoder.bias and leaves cls.predictions.bias unused.
_PARAMS = {"bert": {"lm_head.bias": "cls.predictions.bias"}}              # with tie_embeddings only
_W = {"gate": "w1", "down": "w2", "up": "w3"}    # Mixtral checkpoints' expert names
_CONV1D = ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
_BLOCK = re.compile(r"(encoder\.)?blocks\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(fc|proj)")


def layer_prefix(family: str | None, encoder: bool = False) -> str:
    """The name prefix of layer i's tensors in `family` (None = ours), with {i} to fill; with
    `encoder`, of an encoder-decoder's encoder stack."""
    if encoder:
        return _ENCODER_LAYER[family]
    return _LAYER.get(family, "model.layers.{i}.")


def _hf_module(family: str, module: str, role: str | None, fused_experts: bool = False,
               gated: bool = True) -> str:
    """Our module (+ the role of a row slice) -> the HF module (or stacked tensor) holding it."""
    table = _TABLES.get(family, _LLAMA)
    m = _BLOCK.fullmatch(module)
    if m is None:
        return table[module]
    enc, i, rest = m.groups()
    h = layer_prefix(family, encoder=bool(enc)).format(i=i)
    x = _EXPERT.fullmatch(rest)
    if x and fused_experts:
        return h + ("mlp.experts.gate_up_proj" if x[2] == "fc" else "mlp.experts.down_proj")
    if x:
        return h + f"block_sparse_moe.experts.{x[1]}.{_W[role]}"
    if rest == "mlp.router":
        return h + ("mlp.gate" if fused_experts else "block_sparse_moe.gate")
    name = _ROLE_NAMES.get(family, {}).get(role, role)
    if family == "t5" and rest == "mlp.fc" and not gated:
        name = "wi"
    # T5's feed-forward is sublayer 1 of an encoder block, 2 of a decoder block (after cross-attention)
    return h + table[rest].format(role=name, ff=1 if enc else 2)


def iter_hf_names(cfg: ModelConfig, family: str, fused_experts: bool = False) -> Iterator[NameEntry]:
    """hf_name_table, lazily: a check that stops at the first mismatch does work bounded by the
    checkpoint, not by the sizes a config declares."""
    check_exportable(cfg, family)
    gated = cfg.mlp in GATED_MLPS
    for name, shape, roles in _ours(cfg):
        module, param = name.rsplit(".", 1)
        # GPT-2's Conv1D linears store (in, out); its c_attn is one fused q|k|v tensor like ours
        transposed = family == "gpt2" and param == "weight" and module.endswith(_CONV1D)
        if family == "gpt2" and module.endswith("attn.qkv"):
            roles = [("q+k+v", None)]
        expert = _EXPERT.search(module)
        if fused_experts and expert:       # one slice of a stacked (E, ...) tensor
            role = "gate+up" if module.endswith("fc") else "down"
            parts = [HFPart(_hf_module(family, module, role, True), role, None, int(expert[1]))]
        elif name in _PARAMS.get(family, {}) and cfg.tie_embeddings:
            parts = [HFPart(_PARAMS[family][name], roles[0][0])]
        else:
            parts = [HFPart(f"{_hf_module(family, module, role, fused_experts, gated)}.{param}", role, rows)
                     for role, rows in roles]
        yield NameEntry(name, shape, tuple(parts), transposed)


def hf_name_table(cfg: ModelConfig, family: str, fused_experts: bool = False) -> list[NameEntry]:
    """For each tensor our checkpoint of `cfg` stores (model order): its shape and the HF
    tensors of `family` that hold it. Raises LmstackError if `family` cannot express `cfg`."""
    return list(iter_hf_names(cfg, family, fused_experts))


def hf_module_name(cfg: ModelConfig, module: str, role: str | None = None, family: str | None = None) -> str:
    """One of our linear (or norm, embedding) modules + the role of a row slice -> the HF
    module that holds it: ("blocks.3.attn.qkv", "q") -> "model.layers.3.self_attn.q_proj".
    `role` may be None for a module that is one HF module. Family None: as export_hf picks."""
    family = family or pick_family(cfg)
    if module == "lm_head" and role in (None, "lm_head"):
        return _TABLES.get(family, _LLAMA)["lm_head"]   # a tied head is a module there too, not a tensor
    for e in iter_hf_names(cfg, family):
        if e.ours == f"{module}.weight":
            roles = [p.role for p in e.parts]
            hit = [p for p in e.parts if p.role == role or (role is None and len(e.parts) == 1)]
            if not hit:
                raise LmstackError(f"{module} has no role {role!r} in Hugging Face {family}; its roles: {roles}")
            return hit[0].name.removesuffix(".weight")
    raise LmstackError(f"{module!r} is not a module with a weight in this {family} model (e.g. 'blocks.0.attn.qkv', "
                       f"'blocks.0.mlp.proj', 'lm_head' when untied)")


def normalize_hf_names(family: str, named: dict) -> dict:
    """GPT-2 checkpoints come with and without the "transformer." prefix (the original files
    have none): add it where it is missing, so that the table's names match."""
    if family != "gpt2":
        return named
    return {k if k.startswith(("transformer.", "lm_head.")) else "transformer." + k: v for k, v in named.items()}


def t5_untied_if_stored(cfg: ModelConfig, family: str, names) -> ModelConfig:
    """T5's weights, not its config, tell whether its LM head is its own: transformers 5 writes
    tie_word_embeddings=true for every T5 and keeps a separate head by storing lm_head.weight
    (4.x's t5-v1.1 files too). `names`: the tensor names the weights hold."""
    if family == "t5" and cfg.tie_embeddings and "lm_head.weight" in names:
        return cfg.replace(tie_embeddings=False)
    return cfg


def has_fused_experts(names) -> bool:
    """Whether names follow transformers 5's in-memory layout of stacked experts."""
    return any(k.endswith("mlp.experts.gate_up_proj") for k in names)


# ---- conversion --------------------------------------------------------------------------
def state_from_hf(cfg: ModelConfig, family: str, tensors: dict[str, Tensor],
                  source: str = "HF weights") -> dict[str, Tensor]:
    """HF-named tensors -> ours (concatenating row slices, undoing transposes). Extra HF
    tensors (buffers such as GPT-2's attn.bias) are ignored."""
    tensors = normalize_hf_names(family, tensors)
    out = {}
    for e in iter_hf_names(cfg, family, has_fused_experts(tensors)):
        pieces = []
        for p in e.parts:
            if p.name not in tensors:
                raise LmstackError(f"{source} lacks tensor {p.name!r} that a {family} model with this config "
                                   f"needs; the weights do not match the config")
            t = tensors[p.name] if p.index is None else tensors[p.name][p.index]
            pieces.append(t.t() if e.transposed else t)
        out[e.ours] = pieces[0].contiguous() if len(pieces) == 1 else torch.cat(pieces)
    return out


def state_to_hf(model, family: str) -> dict[str, Tensor]:
    """Our model's tensors -> HF-named tensors of `family` (contiguous, on the CPU), in the
    per-expert layout that Hugging Face files use."""
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {}
    for e in iter_hf_names(model.config, family):
        t = sd[e.ours]
        for p in e.parts:
            piece = t if p.rows is None else t[p.rows[0]:p.rows[1]]
            out[p.name] = (piece.t() if e.transposed else piece).contiguous()
    return out
