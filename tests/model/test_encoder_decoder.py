"""The encoder-decoder: cross-attention against torch's TransformerDecoderLayer, T5's relative
position buckets against hand-computed values, the KV-cached decoder and the generation loops
against the plain loop without cache (and beam search against exhaustive search), one loader
for every architecture type, and errors at the door that name the field."""
import itertools
import json
import random

import pytest
import torch
import torch.nn.functional as F

from lmstack.model import ConfigError, ContiguousKVCache, Encoder, EncoderDecoder, EncoderMemory, ModelConfig, \
    Transformer, build_model, from_pretrained
from lmstack.model.attention import AttnContext
from lmstack.model.checkpoint import state_for_saving
from lmstack.model.hf_names import stored_tensors
from lmstack.model.positions import relative_position_bucket
from lmstack.model.seq2seq import beam_search, greedy
from lmstack.model.transformer import Block
from lmstack.utils import LmstackError

V = 61


def t5ish(**kw) -> ModelConfig:
    base = dict(arch="encoder-decoder", vocab_size=V, n_layer=2, n_encoder_layer=3, n_head=4, n_kv_head=2, n_embd=48,
                head_dim=10, intermediate_size=40, context_length=64, pos_emb="relative", rel_num_buckets=8,
                rel_max_distance=16, norm_eps=1e-6, mlp="gated_gelu", attn_scale=1.0, scale_head=True)
    base.update(kw)
    return ModelConfig(**base)


def model(**kw) -> EncoderDecoder:
    torch.manual_seed(0)
    return EncoderDecoder(t5ish(**kw)).eval()


def ids(B=2, T=9, seed=1, lo=0):
    return torch.randint(lo, V, (B, T), generator=torch.Generator().manual_seed(seed))


# ---- the pieces against references ----------------------------------------------------------
def test_relative_buckets_by_hand():
    # bidirectional, 32 buckets, max_distance 128 (T5's): 16 per direction, 8 of them exact;
    # distance d >= 8 -> 8 + floor(log(d / 8) / log(128 / 8) * 8), at most 15; keys after the query +16
    rel = torch.tensor([0, -1, -7, -8, -20, -127, -200, 1, 20, 200])
    want = [0, 1, 7, 8, 10, 15, 15, 17, 26, 31]     # -20: 8 + floor(0.9163 / 2.7726 * 8) = 8 + 2
    assert relative_position_bucket(rel, True, 32, 128).tolist() == want
    # unidirectional (the decoder): future keys -> bucket 0; 16 exact, then log up to 128
    rel = torch.tensor([5, 0, -5, -15, -16, -20, -127, -1000])
    want = [0, 0, 5, 15, 16, 17, 31, 31]            # -20: 16 + floor(log(20/16) / log(8) * 16) = 16 + 1
    assert relative_position_bucket(rel, False, 32, 128).tolist() == want


