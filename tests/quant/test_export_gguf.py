"""GGUF export (lmstack.quant.export): GGML blocks byte for byte against the `gguf` package's
reference quantizers, the file read back by `gguf.GGUFReader` (metadata, tokenizer, tensors),
and the file run by an independent NumPy forward of llama.cpp's `llama` graph (interleaved
RoPE, GQA, RMSNorm, SwiGLU) against our Transformer's logits. The llama.cpp run itself is in
test_export_llamacpp.py (skipped without llama-cpp-python)."""
import functools
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack.model import ModelConfig, Transformer
from lmstack.quant import QuantConfig, quantize_model
from lmstack.quant.export import export_gguf
from lmstack.quant.export.ggml_blocks import encode
from lmstack.quant.export.gguf_llama import rope_interleave
from lmstack.tokenizer import Tokenizer
from lmstack.tokenizer.base import bytes_to_bytelevel
from lmstack.utils import LmstackError

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

TEXT = ("The quick brown fox jumps over the lazy dog 1234 times.\n  Ünïcödé café — naïve 東京 🙂\t"
        "It's we'll they've I'm 3.14159 and 42, 007!\n\n") * 8


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one thread (tests/conftest.py)."""


@functools.lru_cache(maxsize=None)
def make_tokenizer(pattern: str = "gpt2", vocab_size: int = 360) -> Tokenizer:
    return Tokenizer.train([TEXT], vocab_size=vocab_size, pattern=pattern, show_progress=False)


def make_model(seed: int = 0, **overrides) -> Transformer:
    """A tiny Llama-style model with GQA and a padded vocabulary (384 rows, 360 tokens). The
    weights are larger than the default init so that logits are far apart (greedy decoding
    then has clear winners to compare)."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=384, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96,
              context_length=128, init_std=0.15)
    kw.update(overrides)
    return Transformer(ModelConfig(**kw)).eval()


def field(reader, key):
    return reader.fields[key].contents()


# ---- GGML blocks -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind,qtype", [("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)])
def test_blocks_equal_gguf_reference_bytes(kind, qtype):
    torch.manual_seed(0)
    w = torch.randn(16, 128) * 3
    w[0, :32] = 0                                      # an all-zero block: d = 0
    w[1, :32] = torch.arange(32) / 8 - 2               # exact halves: roundf ties away from zero
    w[2, :32] = 0.5
    w[2, 7] = -0.5                                     # |max| tie: the first one sets the sign
    w[3] *= 1e-6                                       # tiny scales (float16 subnormals)
    assert encode(w, kind) == gguf.quants.quantize(w.numpy(), qtype).tobytes()
    assert encode(w, "f16") == w.numpy().astype(np.float16).tobytes()


def test_q4_0_block_by_hand():
    # one block: max |x| is -4 at index 0 -> d = 0.5, q = trunc(x / 0.5 + 8.5) clipped to 15
    x = torch.zeros(1, 32)
    x[0, 0], x[0, 1], x[0, 16], x[0, 17] = -4.0, 1.0, 3.9, 0.24
    b = encode(x, "q4_0")
    assert np.frombuffer(b[:2], np.float16)[0] == 0.5
    q = [8] * 32
    q[0], q[1], q[16], q[17] = 0, 10, 15, 8               # -4/0.5+8.5=0.5; 2+8.5; 7.8+8.5=16.3->15; 8.98
    assert list(b[2:]) == [q[j] | (q[j + 16] << 4) for j in range(16)]


