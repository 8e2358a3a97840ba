"""Lab 1: BPE from scratch, bytes per token by script, one-hot vs learned embeddings."""
import numpy as np

from lmstack.labs.tokenization import bytes_per_token, cosine_matrix, group_cosines
from lmstack.tokenizer import Tokenizer


def test_group_cosines_by_hand():
    cos = np.array([[1.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 1.0]])
    within, between = group_cosines(cos, 2)
    assert within == 0.5 and between == (0.1 + 0.3) / 2
    emb = np.eye(3)
    assert np.allclose(cosine_matrix(__import__("torch").tensor(emb)), np.eye(3))   # one-hot: orthogonal


def test_bytes_per_token_counts_bytes_over_tokens():
    tok = Tokenizer.train(["aaaa aaaa aaaa"] * 5, vocab_size=262, pattern="gpt4", show_progress=False)
    text = "aaaa 日本"
    bpt = bytes_per_token(tok, text)
    ids = tok.encode(text)
    assert bpt["all"] == len(text.encode()) / len(ids)
    assert bpt["cjk"] == 1.0                                             # never seen: one byte per token


def test_quick_run(quick_lab, assert_page):
    lab = quick_lab("tokenization")
    assert_page(lab)
    n = lab["numbers"]
    assert n["tiktoken_equals_python"] is True                          # the cl100k split run by tiktoken
    cl = n["bytes_per_token"]["cl100k split (tiktoken)"]
    assert cl["latin"] > 2 * max(cl["cjk"], cl["emoji"]) and min(cl["cjk"], cl["emoji"]) >= 1.0
    assert all(isinstance(m, str) and m for m in n["first_merges"])
    cos = n["embedding_cosines"]
    assert cos["one-hot"] == {"within_digits": 0.0, "digits_vs_words": 0.0}
    trained, init = cos["learned, trained"], cos["learned, at init"]
    assert trained["within_digits"] - trained["digits_vs_words"] > init["within_digits"] - init["digits_vs_words"] + 0.1
    assert lab["record"]["insight"]["holds"]
    assert "cl100k_base" in " ".join(lab["record"]["notes"])               # the substitution is said
    assert (lab["out"] / "tokens.html").read_text().count("<span") > 100
