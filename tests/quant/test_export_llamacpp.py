"""llama.cpp runs our GGUF export (llama-cpp-python, an optional extra: `make llamacpp`).

F32: greedy decoding gives our tokens, 32 new ones on several prompts (KV cache in f32, so
the only differences are float summation order). Q8_0 / Q4_0: llama.cpp's logits are those of
our model holding the file's dequantized weights, up to llama.cpp quantizing activations to
8 bits in its Q matmuls. The tokenizer gives our ids, with both split patterns, on text
ending in whitespace, with digits, and with Unicode."""
import numpy as np
import pytest
import torch

from lmstack.quant.export import export_gguf
from tests.quant.test_export_gguf import _one_thread, make_model, make_tokenizer  # noqa: F401 (autouse)

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

PROMPTS = ["The quick brown fox", "1234 + 5678 =", "naïve café 東京 🙂", "It's we'll\n\n  x"]
TEXTS = ["hello world  ", "line one\n\n", "tabs\t", "x  \t \n", "   ", "1234567 89 3.14159 2024-01-01 x1y22z333",
         "mixed123abc   456!!! ???\n", "naïve café 東京 🙂 Ünïcödé — ok", "ÀÉÎÕÜ ñ ß 日本語のテキスト 한국어",
         "emoji🙂🙂 x🙂y", "It's we'll THEY'VE I'M don't", "a\r\nb\n \n  c   \n", " leading space"]


def open_llama(path, vocab_only: bool = False):
    # f32 K/V: llama.cpp's default f16 cache alone moves logits by ~1e-3
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False,
                           type_k=0, type_v=0, vocab_only=vocab_only)


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([out[-1]])
    return out


@torch.no_grad()
def our_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_llamacpp_greedy_tokens_equal_ours(tmp_path):
    model, tok = make_model(), make_tokenizer("gpt4")
    r = export_gguf(model, tok, tmp_path / "m.gguf", type="f32")
    llm = open_llama(r.path)
    try:
        for text in PROMPTS:
            prompt = tok.encode(text)
            ours = our_greedy(model, prompt, 32)
            assert llama_greedy(llm, prompt, 32) == ours, text
            assert len(set(ours)) > 3                  # not a degenerate repeat of one token
        llm.reset()
        llm.eval(prompt)
        with torch.no_grad():
            logits = model(torch.tensor([prompt]))[0].numpy()
        assert np.abs(np.array(llm.scores[:len(prompt)]) - logits).max() < 1e-4 * np.abs(logits).max()
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
def test_llamacpp_quantized_logits_equal_ours_with_the_files_weights(tmp_path, kind):
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[kind]
    model, tok = make_model(), make_tokenizer("gpt2")
    r = export_gguf(model, tok, tmp_path / "m.gguf", type=kind)
    deq = make_model()
    with torch.no_grad():
        for p in deq.parameters():
            if p.dim() == 2:   # the file's weights (rounding commutes with the q/k row reordering)
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), qtype), qtype)))
    llm = open_llama(r.path)
    try:
        for text in PROMPTS:
            ids = tok.encode(text)
            llm.reset()
            llm.eval(ids)
            theirs = np.array(llm.scores[:len(ids)])
            with torch.no_grad():
                ours, full = deq(torch.tensor([ids]))[0].numpy(), model(torch.tensor([ids]))[0].numpy()
            err = np.abs(theirs - ours).max()
            assert err < 0.05 * np.abs(ours).max(), text
            if kind == "q4_0":   # far closer to the file's weights than the quantization error itself
                assert err < 0.25 * np.abs(full - ours).max(), text
            assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.75, text
    finally:
        llm.close()


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_llamacpp_tokenizer_ids_equal_ours(tmp_path, pattern):
    tok = make_tokenizer(pattern)
    r = export_gguf(make_model(), tok, tmp_path / "m.gguf", type="f16")
    llm = open_llama(r.path, vocab_only=True)
    try:
        for text in TEXTS:
            ids = tok.encode_ordinary(text)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids, repr(text)
            assert llm.detokenize(ids).decode() == text
        chat = "<|user|>hi 42<|end|><|assistant|>"
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat, allowed_special="all")
        assert llm.token_eos() == tok.eot_token
    finally:
        llm.close()
