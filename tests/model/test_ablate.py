"""model/ablate.py: each lesion equals the same change made by hand to the weights; norms and
activations are really gone after stripping."""
import copy

import pytest
import torch

from lmstack.model import ModelConfig, Transformer
from lmstack.model.ablate import LESIONS, lesion_qkv, strip_activations, strip_norms
from lmstack.model.layers import RMSNorm
from lmstack.utils import LmstackError


def _model(**over):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**dict(vocab_size=50, n_layer=2, n_head=4, n_embd=32, context_length=12),
                                      **over})).eval()


IDS = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))


def _swap_rows(model, a: slice, b: slice):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for blk in m.blocks:
            w = blk.attn.qkv.weight
            wa, wb = w[a].clone(), w[b].clone()
            w[a], w[b] = wb, wa
    return m


@pytest.mark.parametrize("kind,a,b", [("swap_qk", slice(0, 32), slice(32, 64)),   # rows [q | k | v], 32 each
                                      ("swap_kv", slice(32, 64), slice(64, 96))])
def test_swaps_equal_swapping_the_weight_rows(kind, a, b):
    m = _model()
    want = _swap_rows(m, a, b)(IDS)
    hooks = lesion_qkv(m, kind)
    torch.testing.assert_close(m(IDS), want)
    hooks.remove()
    torch.testing.assert_close(m(IDS), _model()(IDS))           # removed: the original model again


def test_zero_v_equals_a_silent_attention():
    m = _model()
    want = copy.deepcopy(m)
    with torch.no_grad():
        for blk in want.blocks:
            blk.attn.proj.weight.zero_()
    lesion_qkv(m, "zero_v")
    torch.testing.assert_close(m(IDS), want(IDS))


@pytest.mark.parametrize("kind", ["zero_q", "zero_k"])
def test_zero_q_or_k_makes_attention_uniform_over_visible_keys(kind):
    m = _model()
    lesion_qkv(m, kind)
    att = m.introspect(IDS)["attentions"][0]                           # (B, H, T, T)
    T = IDS.shape[1]
    want = torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1)[:, None]
    torch.testing.assert_close(att, want.expand_as(att))


def test_lesion_errors():
    with pytest.raises(LmstackError, match="valid: swap_qk"):
        lesion_qkv(_model(), "zero_x")
    with pytest.raises(LmstackError, match="n_kv_head=2"):
        lesion_qkv(_model(n_kv_head=2), "swap_qk")
    assert set(LESIONS) == {"swap_qk", "swap_kv", "zero_q", "zero_k", "zero_v"}


def test_strip_norms_removes_every_norm():
    m = _model()
    before = m(IDS)
    assert strip_norms(m) == 2 * 2 + 1                                  # two per block + the final norm
    assert not any(isinstance(x, (RMSNorm, torch.nn.LayerNorm)) for x in m.modules())
    assert not any("norm" in k for k in m.state_dict())
    assert (m(IDS) - before).abs().max() > 1e-3
    # without norms, scaling the embeddings scales the first block's attention input exactly
    x = m.introspect(IDS)["hidden_states"][0]
    torch.testing.assert_close(m.blocks[0].attn_norm(2 * x), 2 * x)


def test_strip_activations_makes_a_plain_mlp_linear():
    m = _model(mlp="relu")
    mlp = m.blocks[0].mlp
    x = torch.randn(3, 32)
    assert (mlp(-x) + mlp(x)).abs().max() > 1e-3                       # relu: not odd
    assert strip_activations(m) == 2
    torch.testing.assert_close(mlp(-x), -mlp(x))                       # linear (no bias): odd
    torch.testing.assert_close(mlp(2 * x), 2 * mlp(x))
