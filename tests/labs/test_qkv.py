"""Lab 4: one block, a stack, and Q/K/V broken five ways."""
import math

from lmstack.model.ablate import LESIONS


def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("qkv")
    assert_page(lab)
    n = lab["numbers"]
    loss = n["val_loss"]
    assert set(loss) == {"one block", *LESIONS}
    base = loss["one block"]
    assert base < 0.5                                                  # the intact block solves copy-two-back
    assert loss["swap_qk"] < base + 0.3 and loss["swap_kv"] < base + 0.3   # relabelling costs nothing
    assert loss["zero_q"] == loss["zero_k"] > base + 1.0               # both give exactly uniform attention
    assert loss["zero_v"] > math.log(16) - 0.15                        # no values: a uniform guess
    after = n["trained_block_broken_afterwards"]
    assert after["none"] < 0.5 and min(after["swap_qk"], after["swap_kv"]) > after["none"] + 1.0
    assert set(n["stacking_val_loss"]) == {"1 block", "2 blocks"}
    assert lab["record"]["insight"]["holds"]
