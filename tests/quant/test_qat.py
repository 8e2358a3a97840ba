"""Quantization-aware training: the fake-quantized forward is RTN's dequantized weight bit for
bit, the straight-through gradient follows its stated rule, the Trainer trains through it
(the trainer's model_transform, QAT) and convert_qat gives the IntLinear model whose codes
are rtn_quantize of the trained weights and whose logits are the fake-quant model's."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmstack import kernels
from lmstack.utils import LmstackError
from lmstack.model import IntLinear, ModelConfig, Transformer, get_transforms
from lmstack.quant import QAT, FakeQuantLinear, QuantConfig, QuantError, convert_qat, prepare_qat, quantize_model
from lmstack.quant.qat import fake_quantize_grid, ste_fake_quantize
from lmstack.quant.rtn import fake_quantize, rtn_quantize

CFG = dict(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, context_length=64)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (tests/conftest.py)."""


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**CFG, **kw}))


class Tokens:
    """A batch source of random windows over a repeating token pattern (so the loss can fall)."""

    def __init__(self, seed=0, batch=4, T=32):
        g = torch.Generator().manual_seed(123)
        pattern = torch.randint(0, 64, (29,), generator=g)
        self.stream = pattern.repeat(200)
        self.gen, self.batch, self.T = torch.Generator().manual_seed(seed), batch, T

    def next_batch(self):
        s = torch.randint(0, len(self.stream) - self.T - 1, (self.batch,), generator=self.gen)
        w = torch.stack([self.stream[i:i + self.T + 1] for i in s.tolist()])
        return w[:, :-1], w[:, 1:]

    def state_dict(self):
        return {"gen": self.gen.get_state()}

    def load_state_dict(self, sd):
        self.gen.set_state(sd["gen"])


@pytest.mark.parametrize("bits,g,sym", [(4, 32, True), (4, None, False), (8, 16, True), (8, 64, False)])
def test_fake_weight_is_rtn_dequantized_bit_for_bit(bits, g, sym):
    lin = nn.Linear(64, 24)
    torch.nn.init.normal_(lin.weight, std=0.3)
    fq = FakeQuantLinear(lin, bits, g, sym)
    assert fq.weight is lin.weight and fq.bias is lin.bias        # same Parameters, same names
    assert torch.equal(fq.fake_weight(), fake_quantize(lin.weight, bits, g, sym))
    if g in (None, 32, 64):                                       # QuantConfig's group sizes
        int_lin = nn.Linear(64, 24)
        int_lin.load_state_dict(lin.state_dict())
        m = IntLinear(24, 64, bits, g, sym, bias=int_lin.bias)
        codes, scale, zero = rtn_quantize(lin.weight, bits, g, sym)
        m.set_codes(codes, scale, zero)
        assert torch.equal(fq.fake_weight(), m.dequantize())


def test_ste_gradient_passes_inside_the_grid_and_zeroes_clamped_weights():
    torch.manual_seed(0)
    w = torch.randn(6, 16, requires_grad=True)
    x, up = torch.randn(5, 16), torch.randn(5, 6)
    # a symmetric 4-bit grid whose step is too small for the largest weights: |w| > 7 * s clamps
    scale = torch.full((6, 2), 0.15)
    w_hat, inside = fake_quantize_grid(w.detach(), scale, None, 4, 8)
    assert 0 < int((~inside).sum()) < w.numel()
    # reference: the gradient of the loss w.r.t. the dequantized weight as a leaf
    leaf = w_hat.clone().requires_grad_(True)
    (F.linear(x, leaf) * up).sum().backward()
    (F.linear(x, ste_fake_quantize(w, scale, None, 4, 8)) * up).sum().backward()
    assert torch.equal(w.grad, torch.where(inside, leaf.grad, torch.zeros_like(leaf.grad)))
    assert torch.equal(w.grad[~inside], torch.zeros(int((~inside).sum())))
    # the weights outside are exactly those whose rounded code left [1, 15] (|w / s| > 7.5)
    assert torch.equal(~inside, (torch.round(w.detach() / 0.15).abs() > 7))


