"""Lab 6: the KV cache's FLOPs, time and memory, and the prefix cache's hits."""

def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("kv-cache")
    assert_page(lab)
    n = lab["numbers"]
    lengths = sorted(int(L) for L in n["per_length"])
    flops_cached = {n["per_length"][str(L)]["flops_cached"] for L in lengths}
    assert len(flops_cached) == 1                                     # a cached step costs the same at any length
    for L in lengths:
        row = n["per_length"][str(L)]
        assert row["max_logit_diff"] < 1e-3                          # the cached step computes the same logits
        assert row["flops_uncached"] / row["flops_cached"] > L / 2   # op counts: robust to a noisy machine
        assert row["cache_bytes"] == n["cache_bytes_per_token"] * (L + 1)
        assert row["paged_cache_bytes_at_peak"] >= n["cache_bytes_per_token"] * L
    assert n["time_ratio_at_max_length"] > 1.5                       # and it is faster, with a wide margin
    on, off = n["prefix_cache"]["on"], n["prefix_cache"]["off"]
    assert off["cached_tokens"] == 0 and off["hit_rate"] == 0
    first, unrelated = on["requests"][0], on["requests"][2]
    assert first["cached_tokens"] == 0 and unrelated["cached_tokens"] == 0
    assert all(r["cached_tokens"] == 64 for i, r in enumerate(on["requests"]) if i not in (0, 2))   # the shared 64
    assert lab["record"]["insight"]["holds"]
