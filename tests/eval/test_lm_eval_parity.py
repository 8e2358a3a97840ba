"""Our log-likelihoods against lm-evaluation-harness's HFLM on the same model, exported to a
Hugging Face folder (skipped without lm-eval and transformers)."""
from __future__ import annotations

import json

import pytest
import torch

from lmstack.eval import loglikelihood, loglikelihood_rolling
from lmstack.eval.loglikelihood import encode_pair
from tests.eval.conftest import tiny_llm

pytest.importorskip("transformers")
lm_eval_hf = pytest.importorskip("lm_eval.models.huggingface")
Instance = pytest.importorskip("lm_eval.api.instance").Instance

CONTEXT = 96

PAIRS = [("the cat sat on", " the mat."), ("the cat sat on ", "the log."), ("the cat sat on  ", " the"),
         ("", "the dog sat"), ("", "<|endoftext|>the dog"), ("Q: what is 2+2?\nA:", " 2+2=4"),
         ("Q: what is 2+2?\nA:", " 2+2=5"), ("Alice counted", " one, two, three."),
         ("the", "<|endoftext|>"), ("The capital of Zelmal is", " Konfa.\n"),
         ("x" * 40, " the cat sat on the mat. the dog sat on the log." * 3)]    # longer than the window


@pytest.fixture(scope="module")
def hf_dir(tokenizer, tmp_path_factory):
    from lmstack.model.hf import export_hf

    path = tmp_path_factory.mktemp("hf_tiny")
    export_hf(tiny_llm(tokenizer, context_length=CONTEXT).model, path)
    tokenizer.save(path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "eos_token": "<|endoftext|>"}))
    return path


def hflm(hf_dir, **kw):
    # max_length = ours: lm-eval's counts the model's input, one token less than context +
    # continuation, and our engine scores at most context_length - 1 tokens
    return lm_eval_hf.HFLM(pretrained=str(hf_dir), backend="causal", device="cpu", dtype="float32",
                           batch_size=4, max_length=CONTEXT - 2, **kw)


def test_loglikelihood_matches_hflm(hf_dir, tokenizer):
    lm = hflm(hf_dir)
    want = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)], disable_tqdm=True)
    for batch_size in (1, 5):
        got = loglikelihood(str(hf_dir), PAIRS, batch_size=batch_size)
        diff = max(abs(a[0] - b[0]) for a, b in zip(got, want))
        print(f"batch_size={batch_size}: max |ours - HFLM| = {diff:.2e}")
        assert diff < 1e-4
        assert [g for _, g in got] == [g for _, g in want]
    # the same split into context and continuation tokens
    eot = tokenizer.eot_token
    for ctx, cont in PAIRS:
        if ctx:
            assert encode_pair(tokenizer, ctx, cont, eot) == tuple(lm._encode_pair(ctx, cont))
    assert lm.prefix_token_id == eot


@pytest.mark.parametrize("max_length", [CONTEXT - 2, 20])
def test_rolling_loglikelihood_matches_hflm(hf_dir, max_length):
    texts = ["the cat sat on the mat. the dog sat on the log. " * 3, "Alice counted one, two, three.", "x"]
    # logits_cache=False: with it, lm-eval 0.4.13 returned a different value for one rolling
    # window than transformers' own forward pass over that window (which ours matches)
    lm = lm_eval_hf.HFLM(pretrained=str(hf_dir), backend="causal", device="cpu", dtype="float32", batch_size=4,
                         max_length=max_length, logits_cache=False)
    want = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)],
                                    disable_tqdm=True)
    got = loglikelihood_rolling(str(hf_dir), texts, max_length=max_length)
    # HFLM sums each window in float32 (ulp of a sum near -300 is ~3e-5); ours sums in float64
    assert got == pytest.approx(want, abs=1e-4, rel=1e-6)
    assert torch.isfinite(torch.tensor(got)).all()


@pytest.fixture(scope="module")
def hf_bos_dir(hf_dir, tmp_path_factory):
    """The same model with a Llama-style tokenizer: its post-processor puts a BOS before every
    encoded text (here <|system|>), which HF applies and lmstack's tokenizer ignores."""
    import shutil

    path = tmp_path_factory.mktemp("hf_bos")
    for f in ("config.json", "model.safetensors"):
        shutil.copy(hf_dir / f, path / f)
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    bos_id = next(t["id"] for t in tok["added_tokens"] if t["content"] == "<|system|>")
    tok["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|system|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|system|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|system|>": {"id": "<|system|>", "ids": [bos_id], "tokens": ["<|system|>"]}}}
    (path / "tokenizer.json").write_text(json.dumps(tok))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "bos_token": "<|system|>", "eos_token": "<|endoftext|>"}))
    return path


def test_a_tokenizer_that_adds_bos(hf_bos_dir, tokenizer):
    lm = hflm(hf_bos_dir)
    bos = tokenizer.special_tokens["<|system|>"]
    assert lm.tok_encode("the cat")[0] == bos and lm.prefix_token_id == bos      # HF adds it; so must we
    want = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)], disable_tqdm=True)
    got = loglikelihood(str(hf_bos_dir), PAIRS)
    assert max(abs(a[0] - b[0]) for a, b in zip(got, want)) < 1e-4
    texts = ["the cat sat on the mat. " * 4, "<|system|>Alice counted one, two, three."]
    want = lm_eval_hf.HFLM(pretrained=str(hf_bos_dir), backend="causal", device="cpu", dtype="float32",
                           max_length=CONTEXT - 2, logits_cache=False).loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)], disable_tqdm=True)
    assert loglikelihood_rolling(str(hf_bos_dir), texts) == pytest.approx(want, abs=1e-4, rel=1e-6)
