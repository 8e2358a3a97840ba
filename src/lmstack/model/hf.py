"""Hugging Face interop: convert transformers checkpoints to our Transformer and back.

    model = Transformer.from_pretrained("path/to/hf_folder")   # auto-detected (calls load_hf)
    model = from_hf(hf_model)                                  # an in-memory transformers model
    export_hf(model, "out_dir")                                # AutoModelForCausalLM.from_pretrained loads it

Families: gpt2, llama, qwen2, qwen3 (QK-norm), mistral, mixtral. Our layout differs from HF's in three ways:
  - q/k/v live in one `qkv` linear (rows [q | k | v]); SwiGLU gate and up in one `fc`
    (rows [gate | up]); conversion concatenates and splits.
  - GPT-2's Conv1D stores weights as (in, out): transposed both ways.
  - RoPE uses the same half-split ("rotate_half") layout as HF Llama, so q/k need no permutation.
Both transformers 4.x (`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x (`rope_parameters`,
`dtype`, fused MoE experts) config and weight names are read; exports write both spellings.
Only safetensors weights are read (pytorch_model.bin would need unpickling: refused).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from lmstack.model.checkpoint import load_state, read_safetensors, stored_dtype
from lmstack.model.config import ModelConfig
from lmstack.utils import LmstackError, atomic_write_bytes, atomic_write_json

FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "mixtral")


# ---- config ------------------------------------------------------------------------
def config_from_hf(hf: dict) -> ModelConfig:
    """A transformers config.json dict -> ModelConfig (raises for features we do not model)."""
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        raise LmstackError(f"Hugging Face model_type {mt!r} is not supported; supported: {list(FAMILIES)}")
    extra = {"hf_model_type": mt}
    if mt == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise LmstackError(f"gpt2 activation_function={hf['activation_function']!r} is not supported; "
                               f"lmstack's gelu is the tanh approximation (gelu_new)")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise LmstackError("gpt2 configs with scale_attn_by_inverse_layer_idx or without scale_attn_weights "
                               "are not supported")
        n_embd = hf.get("n_embd", 768)
        return ModelConfig(
            vocab_size=hf["vocab_size"], n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
            intermediate_size=hf.get("n_inner") or 4 * n_embd, context_length=hf.get("n_positions", 1024),
            pos_emb="learned", norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu",
            bias=True, qkv_bias=True, tie_embeddings=hf.get("tie_word_embeddings", True), extra=extra)

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LmstackError(f"{mt} hidden_act={act!r} is not supported; lmstack's SwiGLU uses silu")
    theta, scaling = _rope_from_hf(hf)
    n_head = hf["num_attention_heads"]
    qkv_bias = bias = False
    if mt == "qwen2":
        qkv_bias = True
    elif mt == "qwen3" and hf.get("attention_bias", False):
        raise LmstackError("qwen3 with attention_bias=True (bias on q, k, v and o, none on the MLP) is not supported")
    elif mt == "llama":
        qkv_bias = bool(hf.get("attention_bias", False))
        bias = bool(hf.get("mlp_bias", False))
        if qkv_bias != bias:
            raise LmstackError(f"llama with attention_bias={qkv_bias} and mlp_bias={bias} is not supported; "
                               f"lmstack's `bias` covers o_proj and the MLP together")
    window = hf.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    layer_types = set(hf.get("layer_types") or [])
    if "full_attention" in layer_types and "sliding_attention" in layer_types:
        raise LmstackError(f"{mt} config mixes sliding and full attention layers (layer_types); lmstack "
                           f"applies one sliding_window to every layer")
    if layer_types == {"full_attention"}:
        window = None
    ctx = hf.get("max_position_embeddings", 2048)
    if window is not None and window >= ctx:
        window = None  # a window as long as the context changes nothing
    kw = dict(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
              n_kv_head=hf.get("num_key_value_heads") or n_head, n_embd=hf["hidden_size"],
              head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head,
              intermediate_size=hf["intermediate_size"], context_length=ctx, pos_emb="rope", rope_theta=theta,
              rope_scaling=scaling, rotary_fraction=hf.get("partial_rotary_factor", 1.0), sliding_window=window,
              qkv_bias=qkv_bias, bias=bias, qk_norm=mt == "qwen3", norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu",
              tie_embeddings=hf.get("tie_word_embeddings", False), extra=extra)
    if mt == "mixtral":
        kw.update(n_expert=hf.get("num_local_experts", 8), n_expert_per_token=hf.get("num_experts_per_tok", 2),
                  moe_aux_loss_coef=hf.get("router_aux_loss_coef", 0.02))
    return ModelConfig(**kw)


def _rope_from_hf(hf: dict) -> tuple[float, dict | None]:
    rp = hf.get("rope_parameters") or {}           # transformers 5
    legacy = hf.get("rope_scaling") or {}          # transformers 4
    theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
    src = rp if rp.get("rope_type", "default") != "default" else legacy
    kind = src.get("rope_type", src.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind == "linear":
        return float(theta), {"type": "linear", "factor": src["factor"]}
    if kind == "llama3":
        return float(theta), {"type": "llama3", "factor": src["factor"], "low_freq_factor": src["low_freq_factor"],
                              "high_freq_factor": src["high_freq_factor"],
                              "original_context_length": src["original_max_position_embeddings"]}
    raise LmstackError(f"rope type {kind!r} is not supported; supported: default, linear, llama3")


def config_to_hf(cfg: ModelConfig, family: str | None = None, dtype: str = "float32") -> dict:
    """ModelConfig -> a transformers config.json dict for `family` (chosen from the config if None)."""
    family = family or _pick_family(cfg)
    _check_exportable(cfg, family)
    if family == "gpt2":
        return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=cfg.vocab_size,
                    n_positions=cfg.context_length, n_embd=cfg.n_embd, n_layer=cfg.n_layer, n_head=cfg.n_head,
                    n_inner=cfg.intermediate_size, activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=cfg.tie_embeddings,
                    torch_dtype=dtype, dtype=dtype)
    rope_parameters = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    rope_scaling = None
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        rope_scaling = {"rope_type": s["type"], "factor": s["factor"]}
        if s["type"] == "llama3":
            rope_scaling.update(low_freq_factor=s["low_freq_factor"], high_freq_factor=s["high_freq_factor"],
                                original_max_position_embeddings=s["original_context_length"])
        rope_parameters.update(rope_scaling)
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "mistral": "MistralForCausalLM",
            "mixtral": "MixtralForCausalLM"}[family]
    out = dict(architectures=[arch], model_type=family, vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd,
               intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer,
               num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
               hidden_act="silu", max_position_embeddings=cfg.context_length, rms_norm_eps=cfg.norm_eps,
               rope_theta=cfg.rope_theta, rope_scaling=rope_scaling, rope_parameters=rope_parameters,
               tie_word_embeddings=cfg.tie_embeddings, attention_dropout=0.0, torch_dtype=dtype, dtype=dtype)
    if family == "llama":
        out.update(attention_bias=cfg.qkv_bias, mlp_bias=cfg.bias)
    if family in ("mistral", "mixtral"):
        out["sliding_window"] = cfg.sliding_window
    if family in ("qwen2", "qwen3"):
        out.update(use_sliding_window=False, sliding_window=None)
    if family == "qwen3":
        out["attention_bias"] = False
    if family == "mixtral":
        out.update(num_local_experts=cfg.n_expert, num_experts_per_tok=cfg.n_expert_per_token,
                   router_aux_loss_coef=cfg.moe_aux_loss_coef, router_jitter_noise=0.0)
    return out


def _pick_family(cfg: ModelConfig) -> str:
    if cfg.n_expert:
        return "mixtral"
    if cfg.qk_norm:
        return "qwen3"
    if cfg.pos_emb == "learned":
        return "gpt2"
    if cfg.sliding_window is not None:
        return "mistral"
    if cfg.qkv_bias and not cfg.bias:
        return "qwen2"
    return "llama"


def _check_exportable(cfg: ModelConfig, family: str) -> None:
    if family not in FAMILIES:
        raise LmstackError(f"unknown Hugging Face family {family!r}; valid: {list(FAMILIES)}")
    want = {"mask": "causal", "norm_placement": "pre", "qk_norm": family == "qwen3"}
    if family == "gpt2":
        want.update(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, qkv_bias=True, n_expert=0,
                    n_kv_head=cfg.n_head, head_dim=cfg.n_embd // cfg.n_head, sliding_window=None)
    else:
        want.update(pos_emb="rope", norm="rmsnorm", mlp="swiglu", rotary_fraction=1.0)
        want.update({"llama": dict(n_expert=0, sliding_window=None, qkv_bias=cfg.bias),
                     "qwen2": dict(n_expert=0, sliding_window=None, qkv_bias=True, bias=False),
                     "qwen3": dict(n_expert=0, sliding_window=None, qkv_bias=False, bias=False),
                     "mistral": dict(n_expert=0, qkv_bias=False, bias=False),
                     "mixtral": dict(qkv_bias=False, bias=False)}[family])
        if family != "mixtral" and cfg.n_expert:
            want["n_expert"] = 0
    for name, value in want.items():
        if getattr(cfg, name) != value:
            raise LmstackError(f"cannot export to Hugging Face {family}: it needs {name}={value!r}, the model has "
                               f"{name}={getattr(cfg, name)!r}")


# ---- weights: HF names -> ours ------------------------------------------------------
def state_from_hf(cfg: ModelConfig, model_type: str, t: dict[str, Tensor]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    if model_type == "gpt2":
        t = {k.removeprefix("transformer."): v for k, v in t.items()}
        out["wte.weight"], out["wpe.weight"] = t["wte.weight"], t["wpe.weight"]
        for i in range(cfg.n_layer):
            h, b = f"h.{i}.", f"blocks.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[b + ours + ".weight"], out[b + ours + ".bias"] = t[h + theirs + ".weight"], t[h + theirs + ".bias"]
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                out[b + ours + ".weight"] = t[h + theirs + ".weight"].t().contiguous()  # Conv1D is (in, out)
                out[b + ours + ".bias"] = t[h + theirs + ".bias"]
        out["norm_f.weight"], out["norm_f.bias"] = t["ln_f.weight"], t["ln_f.bias"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = t["lm_head.weight"]
        return out

    out["wte.weight"], out["norm_f.weight"] = t["model.embed_tokens.weight"], t["model.norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t["lm_head.weight"]
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        a = h + "self_attn."
        out[b + "attn_norm.weight"] = t[h + "input_layernorm.weight"]
        out[b + "mlp_norm.weight"] = t[h + "post_attention_layernorm.weight"]
        out[b + "attn.qkv.weight"] = torch.cat([t[a + f"{p}_proj.weight"] for p in "qkv"])
        if cfg.qkv_bias:
            out[b + "attn.qkv.bias"] = torch.cat([t[a + f"{p}_proj.bias"] for p in "qkv"])
        out[b + "attn.proj.weight"] = t[a + "o_proj.weight"]
        if cfg.bias:
            out[b + "attn.proj.bias"] = t[a + "o_proj.bias"]
        if cfg.qk_norm:
            out[b + "attn.q_norm.weight"], out[b + "attn.k_norm.weight"] = t[a + "q_norm.weight"], t[a + "k_norm.weight"]
        if cfg.n_expert:
            out.update(_moe_from_hf(cfg, t, h, b))
            continue
        m = h + "mlp."
        out[b + "mlp.fc.weight"] = torch.cat([t[m + "gate_proj.weight"], t[m + "up_proj.weight"]])
        out[b + "mlp.proj.weight"] = t[m + "down_proj.weight"]
        if cfg.bias:
            out[b + "mlp.fc.bias"] = torch.cat([t[m + "gate_proj.bias"], t[m + "up_proj.bias"]])
            out[b + "mlp.proj.bias"] = t[m + "down_proj.bias"]
    return out


def _moe_from_hf(cfg: ModelConfig, t: dict[str, Tensor], h: str, b: str) -> dict[str, Tensor]:
    out = {}
    if h + "mlp.experts.gate_up_proj" in t:  # transformers 5 fused layout: (E, 2I, C) and (E, C, I)
        out[b + "mlp.router.weight"] = t[h + "mlp.gate.weight"]
        gate_up, down = t[h + "mlp.experts.gate_up_proj"], t[h + "mlp.experts.down_proj"]
        for e in range(cfg.n_expert):
            out[b + f"mlp.experts.{e}.fc.weight"] = gate_up[e]
            out[b + f"mlp.experts.{e}.proj.weight"] = down[e]
        return out
    m = h + "block_sparse_moe."  # checkpoint layout: w1 = gate, w3 = up, w2 = down
    out[b + "mlp.router.weight"] = t[m + "gate.weight"]
    for e in range(cfg.n_expert):
        x = m + f"experts.{e}."
        out[b + f"mlp.experts.{e}.fc.weight"] = torch.cat([t[x + "w1.weight"], t[x + "w3.weight"]])
        out[b + f"mlp.experts.{e}.proj.weight"] = t[x + "w2.weight"]
    return out


# ---- weights: ours -> HF names ------------------------------------------------------
def state_to_hf(model, family: str) -> dict[str, Tensor]:
    cfg = model.config
    t = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out: dict[str, Tensor] = {}
    if family == "gpt2":
        out["transformer.wte.weight"], out["transformer.wpe.weight"] = t["wte.weight"], t["wpe.weight"]
        for i in range(cfg.n_layer):
            h, b = f"transformer.h.{i}.", f"blocks.{i}."
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[h + theirs + ".weight"], out[h + theirs + ".bias"] = t[b + ours + ".weight"], t[b + ours + ".bias"]
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"),
                                 ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                out[h + theirs + ".weight"] = t[b + ours + ".weight"].t()
                out[h + theirs + ".bias"] = t[b + ours + ".bias"]
        out["transformer.ln_f.weight"], out["transformer.ln_f.bias"] = t["norm_f.weight"], t["norm_f.bias"]
        if not cfg.tie_embeddings:
            out["lm_head.weight"] = t["lm_head.weight"]
        return {k: v.contiguous() for k, v in out.items()}

    H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    out["model.embed_tokens.weight"], out["model.norm.weight"] = t["wte.weight"], t["norm_f.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = t["lm_head.weight"]
    for i in range(cfg.n_layer):
        h, b = f"model.layers.{i}.", f"blocks.{i}."
        a = h + "self_attn."
        out[h + "input_layernorm.weight"] = t[b + "attn_norm.weight"]
        out[h + "post_attention_layernorm.weight"] = t[b + "mlp_norm.weight"]
        for name in ("weight", "bias") if cfg.qkv_bias else ("weight",):
            q, k, v = t[b + f"attn.qkv.{name}"].split([H * D, KV * D, KV * D])
            out[a + f"q_proj.{name}"], out[a + f"k_proj.{name}"], out[a + f"v_proj.{name}"] = q, k, v
        out[a + "o_proj.weight"] = t[b + "attn.proj.weight"]
        if cfg.bias:
            out[a + "o_proj.bias"] = t[b + "attn.proj.bias"]
        if cfg.qk_norm:
            out[a + "q_norm.weight"], out[a + "k_norm.weight"] = t[b + "attn.q_norm.weight"], t[b + "attn.k_norm.weight"]
        if cfg.n_expert:
            m = h + "block_sparse_moe."
            out[m + "gate.weight"] = t[b + "mlp.router.weight"]
            for e in range(cfg.n_expert):
                gate, up = t[b + f"mlp.experts.{e}.fc.weight"].chunk(2)
                out[m + f"experts.{e}.w1.weight"], out[m + f"experts.{e}.w3.weight"] = gate, up
                out[m + f"experts.{e}.w2.weight"] = t[b + f"mlp.experts.{e}.proj.weight"]
            continue
        m = h + "mlp."
        for name in ("weight", "bias") if cfg.bias else ("weight",):
            gate, up = t[b + f"mlp.fc.{name}"].chunk(2)
            out[m + f"gate_proj.{name}"], out[m + f"up_proj.{name}"] = gate, up
            out[m + f"down_proj.{name}"] = t[b + f"mlp.proj.{name}"]
    return {k: v.contiguous() for k, v in out.items()}


# ---- entry points -------------------------------------------------------------------
def read_hf_weights(path: Path) -> dict[str, Tensor]:
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        tensors: dict[str, Tensor] = {}
        for f in files:
            tensors.update(read_safetensors(path / f))
        return tensors
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise LmstackError(f"{path} holds only pickled PyTorch weights; lmstack never unpickles. Convert them to "
                           f"safetensors first (transformers: save_pretrained(..., safe_serialization=True))")
    raise LmstackError(f"no model.safetensors (or sharded index) in {path}")


def load_hf(path: str | Path):
    """A Hugging Face model folder -> our Transformer, in the dtype the weights are stored in."""
    from lmstack.model.transformer import Transformer
    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    cfg = config_from_hf(hf)
    tensors = read_hf_weights(path)
    model = Transformer(cfg)
    load_state(model, _convert(cfg, hf["model_type"], tensors, str(path)), source=str(path))
    return model.to(stored_dtype(tensors))


def from_hf(hf_model):
    """An in-memory transformers model -> our Transformer (same dtype as its weights)."""
    from lmstack.model.transformer import Transformer
    hf = hf_model.config.to_dict()
    cfg = config_from_hf(hf)
    model = Transformer(cfg)
    tensors = dict(hf_model.state_dict())
    load_state(model, _convert(cfg, hf["model_type"], tensors, type(hf_model).__name__), source="HF model")
    return model.to(next(hf_model.parameters()).dtype)


def _convert(cfg: ModelConfig, model_type: str, tensors: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    try:
        return state_from_hf(cfg, model_type, tensors)
    except KeyError as e:
        raise LmstackError(f"{source} lacks tensor {e.args[0]!r} that a {model_type} model with this config.json "
                           f"needs; the weights do not match the config") from None


def export_hf(model, path: str | Path, family: str | None = None) -> Path:
    """Write `model` as a Hugging Face folder (config.json + model.safetensors) that
    transformers' AutoModelForCausalLM.from_pretrained loads. Other files in `path` are kept."""
    from safetensors.torch import save
    path = Path(path)
    cfg = model.config
    family = family or _pick_family(cfg)
    dtype = next(model.parameters()).dtype  # written as the model holds it
    hf_cfg = config_to_hf(cfg, family, dtype=str(dtype).removeprefix("torch."))
    tensors = state_to_hf(model, family)
    atomic_write_bytes(path / "model.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write_json(path / "config.json", hf_cfg)
    return path
