"""Our Transformer against Hugging Face transformers: random tiny HF models built from configs
(no download), converted both ways, logits compared (max abs diff <= 1e-4, float32)."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmstack.model import Transformer  # noqa: E402
from lmstack.model.hf import export_hf, from_hf  # noqa: E402

TOL = 1e-4
V = 96  # vocab


def _llama_kw(**kw):
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)
    base.update(kw)
    return base


def _hf(name, **kw):
    torch.manual_seed(0)
    cls_cfg = getattr(transformers, f"{name}Config")
    cls = getattr(transformers, f"{name}ForCausalLM" if name != "GPT2" else "GPT2LMHeadModel")
    m = cls(cls_cfg(attn_implementation="eager", **kw)).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise so they are exercised
        for n, p in m.named_parameters():
            if "norm" in n or "ln_" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return m


CASES = {
    "gpt2": ("GPT2", dict(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": ("Llama", _llama_kw(rope_theta=500000.0)),
    "llama3-scaled": ("Llama", _llama_kw(rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 16})),
    "llama-bias": ("Llama", _llama_kw(attention_bias=True, mlp_bias=True, num_key_value_heads=1)),  # MQA
    "qwen2": ("Qwen2", _llama_kw(tie_word_embeddings=True)),
    "qwen3": ("Qwen3", _llama_kw(head_dim=24)),  # QK-norm; head_dim != hidden/heads
    "mistral": ("Mistral", _llama_kw(sliding_window=8)),
    "mixtral": ("Mixtral", _llama_kw(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
}


def _ids(T=24, B=2):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("case", list(CASES))
def test_import_matches_hf_logits(case, tmp_path):
    name, kw = CASES[case]
    hf = _hf(name, **kw)
    ids = _ids()  # T=24 > sliding_window=8 for mistral
    with torch.no_grad():
        ref = hf(ids).logits
        ours = from_hf(hf).eval()
        assert (ours(ids) - ref).abs().max().item() <= TOL
        # through the disk: HF save_pretrained folder, auto-detected by Transformer.from_pretrained
        hf.save_pretrained(tmp_path / "hf")
        loaded = Transformer.from_pretrained(tmp_path / "hf")
        assert (loaded(ids) - ref).abs().max().item() <= TOL
    if case == "mistral":
        assert loaded.config.sliding_window == 8
    if case == "mixtral":  # the load-balancing loss equals HF's (ours is weighted by the coefficient)
        hf_out = hf(ids, output_router_logits=True)
        with torch.no_grad():
            ours(ids)
        coef = hf.config.router_aux_loss_coef
        assert torch.allclose(ours.aux_loss(), coef * hf_out.aux_loss, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_export_loads_in_transformers(case, tmp_path):
    name, kw = CASES[case]
    ours = from_hf(_hf(name, **kw)).eval()
    export_hf(ours, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == name.lower()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = _ids()
    with torch.no_grad():
        assert (back(ids).logits - ours(ids)).abs().max().item() <= TOL


def test_introspection_matches_hf_attentions():
    hf = _hf("Llama", **_llama_kw())
    ours = from_hf(hf).eval()
    ids = _ids(T=12)
    with torch.no_grad():
        ref = hf(ids, output_attentions=True, output_hidden_states=True)
    got = ours.introspect(ids)
    assert len(got["attentions"]) == len(ref.attentions) == 2
    for a, b in zip(got["attentions"], ref.attentions):
        assert a.shape == b.shape == (2, 4, 12, 12)
        assert (a - b).abs().max().item() <= 1e-5
    assert len(got["hidden_states"]) == len(ref.hidden_states) == 3
    for a, b in zip(got["hidden_states"], ref.hidden_states):
        assert (a - b).abs().max().item() <= TOL


def test_sdpa_backend_of_hf_agrees_too():
    """The eager HF reference is not a special case: HF's own SDPA path gives the same logits as ours."""
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(attn_implementation="sdpa", **_llama_kw(sliding_window=8))
    hf = transformers.MistralForCausalLM(cfg).eval()
    ids = _ids()
    with torch.no_grad():
        assert (from_hf(hf).eval()(ids) - hf(ids).logits).abs().max().item() <= TOL


def test_transformers4_config_names(tmp_path):
    """A 4.x-style config.json (top-level rope_theta, rope_scaling with "type", torch_dtype) loads the same."""
    hf = _hf("Llama", **_llama_kw(rope_parameters={"rope_type": "linear", "rope_theta": 20000.0, "factor": 2.0}))
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("rope_parameters")
    cfg.pop("dtype", None)
    cfg.update(rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.0}, torch_dtype="float32")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = Transformer.from_pretrained(tmp_path)
    assert ours.config.rope_theta == 20000.0 and ours.config.rope_scaling == {"type": "linear", "factor": 2.0}
    ids = _ids()
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= TOL


def test_export_keeps_dtype(tmp_path):
    ours = from_hf(_hf("Llama", **_llama_kw())).to(torch.bfloat16).eval()
    export_hf(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert next(back.parameters()).dtype == torch.bfloat16
    assert torch.equal(back.model.embed_tokens.weight, ours.wte.weight)
