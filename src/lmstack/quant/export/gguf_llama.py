"""Export a model and its tokenizer as a GGUF file of llama.cpp's `llama` architecture.

    result = export_gguf(model, tokenizer, "model-q8_0.gguf", type="q8_0")
    result.tensor_types["blk.0.attn_q.weight"]   # "q8_0"; result.fallbacks: tensors kept as F16

What the file holds, and why:
- Tensors come from the one name table (model/hf_names.py, Hugging Face llama names), then
  renamed to GGUF's (`model.layers.3.self_attn.q_proj` -> `blk.3.attn_q`). 2-D weights are
  stored as --type (f32, f16, q8_0, q4_0); norms and biases stay F32, as llama.cpp's own
  converter keeps them. A Q tensor needs rows of 32k values; one that has not is stored as
  F16 and listed in `fallbacks`. A tied LM head is not written (llama.cpp reuses token_embd).
- RoPE: we rotate pairs (i, i + D/2) of each head (HF's half split); llama.cpp's `llama`
  architecture rotates pairs (2i, 2i + 1). So the rows of q (per head of n_head) and k (per
  head of n_kv_head), weights and biases, are reordered so that new row 2i + h holds old row
  h * D/2 + i; v is untouched. Without it the file loads and runs, and its logits drift.
- Tokenizer: `tokenizer.ggml.model = "gpt2"` (byte-level BPE), tokens in GPT-2's byte-to-
  unicode alphabet, merges as "a b", special tokens CONTROL and the rest NORMAL (ids the
  tokenizer does not use, up to vocab_size, are "[PAD<id>]" UNUSED), and the pre-tokenizer
  named for our split pattern: gpt2 -> "gpt-2", gpt4 (cl100k) -> "llama-bpe". A missing or
  wrong name still round-trips text while splitting it differently (silently other ids),
  so other patterns are refused. BOS = EOS = the end-of-text id, with add_bos_token false
  (lmstack never adds special tokens on its own); without these keys llama.cpp would use
  its own defaults for a gpt2 vocabulary (id 11).
- Quantized runs are exported from the float weights they compute with (dequantized), then
  stored as --type. Models the `llama` architecture cannot run (learned positions, LayerNorm,
  MoE, sliding windows, QK-norm, partial RoPE ...) are refused before anything is written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from lmstack.model.config import ModelConfig
from lmstack.model.hf_config import pick_family
from lmstack.model.hf_names import iter_hf_names
from lmstack.model.positions import rope_inv_freq
from lmstack.quant.export.ggml_blocks import QUANTIZED, encode, fits
from lmstack.quant.export.gguf_file import KV, TensorPlan, ValueType, check_output_file, write_gguf
from lmstack.quant.export.weights import check_transforms, float_state
from lmstack.tokenizer.base import bytes_to_bytelevel
from lmstack.utils import LmstackError

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
FILE_TYPE = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}        # llama_ftype: what most tensors are
PRE_TOKENIZERS = {"gpt2": "gpt-2", "gpt4": "llama-bpe"}       # our split pattern -> llama.cpp's name
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_UNUSED = 1, 3, 5
ARCH = "llama"

# HF llama module names -> GGUF's (the part after "model.layers.{i}." -> after "blk.{i}.")
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
          "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
          "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")

# what the `llama` architecture computes: any other value of these fields is refused
_NEEDS = {"arch": "decoder", "pos_emb": "rope", "rotary_fraction": 1.0, "mask": "causal", "sliding_window": None,
          "qk_norm": False, "attn_scale": None, "norm": "rmsnorm", "norm_placement": "pre", "mlp": "swiglu",
          "n_expert": 0, "scale_head": False, "n_token_types": 0, "embed_norm": False, "n_labels": 0}
# fields that size the model or that the file states (written as metadata or tensors), and
# fields with no effect on a causal forward: everything else must keep its default
_WRITTEN = {"vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "head_dim", "intermediate_size",
            "context_length", "rope_theta", "rope_scaling", "norm_eps", "bias", "qkv_bias", "tie_embeddings",
            "dropout", "init_std", "extra", "n_expert_per_token", "moe_aux_loss_coef", "moe_z_loss_coef",
            "rel_num_buckets", "rel_max_distance", "decoder_start_id", "n_encoder_layer"}


@dataclass
class GGUFExport:
    """What export_gguf wrote: the file, its llama_ftype, each tensor's GGML type, and the
    tensors stored as F16 because a Q type did not fit them."""
    path: Path
    type: str
    file_type: int
    nbytes: int
    tensor_types: dict[str, str] = field(default_factory=dict)
    fallbacks: list[str] = field(default_factory=list)


def check_gguf_exportable(cfg: ModelConfig) -> None:
    """Raise unless the `llama` architecture computes exactly what `cfg` does (naming the field)."""
    base = ModelConfig()
    defaults = {f.name: getattr(base, f.name) for f in fields(ModelConfig)
                if f.name not in _NEEDS and f.name not in _WRITTEN}
    for name, want in {**_NEEDS, **defaults}.items():
        if hasattr(cfg, name) and getattr(cfg, name) != want:
            raise LmstackError(f"cannot export to GGUF: llama.cpp's `llama` architecture needs {name}={want!r}, the "
                               f"model has {name}={getattr(cfg, name)!r} (GGUF export supports Llama-style models: "
                               f"RoPE, RMSNorm, SwiGLU, pre-norm, dense MLP)")
    if cfg.bias and not cfg.qkv_bias:
        raise LmstackError("cannot export to GGUF: bias=True with qkv_bias=False (biases on the output and MLP "
                           "linears only) has no Hugging Face llama/qwen2 name table to map it through")


def _gguf_name(hf_name: str) -> str:
    module, param = hf_name.rsplit(".", 1)
    if module in _TOP:
        return f"{_TOP[module]}.{param}"
    m = _HF_LAYER.fullmatch(module)
    if m is None or m[2] not in _LAYER:
        raise LmstackError(f"no GGUF name for Hugging Face tensor {hf_name!r}")
    return f"blk.{m[1]}.{_LAYER[m[2]]}.{param}"


def rope_interleave(w: Tensor, n_head: int) -> Tensor:
    """Rows of q or k (n_head * D, ...) from half-split RoPE order to interleaved pairs: within
    each head, new row 2i + h = old row h * D/2 + i (h = 0, 1; i < D/2). Works for biases too."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(cfg: ModelConfig, state: dict[str, Tensor]) -> list[tuple[str, Tensor]]:
    """(GGUF name, float tensor) in file order, from our float state (names as stored)."""
    family = pick_family(cfg)
    out = []
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "llama3":
        # llama.cpp divides each pair's frequency by rope_freqs[i]: base / scaled frequency
        base = rope_inv_freq(cfg.replace(rope_scaling=None))
        out.append(("rope_freqs.weight", base / rope_inv_freq(cfg)))
    for e in iter_hf_names(cfg, family):
        t = state[e.ours]
        for p in e.parts:
            piece = t if p.rows is None else t[p.rows[0]:p.rows[1]]
            if p.role == "q":
                piece = rope_interleave(piece, cfg.n_head)
            elif p.role == "k":
                piece = rope_interleave(piece, cfg.n_kv_head)
            out.append((_gguf_name(p.name), piece.contiguous()))
    return out


