"""Lab 10: norms and activations removed and retrained; the residual stream per layer."""
from lmstack.labs.norms import VARIANTS


def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("norms")
    assert_page(lab)
    models = lab["numbers"]["models"]
    assert set(models) == set(VARIANTS)
    base, no_norm = models["RMSNorm + SwiGLU"], models["no norm + SwiGLU"]
    assert no_norm["diverged"] or no_norm["val_loss"] > base["val_loss"] + 0.02
    lin, relu = models["RMSNorm + no activation"], models["RMSNorm + ReLU"]
    assert lin["val_loss"] > relu["val_loss"] + 0.02
    for v in models.values():
        if not v["diverged"]:
            assert len(v["rms"]) == 3 and all(p[0] <= p[2] <= p[4] for p in v["percentiles"])
    assert lab["record"]["insight"]["holds"]