@pytest.mark.parametrize("placement", ["post", "pre"])
def test_cross_attention_block_matches_torch_decoder_layer(placement):
    torch.manual_seed(0)
    cfg = t5ish(pos_emb="none", norm="layernorm", mlp="relu", bias=True, qkv_bias=True, n_kv_head=4, head_dim=None,
                attn_scale=None, norm_placement=placement, intermediate_size=96, scale_head=False, norm_eps=1e-5)
    ref = torch.nn.TransformerDecoderLayer(48, 4, 96, dropout=0.0, batch_first=True,
                                           norm_first=placement == "pre").eval()
    blk = Block(cfg, 0, cross_attention=True).eval()
    C = 48
    with torch.no_grad():
        for norm in (ref.norm1, ref.norm2, ref.norm3):   # not the trivial 1/0 init
            norm.weight.add_(0.1 * torch.randn_like(norm.weight))
            norm.bias.add_(0.1 * torch.randn_like(norm.bias))
        ref.multihead_attn.in_proj_bias.add_(0.1 * torch.randn(3 * C))
        for ours, theirs in ((blk.attn.qkv.weight, ref.self_attn.in_proj_weight),
                             (blk.attn.qkv.bias, ref.self_attn.in_proj_bias),
                             (blk.attn.proj.weight, ref.self_attn.out_proj.weight),
                             (blk.attn.proj.bias, ref.self_attn.out_proj.bias),
                             (blk.cross_attn.q.weight, ref.multihead_attn.in_proj_weight[:C]),
                             (blk.cross_attn.q.bias, ref.multihead_attn.in_proj_bias[:C]),
                             (blk.cross_attn.kv.weight, ref.multihead_attn.in_proj_weight[C:]),
                             (blk.cross_attn.kv.bias, ref.multihead_attn.in_proj_bias[C:]),
                             (blk.cross_attn.proj.weight, ref.multihead_attn.out_proj.weight),
                             (blk.cross_attn.proj.bias, ref.multihead_attn.out_proj.bias),
                             (blk.mlp.fc.weight, ref.linear1.weight), (blk.mlp.fc.bias, ref.linear1.bias),
                             (blk.mlp.proj.weight, ref.linear2.weight), (blk.mlp.proj.bias, ref.linear2.bias),
                             (blk.attn_norm.weight, ref.norm1.weight), (blk.attn_norm.bias, ref.norm1.bias),
                             (blk.cross_norm.weight, ref.norm2.weight), (blk.cross_norm.bias, ref.norm2.bias),
                             (blk.mlp_norm.weight, ref.norm3.weight), (blk.mlp_norm.bias, ref.norm3.bias)):
            ours.copy_(theirs)
        x, mem = torch.randn(2, 7, C), torch.randn(2, 10, C)
        enc_pos = torch.arange(10).expand(2, 10).clone()
        enc_pos[1, 6:] = -1                                  # row 1's encoder input is padded after 6 tokens
        memory = EncoderMemory(enc_pos, [blk.cross_attn.project_memory(mem)], mem)
        ctx = AttnContext(positions=torch.arange(7).expand(2, 7), causal_fast=True, memory=memory)
        expected = ref(x, mem, tgt_mask=torch.nn.Transformer.generate_square_subsequent_mask(7), tgt_is_causal=True,
                       memory_key_padding_mask=enc_pos < 0)
        assert (blk(x, ctx) - expected).abs().max().item() < 1e-5


def test_stacks_see_what_they_should():
    m = model()
    x, d = ids(T=9), ids(T=7, seed=2)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        out = m(x, decoder_input_ids=d, attention_mask=mask)
        x2 = x.clone()
        x2[1, 5:] = (x[1, 5:] + 1) % V                           # change only row 1's padding
        assert torch.equal(m(x2, decoder_input_ids=d, attention_mask=mask)[1], out[1])
        x3 = x.clone()
        x3[:, 8] = (x[:, 8] + 1) % V                             # the encoder is bidirectional: all of row 0 moves
        assert (m(x3, decoder_input_ids=d, attention_mask=mask)[0, 0] - out[0, 0]).abs().max() > 1e-4
        d2 = d.clone()
        d2[:, 4] = (d[:, 4] + 1) % V                             # the decoder is causal
        got = m(x, decoder_input_ids=d2, attention_mask=mask)
        assert torch.allclose(got[:, :4], out[:, :4], atol=1e-6) and (got[:, 4:] - out[:, 4:]).abs().max() > 1e-4
    names = [k for k in m.state_dict() if "rel_bias" in k]     # one table per stack, read by all its layers
    assert names == ["rel_bias.weight", "encoder.rel_bias.weight"]
    assert m.rel_bias.bidirectional is False and m.encoder.rel_bias.bidirectional is True


