"""`lmstack eval` end to end on a tiny trained run directory and on the same model exported
as a Hugging Face folder: the table, the JSON (versions, variants, failures), numbers equal
to direct calls, a prompt sweep, the judge, and errors at the door."""
from __future__ import annotations

import json
import shutil

import pytest

from lmstack.cli.main import main
from lmstack.eval import loglikelihood


def run_eval(argv, capsys):
    rc = main(["eval", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_eval_run_dir_default_tasks(trained_run, capsys):
    rc, out, err = run_eval([str(trained_run), "--limit", "3"], capsys)
    assert rc == 0, err
    report = json.loads((trained_run / "eval_results.json").read_text())
    names = [t["task"] for t in report["tasks"]]
    # every built-in task whose data the run has (its data dir holds all five probe sets and docs)
    assert names == ["arithmetic", "arithmetic_mc", "arithmetic_steps", "facts", "facts_mc", "instructions",
                     "instructions_mc", "reading", "val_ppl"]
    for t in report["tasks"]:
        assert t["n"] == 3 and t["version"] == 1 and t["variant"] == "default" and t["template"].endswith(".yaml")
        assert t["task"] in out
    # the reading prompts (a context paragraph) are longer than the model's 256 tokens: listed, not fatal
    reading = next(t for t in report["tasks"] if t["task"] == "reading")
    assert reading["n_failed"] >= 1 and "the model's context is 256" in reading["failures"][0]["reason"]
    # multiple choice: the JSON's log-likelihoods are those of a direct call
    mc = next(t for t in report["tasks"] if t["task"] == "facts_mc")
    for s in mc["samples"]:
        direct = [x for x, _ in loglikelihood(str(trained_run), [(s["prompt"], " " + c) for c in s["choices"]])]
        assert s["loglikelihoods"] == pytest.approx(direct, abs=1e-4)
        assert s["acc"] == float(max(range(len(direct)), key=direct.__getitem__) == s["gold"])
    ppl = next(t for t in report["tasks"] if t["task"] == "val_ppl")
    assert 1.0 < ppl["metrics"]["token_perplexity"] < 300          # a vocab of 300: trained a little


def test_eval_hf_folder_matches_the_run_dir(trained_run, tmp_path, capsys):
    from lmstack.model import Transformer
    from lmstack.model.hf import export_hf

    hf = tmp_path / "hf"
    export_hf(Transformer.from_pretrained(trained_run), hf)
    shutil.copy(trained_run / "tokenizer.json", hf / "tokenizer.json")
    args = ["--tasks", "facts_mc,val_ppl", "--limit", "4", "--data", str(trained_run / "data")]
    assert run_eval([str(trained_run), *args, "--out", str(tmp_path / "a.json")], capsys)[0] == 0
    assert run_eval([str(hf), *args, "--out", str(tmp_path / "b.json")], capsys)[0] == 0
    a, b = (json.loads((tmp_path / f).read_text())["tasks"] for f in ("a.json", "b.json"))
    for ta, tb in zip(a, b):
        assert tb["metrics"] == pytest.approx(ta["metrics"], rel=1e-4)


SHORT_SINGLE = """name: terse_single
version: 7
kind: single
prompt: "Q: {question}\\nRef: {reference}\\nAns: {answer}\\nOK?"
verdicts: {"yes": " yes", "no": " no"}
scores: {"yes": 1, "no": 0}
pattern: "(yes|no)"
"""
SHORT_PAIRWISE = """name: terse_pairwise
version: 7
kind: pairwise
prompt: "Q: {question}\\nA: {answer_a}\\nB: {answer_b}\\nBetter:"
verdicts: {"A": " A", "B": " B"}
pattern: "(A|B)"
"""


def test_template_sweep_and_judge(trained_run, tmp_path, capsys):
    out_file = tmp_path / "sweep.json"
    (tmp_path / "single.yaml").write_text(SHORT_SINGLE)
    (tmp_path / "pairwise.yaml").write_text(SHORT_PAIRWISE)
    rc, out, err = run_eval([str(trained_run), "--tasks", "facts", "--template-variant", "default,fewshot3",
                             "--limit", "2", "--out", str(out_file), "--judge", str(trained_run),
                             "--judge-mode", "loglikelihood", "--judge-template", str(tmp_path / "single.yaml")],
                            capsys)
    assert rc == 0, err
    report = json.loads(out_file.read_text())
    default, fewshot = report["tasks"]
    assert (default["variant"], fewshot["variant"]) == ("default", "fewshot3")
    for d, f in zip(default["samples"], fewshot["samples"]):
        assert f["prompt"].endswith(d["prompt"]) and f["prompt"].count("\n\n") == 3
    assert report["judge"]["mode"] == "loglikelihood" and report["judge"]["version"] == 7
    judged = default["judged"]
    assert judged["n_judged"] == 2 and judged["calibration"]["n"] == 2
    # the few-shot prompts are longer than the model's context once inside the judge's prompt:
    # those items are listed as failures, the others judged
    assert fewshot["judged"]["n_judged"] + fewshot["judged"]["n_failed"] == 2
    assert all("the model scores at most 255" in f["reason"] for f in fewshot["judged"]["failures"])
    assert "judge facts: pass rate" in out
    rc, out, err = run_eval([str(trained_run), "--tasks", "facts", "--limit", "2", "--out", str(out_file),
                             "--compare", str(trained_run), "--judge", str(trained_run), "--judge-mode",
                             "loglikelihood", "--judge-template", str(tmp_path / "pairwise.yaml")], capsys)
    assert rc == 0, err
    pair = json.loads(out_file.read_text())["tasks"][0]["pairwise"]
    # the same model on both sides gives the same answers, so both orders show the judge the same
    # prompt and it gives the same letter: one order says a won, the other b. With no tie
    # verdict in this template, every pair is inconsistent.
    assert pair["n_judged"] == 2 and pair["inconsistent"] == 2 and pair["consistency_rate"] == 0.0
    assert "consistency 0.0%" in out


@pytest.mark.parametrize("argv,message", [
    ([], "give a model directory or --endpoint URL"),
    (["{run}", "--tasks", "nope"], "unknown task 'nope'"),
    (["{run}", "--tasks", "facts:zero"], "no variant 'zero'"),
    (["{run}", "--compare", "{run}"], "--compare needs --judge"),
    (["{run}", "--tasks", "facts_mc", "--judge", "{run}"], "none of --tasks is one"),
    (["{run}", "--tasks", "facts", "--judge", "{run}", "--judge-mode", "vibes"], "judge mode must be"),
    (["{run}", "--tasks", "facts", "--judge", "{run}", "--compare", "{run}", "--judge-template", "single"],
     "--compare needs a pairwise one"),
    (["--endpoint", "http://127.0.0.1:9/v1", "--tasks", "facts", "--data", "{run}/data"], "is not usable"),
])
def test_errors_at_the_door(trained_run, capsys, argv, message):
    rc, _, err = run_eval([a.replace("{run}", str(trained_run)) for a in argv], capsys)
    assert rc == 1 and message in err
