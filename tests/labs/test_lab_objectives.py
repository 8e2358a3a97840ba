"""Lab 11: masked, causal and prefix LM through the Trainer's built-in objectives."""
import pytest


def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("objectives")
    assert_page(lab)
    n = lab["numbers"]
    share = n["share_of_positions_with_loss"]
    assert share["causal"] == 1.0 and share["masked"] == pytest.approx(5 / 32)   # round(0.15 * 32) per row
    assert 0.4 < share["prefix"] < 0.7
    s = n["same_targets"]
    assert s["causal LM, 2nd half given 1st"] < s["prefix LM, 2nd half given 1st"]
    assert set(n["samples"]) == {"causal (engine, greedy)", "prefix (greedy loop)", "masked (fill the [blanks])"}
    assert n["samples"]["prefix (greedy loop)"].startswith("once upon a time,")
    assert lab["record"]["insight"]["holds"]
