"""`loglikelihood` against a plain forward pass, lm-eval's pair-splitting rules on hand-made
cases, batch-size invariance, the prefix cache computing a shared context once (exact token
counts), and lm-eval's rolling windows."""
from __future__ import annotations

import random

import pytest
import torch

from lmstack.eval import loglikelihood, loglikelihood_rolling, loglikelihood_tokens
from lmstack.eval.loglikelihood import encode_pair, rolling_windows
from lmstack.utils import LmstackError
from tests.eval.conftest import tiny_llm


class MergeTokenizer:
    """Characters are tokens (ord % 90 + 5), except that "ab" is one token (1) and "^" is
    token 0, the prefix token: enough to see every branch of lm-eval's split."""
    special_tokens = {"^": 0}
    eot_token = 0
    n_vocab = 96

    def encode(self, text, allowed_special="none"):
        out, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                out.append(1)
                i += 2
                continue
            out.append(0 if text[i] == "^" else ord(text[i]) % 90 + 5)
            i += 1
        return out

    def decode_bytes(self, ids):
        return b""


def ids(s):
    return MergeTokenizer().encode(s)


@pytest.mark.parametrize("context,continuation,want", [
    ("xy", "z", (ids("xy"), ids("z"))),
    ("x  ", "y", (ids("x"), ids("  y"))),              # trailing spaces move to the continuation
    ("xa", "bc", (ids("xa"), [ids("c")[0]])),           # whole = x|ab|c: the continuation is what follows
    ("xa", "b", (ids("xa"), [])),                       # ... which can be nothing
    ("", "yab", ([0], ids("yab"))),                     # empty context -> the prefix token
    ("", "^yz", ([0], ids("yz"))),                      # unless the continuation starts with it
])
def test_encode_pair_follows_lm_eval(context, continuation, want):
    assert encode_pair(MergeTokenizer(), context, continuation, prefix_token=0) == want


def plain_scores(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """Reference: one forward over ctx + cont; float64 log_softmax; argmax check."""
    with torch.no_grad():
        lp = model(torch.tensor([ctx + cont]))[0].double().log_softmax(-1)
    rows = lp[len(ctx) - 1:len(ctx) + len(cont) - 1]
    return (sum(rows[j, t].item() for j, t in enumerate(cont)),
            all(rows[j].argmax().item() == t for j, t in enumerate(cont)))


def random_pairs(n_contexts=10, n_choices=4, vocab=90, seed=0):
    rng = random.Random(seed)
    pairs = []
    for q in range(n_contexts):
        ctx = [5 + q] + [rng.randrange(5, vocab) for _ in range(rng.randrange(0, 50))]   # distinct first tokens
        pairs += [(ctx, [rng.randrange(5, vocab) for _ in range(rng.randrange(1, 6))]) for _ in range(n_choices)]
    return pairs


def test_scores_equal_a_plain_forward_and_do_not_depend_on_batch_size(tokenizer):
    pairs = random_pairs()
    llm = tiny_llm(tokenizer)
    want = [plain_scores(llm.model, c, x) for c, x in pairs]
    results = {bs: loglikelihood_tokens(tiny_llm(tokenizer), pairs, batch_size=bs) for bs in (1, 3, 64)}
    for bs, got in results.items():
        assert [g for _, g in got] == [g for _, g in want]
        assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) < 1e-4, bs
    # Batch size changes how many rows each matmul has, and BLAS takes a different kernel (and
    # summation order) for 1 row, 2-3 rows or >= 4 rows: float32 sums move in their last bits
    # (~1e-5 here), so the contract is equality within 1e-4, not bit for bit.
    for bs in (3, 64):
        assert max(abs(a - b) for (a, _), (b, _) in zip(results[1], results[bs])) < 1e-4