def test_ste_gradient_is_the_identity_on_the_module_grid():
    """With the module's own absmax grid nothing clamps: dL/dW = dL/dW_hat exactly."""
    torch.manual_seed(1)
    lin = nn.Linear(32, 8, bias=False)
    fq = FakeQuantLinear(lin, 4, 32, True)
    x, up = torch.randn(3, 32), torch.randn(3, 8)
    (fq(x) * up).sum().backward()
    leaf = fake_quantize(lin.weight, 4, 32, True).requires_grad_(True)
    (F.linear(x, leaf) * up).sum().backward()
    assert torch.equal(lin.weight.grad, leaf.grad)


def test_trainer_option_trains_through_fake_quant_and_convert_matches(tmp_path):
    from lmstack.train import TrainConfig, Trainer
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = TrainConfig(out=str(tmp_path / "run"), max_steps=8, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1,
                      eval_every=0, ckpt_every=0, tensorboard=False, device="cpu")
    res = Trainer(cfg, model, batches=Tokens(), model_transform=QAT({"bits": 4, "group_size": 32})).fit()
    names = [f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    assert [n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)] == names
    assert set(model.state_dict()) == set(before)                    # same state-dict names
    assert not torch.equal(model.blocks[0].attn.qkv.weight, before["blocks.0.attn.qkv.weight"])
    assert res["train_loss"] < 4.0                                    # ln(64) = 4.16 at the start
    # the saved run is the float (latent) weights
    saved = Transformer.from_pretrained(tmp_path / "run")
    assert torch.equal(saved.blocks[1].mlp.fc.weight, model.blocks[1].mlp.fc.weight)

    model.eval()
    x = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        fake_logits = model(x)
    latent = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    assert convert_qat(model) is model
    for n in names:
        m = model.get_submodule(n)
        assert isinstance(m, IntLinear)
        codes, scale, _ = rtn_quantize(latent[n], 4, 32, True)
        assert torch.equal(m.codes().long(), codes) and torch.equal(m.weight_scale, scale)
    with torch.no_grad(), kernels.disabled():
        assert torch.equal(model(x), fake_logits)
    with torch.no_grad():                       # the compiled kernels sum in another order
        assert (model(x) - fake_logits).abs().max() < 1e-4
    rec = get_transforms(model)[-1]
    assert (rec["kind"], rec["method"], rec["bits"], rec["group_size"], rec["modules"]) == \
        ("quant", "rtn", 4, 32, names)
    # ... and it is a normal quantized run
    model.save_pretrained(tmp_path / "int4")
    with torch.no_grad():
        assert torch.equal(Transformer.from_pretrained(tmp_path / "int4")(x), model(x))


def test_bad_settings_are_clear_errors_and_change_nothing(tmp_path):
    m = tiny()
    with pytest.raises(QuantError, match=r"unknown key\(s\) \['bitz'\]"):
        prepare_qat(m, {"bitz": 4})
    with pytest.raises(QuantError, match="bits=3"):
        prepare_qat(m, {"bits": 3})
    with pytest.raises(QuantError, match="group_size=128 does not divide in_features=64"):
        prepare_qat(m, {"bits": 4, "group_size": 128})
    with pytest.raises(QuantError, match="method='gptq'"):
        prepare_qat(m, QuantConfig("gptq", 4))
    with pytest.raises(QuantError, match="call prepare_qat"):
        convert_qat(m)
    assert not any(isinstance(x, FakeQuantLinear) for x in m.modules())
    prepare_qat(m, {"bits": 4})
    with pytest.raises(QuantError, match="already has fake-quantized"):
        prepare_qat(m, {"bits": 8})
    with pytest.raises(QuantError, match=r"fake-quantized \(QAT\).*int4.*convert_qat"):
        quantize_model(m, QuantConfig("rtn", 4))
    assert sum(isinstance(x, FakeQuantLinear) for x in m.modules()) == 8     # unchanged
    from lmstack.quant.export import export_hf_folder
    with pytest.raises(LmstackError, match=r"fake-quantized \(QAT\).*convert_qat"):
        export_hf_folder(m, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []                                    # nothing written
    q = tiny()
    quantize_model(q, QuantConfig("rtn", 8))
    with pytest.raises(QuantError, match="already quantized"):
        prepare_qat(q, {"bits": 4})
    with pytest.raises(ValueError, match="bitz"):
        QAT({"bitz": 4})                  # the trainer's transform checks its settings when made
    with pytest.raises(ValueError, match="group_size=48"):
        QAT({"bits": 4, "group_size": 48})
