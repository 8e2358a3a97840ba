"""lm-evaluation-harness's own `local-completions` model, end to end against our server: it
tokenizes each (context, choice) pair with the model's tokenizer (Hugging Face), posts the
ids to /v1/completions (echo, logprobs=1, max_tokens=1), parses our answer with its own
parser and retries through tenacity. Its log-likelihoods and is_greedy must be the ones our
harness computes locally (`lmstack.eval.loglikelihood` on the same run directory), and so
the multiple-choice accuracy. Skipped without lm-eval's API extra (aiohttp, tenacity, requests)."""
from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tenacity")
pytest.importorskip("aiohttp")
openai_completions = pytest.importorskip("lm_eval.models.openai_completions")
Instance = pytest.importorskip("lm_eval.api.instance").Instance

# 4-way multiple choice: one-token and several-token choices, a context ending in a space
# (lm-eval moves it to the continuation), and a special token inside a choice
QUESTIONS = [
    ("Q: what did the cat sit on?\nA: the cat sat on the", [" mat", " log", " world", " fox"], 0),
    ("Alice counted: one, two,", [" three", " four, five", " hello", " dog"], 0),
    ("The quick brown fox jumps over the ", ["lazy dog.", "warm mat.", "world", "cat"], 0),
    ("Bob said hello to the", [" world", " world and the world said", " cat<|endoftext|>", " time"], 0),
]
PAIRS = [(ctx, choice) for ctx, choices, _ in QUESTIONS for choice in choices]


def accuracy(scores: list[tuple[float, bool]]) -> float:
    right, i = 0, 0
    for _, choices, gold in QUESTIONS:
        lls = [lp for lp, _ in scores[i:i + len(choices)]]
        right += max(range(len(lls)), key=lls.__getitem__) == gold
        i += len(choices)
    return right / len(QUESTIONS)


@pytest.fixture(scope="module")
def hf_tokenizer_dir(run_dir, tmp_path_factory):
    """The run's tokenizer.json as a Hugging Face tokenizer folder (what lm-eval loads)."""
    path = tmp_path_factory.mktemp("lm_eval_tok")
    shutil.copy(run_dir / "tokenizer.json", path / "tokenizer.json")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "eos_token": "<|endoftext|>"}))
    return path


@pytest.mark.parametrize("batch_size", [1, 8])
def test_lm_eval_local_completions_scores_like_local_harness(server, run_dir, hf_tokenizer_dir, batch_size):
    from lmstack.eval import loglikelihood

    lm = openai_completions.LocalCompletionsAPI(
        base_url=server.url + "/v1/completions", model=server.state.model_name, tokenizer=str(hf_tokenizer_dir),
        tokenizer_backend="huggingface", batch_size=batch_size, max_retries=1)
    theirs = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(PAIRS)],
                              disable_tqdm=True)
    ours = loglikelihood(str(run_dir), PAIRS, batch_size=4)
    assert len(theirs) == len(PAIRS)
    diff = max(abs(a[0] - b[0]) for a, b in zip(ours, theirs))
    print(f"batch_size={batch_size}: max |local - lm-eval via server| = {diff:.2e}")
    assert diff < 1e-4
    assert [g for _, g in theirs] == [g for _, g in ours]
    assert accuracy(theirs) == accuracy(ours)
    # the scores are not all alike (a parser reading the wrong slice would give equal sums)
    assert len({round(lp, 3) for lp, _ in ours}) > len(PAIRS) // 2


def test_lm_eval_local_completions_reports_a_refused_request(server, hf_tokenizer_dir):
    """A request the server refuses (a pair longer than the model's context) reaches lm-eval as
    an HTTP error after its retries, not as a made-up score."""
    lm = openai_completions.LocalCompletionsAPI(
        base_url=server.url + "/v1/completions", model=server.state.model_name, tokenizer=str(hf_tokenizer_dir),
        tokenizer_backend="huggingface", batch_size=1, max_retries=1, max_length=100_000)
    too_long = ("the cat sat on the mat. " * 200, " the dog")
    with pytest.raises(Exception, match="400"):
        lm.loglikelihood([Instance("loglikelihood", {}, too_long, 0)], disable_tqdm=True)
