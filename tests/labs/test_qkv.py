"""Lab 4: one block, a stack, and Q/K/V broken five ways."""
import math

from lmstack.model.ablate import LESIONS


def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("qkv")
    assert_page(lab)
    loss = lab["numbers"]["val_loss"]
    assert set(LESIONS) <= set(loss) and "one block" in loss and "stack of 2" in loss
    assert loss["zero_q"] == loss["zero_k"]                           # both give exactly uniform attention
    assert loss["zero_v"] > math.log(16) - 0.15                       # no values: a uniform guess
    assert loss["zero_q"] > loss["one block"] + 0.1
    assert abs(loss["swap_qk"] - loss["one block"]) < 0.1 and abs(loss["swap_kv"] - loss["one block"]) < 0.1
    after = lab["numbers"]["trained_block_broken_afterwards"]
    assert after["swap_kv"] > after["none"] + 0.1                     # breaking a trained block hurts
    assert lab["record"]["insight"]["holds"]
