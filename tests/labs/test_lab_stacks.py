"""Lab 15: one model in lmstack's engine, transformers and llama.cpp: same tokens, costs side by side."""
from pathlib import Path

import pytest
import torch

from lmstack.labs import LABS

pytestmark = pytest.mark.skipif(bool(LABS["stacks"].missing()), reason="the stacks lab needs transformers and "
                                "llama-cpp-python")


def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("stacks")
    assert_page(lab)
    n = lab["numbers"]
    st = n["stacks"]
    assert list(st) == ["lmstack", "transformers", "llama.cpp"]
    # the tokens every stack produced are the model's greedy tokens: a plain no-cache loop agrees
    from lmstack.labs.base import LabContext
    from lmstack.labs.toy import tiny_lm
    lm, _ = tiny_lm(LabContext(quick=True, seed=0, work=Path(".")))
    ids = list(n["sample_ids"]["prompt"])
    with torch.no_grad():
        for _ in range(n["new_tokens"]):
            ids.append(int(lm.model(torch.tensor([ids]))[0, -1].argmax()))
    plain = ids[len(n["sample_ids"]["prompt"]):]
    for s in st:
        assert n["sample_ids"][s] == plain, s
        assert st[s]["token_agreement"] == 1.0 and st[s]["identical_sequences"] == n["batch"]
        assert st[s]["ms_per_token"] > 0 and st[s]["ttft_ms"] > 0 and st[s]["tokens_per_s"] > 0
        assert n["ratios_vs_lmstack"][s]["tokens_per_s"] == pytest.approx(st[s]["tokens_per_s"] /
                                                                         st["lmstack"]["tokens_per_s"])
    assert st["lmstack"]["weights_bytes"] == st["transformers"]["weights_bytes"] == 4 * n["params"]
    assert 4 * n["params"] < st["llama.cpp"]["weights_bytes"] < 1.2 * 4 * n["params"]   # f32 file: weights + vocab
    assert lab["record"]["insight"]["holds"]
