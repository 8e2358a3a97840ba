"""Hugging Face config.json <-> ModelConfig, for the families we convert: the decoder-only
gpt2, llama, qwen2, qwen3, mistral, mixtral; the encoder bert (BertForMaskedLM); the
encoder-decoder t5 (T5ForConditionalGeneration, t5 and t5-v1.1).

Both transformers 4.x (`rope_theta`, `rope_scaling`, `torch_dtype`) and 5.x (`rope_parameters`,
`dtype`) spellings are read; exports write both. A feature we do not model is refused by
name, and so is a config missing a size we cannot guess (`hidden_size`, ...): the error names
the file and the field, never a KeyError from inside. Weight names are in hf_names.py; the
user-facing functions (load_hf, from_hf, export_hf) in hf.py.
"""
from __future__ import annotations

from lmstack.model.config import ConfigError, ModelConfig
from lmstack.utils import LmstackError

FAMILIES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "mixtral", "bert", "t5")

# our field -> its name in each family's config.json (for error messages; others are the same)
_GPT2_FIELDS = {"n_layer": "n_layer", "n_embd": "n_embd", "n_head": "n_head", "context_length": "n_positions",
                "intermediate_size": "n_inner"}
_LLAMA_FIELDS = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
                 "n_kv_head": "num_key_value_heads", "context_length": "max_position_embeddings",
                 "n_expert": "num_local_experts"}
_BERT_FIELDS = {"n_layer": "num_hidden_layers", "n_embd": "hidden_size", "n_head": "num_attention_heads",
                "context_length": "max_position_embeddings", "n_token_types": "type_vocab_size"}
_T5_FIELDS = {"n_layer": "num_decoder_layers", "n_encoder_layer": "num_layers", "n_embd": "d_model",
              "n_head": "num_heads", "n_kv_head": "num_heads", "head_dim": "d_kv", "intermediate_size": "d_ff",
              "rel_num_buckets": "relative_attention_num_buckets"}
# activations as transformers names them (ACT2FN) <-> our `mlp` kinds (BERT's hidden_act)
_BERT_ACTS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu": "relu"}
# T5's feed_forward_proj <-> our `mlp` kinds ("gated-gelu" is gelu_new, the tanh form)
_T5_MLPS = {"relu": "relu", "gated-gelu": "gated_gelu", "gated-silu": "swiglu", "gelu": "gelu_exact"}


def hf_field_names(family: str) -> dict[str, str]:
    """Our ModelConfig field -> the config.json key `family` uses for it (where they differ)."""
    return {"gpt2": _GPT2_FIELDS, "bert": _BERT_FIELDS, "t5": _T5_FIELDS}.get(family, _LLAMA_FIELDS)


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """A transformers config.json dict -> ModelConfig. Raises LmstackError naming `source` and
    the field for features we do not model and for missing or invalid sizes."""
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        raise LmstackError(f"{source}: Hugging Face model_type {mt!r} is not supported; supported: {list(FAMILIES)}")
    try:
        return _config_from_hf(hf, mt, source)
    except ConfigError as e:  # named in our field names; say which file it came from
        raise ConfigError(f"{source} ({mt}): {e}") from None


def _need(hf: dict, key: str, mt: str, source: str) -> int:
    """A required positive int field of the HF config."""
    if key not in hf or hf[key] is None:
        raise LmstackError(f"{source}: the {mt} config has no {key!r}; a {mt} config.json must give it (it sets "
                           f"the size of the weights)")
    v = hf[key]
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise LmstackError(f"{source}: {mt} config field {key}={v!r} must be a positive int")
    return v