@pytest.mark.parametrize("batch_size", [1, 64])
def test_shared_contexts_are_computed_once(tokenizer, batch_size):
    block = 8
    llm = tiny_llm(tokenizer, block_size=block)
    pairs = random_pairs(n_contexts=8, n_choices=4, seed=9)
    pairs += [([13] + list(range(30, 50)), [60 + k]) for k in range(3)]      # only one-token choices
    before = llm.stats()["prompt_tokens"]
    got = loglikelihood_tokens(llm, pairs, batch_size=batch_size)
    computed = llm.stats()["prompt_tokens"] - before
    # One request leads each context and computes it; every other choice reuses the context's
    # whole blocks before its last token (whose logits score the first continuation token).
    # Where a one-token choice meets others, the leader's first continuation position is
    # scored over the whole vocabulary and the one-token choices cost nothing: the leader is
    # a longer choice where there is one, else context + one of the one-token choices.
    want, kinds = 0, set()
    contexts = {tuple(c): [x for c2, x in pairs if c2 == c] for c, _ in pairs}
    for ctx, conts in contexts.items():
        reused = (len(ctx) - 1) // block * block
        ones, longer = [x for x in conts if len(x) == 1], [x for x in conts if len(x) > 1]
        if ones and longer:
            kinds.add("a longer choice leads")
            want += len(ctx) + len(longer[0]) + sum(len(ctx) + len(x) - reused for x in longer[1:])
        elif len(ones) >= 2:
            kinds.add("one-token leader")
            want += len(ctx) + 1
        else:
            kinds.add("first pair leads")
            want += len(ctx) + len(conts[0]) + sum(len(ctx) + len(x) - reused for x in conts[1:])
    assert kinds == {"a longer choice leads", "one-token leader", "first pair leads"}   # every case ran
    want_scores = [plain_scores(llm.model, c, x) for c, x in pairs]
    assert max(abs(x - y) for (x, _), (y, _) in zip(got, want_scores)) < 1e-4
    assert [g for _, g in got] == [g for _, g in want_scores]
    naive = sum(len(c) + len(x) for c, x in pairs)
    assert computed == want < naive


@pytest.mark.parametrize("batch_size", [1, 64])
def test_contexts_sharing_a_prefix_compute_it_once(tokenizer, batch_size):
    """Few-shot contexts that start alike: the first of them runs one engine call before the
    others, which find the shared blocks in the prefix cache."""
    block, shared = 8, list(range(5, 25))                           # 20 shared tokens: 2 whole blocks
    contexts = [shared + [40 + 10 * q + j for j in range(10)] for q in range(3)]
    pairs = [(c, [70 + k, 71 + k]) for c in contexts for k in range(2)]
    llm = tiny_llm(tokenizer, block_size=block)
    before = llm.stats()["prompt_tokens"]
    got = loglikelihood_tokens(llm, pairs, batch_size=batch_size)
    computed = llm.stats()["prompt_tokens"] - before
    # first context: 32 + (32 - 24); each other: its leader 32 - 16 (the shared blocks), its second choice 32 - 24
    assert computed == 40 + 2 * (16 + 8)
    want = [plain_scores(llm.model, c, x) for c, x in pairs]
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) < 1e-4
    assert [g for _, g in got] == [g for _, g in want]


def test_nested_shared_prefixes_are_each_computed_once(tokenizer):
    """Contexts whose shared prefixes nest (a token trie): each waits for the first context
    holding its longest shared prefix, not only for the first of their run."""
    block, a, b = 8, list(range(5, 21)), list(range(40, 48))        # A: 2 whole blocks, A + B: 3
    contexts = [a + list(range(30, 40)), a + b + list(range(60, 70)), a + b + list(range(70, 80))]
    pairs = [(c, [85, 86]) for c in contexts]
    llm = tiny_llm(tokenizer, block_size=block)
    before = llm.stats()["prompt_tokens"]
    got = loglikelihood_tokens(llm, pairs, batch_size=8)
    computed = llm.stats()["prompt_tokens"] - before
    # the first whole; the second finds A (16) cached; the third finds A + B (24) of the second
    assert computed == (26 + 2) + (36 - 16) + (36 - 24)
    want = [plain_scores(llm.model, c, x) for c, x in pairs]
    assert max(abs(x - y) for (x, _), (y, _) in zip(got, want)) < 1e-4
    assert [g for _, g in got] == [g for _, g in want]