# ---- the file read back ------------------------------------------------------------------------
def test_metadata_and_tokenizer_read_back(tmp_path):
    tok = make_tokenizer("gpt2")
    model = make_model(tie_embeddings=False, rope_theta=5e5, norm_eps=1e-6)
    cfg = model.config
    r = export_gguf(model, tok, tmp_path / "m.gguf", type="f16", name="tiny")
    rd = gguf.GGUFReader(r.path)
    want = {"general.architecture": "llama", "general.name": "tiny", "general.alignment": 32, "general.file_type": 1,
            "llama.context_length": 128, "llama.embedding_length": 64, "llama.block_count": 2,
            "llama.feed_forward_length": 96, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.rope.dimension_count": 16, "llama.rope.freq_base": 5e5, "llama.vocab_size": 384,
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.add_bos_token": False,
            "tokenizer.ggml.bos_token_id": tok.eot_token, "tokenizer.ggml.eos_token_id": tok.eot_token,
            "tokenizer.ggml.eot_token_id": tok.special_tokens["<|end|>"]}
    for key, value in want.items():
        assert field(rd, key) == value, key
    assert field(rd, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-6)
    tokens, types = field(rd, "tokenizer.ggml.tokens"), field(rd, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == cfg.vocab_size
    for i in range(cfg.vocab_size):
        if i in tok.vocab:       # GPT-2's byte-to-unicode form: " the" -> "Ġthe"
            assert (tokens[i], types[i]) == (bytes_to_bytelevel(tok.vocab[i]), 1)
        elif i < tok.n_vocab:
            assert tok.special_tokens[tokens[i]] == i and types[i] == 3
        else:
            assert (tokens[i], types[i]) == (f"[PAD{i}]", 5)
    assert tokens[ord(" ")] == "Ġ" and tokens[ord("\n")] == "Ċ"
    merges = field(rd, "tokenizer.ggml.merges")
    assert merges == [f"{tokens[a]} {tokens[b]}" for a, b in tok.merges]
    # tensors: names, GGML shapes, types; an untied head is written, norms stay F32
    infos = {t.name: t for t in rd.tensors}
    assert infos["output.weight"].tensor_type == Q.F16 and infos["output_norm.weight"].tensor_type == Q.F32
    assert list(infos["blk.1.attn_k.weight"].shape) == [64, 32]          # GGML order: (in, out)
    assert list(infos["blk.0.ffn_down.weight"].shape) == [96, 64]
    assert {t.data_offset % 32 for t in rd.tensors} == {0}
    assert field(make_gguf_reader(tmp_path, "gpt4"), "tokenizer.ggml.pre") == "llama-bpe"


def make_gguf_reader(tmp_path, pattern):
    r = export_gguf(make_model(), make_tokenizer(pattern), tmp_path / f"{pattern}.gguf", type="f32")
    return gguf.GGUFReader(r.path)


def test_quantized_tensors_equal_reference_of_permuted_weights(tmp_path):
    """Each Q8_0/Q4_0 tensor in the file is gguf.quants.quantize of our weight, with q and k rows
    in interleaved-RoPE order; a tied head is absent; rows of 80 values fall back to F16."""
    model = make_model(intermediate_size=80)
    cfg, sd = model.config, model.state_dict()
    H, KV, D = cfg.n_head, cfg.n_kv_head, cfg.head_dim
    for kind, qtype in (("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)):
        r = export_gguf(model, make_tokenizer(), tmp_path / f"{kind}.gguf", type=kind)
        rd = gguf.GGUFReader(r.path)
        data = {t.name: t for t in rd.tensors}
        assert "output.weight" not in data
        assert field(rd, "general.file_type") == {"q8_0": 7, "q4_0": 2}[kind]
        assert r.fallbacks == ["blk.0.ffn_down.weight", "blk.1.ffn_down.weight"]
        assert data["blk.0.ffn_down.weight"].tensor_type == Q.F16
        qkv = sd["blocks.1.attn.qkv.weight"]
        expect = {"token_embd.weight": sd["wte.weight"],
                  "blk.1.attn_q.weight": rope_interleave(qkv[:H * D], H),
                  "blk.1.attn_k.weight": rope_interleave(qkv[H * D:(H + KV) * D], KV),
                  "blk.1.attn_v.weight": qkv[(H + KV) * D:],
                  "blk.1.ffn_up.weight": sd["blocks.1.mlp.fc.weight"][80:]}
        for name, w in expect.items():
            assert data[name].tensor_type == qtype
            assert data[name].data.tobytes() == gguf.quants.quantize(w.numpy(), qtype).tobytes(), name
        np.testing.assert_array_equal(data["blk.1.ffn_down.weight"].data,
                                      sd["blocks.1.mlp.proj.weight"].numpy().astype(np.float16))
        assert data["blk.1.attn_norm.weight"].tensor_type == Q.F32


def test_rope_interleave_by_hand():
    # one head of D = 4: rows [a0, a1, b0, b1] (pairs (a_i, b_i) in HF's half split) -> [a0, b0, a1, b1]
    w = torch.arange(8.0).view(4, 2)
    assert rope_interleave(w, 1)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]
    assert rope_interleave(torch.arange(8.0), 2).tolist() == [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]


# ---- an independent forward of the `llama` graph, from the file alone --------------------------
def _weights(rd) -> dict[str, np.ndarray]:
    out = {}
    for t in rd.tensors:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        out[t.name] = w.reshape([int(s) for s in reversed(t.shape)])     # torch order (out, in)
    return out


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def _rope_interleaved(x, pos, base, freq_scale, factors):
    """llama.cpp's LLAMA_ROPE_TYPE_NORM: rotate pairs (2i, 2i+1) by pos * scale * base^(-2i/D) / f_i."""
    T, H, D = x.shape
    theta = freq_scale * pos[:, None] * base ** (-np.arange(0, D, 2) / D) / factors     # (T, D/2)
    c, s = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * c - x1 * s, x0 * s + x1 * c
    return out


def llama_reference_logits(path, ids: list[int]) -> np.ndarray:
    """(T, vocab) logits of the GGUF file at `path`, computed as llama.cpp's llama graph does."""
    rd = gguf.GGUFReader(path)
    W = _weights(rd)
    meta = {k: f.contents() for k, f in rd.fields.items() if k.startswith("llama.")}
    H, KV = meta["llama.attention.head_count"], meta["llama.attention.head_count_kv"]
    eps, base = meta["llama.attention.layer_norm_rms_epsilon"], meta["llama.rope.freq_base"]
    scale = 1 / meta["llama.rope.scaling.factor"] if meta.get("llama.rope.scaling.type") == "linear" else 1.0
    factors = W.get("rope_freqs.weight", 1.0)
    T, pos = len(ids), np.arange(len(ids), dtype=np.float64)
    x = W["token_embd.weight"][ids]
    for i in range(meta["llama.block_count"]):
        def lin(name, h):
            y = h @ W[f"blk.{i}.{name}.weight"].T
            return y + W[f"blk.{i}.{name}.bias"] if f"blk.{i}.{name}.bias" in W else y
        h = _rms(x, W[f"blk.{i}.attn_norm.weight"], eps)
        q, k, v = (lin(n, h).reshape(T, -1, meta["llama.attention.key_length"]) for n in ("attn_q", "attn_k", "attn_v"))
        q, k = (_rope_interleaved(t, pos, base, scale, factors) for t in (q, k))
        k, v = np.repeat(k, H // KV, axis=1), np.repeat(v, H // KV, axis=1)
        att = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
        att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + lin("attn_output", np.einsum("hts,shd->thd", att, v).reshape(T, -1))
        h = _rms(x, W[f"blk.{i}.ffn_norm.weight"], eps)
        g = lin("ffn_gate", h)
        x = x + lin("ffn_down", g / (1 + np.exp(-g)) * lin("ffn_up", h))
    head = W.get("output.weight", W["token_embd.weight"])
    return _rms(x, W["output_norm.weight"], eps) @ head.T


@pytest.mark.parametrize("overrides", [
    dict(),                                                              # tied head, GQA
    dict(tie_embeddings=False, qkv_bias=True),                           # qwen2-style q/k/v biases
    dict(qkv_bias=True, bias=True, n_kv_head=1, head_dim=32),            # all biases, MQA, wide heads
    dict(rope_scaling={"type": "linear", "factor": 4.0}),
    dict(rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_context_length": 16}, rope_theta=5e5),
], ids=["tied", "qkv-bias", "bias-mqa", "rope-linear", "rope-llama3"])
def test_f32_file_computes_our_logits(tmp_path, overrides):
    model = make_model(**overrides)
    r = export_gguf(model, make_tokenizer(), tmp_path / "m.gguf", type="f32")
    ids = [5, 77, 300, 12, 9, 250, 31, 180, 2, 44, 101, 64]
    ref = llama_reference_logits(r.path, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).double()[0].numpy()
    assert np.abs(ref - ours).max() < 1e-4 * np.abs(ours).max()


def test_without_the_rope_reordering_logits_drift(tmp_path, monkeypatch):
    """The check above can fail: keep HF's q/k row order and the same graph gives other logits
    (except at position 0, where RoPE rotates nothing: one-token prompts cannot show it)."""
    import lmstack.quant.export.gguf_llama as gl

    model = make_model()
    monkeypatch.setattr(gl, "rope_interleave", lambda w, n: w)
    r = export_gguf(model, make_tokenizer(), tmp_path / "m.gguf", type="f32")
    ids = [5, 77, 300, 12, 9, 250]
    ref = llama_reference_logits(r.path, ids)
    with torch.no_grad():
        ours = model(torch.tensor([ids])).double()[0].numpy()
    assert np.abs(ref[0] - ours[0]).max() < 1e-4 * np.abs(ours).max()
    assert np.abs(ref[1:] - ours[1:]).max() > 1e-2 * np.abs(ours).max()


def test_quantized_file_computes_our_dequantized_logits(tmp_path):
    """Q8_0: the file's logits are those of our model with the file's (dequantized) weights."""
    model = make_model()
    r = export_gguf(model, make_tokenizer(), tmp_path / "q8.gguf", type="q8_0")
    ids = [5, 77, 300, 12, 9, 250, 31, 180]
    ref = llama_reference_logits(r.path, ids)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                back = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), Q.Q8_0), Q.Q8_0)
                p.copy_(torch.from_numpy(back))   # rounding commutes with the row reordering
        ours = model(torch.tensor([ids])).double()[0].numpy()
    assert np.abs(ref - ours).max() < 1e-4 * np.abs(ours).max()


def test_quantized_run_is_exported_from_its_dequantized_weights(tmp_path):
    model = make_model()
    quantize_model(model, QuantConfig(method="rtn", bits=8))
    r = export_gguf(model, make_tokenizer(), tmp_path / "m.gguf", type="f32")
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        ours = model(torch.tensor([ids])).double()[0].numpy()
    assert np.abs(llama_reference_logits(r.path, ids) - ours).max() < 1e-4 * np.abs(ours).max()


# ---- refusals: a clear error and no file -------------------------------------------------------
@pytest.mark.parametrize("overrides,field_name", [
    (dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True, qkv_bias=True), "pos_emb"),
    (dict(n_expert=4), "n_expert"),
    (dict(sliding_window=16), "sliding_window"),
    (dict(qk_norm=True), "qk_norm"),
    (dict(pos_emb="alibi"), "pos_emb"),
    (dict(rotary_fraction=0.5), "rotary_fraction"),
])
def test_models_gguf_cannot_express_are_refused_before_writing(tmp_path, overrides, field_name):
    out = tmp_path / "m.gguf"
    with pytest.raises(LmstackError, match=field_name):
        export_gguf(make_model(**overrides), make_tokenizer(), out, type="f16")
    assert list(tmp_path.iterdir()) == []


