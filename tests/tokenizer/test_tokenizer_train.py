"""Training: the textbook example, an independent naive trainer, HF's BpeTrainer, errors."""
import json
from collections import Counter

import pytest

from lmstack.tokenizer import PATTERNS, Tokenizer, TokenizerError
from lmstack.tokenizer.base import bytes_to_bytelevel
from lmstack.tokenizer.trainer import BYTE_CHAR


def test_textbook_aaabdaaabac():
    # Wikipedia's BPE example: Z=aa, Y=ab, X=ZY -> "XdXac"
    tok = Tokenizer.train("aaabdaaabac", vocab_size=256 + 3, pattern="none", special_tokens=[], min_frequency=1)
    merged = [tok.vocab[256 + i] for i in range(3)]
    assert merged == [b"aa", b"ab", b"aaab"]
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    ids = tok.encode("aaabdaaabac")
    assert ids == [258, ord("d"), 258, ord("a"), ord("c")]
    assert tok.decode(ids) == "aaabdaaabac"


def naive_train(texts, pattern, n_merges, min_frequency):
    """Reference: recount every pair of every chunk after each merge (minbpe's loop), ties
    broken the documented way (smallest pair in HF byte-level alphabet order)."""
    import regex
    chunks = Counter()
    for t in texts:
        chunks.update(regex.findall(PATTERNS[pattern], t))
    words = {tuple(c.encode()): f for c, f in chunks.items()}

    def key(i):
        return ord(BYTE_CHAR[i]) if i < 256 else i

    merges = []
    for m in range(n_merges):
        stats = Counter()
        for w, f in words.items():
            for p in zip(w, w[1:]):
                stats[p] += f
        if not stats:
            break
        best = min(stats, key=lambda p: (-stats[p], key(p[0]), key(p[1])))
        if stats[best] < min_frequency:
            break
        new = 256 + m
        merges.append(best)
        nw = {}
        for w, f in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            nw[tuple(out)] = nw.get(tuple(out), 0) + f
        words = nw
    return merges


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2"])
def test_incremental_trainer_matches_naive_recount(mixed_corpus, pattern):
    tok = Tokenizer.train(mixed_corpus, vocab_size=256 + 150, pattern=pattern, special_tokens=[], min_frequency=2)
    assert tok.merges == naive_train(mixed_corpus, pattern, 150, 2)


def test_repeated_runs_merge_like_naive():
    # runs of one byte exercise the overlapping-pair bookkeeping ("aaaa" -> "XX")
    texts = ["aaaa aaaaa aaaaaaa bbbbbb abababab aaabbb " * 3, "zzzzzzzzzzzzzzzz"]
    tok = Tokenizer.train(texts, vocab_size=256 + 20, pattern="gpt2", special_tokens=[], min_frequency=1)
    assert tok.merges == naive_train(texts, "gpt2", 20, 1)


def runs_corpus() -> list[str]:
    """Runs of repeated bytes: overlapping pairs ("aaaa", "====", spaces) are where two
    incremental trainers most easily disagree."""
    import random
    rng = random.Random(0)
    texts = [" ".join(rng.choice("ab=- ") * rng.randint(1, 12) + rng.choice(["", "x", "ab"]) for _ in range(20))
             for _ in range(300)]
    return texts + ["==========\n----------\n" * 5 + "aaaaaaaaaaaaaaa " * 4 + "        code\n" * 3]


@pytest.mark.parametrize("pattern, corpus", [("gpt4", "mixed"), ("gpt2", "mixed"), ("gpt4", "runs"),
                                             ("none", "runs")])
def test_merges_match_hf_bpe_trainer(mixed_corpus, pattern, corpus):
    """HF's BpeTrainer with the same pre-tokenization learns the same merges in the same
    order: both take the most frequent pair and break ties by the smaller pair in the
    byte-level alphabet order (merged tokens after bytes, by creation)."""
    from tokenizers import Regex
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    texts = mixed_corpus if corpus == "mixed" else runs_corpus()
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    if PATTERNS[pattern] is not None:
        steps.insert(0, pre_tokenizers.Split(Regex(PATTERNS[pattern]), behavior="isolated"))
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(steps)
    trainer = trainers.BpeTrainer(vocab_size=800, min_frequency=2, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator(texts, trainer)
    hf_merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                 for m in json.loads(hf.to_str())["model"]["merges"]]
    ours = Tokenizer.train(texts, vocab_size=800, pattern=pattern, special_tokens=["<|endoftext|>"])
    our_merges = [(bytes_to_bytelevel(ours.vocab[a]), bytes_to_bytelevel(ours.vocab[b])) for a, b in ours.merges]
    assert len(our_merges) > 150
    assert our_merges == hf_merges
    # same merges -> same segmentation; ids differ only by layout (HF puts specials first)
    text = "\n".join(texts)
    hf_pieces = [hf.id_to_token(i) for i in hf.encode(text).ids]
    our_pieces = [bytes_to_bytelevel(ours.token_bytes(i)) for i in ours.encode(text)]
    assert our_pieces == hf_pieces


def test_min_frequency_and_early_stop():
    tok = Tokenizer.train(["ab ab ab cd"], vocab_size=300, pattern="gpt2", special_tokens=[], min_frequency=3)
    # "ab" occurs 3 times (once as "ab", twice as " ab"), " a" twice, "cd" once
    assert [tok.vocab[i] for i in range(256, tok.n_vocab)] == [b"ab"]
    assert tok.n_vocab == 257


def test_specials_are_not_learned_and_come_last():
    text = "hello<|endoftext|>hello<|endoftext|>" * 20
    tok = Tokenizer.train([text], vocab_size=300, special_tokens=["<|endoftext|>"], min_frequency=1)
    assert all(b"<|" not in tok.vocab[i] for i in tok.vocab)
    assert tok.special_tokens == {"<|endoftext|>": tok.n_vocab - 1}
    assert tok.eot_token == tok.n_vocab - 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(vocab_size=260), "at least 256 bytes + 5 special tokens = 261"),
    (dict(vocab_size=300, pattern="gpt5"), "valid patterns: gpt2, gpt4, none"),
    (dict(vocab_size=300, special_tokens=["<|a|>", "<|a|>"]), "distinct"),
    (dict(vocab_size=300, min_frequency=0), "min_frequency"),
])
def test_bad_arguments_fail_before_training(kwargs, message):
    with pytest.raises(TokenizerError, match=message.replace("+", r"\+").replace("(", r"\(")):
        Tokenizer.train(["some text"], **kwargs)


@pytest.mark.parametrize("texts", [[], [""], ["", ""], ""])
def test_empty_training_text(texts):
    with pytest.raises(TokenizerError, match="training text is empty"):
        Tokenizer.train(texts, vocab_size=300)