def llama_metadata(cfg: ModelConfig, name: str, file_type: int, quantized: bool) -> list[KV]:
    u32, f32, s = ValueType.UINT32, ValueType.FLOAT32, ValueType.STRING
    kvs = [KV("general.architecture", s, ARCH), KV("general.name", s, name), KV("general.alignment", u32, 32),
           KV("general.file_type", u32, file_type)]
    if quantized:
        kvs.append(KV("general.quantization_version", u32, 2))
    a = ARCH
    kvs += [KV(f"{a}.vocab_size", u32, cfg.vocab_size), KV(f"{a}.context_length", u32, cfg.context_length),
            KV(f"{a}.embedding_length", u32, cfg.n_embd), KV(f"{a}.block_count", u32, cfg.n_layer),
            KV(f"{a}.feed_forward_length", u32, cfg.intermediate_size),
            KV(f"{a}.attention.head_count", u32, cfg.n_head), KV(f"{a}.attention.head_count_kv", u32, cfg.n_kv_head),
            KV(f"{a}.attention.key_length", u32, cfg.head_dim), KV(f"{a}.attention.value_length", u32, cfg.head_dim),
            KV(f"{a}.attention.layer_norm_rms_epsilon", f32, cfg.norm_eps),
            KV(f"{a}.rope.dimension_count", u32, cfg.rotary_dim), KV(f"{a}.rope.freq_base", f32, cfg.rope_theta)]
    if cfg.rope_scaling and cfg.rope_scaling["type"] == "linear":
        kvs += [KV(f"{a}.rope.scaling.type", s, "linear"), KV(f"{a}.rope.scaling.factor", f32,
                                                                float(cfg.rope_scaling["factor"]))]
    return kvs


