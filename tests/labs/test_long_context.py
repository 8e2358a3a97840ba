"""Lab 7: loss past the training length, full attention against a sliding window."""
import numpy as np

from lmstack.labs.long_context import collapse_point, moving_average


def test_collapse_point_on_a_made_up_curve():
    losses = np.full(64, 2.0)
    losses[40:] = 3.0                                                   # jumps at 40; trained on 16
    p, ref = collapse_point(losses, 16, threshold=0.2)
    assert ref == 2.0 and 32 <= p <= 40                                 # the moving average rises before 40
    assert collapse_point(np.full(64, 2.0), 16)[0] is None
    assert np.allclose(moving_average(np.arange(5.0), 2), [0.0, 0.5, 1.5, 2.5, 3.5])   # x[i-1], x[i]


def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("long-context")
    assert_page(lab)
    n = lab["numbers"]
    full, win = n["collapse_position"]["full attention"], n["collapse_position"][f"sliding window {n['window']}"]
    assert full is not None and full >= n["train_len"]
    assert win is None or win > full
    beyond = n["mean_loss_beyond_train_len"]
    assert beyond[f"sliding window {n['window']}"] < beyond["full attention"]
    assert lab["record"]["insight"]["holds"]