def test_cached_decoder_equals_full_decode():
    m = model()
    cfg = m.config
    x, d = ids(T=9), ids(T=8, seed=2)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, 6:] = 0
    with torch.no_grad():
        full = m(x, decoder_input_ids=d, attention_mask=mask)
        memory = m.encode(x, mask)
        cache = ContiguousKVCache(cfg.n_layer, 2, 16, cfg.n_kv_head, cfg.head_dim)
        outs = [m.decode(d[:, :3], memory, positions=torch.arange(3).expand(2, 3), cache=cache)]
        for t in range(3, 8):
            outs.append(m.decode(d[:, t:t + 1], memory, positions=torch.full((2, 1), t), cache=cache))
        assert (torch.cat(outs, 1) - full).abs().max().item() < 1e-5
        assert torch.equal(m(x, decoder_input_ids=d, memory=memory), m.decode(d, memory))


# ---- generation -------------------------------------------------------------------------------
def test_greedy_and_beam_with_cache_equal_the_plain_loop():
    m = model(init_std=0.5)         # larger weights than training's init: varied, non-repeating outputs
    x = ids(B=3, T=8)
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[2, 4:] = 0
    plain = greedy(m, x, mask, max_new_tokens=10, use_cache=False)
    # EOS := a token row 0 emits first at step t >= 2, so rows stop at different steps
    t = next(t for t in range(2, 11) if int(plain[0, t]) not in plain[0, 1:t].tolist())
    eos = int(plain[0, t])
    for e in (None, eos):
        g = greedy(m, x, mask, max_new_tokens=10, eos_id=e)
        assert torch.equal(g, greedy(m, x, mask, max_new_tokens=10, eos_id=e, use_cache=False))
        assert g[:, 0].eq(m.config.decoder_start_id).all()
        for W in (1, 3):
            s, sc = beam_search(m, x, mask, num_beams=W, max_new_tokens=10, eos_id=e)
            s2, sc2 = beam_search(m, x, mask, num_beams=W, max_new_tokens=10, eos_id=e, use_cache=False)
            assert torch.equal(s, s2) and torch.allclose(sc, sc2, atol=1e-5)
            if W == 1 and e is None:            # one beam, no EOS: greedy
                assert torch.equal(s, g)
    g = greedy(m, x, mask, max_new_tokens=10, eos_id=eos, pad_id=V - 1)
    assert torch.equal(g[0, :t + 1], plain[0, :t + 1]) and g[0, t + 1:].eq(V - 1).all()   # padded after EOS


def test_beam_search_finds_the_best_sequence_exhaustively():
    """With V^(L-1) beams nothing is pruned: the answer is the argmax over all V^L sequences."""
    torch.manual_seed(0)
    m = EncoderDecoder(t5ish(vocab_size=5, n_embd=24, head_dim=6, init_std=0.5)).eval()
    x = torch.randint(0, 5, (2, 6), generator=torch.Generator().manual_seed(3))
    L = 3
    with torch.no_grad():
        memory = m.encode(x)
        seqs = torch.tensor(list(itertools.product(range(5), repeat=L)))              # (125, L)
        dec = torch.cat([torch.zeros(len(seqs), 1, dtype=torch.long), seqs], 1)
        for b in range(2):
            mem = EncoderMemory(memory.positions[b:b + 1].expand(len(seqs), -1),
                                [(k[b:b + 1].expand(len(seqs), -1, -1, -1), v[b:b + 1].expand(len(seqs), -1, -1, -1))
                                 for k, v in memory.kv], memory.hidden[b:b + 1].expand(len(seqs), -1, -1))
            logp = m.decode(dec[:, :-1], mem).log_softmax(-1).gather(-1, seqs[..., None])[..., 0].sum(1)
            best = logp.argmax()
            got, score = beam_search(m, x[b:b + 1], num_beams=25, max_new_tokens=L)
            assert got[0, 1:].tolist() == seqs[best].tolist()
            assert abs(score.item() - logp[best].item() / L) < 1e-5        # length_penalty 1: mean log-prob


