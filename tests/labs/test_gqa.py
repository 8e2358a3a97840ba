"""Lab 9: MHA converted to GQA/MQA: cache size, decode speed, quality."""

def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("gqa")
    assert_page(lab)
    n = lab["numbers"]
    rows = n["by_kv_heads"]
    mha = rows["MHA"]
    for row in rows.values():
        assert row["cache_bytes_per_token"] * n["n_head"] == mha["cache_bytes_per_token"] * row["n_kv_head"]
        assert row["tokens_per_s"] > 0
    assert rows["MQA"]["params"] < mha["params"]
    assert rows["MQA"]["val_loss"] > mha["val_loss"]                  # pooling loses information
    assert "val_loss_uptrained" not in mha
    assert rows["MQA"]["val_loss_uptrained"] < rows["MQA"]["val_loss"]   # uptraining recovers part of it
    assert lab["record"]["insight"]["holds"]
