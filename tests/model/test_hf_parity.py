"""Our Transformer against Hugging Face transformers: random tiny HF models built from configs
(no download), converted both ways, logits compared (max abs diff <= 1e-4, float32); the name
table against the HF models' own state_dicts and files."""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from lmstack.model import Transformer, linear_roles  # noqa: E402
from lmstack.model.hf import config_from_hf, export_hf, from_hf, hf_module_name, hf_name_table  # noqa: E402
from lmstack.model.hf_names import has_fused_experts, normalize_hf_names  # noqa: E402
from lmstack.model.weights_io import read_header  # noqa: E402
from lmstack.utils import LmstackError  # noqa: E402

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
        assert ours.num_params() == hf.num_parameters()
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


# ---- the name table against the HF models themselves ----------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_name_table_is_exactly_hf_state_dict(case, tmp_path):
    """Every HF name and shape the table gives is in the HF model's state_dict (transformers 5's
    in-memory layout) and in the file transformers saves (per-expert layout), and nothing else."""
    name, kw = CASES[case]
    hf = _hf(name, **kw)
    family = hf.config.model_type
    cfg = config_from_hf(hf.config.to_dict())
    in_memory = normalize_hf_names(family, {k: tuple(v.shape) for k, v in hf.state_dict().items()})
    if cfg.tie_embeddings:
        del in_memory["lm_head.weight"]          # the embedding itself, as in ours; files leave it out
    hf.save_pretrained(tmp_path)
    on_disk = normalize_hf_names(family, {k: v.shape for k, v in read_header(tmp_path / "model.safetensors").items()})
    for shapes in (in_memory, on_disk):
        table = hf_name_table(cfg, family, fused_experts=has_fused_experts(shapes))
        want = {}
        for e in table:
            for p in e.parts:
                want[p.name] = e.part_shape(p) if p.index is None else (cfg.n_expert, *e.part_shape(p))
        assert want == shapes
    assert has_fused_experts(in_memory) == (family == "mixtral") and not has_fused_experts(on_disk)
    ours = from_hf(hf)
    stored = [k for k in ours.state_dict() if not (cfg.tie_embeddings and k == "lm_head.weight")]
    assert [e.ours for e in table] == stored


@pytest.mark.parametrize("case", list(CASES))
def test_hf_module_name_for_every_linear_role(case, tmp_path):
    """What PEFT adapter export needs: each (our linear, role) -> the HF module whose weight is
    exactly those rows of ours (transposed for GPT-2's Conv1D)."""
    name, kw = CASES[case]
    hf = _hf(name, **kw)
    hf.save_pretrained(tmp_path)
    theirs = load_file(str(tmp_path / "model.safetensors"))
    ours = from_hf(hf)
    cfg, family = ours.config, hf.config.model_type
    for module, slices in linear_roles(ours).items():
        if module == "lm_head" and cfg.tie_embeddings:         # HF's is tied too and not in the file
            assert hf_module_name(cfg, module, "lm_head", family) == "lm_head"
            continue
        weight = ours.get_submodule(module).weight
        if family == "gpt2":       # c_attn / c_fc are single HF modules: the whole linear, transposed
            hf_w = theirs[hf_module_name(cfg, module, None, family) + ".weight"]
            assert torch.equal(hf_w.t() if module != "lm_head" else hf_w, weight)
            continue
        for role, (a, b) in slices.items():
            assert torch.equal(theirs[hf_module_name(cfg, module, role, family) + ".weight"], weight[a:b])


def test_hf_module_name_examples():
    llama = config_from_hf(_hf("Llama", **_llama_kw(num_hidden_layers=4)).config.to_dict())
    assert hf_module_name(llama, "blocks.3.attn.qkv", "q") == "model.layers.3.self_attn.q_proj"
    assert hf_module_name(llama, "blocks.3.mlp.fc", "up") == "model.layers.3.mlp.up_proj"
    assert hf_module_name(llama, "blocks.0.attn.proj") == "model.layers.0.self_attn.o_proj"
    assert hf_module_name(llama, "lm_head") == "lm_head"
    with pytest.raises(LmstackError, match=r"blocks.0.attn.qkv has no role None.*\['q', 'k', 'v'\]"):
        hf_module_name(llama, "blocks.0.attn.qkv")
    with pytest.raises(LmstackError, match="'blocks.9.attn.qkv' is not a module"):
        hf_module_name(llama, "blocks.9.attn.qkv", "q")
    gpt2 = config_from_hf(_hf("GPT2", **CASES["gpt2"][1]).config.to_dict())
    assert hf_module_name(gpt2, "blocks.1.attn.qkv") == "transformer.h.1.attn.c_attn"
    with pytest.raises(LmstackError, match=r"no role 'q' in Hugging Face gpt2; its roles: \['q\+k\+v'\]"):
        hf_module_name(gpt2, "blocks.1.attn.qkv", "q")
    mixtral = config_from_hf(_hf("Mixtral", **CASES["mixtral"][1]).config.to_dict())
    assert hf_module_name(mixtral, "blocks.1.mlp.experts.2.fc", "up") == "model.layers.1.block_sparse_moe.experts.2.w3"


def test_sharded_folder_from_transformers(tmp_path):
    hf = _hf("Mixtral", **CASES["mixtral"][1])
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    ids = _ids()
    with torch.no_grad():
        assert (Transformer.from_pretrained(tmp_path)(ids) - hf(ids).logits).abs().max().item() <= TOL