# ---- training signal, the loader, and errors --------------------------------------------------
def test_teacher_forced_loss_and_gradients_reach_both_stacks():
    m = model(dropout=0.1).train()
    x, y = ids(T=9), ids(T=6, seed=4)
    logits = m(x, decoder_input_ids=m.shift_right(y))
    assert m.shift_right(torch.tensor([[5, 6, -100]])).tolist() == [[0, 5, 6]]
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    loss.backward()
    for p in (m.encoder.blocks[0].attn.qkv.weight, m.encoder.rel_bias.weight, m.blocks[1].cross_attn.kv.weight,
              m.rel_bias.weight, m.wte.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def _instruction_pairs(n: int, seed: int, S: int = 48, T: int = 16):
    """tinyworld instruction tasks as seq2seq pairs of bytes: prompt -> answer + EOS (id 1)."""
    from lmstack.data.tinyworld_tasks import instruction
    rng = random.Random(seed)
    x, mask, y = torch.zeros(n, S, dtype=torch.long), torch.zeros(n, S, dtype=torch.long), torch.full((n, T), -100)
    for i in range(n):
        r = instruction(rng, lambda k: True)
        a, b = list(r["prompt"].encode())[:S], (list(r["answer"].encode()) + [1])[:T]
        x[i, :len(a)], mask[i, :len(a)], y[i, :len(b)] = torch.tensor(a), 1, torch.tensor(b)
    return x, mask, y



STEPS = 100


def test_trains_on_tinyworld_instruction_pairs(one_thread):
    """Input -> output pairs (teacher forcing): after 100 steps the held-out loss is far below
    its start, and far below the loss of the same targets read against other examples' inputs:
    the decoder has learned to read the encoder through cross-attention."""
    torch.manual_seed(0)
    m = EncoderDecoder(ModelConfig(arch="encoder-decoder", vocab_size=256, n_layer=2, n_encoder_layer=2, n_head=4,
                                   n_embd=64, intermediate_size=128, context_length=64, pos_emb="relative",
                                   rel_num_buckets=16, rel_max_distance=32, mlp="gated_gelu"))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    tx, tmask, ty = _instruction_pairs(90, seed=1)

    def held_out(order=None):
        order = torch.arange(90) if order is None else order
        with torch.no_grad():
            logits = m.eval()(tx[order], decoder_input_ids=m.shift_right(ty), attention_mask=tmask[order])
        return F.cross_entropy(logits.flatten(0, 1), ty.flatten(), ignore_index=-100).item()

    start = held_out()
    for step in range(STEPS):
        x, mask, y = _instruction_pairs(32, seed=100 + step)
        loss = F.cross_entropy(m.train()(x, decoder_input_ids=m.shift_right(y), attention_mask=mask).flatten(0, 1),
                               y.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    matched, shuffled = held_out(), held_out(torch.roll(torch.arange(90), 1))
    print(f"held-out loss: start {start:.2f}, matched {matched:.2f}, shuffled inputs {shuffled:.2f}")
    assert matched < 0.5 * start and matched < shuffled - 0.5, (start, matched, shuffled)


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=False, scale_head=False, mlp="relu", n_kv_head=4),
                                dict(pos_emb="rope", norm="layernorm", norm_placement="post", bias=True)])
def test_save_load_round_trip_through_the_one_loader(tmp_path, kw):
    m = model(**kw)
    m.save_pretrained(tmp_path)
    back = from_pretrained(tmp_path)
    assert type(back) is EncoderDecoder and back.config == m.config
    x, d = ids(), ids(T=5, seed=2)
    with torch.no_grad():
        assert torch.equal(back(x, decoder_input_ids=d), m(x, decoder_input_ids=d))
    saved = {k: tuple(v.shape) for k, v in state_for_saving(m).items()}
    assert [(e.ours, e.shape) for e in stored_tensors(m.config)] == list(saved.items())   # the name table
    assert json.loads((tmp_path / "config.json").read_text())["arch"] == "encoder-decoder"


