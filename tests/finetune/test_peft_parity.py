"""lmstack LoRA against PEFT on random tiny HF Llama, Qwen2 and Mistral models (built from
configs, no download): our adapter folders load in PEFT with no missing or unexpected keys
and give our logits; PEFT's folders load in lmstack and give PEFT's logits; one backward
pass from the same adapters and batch gives the same A and B gradients; merged models agree.

Measured (float32, CPU, peft 0.21, transformers 5): logits max abs diff <= 9e-7 both ways
(bound 1e-4); A/B gradients max abs diff <= 1.1e-6 for gradients up to 0.15 (bound 2e-6 * max(1, max |g|)
+ 1e-7). That is float32 rounding of sums taken in other orders: against the same models run
in float64, on 8 input batches, PEFT's float32 gradients are 1.1e-7 .. 3.7e-7 off and ours
1.3e-7 .. 1.1e-6 (qwen2; the 1.1e-6 on the batch this test uses)."""
import pytest
import torch
import torch.nn.functional as F

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from lmstack.finetune import LoraConfig, add_lora, load_adapter, lora_modules, merge_lora, save_adapter  # noqa: E402
from lmstack.model.hf_names import hf_module_name  # noqa: E402
from lmstack.model import Transformer  # noqa: E402

V = 96
LOGIT_TOL = 1e-4
KW = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)
ALL = ["q", "k", "v", "o", "gate", "up", "down"]
# family -> (HF config kwargs, our LoraConfig, PEFT's target_modules for a PEFT-made adapter)
CASES = {
    "llama": ("Llama", {}, LoraConfig(r=4, alpha=8, targets=["q", "v"]), ["q_proj", "v_proj"]),
    "qwen2": ("Qwen2", {}, LoraConfig(r=4, alpha=6, targets="all-linear", use_rslora=True), "all-linear"),
    "mistral": ("Mistral", dict(sliding_window=8), LoraConfig(r=2, alpha=4, targets=ALL),
                ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}


def hf_base(case, tmp_path):
    """A random tiny HF model saved to tmp_path/base; returns that folder."""
    name, extra, _, _ = CASES[case]
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{name}Config")(attn_implementation="eager", **KW, **extra)
    m = getattr(transformers, f"{name}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise so they are exercised
        for n, p in m.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    m.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def load_hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def ids(T=24):  # T > sliding_window=8 for mistral
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))


def ours_with_adapters(case, folder):
    m = Transformer.from_pretrained(folder)
    add_lora(m, CASES[case][2])
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for mod in lora_modules(m).values():
            for p in mod.lora_B.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_our_adapter_loads_in_peft_with_our_logits(case, tmp_path):
    folder = hf_base(case, tmp_path)
    ours = ours_with_adapters(case, folder)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(folder))
    # every key of ours is one of PEFT's and PEFT expects no other
    pcfg = peft.PeftConfig.from_pretrained(tmp_path / "adapter")
    pm = peft.get_peft_model(load_hf(folder), pcfg)
    res = peft.set_peft_model_state_dict(pm, peft.load_peft_weights(str(tmp_path / "adapter")))
    assert res.unexpected_keys == [] and [k for k in res.missing_keys if "lora_" in k] == []
    # the public path, and the logits
    pm = peft.PeftModel.from_pretrained(load_hf(folder), tmp_path / "adapter").eval()
    x = ids()
    with torch.no_grad():
        ref = pm(x).logits
        assert max_diff(ours(x), ref) <= LOGIT_TOL
        assert max_diff(load_hf(folder)(x).logits, ref) > 1e-2  # the adapters do change the logits
        # merged both ways: PEFT's merge_and_unload and ours give the same model
        merged_ref = pm.merge_and_unload()(x).logits
        stats = merge_lora(ours)
        assert stats["max_abs_logit_drift"] <= 1e-5
        assert max_diff(ours(x), merged_ref) <= LOGIT_TOL


@pytest.mark.parametrize("case", list(CASES))
def test_peft_adapter_loads_in_lmstack_with_peft_logits(case, tmp_path):
    folder = hf_base(case, tmp_path)
    torch.manual_seed(3)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=CASES[case][3], task_type="CAUSAL_LM",
                          init_lora_weights=False, use_rslora=case == "qwen2")  # random A and B
    pm = peft.get_peft_model(load_hf(folder), cfg).eval()
    pm.save_pretrained(tmp_path / "peft")
    ours = Transformer.from_pretrained(folder)
    names = load_adapter(ours, tmp_path / "peft")
    assert len(names) == (2 if case == "llama" else 8)
    x = ids()
    with torch.no_grad():
        assert max_diff(ours(x), pm(x).logits) <= LOGIT_TOL


@pytest.mark.parametrize("case", list(CASES))
def test_one_step_gradients_equal_peft(case, tmp_path):
    folder = hf_base(case, tmp_path)
    ours = ours_with_adapters(case, folder)
    save_adapter(ours, tmp_path / "adapter")
    x = ids()

    def loss(logits):  # next-token cross-entropy, computed the same way for both
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), x[:, 1:].reshape(-1))

    loss(ours(x)).backward()
    pm = peft.PeftModel.from_pretrained(load_hf(folder), tmp_path / "adapter", is_trainable=True)
    loss(pm(x).logits).backward()
    theirs = {n: p.grad for n, p in pm.named_parameters() if p.requires_grad}
    assert len(theirs) == sum(2 * len(m.slices) for m in lora_modules(ours).values())
    assert all(p.grad is None for n, p in ours.named_parameters() if "lora_" not in n)
    # the two sum the same products in other orders (fused qkv and gate|up, stacked adapters),
    # so they differ by float32 rounding (see the module docstring for the bound)
    for name, mod in lora_modules(ours).items():
        for role in mod.slices:
            hf = hf_module_name(ours.config, name, role)
            for ab, mine in (("A", mod.lora_A[role].grad), ("B", mod.lora_B[role].grad)):
                ref = theirs[f"base_model.model.{hf}.lora_{ab}.default.weight"]
                assert mine.abs().max() > 0
                assert max_diff(mine, ref) <= 2e-6 * max(1.0, ref.abs().max().item()) + 1e-7, (hf, ab)
