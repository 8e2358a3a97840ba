"""ModelConfig: every architectural variant of the one Transformer is a field here.

A family difference (GPT-2 vs Llama vs Mixtral) is a value of a field, never a copy of the
model (STYLE.md §1). The config is validated where it is made (`__post_init__`): a bad value
raises `ConfigError` naming the field, the value and what would be valid (STYLE.md §2).

    cfg = ModelConfig.preset("tiny", vocab_size=4096)
    cfg = ModelConfig(vocab_size=32000, n_layer=4, n_head=8, n_kv_head=2, n_embd=256)
    ModelConfig.from_dict(cfg.to_dict()) == cfg

Derived sizes (STYLE.md §14): n_kv_head, head_dim and intermediate_size left None are computed
from the others, and the config remembers which ones it computed (`derived_fields`).
`to_dict()` writes those as None, so `from_dict` and `replace()` compute them again from the
new values: `preset("tiny").replace(n_head=8)` has head_dim 32 and 8 KV heads, not the old
head count's 64 and 4. A size given explicitly stays as given.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from lmstack.utils import LmstackError


class ConfigError(LmstackError, ValueError):
    """An impossible model configuration (both an LmstackError and a ValueError)."""


ARCHS = ("decoder", "encoder", "encoder-decoder")
POS_EMBS = ("rope", "learned", "sinusoidal", "alibi", "relative", "none")
MASKS = ("causal", "bidirectional", "prefix")
NORMS = ("rmsnorm", "layernorm")
NORM_PLACEMENTS = ("pre", "post")
MLPS = ("swiglu", "gated_gelu", "gelu", "gelu_exact", "relu")
GATED_MLPS = ("swiglu", "gated_gelu")   # fc holds rows [gate | up]
ROPE_SCALINGS = ("linear", "llama3")
DERIVED = ("n_kv_head", "head_dim", "intermediate_size")   # None = computed from the other fields


@dataclass
class ModelConfig:
    """One transformer: decoder-only, encoder-only or encoder-decoder.

    Architecture (the topology; everything else below applies to every stack)
      arch: decoder | encoder | encoder-decoder.
        decoder          the Transformer: self-attention masked by `mask`, an LM head (GPT, Llama)
        encoder          the Encoder: bidirectional (mask must be "bidirectional"), BERT's masked-LM
                         head (dense + activation + norm, then the LM head with a bias), a mean-
                         pooled output, and with n_labels > 0 a sequence-classification head
        encoder-decoder  the EncoderDecoder (T5): n_encoder_layer bidirectional blocks encode the
                         input; the n_layer causal decoder blocks gain a cross-attention sublayer
                         on the encoder's output; one token embedding serves both stacks
      n_encoder_layer (the encoder's depth; >= 1 for an encoder-decoder, 0 otherwise); decoder_start_id (the
      first token of an encoder-decoder's decoder input: T5 starts with its pad id, 0);
      n_token_types (BERT's segment embeddings, 0 = none); embed_norm (a norm over the summed
      embeddings before the first block, BERT); n_labels (an encoder's classifier, 0 = none).
    Sizes
      vocab_size, n_layer, n_head, n_embd; n_kv_head (None = n_head: MHA; 1 = MQA; else GQA);
      head_dim (None = n_embd // n_head); intermediate_size (None = 4*n_embd for gelu/relu,
      ~8/3*n_embd rounded up to a multiple of 64 for swiglu, which keeps the parameter count of
      a 4x GELU MLP); context_length = the longest sequence (and the learned-position table).
    Positions
      pos_emb: rope | learned | sinusoidal | alibi | relative | none. relative: T5's bias, one
      learned scalar per head and bucket of k_pos - q_pos, rel_num_buckets buckets (half exact
      distances, half log-spaced up to rel_max_distance), bidirectional buckets in bidirectional
      attention and past-only ones in causal attention; one table per stack, used by all its
      layers. RoPE: rope_theta, rotary_fraction
      (partial rotary: the first fraction of each head's dims rotate), rope_scaling
      {"type": "linear", "factor": f} or {"type": "llama3", "factor", "low_freq_factor",
      "high_freq_factor", "original_context_length"}.
    Attention
      mask: causal | bidirectional | prefix (bidirectional over a per-row prefix given by
      `prefix_lens`, causal after); sliding_window W (a query sees the W most recent keys,
      itself included); qkv_bias; qk_norm (RMSNorm over head_dim of q and k, per head);
      attn_scale (None = 1/sqrt(head_dim); T5 uses 1.0, its init absorbs the scale).
    Blocks
      norm: rmsnorm | layernorm (layernorm has a bias); norm_placement: pre | post (post =
      the original "Add & Norm": x = norm(x + f(x)), and no final norm); mlp: swiglu |
      gated_gelu (T5 v1.1: gelu_tanh(gate) * up) | gelu (tanh approximation, as GPT-2's
      gelu_new) | gelu_exact (erf, BERT's) | relu; bias (on the attention output and MLP
      linears); dropout (embeddings, attention weights, residual branches).
    Mixture of experts (n_expert > 0 replaces every MLP)
      n_expert_per_token (top-k); moe_aux_loss_coef (Switch/Mixtral load balancing);
      moe_z_loss_coef (router z-loss, ST-MoE).
    Embeddings and init
      tie_embeddings (lm_head shares the token embedding); scale_head (the LM head reads the
      final hidden state times n_embd**-0.5: T5, whose tied head would otherwise give logits
      sqrt(n_embd) times larger); init_std (0.02; residual output
      projections use init_std / sqrt(2 * n_layer), GPT-2's scaled init).
    """
    arch: str = "decoder"
    vocab_size: int = 4096
    n_layer: int = 4
    n_encoder_layer: int = 0
    n_head: int = 4
    n_kv_head: int | None = None
    n_embd: int = 256
    head_dim: int | None = None
    intermediate_size: int | None = None
    context_length: int = 512
    pos_emb: str = "rope"
    rope_theta: float = 10000.0
    rotary_fraction: float = 1.0
    rope_scaling: dict | None = None
    rel_num_buckets: int = 32
    rel_max_distance: int = 128
    mask: str = "causal"
    sliding_window: int | None = None
    qkv_bias: bool = False
    qk_norm: bool = False
    attn_scale: float | None = None
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_placement: str = "pre"
    mlp: str = "swiglu"
    bias: bool = False
    dropout: float = 0.0
    n_expert: int = 0
    n_expert_per_token: int = 2
    moe_aux_loss_coef: float = 0.01
    moe_z_loss_coef: float = 0.0
    tie_embeddings: bool = True
    scale_head: bool = False
    n_token_types: int = 0
    embed_norm: bool = False
    n_labels: int = 0
    decoder_start_id: int = 0
    init_std: float = 0.02
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. where it was imported from)

    def __post_init__(self) -> None:
        # which sizes this config computes (not a dataclass field: not compared, not in repr)
        self._derived = frozenset(n for n in DERIVED if getattr(self, n) is None)
        for name in ("vocab_size", "n_layer", "n_head", "n_embd", "context_length"):
            _positive_int(name, getattr(self, name))
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        _positive_int("n_kv_head", self.n_kv_head)
        _choice("pos_emb", self.pos_emb, POS_EMBS)
        _choice("mask", self.mask, MASKS)
        _choice("norm", self.norm, NORMS)
        _choice("norm_placement", self.norm_placement, NORM_PLACEMENTS)
        _choice("mlp", self.mlp, MLPS)
        if self.head_dim is None:
            if self.n_embd % self.n_head:
                raise ConfigError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; choose n_head "
                                  f"among the divisors {_divisors(self.n_embd)} or set head_dim explicitly")
            self.head_dim = self.n_embd // self.n_head
        _positive_int("head_dim", self.head_dim)
        if self.n_head % self.n_kv_head:
            raise ConfigError(f"n_head={self.n_head} is not divisible by n_kv_head={self.n_kv_head}; valid "
                              f"n_kv_head: {_divisors(self.n_head)}")
        if self.intermediate_size is None:
            if self.mlp == "swiglu":
                self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
            else:
                self.intermediate_size = 4 * self.n_embd
        _positive_int("intermediate_size", self.intermediate_size)
        if self.pos_emb == "rope":
            if self.rope_theta <= 0:
                raise ConfigError(f"rope_theta={self.rope_theta} must be > 0 (10000 is the RoPE paper's value)")
            if not 0 < self.rotary_fraction <= 1:
                raise ConfigError(f"rotary_fraction={self.rotary_fraction} must be in (0, 1]")
            if int(self.head_dim * self.rotary_fraction) % 2:
                raise ConfigError(f"rotary_fraction={self.rotary_fraction} of head_dim={self.head_dim} gives an odd "
                                  f"number of rotary dims ({int(self.head_dim * self.rotary_fraction)}); RoPE "
                                  f"rotates pairs, choose a fraction giving an even count")
            _check_rope_scaling(self.rope_scaling)
        elif self.rope_scaling is not None:
            raise ConfigError(f"rope_scaling={self.rope_scaling} is set but pos_emb={self.pos_emb!r}; "
                              f"rope_scaling only applies to pos_emb='rope'")
        if self.pos_emb == "sinusoidal" and self.n_embd % 2:
            raise ConfigError(f"n_embd={self.n_embd} must be even for pos_emb='sinusoidal'")
        if self.sliding_window is not None:
            if not isinstance(self.sliding_window, int) or not 0 < self.sliding_window <= self.context_length:
                raise ConfigError(f"sliding_window={self.sliding_window} must be an int in [1, context_length="
                                  f"{self.context_length}] or None (full attention)")
        if self.norm_eps <= 0:
            raise ConfigError(f"norm_eps={self.norm_eps} must be > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout={self.dropout} must be in [0, 1)")
        if self.n_expert < 0 or self.n_expert == 1:
            raise ConfigError(f"n_expert={self.n_expert} must be 0 (dense MLP) or >= 2")
        if self.n_expert and not 1 <= self.n_expert_per_token <= self.n_expert:
            raise ConfigError(f"n_expert_per_token={self.n_expert_per_token} must be in [1, n_expert="
                              f"{self.n_expert}]")
        if self.moe_aux_loss_coef < 0 or self.moe_z_loss_coef < 0:
            raise ConfigError(f"moe_aux_loss_coef={self.moe_aux_loss_coef} and moe_z_loss_coef="
                              f"{self.moe_z_loss_coef} must be >= 0")
        if self.init_std <= 0:
            raise ConfigError(f"init_std={self.init_std} must be > 0")
        if self.attn_scale is not None and not (isinstance(self.attn_scale, (int, float)) and self.attn_scale > 0):
            raise ConfigError(f"attn_scale={self.attn_scale!r} must be a number > 0, or None for 1/sqrt(head_dim)")
        if self.pos_emb == "relative":
            _check_relative(self.rel_num_buckets, self.rel_max_distance)
        self._check_arch()

    def _check_arch(self) -> None:
        """The fields that say which stacks and heads exist, and what each topology needs."""
        _choice("arch", self.arch, ARCHS)
        if self.arch == "encoder-decoder":
            if not isinstance(self.n_encoder_layer, int) or self.n_encoder_layer <= 0:
                raise ConfigError(f"n_encoder_layer={self.n_encoder_layer!r}: arch='encoder-decoder' needs an "
                                  f"encoder for its cross-attention to read; give its depth, a positive int")
            if self.mask != "causal":
                raise ConfigError(f"mask={self.mask!r} with arch='encoder-decoder': `mask` is the decoder's "
                                  f"self-attention and must be 'causal' (the encoder is always bidirectional)")
            if self.pos_emb == "learned":
                raise ConfigError("pos_emb='learned' with arch='encoder-decoder' is not supported (it would need a "
                                  "position table per stack); choose 'relative' (T5), 'rope', 'sinusoidal' or 'none'")
        elif self.n_encoder_layer != 0:
            raise ConfigError(f"n_encoder_layer={self.n_encoder_layer!r} but arch={self.arch!r} has no encoder "
                              f"(only arch='encoder-decoder' has one, read by cross-attention); leave it 0")
        if self.arch == "encoder" and self.mask != "bidirectional":
            raise ConfigError(f"mask={self.mask!r} with arch='encoder': an encoder attends both ways; set "
                              f"mask='bidirectional'")
        for name in ("n_token_types", "n_labels"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"{name}={v!r} must be an int >= 0 (0 = none)")
        if self.n_labels and self.arch != "encoder":
            raise ConfigError(f"n_labels={self.n_labels} asks for a classification head, which arch='encoder' "
                              f"builds; this config has arch={self.arch!r}")
        if not isinstance(self.decoder_start_id, int) or not 0 <= self.decoder_start_id < self.vocab_size:
            raise ConfigError(f"decoder_start_id={self.decoder_start_id!r} must be a token id in [0, vocab_size="
                              f"{self.vocab_size})")

    @property
    def cross_attention(self) -> bool:
        """Whether the decoder's blocks have a cross-attention sublayer (an encoder-decoder's do)."""
        return self.arch == "encoder-decoder"

    # ---- derived sizes -------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        """Number of dims of each head that RoPE rotates (the rest pass through)."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def derived_fields(self) -> frozenset[str]:
        """The sizes among DERIVED that were computed here rather than given."""
        return self._derived

    # ---- (de)serialisation ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field; a derived size as None, so that reading it back derives it again."""
        return {f.name: None if f.name in self._derived else copy.deepcopy(getattr(self, f.name))
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ConfigError(f"unknown ModelConfig field(s) {unknown}; valid fields: {valid}")
        return cls(**d)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again). Derived sizes are computed again
        from the new values unless `changes` gives them; explicitly given ones are kept."""
        return self.from_dict({**self.to_dict(), **changes})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named configuration; keyword arguments override its fields."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})


def check_arch(cfg: ModelConfig, arch: str, builder: str, source: str | None = None) -> None:
    """Refuse to build (or load) a model of one architecture type from a config of another."""
    if cfg.arch != arch:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}arch={cfg.arch!r}, but {builder} builds arch={arch!r} models; load it with "
                          f"lmstack.model.from_pretrained (or build it with lmstack.model.build_model), which pick "
                          f"the class from `arch`")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive int")


def _choice(name: str, value: Any, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(valid)}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_relative(num_buckets: Any, max_distance: Any) -> None:
    # bidirectional attention halves the buckets (one half per direction), and each half keeps
    # half of its buckets for exact distances: 4 buckets is the least that leaves one of each
    if not isinstance(num_buckets, int) or isinstance(num_buckets, bool) or num_buckets < 4:
        raise ConfigError(f"rel_num_buckets={num_buckets!r} must be an int >= 4 (T5 uses 32)")
    if not isinstance(max_distance, int) or isinstance(max_distance, bool) or max_distance <= num_buckets // 2:
        raise ConfigError(f"rel_max_distance={max_distance!r} must be an int > rel_num_buckets // 2 = "
                          f"{num_buckets // 2} (beyond the exact buckets, log-spaced buckets reach it; T5: 128)")


def _check_rope_scaling(s: dict | None) -> None:
    if s is None:
        return
    if not isinstance(s, dict) or s.get("type") not in ROPE_SCALINGS:
        raise ConfigError(f"rope_scaling={s!r} needs 'type' in {list(ROPE_SCALINGS)} and a 'factor'")
    if not isinstance(s.get("factor"), (int, float)) or s["factor"] <= 0:
        raise ConfigError(f"rope_scaling factor={s.get('factor')!r} must be a number > 0")
    if s["type"] == "llama3":
        need = ("low_freq_factor", "high_freq_factor", "original_context_length")
        missing = [k for k in need if k not in s]
        if missing:
            raise ConfigError(f"rope_scaling type 'llama3' needs keys {list(need)}; missing {missing}")


# Presets. `tiny` trains on two CPU cores in minutes; the others mirror known families at
# a small size (llama-tiny, mixtral-tiny) or at full size (gpt2-124m, the 124M GPT-2).
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=4096, n_layer=4, n_head=4, n_embd=256, context_length=512,
                 pos_emb="rope", norm="rmsnorm", mlp="swiglu", tie_embeddings=True),
    "llama-tiny": dict(vocab_size=32000, n_layer=4, n_head=8, n_kv_head=2, n_embd=256, intermediate_size=688,
                       context_length=1024, pos_emb="rope", rope_theta=10000.0, norm="rmsnorm", norm_eps=1e-5,
                       mlp="swiglu", tie_embeddings=False),
    "mixtral-tiny": dict(vocab_size=32000, n_layer=4, n_head=8, n_kv_head=2, n_embd=256, intermediate_size=512,
                         context_length=1024, pos_emb="rope", rope_theta=1e6, norm="rmsnorm", norm_eps=1e-5,
                         mlp="swiglu", n_expert=8, n_expert_per_token=2, moe_aux_loss_coef=0.02,
                         tie_embeddings=False),
    # arch="encoder" at BERT's layout (post-norm, learned positions, segments, exact gelu)
    "bert-tiny": dict(arch="encoder", vocab_size=4096, n_layer=2, n_head=4, n_embd=128, intermediate_size=512,
                      context_length=512, pos_emb="learned", mask="bidirectional", norm="layernorm", norm_eps=1e-12,
                      norm_placement="post", mlp="gelu_exact", bias=True, qkv_bias=True, n_token_types=2,
                      embed_norm=True),
    # arch="encoder-decoder" at T5 v1.1's layout (relative bias, RMSNorm, unscaled attention, gated
    # GELU, own LM head). Not T5's scaled tied head: n_embd**-0.5 on top of our N(0, 0.02) init
    # (T5 inits embeddings N(0, 1)) leaves the logits near zero and training crawls.
    "t5-tiny": dict(arch="encoder-decoder", vocab_size=4096, n_layer=2, n_encoder_layer=2, n_head=4, n_embd=128,
                    intermediate_size=512, context_length=512, pos_emb="relative", norm="rmsnorm", norm_eps=1e-6,
                    mlp="gated_gelu", attn_scale=1.0, tie_embeddings=False),
    "gpt2-124m": dict(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, context_length=1024, pos_emb="learned",
                      norm="layernorm", norm_eps=1e-5, mlp="gelu", bias=True, qkv_bias=True, tie_embeddings=True),
}
