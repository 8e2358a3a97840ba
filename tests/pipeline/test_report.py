"""The report and the terminal summary: whole probe prompts, right and wrong examples, the
report's own row, training curves and samples taken during training; no metric name cut."""
import html as html_lib

from lmstack.pipeline import format_table
from lmstack.pipeline.stages import mixed_examples
from lmstack.report import render_report, training_curves_png

CONTEXT = "Text: Mira keeps a green lantern in the attic of the old mill by the river. " * 3


def _ex(i, ok):
    return {"prompt": f"{CONTEXT}Q{i}: what colour is the lantern?\nA:", "completion": " green" if ok else " red",
            "answer": "green", "correct": ok}


def test_examples_mix_right_and_wrong_in_probe_order():
    examples = [_ex(i, ok) for i, ok in enumerate([True, True, True, False, True, False, False])]
    assert [e["prompt"].split("Q")[-1][0] for e in mixed_examples(examples)] == ["0", "1", "3", "5"]
    all_right = [_ex(i, True) for i in range(6)]
    assert mixed_examples(all_right) == all_right[:4]
    assert mixed_examples([_ex(0, False)]) == [_ex(0, False)]


def _page(**kw):
    probes = [{"task": "reading", "n": 7, "correct": 4, "accuracy": 4 / 7, "chance": 0.2,
               "examples": [_ex(0, True), _ex(3, False)]}]
    args = dict(title="t", subtitle="s", headline=[], figures=[], probes=probes, samples=[], recipe={},
                stages=[{"name": "pretrain", "status": "ran", "seconds": 1.0, "numbers": {}},
                        {"name": "report", "status": "ran", "seconds": 0.2, "numbers": {"figures": 2}}])
    return render_report(**{**args, **kw})


def test_whole_prompts_are_shown_with_right_and_wrong_marked():
    page = html_lib.unescape(_page())
    assert len(CONTEXT) > 120 and _ex(0, True)["prompt"] in page      # the context that holds the answer
    assert "| green (right)" in page and "| green (wrong)" in page
    assert "<td>report</td>" in page


def test_samples_during_training_are_listed_by_step():
    during = [{"step": s, "samples": [{"prompt": "Once upon", "completion": f" a time {s}"}]} for s in (250, 500)]
    page = _page(training_samples=during)
    assert "Samples during training" in page
    assert page.index(" a time 250") < page.index(" a time 500")


def test_training_curves_figure():
    metrics = [{"step": s, "split": "train", "loss": 3.0, "lr": 1e-3 * s, "grad_norm": 0.5, "tok_per_s": 100.0 * s}
               for s in range(1, 20)] + [{"step": 10, "split": "val", "loss": 2.0}]
    png = training_curves_png(metrics, grad_clip=1.0)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert png != training_curves_png([m for m in metrics if m["split"] == "val"])   # empty panels differ


def test_terminal_table_wraps_numbers_and_cuts_none():
    numbers = {"params": 3738112, "steps": 750, "tokens": 1536000, "tokens_per_s": 4650.2, "train_loss": 1.2,
               "trainer_val_loss": 1.25, "resumed_from": 500, "a_rather_long_metric_name_here": 0.5}
    table = format_table({"run_dir": "runs/x", "seconds": 1.0,
                          "stages": [{"name": "pretrain", "status": "ran", "seconds": 3.0, "numbers": numbers}]},
                         width=60)
    assert "..." not in table
    for key in numbers:
        assert f"{key}=" in table
    body = table.splitlines()[2:-1]
    assert len(body) >= 2 and all(len(line) <= len("pretrain  ran     3.0s  ") + 60 + 1 for line in body)