def test_bad_type_tokenizer_and_paths_are_refused(tmp_path):
    model, tok = make_model(), make_tokenizer()
    with pytest.raises(LmstackError, match="q5_k"):
        export_gguf(model, tok, tmp_path / "m.gguf", type="q5_k")
    with pytest.raises(LmstackError, match="pattern 'none'"):
        export_gguf(model, make_tokenizer("none", 300), tmp_path / "m.gguf")
    with pytest.raises(LmstackError, match="vocab_size"):
        export_gguf(make_model(vocab_size=300), tok, tmp_path / "m.gguf")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(LmstackError, match="does not exist"):
        export_gguf(model, tok, blocker / "m.gguf")
    with pytest.raises(LmstackError, match="is a folder"):
        export_gguf(model, tok, tmp_path)
    (tmp_path / "old.gguf").write_bytes(b"old")
    with pytest.raises(LmstackError, match="already exists"):
        export_gguf(model, tok, tmp_path / "old.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "old.gguf"]
    assert (tmp_path / "old.gguf").read_bytes() == b"old"


def test_a_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    import lmstack.quant.export.gguf_llama as gl

    def boom(t, kind):
        raise RuntimeError("disk full")
    monkeypatch.setattr(gl, "encode", boom)
    with pytest.raises(RuntimeError):
        export_gguf(make_model(), make_tokenizer(), tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_cli_export_gguf(tmp_path, capsys):
    from lmstack.cli.main import main

    run = tmp_path / "run"
    model, tok = make_model(), make_tokenizer()
    model.save_pretrained(run)
    tok.save(run / "tokenizer.json")
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--format", "gguf", "--type", "q8_0", "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    data = {t.name: t for t in gguf.GGUFReader(out).tensors}
    w = model.state_dict()["blocks.0.mlp.proj.weight"].numpy()
    assert data["blk.0.ffn_down.weight"].data.tobytes() == gguf.quants.quantize(w, Q.Q8_0).tobytes()
    assert main(["export", str(run), "--format", "gguf", "--type", "q3", "--out", str(tmp_path / "x.gguf")]) == 1
    assert "--type 'q3'" in capsys.readouterr().err
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "x")]) == 1
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x").exists()
    assert Path(out).stat().st_size > 0
