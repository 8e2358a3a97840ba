"""Lab 3: attention by hand equals the library's; the causal mask hides the future."""

def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("attention")
    assert_page(lab)
    n = lab["numbers"]
    assert n["hand_vs_library"]["max_abs_diff_weights"] < 1e-5
    assert n["hand_vs_library"]["max_abs_diff_block_output"] < 1e-4
    c = n["causal_check"]
    assert c["max_change_before"] < 1e-6                              # nothing before the change moves
    assert c["min_change_from"] > 1e-3                                # the perturbation was real
    assert c["bidirectional_max_change_before"] > 1e-3                # and the check can fail
    assert len(n["mean_attention_to_previous_token"]) == 2 * n["n_head"]
    assert lab["record"]["insight"]["holds"]