def _config_from_hf(hf: dict, mt: str, source: str) -> ModelConfig:
    extra = {"hf_model_type": mt}
    if mt == "bert":
        return _bert_config(hf, source, extra)
    if mt == "t5":
        return _t5_config(hf, source, extra)
    if mt == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise LmstackError(f"{source}: gpt2 activation_function={hf['activation_function']!r} is not supported; "
                               f"lmstack's gelu is the tanh approximation (gelu_new)")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise LmstackError(f"{source}: gpt2 configs with scale_attn_by_inverse_layer_idx or without "
                               f"scale_attn_weights are not supported")
        # GPT2Config's defaults are the 124M model's, so only the vocabulary is required
        return ModelConfig(
            vocab_size=_need(hf, "vocab_size", mt, source), n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12),
            n_embd=hf.get("n_embd", 768), intermediate_size=hf.get("n_inner"),  # None: 4 * n_embd
            context_length=hf.get("n_positions", 1024), pos_emb="learned", norm="layernorm",
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), mlp="gelu", bias=True, qkv_bias=True,
            tie_embeddings=hf.get("tie_word_embeddings", True), extra=extra)

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise LmstackError(f"{source}: {mt} hidden_act={act!r} is not supported; lmstack's SwiGLU uses silu")
    theta, scaling = _rope_from_hf(hf, source)
    vocab, n_embd, n_layer, n_head, inter = (_need(hf, k, mt, source) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"))
    qkv_bias = bias = False
    if mt == "qwen2":
        qkv_bias = True
    elif mt == "qwen3" and hf.get("attention_bias", False):
        raise LmstackError(f"{source}: qwen3 with attention_bias=True (bias on q, k, v and o, none on the MLP) is "
                           f"not supported")
    elif mt == "llama":
        qkv_bias = bool(hf.get("attention_bias", False))
        bias = bool(hf.get("mlp_bias", False))
        if qkv_bias != bias:
            raise LmstackError(f"{source}: llama with attention_bias={qkv_bias} and mlp_bias={bias} is not "
                               f"supported; lmstack's `bias` covers o_proj and the MLP together")
    window = hf.get("sliding_window")
    if mt in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    layer_types = set(hf.get("layer_types") or [])
    if "full_attention" in layer_types and "sliding_attention" in layer_types:
        raise LmstackError(f"{source}: {mt} config mixes sliding and full attention layers (layer_types); "
                           f"lmstack applies one sliding_window to every layer")
    if layer_types == {"full_attention"}:
        window = None
    ctx = hf.get("max_position_embeddings", 2048)
    if window is not None and window >= ctx:
        window = None  # a window as long as the context changes nothing
    # head_dim and n_kv_head stay derived (None) unless the file states them, so that a later
    # cfg.replace(n_head=...) recomputes them; HF floors hidden/heads where ours would refuse
    head_dim = hf.get("head_dim") or (None if n_embd % n_head == 0 else n_embd // n_head)
    kw = dict(vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_kv_head=hf.get("num_key_value_heads"),
              n_embd=n_embd, head_dim=head_dim, intermediate_size=inter, context_length=ctx, pos_emb="rope",
              rope_theta=theta, rope_scaling=scaling, rotary_fraction=hf.get("partial_rotary_factor", 1.0),
              sliding_window=window, qkv_bias=qkv_bias, bias=bias, qk_norm=mt == "qwen3", norm="rmsnorm",
              norm_eps=hf.get("rms_norm_eps", 1e-6), mlp="swiglu", tie_embeddings=hf.get("tie_word_embeddings", False),
              extra=extra)
    if mt == "mixtral":
        kw.update(n_expert=hf.get("num_local_experts", 8), n_expert_per_token=hf.get("num_experts_per_tok", 2),
                  moe_aux_loss_coef=hf.get("router_aux_loss_coef", 0.02))
    return ModelConfig(**kw)


def _bert_config(hf: dict, source: str, extra: dict) -> ModelConfig:
    """BertForMaskedLM: learned absolute positions + segments, a LayerNorm over the embeddings,
    post-norm blocks with biases, the MLM head (transform + decoder with a bias)."""
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise LmstackError(f"{source}: bert position_embedding_type={hf['position_embedding_type']!r} is not "
                           f"supported; lmstack reads BERT's learned absolute positions ('absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        raise LmstackError(f"{source}: bert with is_decoder / add_cross_attention is not supported; lmstack reads "
                           f"BERT as an encoder (BertForMaskedLM)")
    act = hf.get("hidden_act", "gelu")
    if act not in _BERT_ACTS:
        raise LmstackError(f"{source}: bert hidden_act={act!r} is not supported; supported: {sorted(_BERT_ACTS)}")
    vocab, n_embd, n_layer, n_head, inter = (_need(hf, k, "bert", source) for k in (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"))
    return ModelConfig(
        arch="encoder", vocab_size=vocab, n_layer=n_layer, n_head=n_head, n_embd=n_embd, intermediate_size=inter,
        context_length=hf.get("max_position_embeddings", 512), pos_emb="learned", mask="bidirectional",
        norm="layernorm", norm_eps=hf.get("layer_norm_eps", 1e-12), norm_placement="post", mlp=_BERT_ACTS[act],
        bias=True, qkv_bias=True, n_token_types=hf.get("type_vocab_size", 2), embed_norm=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), extra=extra)


def _t5_config(hf: dict, source: str, extra: dict) -> ModelConfig:
    """T5ForConditionalGeneration, t5 and t5-v1.1: relative position bias, RMSNorm without
    bias, unscaled attention; relu or gated-gelu feed-forward; the tied head's input scaled by
    d_model**-0.5 unless the config says not to (v1.1). Whether the head is tied is decided
    by the weights where they are read (t5_untied_if_stored, in hf_names.py)."""
    ffp = hf.get("feed_forward_proj", "relu")
    if ffp not in _T5_MLPS:
        raise LmstackError(f"{source}: t5 feed_forward_proj={ffp!r} is not supported; supported: {sorted(_T5_MLPS)}")
    vocab, n_embd, n_enc, n_head, head_dim, inter = (_need(hf, k, "t5", source) for k in (
        "vocab_size", "d_model", "num_layers", "num_heads", "d_kv", "d_ff"))
    n_dec = hf.get("num_decoder_layers") or n_enc
    tie = hf.get("tie_word_embeddings", True)
    # transformers 5 writes scale_decoder_outputs; 4.x scaled exactly when the head was tied
    scale = hf.get("scale_decoder_outputs", tie)
    start = hf.get("decoder_start_token_id")
    start = hf.get("pad_token_id") if start is None else start
    return ModelConfig(
        arch="encoder-decoder", vocab_size=vocab, n_layer=n_dec, n_encoder_layer=n_enc, n_head=n_head, n_embd=n_embd,
        head_dim=head_dim, intermediate_size=inter, context_length=hf.get("n_positions") or 512,
        pos_emb="relative", rel_num_buckets=hf.get("relative_attention_num_buckets", 32),
        rel_max_distance=hf.get("relative_attention_max_distance", 128), attn_scale=1.0, norm="rmsnorm",
        norm_eps=hf.get("layer_norm_epsilon", 1e-6), mlp=_T5_MLPS[ffp], tie_embeddings=bool(tie),
        scale_head=bool(scale), decoder_start_id=start or 0, extra=extra)


def _rope_from_hf(hf: dict, source: str) -> tuple[float, dict | None]:
    rp = hf.get("rope_parameters") or {}           # transformers 5
    legacy = hf.get("rope_scaling") or {}          # transformers 4
    theta = rp.get("rope_theta", hf.get("rope_theta", 10000.0))
    src = rp if rp.get("rope_type", "default") != "default" else legacy
    kind = src.get("rope_type", src.get("type", "default"))
    try:
        if kind == "default":
            return float(theta), None
        if kind == "linear":
            return float(theta), {"type": "linear", "factor": src["factor"]}
        if kind == "llama3":
            return float(theta), {"type": "llama3", "factor": src["factor"], "low_freq_factor": src["low_freq_factor"],
                                  "high_freq_factor": src["high_freq_factor"],
                                  "original_context_length": src["original_max_position_embeddings"]}
    except KeyError as e:
        raise LmstackError(f"{source}: rope scaling of type {kind!r} has no {e.args[0]!r}") from None
    raise LmstackError(f"{source}: rope type {kind!r} is not supported; supported: default, linear, llama3")


def config_to_hf(cfg: ModelConfig, family: str | None = None, dtype: str = "float32") -> dict:
    """ModelConfig -> a transformers config.json dict for `family` (chosen from the config if None)."""
    family = family or pick_family(cfg)
    check_exportable(cfg, family)
    if family == "bert":
        act = {v: k for k, v in reversed(_BERT_ACTS.items())}[cfg.mlp]     # gelu -> gelu_new, the first
        return dict(architectures=["BertForMaskedLM"], model_type="bert", vocab_size=cfg.vocab_size,
                    hidden_size=cfg.n_embd, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                    intermediate_size=cfg.intermediate_size, hidden_act=act, max_position_embeddings=cfg.context_length,
                    type_vocab_size=cfg.n_token_types, layer_norm_eps=cfg.norm_eps, position_embedding_type="absolute",
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, tie_word_embeddings=cfg.tie_embeddings,
                    torch_dtype=dtype, dtype=dtype)
    if family == "t5":
        ffp = {v: k for k, v in _T5_MLPS.items()}[cfg.mlp]
        return dict(architectures=["T5ForConditionalGeneration"], model_type="t5", vocab_size=cfg.vocab_size,
                    d_model=cfg.n_embd, d_kv=cfg.head_dim, d_ff=cfg.intermediate_size, num_layers=cfg.n_encoder_layer,
                    num_decoder_layers=cfg.n_layer, num_heads=cfg.n_head,
                    relative_attention_num_buckets=cfg.rel_num_buckets,
                    relative_attention_max_distance=cfg.rel_max_distance, dropout_rate=0.0,
                    layer_norm_epsilon=cfg.norm_eps, feed_forward_proj=ffp, is_encoder_decoder=True,
                    tie_word_embeddings=cfg.tie_embeddings, scale_decoder_outputs=cfg.scale_head,
                    decoder_start_token_id=cfg.decoder_start_id, pad_token_id=cfg.decoder_start_id,
                    torch_dtype=dtype, dtype=dtype)
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
            "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM"}[family]
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


def pick_family(cfg: ModelConfig) -> str:
    """The Hugging Face family that expresses `cfg` (export_hf's default)."""
    if cfg.arch != "decoder":
        return {"encoder": "bert", "encoder-decoder": "t5"}[cfg.arch]
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


def check_exportable(cfg: ModelConfig, family: str) -> None:
    """Raise unless `family` can express `cfg` exactly (naming the first field that differs)."""
    if family not in FAMILIES:
        raise LmstackError(f"unknown Hugging Face family {family!r}; valid: {list(FAMILIES)}")
    if family in ("bert", "t5"):
        _check_wanted(cfg, family, _encoder_family_fields(cfg, family))
        return
    want = {"arch": "decoder", "mask": "causal", "norm_placement": "pre", "qk_norm": family == "qwen3"}
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
    # fields none of the decoder families has, at their defaults
    want.update(attn_scale=None, n_token_types=0, embed_norm=False, scale_head=False)
    _check_wanted(cfg, family, want)


def _encoder_family_fields(cfg: ModelConfig, family: str) -> dict:
    """What bert / t5 need of a config (the checks of `mlp` and segments come first)."""
    mlps = set((_BERT_ACTS if family == "bert" else _T5_MLPS).values())
    if cfg.mlp not in mlps:
        raise LmstackError(f"cannot export to Hugging Face {family}: it needs mlp in {sorted(mlps)}, the model "
                           f"has mlp={cfg.mlp!r}")
    if family == "bert":
        if cfg.n_token_types < 1:
            raise LmstackError("cannot export to Hugging Face bert: it needs n_token_types >= 1 (BERT always adds a "
                               "segment embedding), the model has n_token_types=0")
        return dict(arch="encoder", pos_emb="learned", norm="layernorm", norm_placement="post", bias=True,
                    qkv_bias=True, embed_norm=True, attn_scale=None, head_dim=cfg.n_embd // cfg.n_head,
                    n_kv_head=cfg.n_head, qk_norm=False, sliding_window=None, n_expert=0, scale_head=False,
                    n_labels=0)   # BertForMaskedLM has no place for our classifier
    return dict(arch="encoder-decoder", pos_emb="relative", norm="rmsnorm", norm_placement="pre", bias=False,
                qkv_bias=False, attn_scale=1.0, n_kv_head=cfg.n_head, qk_norm=False, sliding_window=None,
                n_expert=0, n_token_types=0, embed_norm=False)


def _check_wanted(cfg: ModelConfig, family: str, want: dict) -> None:
    for name, value in want.items():
        if getattr(cfg, name) != value:
            raise LmstackError(f"cannot export to Hugging Face {family}: it needs {name}={value!r}, the model has "
                               f"{name}={getattr(cfg, name)!r}")