def tokenizer_metadata(tokenizer, vocab_size: int, eos_token_id: int | None = None) -> list[KV]:
    """GGUF's tokenizer.ggml.* keys for our byte-level BPE, with `vocab_size` token entries."""
    pre = PRE_TOKENIZERS.get(tokenizer.pattern)
    if pre is None:
        raise LmstackError(f"cannot export the tokenizer to GGUF: its split pattern {tokenizer.pattern!r} has no "
                           f"llama.cpp pre-tokenizer (supported: {sorted(PRE_TOKENIZERS)}); llama.cpp would split "
                           f"text differently and give other ids")
    if tokenizer.n_vocab > vocab_size:
        raise LmstackError(f"the tokenizer has {tokenizer.n_vocab} ids but the model's vocab_size is {vocab_size}; "
                           f"they do not belong together")
    eos = tokenizer.eot_token if eos_token_id is None else eos_token_id
    if eos is None or not 0 <= eos < tokenizer.n_vocab:
        raise LmstackError(f"the tokenizer has no end-of-text token (<|endoftext|>) and no eos_token_id was given "
                           f"(got {eos_token_id!r}); GGUF needs one, or llama.cpp uses a default id of its own")
    specials = {i: s for s, i in tokenizer.special_tokens.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in tokenizer.vocab:
            tokens.append(bytes_to_bytelevel(tokenizer.vocab[i]))
            types.append(TOKEN_NORMAL)
        elif i in specials:
            tokens.append(specials[i])
            types.append(TOKEN_CONTROL)
        else:   # padded embedding rows or unused ids: never produced by the tokenizer
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if seen.setdefault(t, i) != i:
            raise LmstackError(f"tokens {seen[t]} and {i} are both written as {t!r} in GGUF's token list; llama.cpp "
                               f"maps text to one id")
    merges = [f"{bytes_to_bytelevel(tokenizer.vocab[a])} {bytes_to_bytelevel(tokenizer.vocab[b])}"
              for a, b in tokenizer.merges]
    s, u32, b = ValueType.STRING, ValueType.UINT32, ValueType.BOOL
    kvs = [KV("tokenizer.ggml.model", s, "gpt2"), KV("tokenizer.ggml.pre", s, pre),
           KV("tokenizer.ggml.tokens", ValueType.ARRAY, tokens, s),
           KV("tokenizer.ggml.token_type", ValueType.ARRAY, types, ValueType.INT32),
           KV("tokenizer.ggml.merges", ValueType.ARRAY, merges, s),
           KV("tokenizer.ggml.bos_token_id", u32, eos), KV("tokenizer.ggml.eos_token_id", u32, eos),
           KV("tokenizer.ggml.add_bos_token", b, False), KV("tokenizer.ggml.add_eos_token", b, False)]
    end = tokenizer.special_tokens.get("<|end|>")          # the chat turn's end (tokenizer/chat.py)
    if end is not None:
        kvs.append(KV("tokenizer.ggml.eot_token_id", u32, end))
    return kvs


def _plan(name: str, t: Tensor, kind: str) -> TensorPlan:
    return TensorPlan(name, tuple(t.shape), kind, lambda: encode(t, kind))


def export_gguf(model: nn.Module, tokenizer, path: str | Path, type: str = "f16", name: str | None = None,
                eos_token_id: int | None = None, overwrite: bool = False) -> GGUFExport:
    """Write `model` + `tokenizer` as a GGUF file of the `llama` architecture (see the module
    docstring). Every check runs before the file is opened; the file appears only when whole.
    type: f32 | f16 | q8_0 | q4_0; name: general.name (default: the file's stem);
    eos_token_id: default the tokenizer's <|endoftext|>."""
    if tokenizer is None:
        raise LmstackError("GGUF export needs the model's tokenizer (a run's tokenizer.json): llama.cpp reads the "
                           "vocabulary from the file")
    if type not in GGUF_TYPES:
        raise LmstackError(f"GGUF type {type!r} is not supported; choose one of {list(GGUF_TYPES)}")
    cfg = model.config
    check_gguf_exportable(cfg)
    check_transforms(model, ("quant",), "GGUF export")
    path = check_output_file(path, overwrite)
    kvs = llama_metadata(cfg, name or path.stem, FILE_TYPE[type], type in QUANTIZED)
    kvs += tokenizer_metadata(tokenizer, cfg.vocab_size, eos_token_id)
    state = float_state(model)
    plans, fallbacks = [], []
    for gname, t in gguf_tensors(cfg, state):
        if not torch.isfinite(t).all():
            raise LmstackError(f"tensor {gname} holds inf or NaN values; the model is broken, refusing to export it")
        kind = "f32" if t.dim() < 2 else type
        if not fits(tuple(t.shape), kind):
            kind = "f16"
            fallbacks.append(gname)
        plans.append(_plan(gname, t, kind))
    nbytes = write_gguf(path, kvs, plans)
    return GGUFExport(path, type, FILE_TYPE[type], nbytes, {p.name: p.kind for p in plans}, fallbacks)

