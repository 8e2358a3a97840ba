"""Hugging Face export of runs (lmstack.quant.export.export_hf_folder): NF4 runs in
bitsandbytes' serialized layout, read back by bitsandbytes (QuantState.from_dict +
dequantize_4bit) and by transformers (AutoModelForCausalLM on CPU) with our weights and
logits; float and dequantized INT runs through export_hf; the tokenizer files; refusals."""
import json

import pytest
import torch

from lmstack.model import ModelConfig, Transformer, inject_lora
from lmstack.model.hf import iter_hf_names
from lmstack.quant import QuantConfig, quantize_model
from lmstack.quant.export import export_hf_folder
from lmstack.quant.export.hf_bnb import QS_KEY
from lmstack.tokenizer import Tokenizer
from lmstack.utils import LmstackError

bnbf = pytest.importorskip("bitsandbytes.functional")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog 1234 times. naïve café 東京\n" * 10


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (tests/conftest.py)."""


def make_model(seed=0, **overrides) -> Transformer:
    """n_embd 64, intermediate 256: NF4 blocks of 64 -> q and gate start on a 256-block absmax
    chunk of their fused linear (k, v do not; up does), so both serialized forms occur."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=320, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=256,
              context_length=64, tie_embeddings=False, init_std=0.1)
    kw.update(overrides)
    return Transformer(ModelConfig(**kw)).eval()


def load_hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", dtype=torch.float32).eval()


def float_path(hf, on: bool = True):
    """bitsandbytes' CPU forward repacks NF4 weights (at the first forward) for an AVX512-BF16
    kernel with bf16 products (~1e-3 off) where the CPU has one; switch it off to compare in
    float32 (on=False gives the CPU's default back)."""
    for m in hf.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m._lmstack_default = getattr(m, "_lmstack_default", m.support_avx512bf16_for_cpu)
            m.support_avx512bf16_for_cpu = False if on else m._lmstack_default
    return hf


IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [2, 71, 82, 81, 82, 84, 59, 0]])


def test_nf4_tensors_are_bitsandbytes_layout(tmp_path):
    model = make_model()
    o_proj = model.blocks[0].attn.proj.weight.detach().clone()
    quantize_model(model, QuantConfig(method="nf4"))
    out = export_hf_folder(model, tmp_path / "hf")
    sd = load_file(out / "model.safetensors")
    # an unfused linear: exactly what bitsandbytes itself serializes for quantize_4bit of the weight
    packed, state = bnbf.quantize_4bit(o_proj, blocksize=64, quant_type="nf4", compress_statistics=True)
    ref = {"weight": packed, **state.as_dict(packed=True)}
    name = "model.layers.0.self_attn.o_proj.weight"
    mine = {k.removeprefix(name).removeprefix("."): v for k, v in sd.items() if k.startswith(name)}
    assert set(mine) == {"" if k == "weight" else k for k in ref}
    for k, v in ref.items():
        got = mine["" if k == "weight" else k]
        assert got.dtype == v.dtype and torch.equal(got, v), k
    # every part of a fused linear dequantizes (bitsandbytes' own code) to our module's rows
    cfg = model.config
    nested = set()
    for e in iter_hf_names(cfg, "llama"):
        module, param = e.ours.rsplit(".", 1)
        if param != "weight" or module == "lm_head" or e.parts[0].role is None:   # float tensors
            continue
        ours = model.get_submodule(module).dequantize()
        for p in e.parts:
            qs = {k.removeprefix(p.name + "."): v for k, v in sd.items() if k.startswith(p.name + ".")}
            state = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
            w = bnbf.dequantize_4bit(sd[p.name], state)
            rows = ours if p.rows is None else ours[p.rows[0]:p.rows[1]]
            assert torch.equal(w, rows), p.name
            if state.nested:
                nested.add(p.role)
    assert nested == {"q", "o", "gate", "up", "down"}         # k and v carry float32 absmax
    hf_cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert hf_cfg["quant_method"] == "bitsandbytes" and hf_cfg["load_in_4bit"] and hf_cfg["bnb_4bit_use_double_quant"]
    assert hf_cfg["bnb_4bit_quant_type"] == "nf4" and hf_cfg["bnb_4bit_compute_dtype"] == "float32"
    assert json.loads(bytes(sd[f"{name}.{QS_KEY}"].tolist()))["shape"] == [64, 64]


def test_transformers_loads_nf4_export_with_our_logits(tmp_path):
    model = make_model()
    quantize_model(model, QuantConfig(method="nf4", exclude=("down",)))
    tok = Tokenizer.train([TEXT], vocab_size=300, pattern="gpt4", show_progress=False)
    out = export_hf_folder(model, tmp_path / "hf", tokenizer=tok)
    hf = load_hf(out)
    layer = hf.model.layers[1]
    assert type(layer.self_attn.k_proj).__name__ == "Linear4bit" and type(layer.mlp.up_proj).__name__ == "Linear4bit"
    assert type(layer.mlp.down_proj) is torch.nn.Linear      # left in float: listed in llm_int8_skip_modules
    with torch.no_grad():
        ours = model(IDS)
        assert (float_path(hf)(IDS).logits - ours).abs().max() < 1e-5
        default = float_path(hf, on=False)(IDS).logits       # bitsandbytes' default CPU kernel
        assert (default - ours).abs().max() < 5e-2 * ours.abs().max()
    # the tokenizer files: transformers' tokenizer gives our ids; generation stops at our end-of-text
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "naïve café 1234  \n"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.eot_token == hf_tok.eos_token_id


def test_float_and_dequantized_int_runs(tmp_path):
    model = make_model(tie_embeddings=True)
    out = export_hf_folder(model, tmp_path / "float")
    with torch.no_grad():
        assert (load_hf(out)(IDS).logits - model(IDS)).abs().max() < 1e-5
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    quantize_model(model, QuantConfig(method="rtn", bits=4, group_size=32))
    with pytest.raises(LmstackError, match="dequantize=True"):
        export_hf_folder(model, tmp_path / "int4")
    assert not (tmp_path / "int4").exists()
    out = export_hf_folder(model, tmp_path / "int4", dequantize=True)
    with torch.no_grad():
        assert (load_hf(out)(IDS).logits - model(IDS)).abs().max() < 1e-5


def test_refusals_write_nothing(tmp_path):
    lora = make_model()
    inject_lora(lora, r=2)
    with pytest.raises(LmstackError, match="lora"):
        export_hf_folder(lora, tmp_path / "a")
    moe = make_model(n_expert=2, intermediate_size=64)
    quantize_model(moe, QuantConfig(method="nf4", exclude=("router",)))
    with pytest.raises(LmstackError, match="mixtral"):
        export_hf_folder(moe, tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(LmstackError, match="not empty"):
        export_hf_folder(make_model(), tmp_path / "full")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LmstackError, match="does not exist"):
        export_hf_folder(make_model(), blocker / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "full"]
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]


def test_cli_export_hf(tmp_path, capsys):
    from lmstack.cli.main import main

    run = tmp_path / "run"
    model = make_model()
    quantize_model(model, QuantConfig(method="nf4"))
    model.save_pretrained(run)
    Tokenizer.train([TEXT], vocab_size=300, pattern="gpt2", show_progress=False).save(run / "tokenizer.json")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 0
    with torch.no_grad():
        assert (float_path(load_hf(out))(IDS).logits - model(IDS)).abs().max() < 1e-5
    assert main(["export", str(run), "--format", "hf", "--out", str(out)]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "hf", "--out", str(out), "--overwrite"]) == 0