def test_text_pairs_through_a_run_directory_and_an_llm(tokenizer, tmp_path):
    llm = tiny_llm(tokenizer)
    llm.model.save_pretrained(tmp_path)
    tokenizer.save(tmp_path / "tokenizer.json")
    pairs = [("the cat sat on", " the mat."), ("Q: what is 2+2?\nA: ", "4"), ("", "the dog"),
             ("the cat", "<|endoftext|>")]
    by_dir = loglikelihood(str(tmp_path), pairs, batch_size=2)
    by_llm = loglikelihood(llm, pairs)
    eot = tokenizer.eot_token
    for (ctx, cont), a, b in zip(pairs, by_dir, by_llm):
        c, x = encode_pair(tokenizer, ctx, cont, eot)
        want = plain_scores(llm.model, c, x)
        assert a[0] == pytest.approx(want[0], abs=1e-4) and b[0] == pytest.approx(want[0], abs=1e-4)
        assert a[1] == b[1] == want[1]
    assert encode_pair(tokenizer, "", "the dog", eot)[0] == [eot]


def test_too_long_pairs_are_truncated_from_the_left_and_bad_input_refused(tokenizer):
    llm = tiny_llm(tokenizer, context_length=32)
    ctx, cont = list(range(5, 45)), [7, 8, 9]                 # 43 tokens; the engine scores <= 31
    got = loglikelihood_tokens(llm, [(ctx, cont)])[0]
    kept = (ctx + cont)[-31:]
    assert got[0] == pytest.approx(plain_scores(llm.model, kept[:-3], cont)[0], abs=1e-4)
    assert loglikelihood_tokens(llm, [([5], [])]) == [(0.0, True)]
    with pytest.raises(LmstackError, match="pair 1: the continuation has 31 tokens"):
        loglikelihood_tokens(llm, [([5], [6]), ([5], list(range(5, 36)))])
    with pytest.raises(LmstackError, match=r"pairs\[0\] must be a \(context, continuation\) pair"):
        loglikelihood(llm, [("only one string",)])
    with pytest.raises(LmstackError, match="batch_size must be a positive int"):
        loglikelihood_tokens(llm, [([5], [6])], batch_size=0)


def test_rolling_windows_by_hand():
    toks = list(range(10, 20))
    # max_length 4, context_len 1: windows of 4 predictions back to back, the last one padded
    # with context from the left so the model still reads 4 tokens
    assert list(rolling_windows(toks, 0, 4)) == [
        ([0], [10, 11, 12, 13]), ([13], [14, 15, 16, 17]), ([15, 16, 17], [18, 19])]
    # context_len 3: each window after the first reads the 3 tokens before it and predicts 2
    assert list(rolling_windows(toks, 0, 4, context_len=3))[:3] == [
        ([0], [10, 11, 12, 13]), ([11, 12, 13], [14, 15]), ([13, 14, 15], [16, 17])]
    assert list(rolling_windows([], 0, 4)) == []


def test_rolling_windows_match_lm_eval():
    utils = pytest.importorskip("lm_eval.utils")
    toks = list(range(100, 187))
    for max_len, ctx_len in [(4, 1), (16, 1), (16, 5), (100, 1), (7, 7)]:
        want = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(toks, 0, max_len, ctx_len)))
        assert list(rolling_windows(toks, 0, max_len, ctx_len)) == want


def test_rolling_loglikelihood_scores_every_token_once(tokenizer):
    llm = tiny_llm(tokenizer, context_length=64)
    text = "the cat sat on the mat. the dog sat on the log. " * 3
    toks = tokenizer.encode(text)
    eot = tokenizer.eot_token
    # short enough for one window: the sum of every token's logprob after the prefix token
    short = "the cat sat on the mat."
    s = tokenizer.encode(short)
    assert loglikelihood_rolling(llm, [short])[0] == pytest.approx(plain_scores(llm.model, [eot], s)[0], abs=1e-4)
    # longer than a window: the sum over lm-eval's windows, each scored by a plain forward
    got = loglikelihood_rolling(llm, [text], max_length=20, context_len=4)[0]
    want = sum(plain_scores(llm.model, c, x)[0] for c, x in rolling_windows(toks, eot, 20, 4))
    assert got == pytest.approx(want, abs=1e-3)
    with pytest.raises(LmstackError, match=r"max_length must be in \[1, 62\]"):
        loglikelihood_rolling(llm, [text], max_length=63)
