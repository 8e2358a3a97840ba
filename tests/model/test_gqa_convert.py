"""to_gqa: MHA -> GQA/MQA by mean-pooling K/V heads, checked against hand-computed weights and
against models whose K/V heads are already equal within each group (where it must be exact)."""
import pytest
import torch

from lmstack.model import ConfigError, ModelConfig, Transformer
from lmstack.model.gqa import pool_heads, to_gqa


def _model(**over):
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=64, n_layer=2, n_head=8, n_embd=32, context_length=16, qkv_bias=True),
                         **over})
    return Transformer(cfg).eval()


def test_pooled_rows_are_the_group_means_by_hand():
    m = _model()
    g = to_gqa(m, 2)
    H, D, C = 8, 4, 32
    w = m.blocks[1].attn.qkv.weight.detach()
    k = w[H * D:2 * H * D].reshape(8, D, C)
    v = w[2 * H * D:].reshape(8, D, C)
    want_k = torch.cat([k[0:4].mean(0), k[4:8].mean(0)])              # heads 0-3 -> 0, 4-7 -> 1
    want_v = torch.cat([v[0:4].mean(0), v[4:8].mean(0)])
    got = g.blocks[1].attn.qkv.weight.detach()
    assert got.shape == ((8 + 2 * 2) * D, C)
    torch.testing.assert_close(got[:H * D], w[:H * D], rtol=0, atol=0)   # queries untouched
    torch.testing.assert_close(got[H * D:H * D + 2 * D], want_k)
    torch.testing.assert_close(got[H * D + 2 * D:], want_v)
    kb = m.blocks[1].attn.qkv.bias.detach()[H * D:2 * H * D].reshape(8, D)       # the K heads' biases
    torch.testing.assert_close(g.blocks[1].attn.qkv.bias.detach()[H * D:H * D + 2 * D],
                               torch.cat([kb[0:4].mean(0), kb[4:8].mean(0)]))
    assert g.config.n_kv_head == 2 and m.config.n_kv_head == 8       # the original is unchanged


def test_exact_when_heads_within_a_group_are_already_equal():
    m = _model()
    H, D = 8, 4
    with torch.no_grad():
        for blk in m.blocks:   # make K/V heads 0-3 equal and 4-7 equal: pooling to 2 then changes nothing
            for part in (slice(H * D, 2 * H * D), slice(2 * H * D, 3 * H * D)):
                w = blk.attn.qkv.weight[part].reshape(8, D, -1)
                w[:] = torch.cat([w[0:1].expand(4, -1, -1), w[4:5].expand(4, -1, -1)])
                b = blk.attn.qkv.bias[part].reshape(8, D)
                b[:] = torch.cat([b[0:1].expand(4, -1), b[4:5].expand(4, -1)])
    ids = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(to_gqa(m, 2)(ids), m(ids), rtol=1e-5, atol=1e-5)
    assert (to_gqa(m, 1)(ids) - m(ids)).abs().max() > 1e-3                  # heads 0 and 4 differ: MQA is not exact


def test_same_head_count_is_the_identity_and_mqa_has_one_head():
    m = _model()
    ids = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(to_gqa(m, 8)(ids), m(ids), rtol=0, atol=0)
    assert to_gqa(m, 1).blocks[0].attn.qkv.weight.shape[0] == (8 + 2) * 4
    assert torch.equal(pool_heads(torch.arange(8.).repeat_interleave(2), 8, 2), torch.tensor([1.5, 1.5, 5.5, 5.5]))


def test_groups_pool_from_an_existing_gqa_model():
    m = _model(n_kv_head=4)
    g = to_gqa(m, 2)
    k_old = m.blocks[0].attn.qkv.weight[32:48].reshape(4, 4, 32)
    torch.testing.assert_close(g.blocks[0].attn.qkv.weight[32:36], k_old[0:2].mean(0))


@pytest.mark.parametrize("bad", [3, 0, 16, 2.0])
def test_bad_group_count_names_the_valid_ones(bad):
    with pytest.raises(ConfigError, match=r"valid: \[1, 2, 4, 8\]"):
        to_gqa(_model(), bad)