def test_the_loader_picks_each_architecture(tmp_path):
    small = dict(vocab_size=V, n_layer=1, n_head=2, n_embd=16, context_length=16)
    for arch, cls, kw in (("decoder", Transformer, {}), ("encoder", Encoder, dict(mask="bidirectional")),
                          ("encoder-decoder", EncoderDecoder, dict(n_encoder_layer=1))):
        cfg = ModelConfig(arch=arch, **small, **kw)
        assert type(build_model(cfg)) is cls
        build_model(cfg).save_pretrained(tmp_path / arch)
        assert type(from_pretrained(tmp_path / arch)) is cls
    with pytest.raises(ConfigError, match=r"arch='encoder-decoder', but Transformer.from_pretrained builds "
                                          r"arch='decoder'"):
        Transformer.from_pretrained(tmp_path / "encoder-decoder")
    with pytest.raises(ConfigError, match=r"arch='decoder', but EncoderDecoder.from_pretrained builds"):
        EncoderDecoder.from_pretrained(tmp_path / "decoder")
    with pytest.raises(ConfigError, match=r"arch='encoder', but Transformer"):
        Transformer.from_pretrained(tmp_path / "encoder")
    with pytest.raises(ConfigError, match=r"arch='decoder', but EncoderDecoder builds"):
        EncoderDecoder(ModelConfig(**small))
    from lmstack.model.hf_config import check_exportable, pick_family
    for preset, cls, family in (("bert-tiny", Encoder, "bert"), ("t5-tiny", EncoderDecoder, "t5")):
        cfg = ModelConfig.preset(preset)
        with torch.device("meta"):
            assert type(build_model(cfg)) is cls
        assert pick_family(cfg) == family
        check_exportable(cfg, family)          # the presets are the Hugging Face layouts


@pytest.mark.parametrize("kw,needle", [
    (dict(n_encoder_layer=0), r"n_encoder_layer=0: arch='encoder-decoder' needs an encoder"),
    (dict(arch="decoder", n_encoder_layer=2), r"n_encoder_layer=2 but arch='decoder' has no encoder"),
    (dict(mask="bidirectional"), r"mask='bidirectional' with arch='encoder-decoder'"),
    (dict(pos_emb="learned"), r"pos_emb='learned' with arch='encoder-decoder'"),
    (dict(arch="encoder", n_encoder_layer=0), r"mask='causal' with arch='encoder'"),
    (dict(arch="seq2seq"), r"arch='seq2seq' is not valid"),
    (dict(rel_num_buckets=2), r"rel_num_buckets=2 must be an int >= 4"),
    (dict(rel_max_distance=4), r"rel_max_distance=4 must be an int > rel_num_buckets // 2 = 4"),
    (dict(attn_scale=0.0), r"attn_scale=0.0"),
    (dict(n_labels=3), r"n_labels=3 asks for a classification head"),
    (dict(decoder_start_id=V), rf"decoder_start_id={V} must be a token id"),
])
def test_config_errors_name_the_field(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        t5ish(**kw)


def test_bad_calls_name_what_is_missing():
    decoder_cfg = ModelConfig(vocab_size=V, n_layer=1, n_head=2, n_embd=16, context_length=16)
    with pytest.raises(ConfigError, match="a Block with cross-attention needs an encoder.*arch='decoder'"):
        Block(decoder_cfg, 0, cross_attention=True)
    m = model()
    with pytest.raises(LmstackError, match="called as model\\(input_ids, decoder_input_ids=...\\)"):
        m(ids())
    memory = m.encode(ids(B=2))
    with pytest.raises(ValueError, match="encoder's output has 2 rows but decoder_input_ids has 3"):
        m.decode(ids(B=3), memory)
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        m.encode(ids(), torch.ones(2, 3))
