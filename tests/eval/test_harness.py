"""The harness's bookkeeping with a scripted backend (hand-computed metrics, failures counted
and listed, the rest scored), then on the real engine: its answers equal direct calls."""
from __future__ import annotations

import json
import math

import pytest
import yaml

from lmstack.eval import Failure, LocalModel, build_examples, evaluate, format_table, load_task, loglikelihood
from lmstack.infer import SamplingParams
from tests.eval.conftest import tiny_llm

RECORDS = [{"prompt": "1+1=", "answer": "2", "g": "a"}, {"prompt": "2+2=", "answer": "4", "g": "a"},
           {"prompt": "3+3=", "answer": "6", "g": "a"}, {"prompt": "4+4=", "answer": "8", "g": "a"}]


class ScriptedModel:
    """A backend whose answers are fixed by prompt: text, (logprob, greedy) or Failure."""

    def __init__(self, texts=None, lls=None, rolling=None):
        self.texts, self.lls, self.rolling = texts or {}, lls or {}, rolling or {}
        self.calls = []

    def info(self):
        return {"model": "scripted", "backend": "test"}

    def generate(self, prompts, max_tokens=32, stop=None, chat=False):
        self.calls.append(("generate", list(prompts), max_tokens, stop))
        return [self.texts[p] for p in prompts]

    def loglikelihood(self, pairs):
        return [self.lls[p] for p in pairs]

    def loglikelihood_rolling(self, texts):
        return [self.rolling[t] for t in texts]


def task(tmp_path, records=RECORDS, **over):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) if isinstance(r, dict) else r for r in records))
    spec = {"name": "t", "version": 2, "kind": "generate_until", "source": {"jsonl": "d.jsonl"},
            "template": "{prompt}", "target": "{answer}", **over}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    return load_task(str(tmp_path / "t.yaml"))


def test_generation_scores_and_failures(tmp_path):
    records = RECORDS + ['{"prompt": "5+5="}']           # a record without its answer
    spec = task(tmp_path, records, generation={"max_tokens": 5, "stop": ["\n"]},
                extract={"regex": r"^\s*(\d+)"}, metrics=["exact_match", "f1"])
    model = ScriptedModel(texts={"1+1=": "2\nmore", "2+2=": " 5", "3+3=": "six", "4+4=": Failure("HTTP 500: boom")})
    report = evaluate(model, [spec])
    r = report["tasks"][0]
    assert model.calls == [("generate", ["1+1=", "2+2=", "3+3=", "4+4="], 5, ["\n"])]
    assert (r["n"], r["n_failed"], r["version"], r["variant"]) == (5, 3, 2, "default")
    reasons = sorted(f["reason"] for f in r["failures"])
    assert "HTTP 500: boom" in reasons
    assert any("matched nothing in 'six'" in x for x in reasons)
    assert any("missing field 'answer'" in x for x in reasons)
    # one right ("2"), one wrong ("5"), three failed: all five in the denominator
    assert r["metrics"] == {"exact_match": pytest.approx(1 / 5), "f1": pytest.approx(1 / 5)}
    assert [s["prediction"] for s in r["samples"]] == ["2", "5", None, None]
    rows = [[c.strip() for c in line.split("|")] for line in format_table(report).splitlines()]
    assert rows[0] == ["task", "variant", "version", "kind", "n", "failed", "metric", "value"]
    assert rows[2] == ["t", "default", "2", "generate_until", "5", "3", "exact_match", "0.2000"]
    assert rows[3] == ["", "", "", "", "", "", "f1", "0.2000"]


def test_multiple_choice_scores_by_hand(tmp_path):
    spec = task(tmp_path, kind="multiple_choice", metrics=["acc", "acc_norm"],
                choices={"distractors": "answer", "n": 2}, target_delimiter=" ")
    examples, lls = [], {}
    for ex in build_examples(spec):
        examples.append(ex)
        for c in ex.choices:     # the gold choice is likelier except in example 0; example 3 fails
            lls[(ex.prompt, " " + c)] = (-1.0 if (c == ex.target) != (ex.index == 0) else -2.0, False)
    lls[(examples[3].prompt, " " + examples[3].choices[0])] = Failure("too long")
    r = evaluate(ScriptedModel(lls=lls), [spec])["tasks"][0]
    assert r["metrics"] == {"acc": pytest.approx(2 / 4), "acc_norm": pytest.approx(2 / 4)}
    assert r["n_failed"] == 1 and r["failures"] == [{"index": 3, "reason": "too long"}]


def test_perplexity_by_hand(tmp_path):
    recs = [{"text": "a b"}, {"text": "c d e f"}, {"text": "x"}]
    spec = task(tmp_path, recs, kind="perplexity", template="{text}", target="")
    model = ScriptedModel(rolling={"a b": (-math.log(2) * 2, 2), "c d e f": (-math.log(2) * 6, 6),
                                   "x": Failure("empty")})
    r = evaluate(model, [spec])["tasks"][0]
    # failed documents are left out: 8 tokens, 6 words, 10 bytes, total -8 ln 2
    assert r["metrics"]["token_perplexity"] == pytest.approx(2.0)
    assert r["metrics"]["word_perplexity"] == pytest.approx(2 ** (8 / 6))
    assert r["metrics"]["bits_per_byte"] == pytest.approx(8 / 10)
    assert r["n_failed"] == 1


def test_local_model_answers_equal_direct_engine_calls(tokenizer, tmp_path):
    llm = tiny_llm(tokenizer, context_length=48)
    model = LocalModel(llm, batch_size=3)
    records = RECORDS + [{"prompt": "the cat sat on the mat. " * 12, "answer": "1", "g": "a"}]  # > 48 tokens
    gen = task(tmp_path, records, generation={"max_tokens": 6, "stop": ["\n"]})
    r = evaluate(model, [gen])["tasks"][0]
    want = llm.generate([x["prompt"] for x in RECORDS], SamplingParams(temperature=0, max_tokens=6, stop=["\n"]))
    assert [s["output"] for s in r["samples"][:4]] == [o.outputs[0].text for o in want]
    assert r["n_failed"] == 1 and "the model's context is 48" in r["failures"][0]["reason"]

    (tmp_path / "mc").mkdir()
    mc = task(tmp_path / "mc", records, kind="multiple_choice", metrics=["acc"],
              choices={"distractors": "answer", "n": 3})
    r = evaluate(model, [mc])["tasks"][0]
    for s in r["samples"][:4]:
        assert s["loglikelihoods"] == pytest.approx([x for x, _ in loglikelihood(
            llm, [(s["prompt"], " " + c) for c in s["choices"]])], abs=1e-4)
    assert r["n_failed"] == 1 and "the model scores at most 47" in r["failures"][0]["reason"]
    assert r["engine_prompt_tokens"] > 0
