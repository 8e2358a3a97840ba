"""Encoding: round trips, identical ids across our BPE, tiktoken, HF tokenizers and
transformers, and tiktoken's special-token semantics."""
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmstack.tokenizer import Tokenizer, TokenizerError

from tokenizer_corpus import MIXED

TRICKY = ["", " ", "\n", "  \n\n\t ", "e\u0301\u0302 combining", "👨‍👩‍👧‍👦🇯🇵", "漢字かなカナ한글",
          "a" * 300, "\r\n\r\n", "x\x00y\x1c\x1fz", "'s 'LL 'Ve", "123456789", "\ufeffBOM", "\U0010ffff"]


def python_and_tiktoken(tok):
    py = Tokenizer(tok.vocab, tok.merges, tok.special_tokens, tok.pattern).set_backend("python")
    tt = Tokenizer(tok.vocab, tok.merges, tok.special_tokens, tok.pattern).set_backend("tiktoken")
    return py, tt


@pytest.fixture(scope="module")
def backends(tok):
    return python_and_tiktoken(tok)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60) | st.sampled_from(TRICKY))
def test_round_trip_and_backends_agree_on_arbitrary_unicode(backends, text):
    py, tt = backends
    ids = py.encode_ordinary(text)
    assert tt.encode_ordinary(text) == ids
    assert py.decode(ids) == text
    assert py.decode_bytes(ids) == text.encode("utf-8")


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2", "none"])
def test_backends_identical_on_mixed_corpus(mixed_corpus, pattern):
    tok = Tokenizer.train(mixed_corpus, vocab_size=600, pattern=pattern)
    py, tt = python_and_tiktoken(tok)
    assert tok.backend == "tiktoken"
    for text in [*mixed_corpus, *TRICKY]:
        assert py.encode(text) == tt.encode(text) == tok.to_tiktoken().encode(text)
        assert py.decode(py.encode(text)) == text
    assert py.encode_batch(mixed_corpus) == tt.encode_batch(mixed_corpus)
    specials_text = [t + "<|endoftext|>" for t in mixed_corpus]
    assert py.encode_ordinary_batch(specials_text) == tt.encode_ordinary_batch(specials_text) == \
        [py.encode_ordinary(t) for t in specials_text]


@pytest.mark.parametrize("pattern", ["gpt4", "gpt2", "none"])
def test_hf_tokenizers_and_transformers_load_our_file(tmp_path, mixed_corpus, pattern):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.train(mixed_corpus, vocab_size=600, pattern=pattern)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    hf = HFTokenizer.from_file(str(path))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(path))
    texts = [*mixed_corpus, *TRICKY[1:], "end<|endoftext|>start <|user|>hi<|end|>"]
    for text in texts:
        ids = tok.encode(text, allowed_special="all")
        assert hf.encode(text).ids == ids
        assert fast.encode(text) == ids
        assert hf.decode(ids, skip_special_tokens=False) == text
    assert hf.get_vocab_size() == tok.n_vocab


def test_specials_follow_tiktoken_semantics(tok):
    text = "a<|endoftext|>b<|user|>"
    eot, user = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|user|>"]
    for t in python_and_tiktoken(tok):
        with pytest.raises(ValueError, match=r"'<\|endoftext\|>'.*allowed_special"):
            t.encode(text)
        assert t.encode(text, allowed_special="all") == [*t.encode("a"), eot, *t.encode("b"), user]
        only = t.encode(text, allowed_special={"<|endoftext|>"}, disallowed_special=())
        assert only == [*t.encode("a"), eot, *t.encode_ordinary("b<|user|>")]
        assert t.encode(text, disallowed_special=()) == t.encode_ordinary(text)
        assert eot not in t.encode_ordinary(text)
        assert t.decode(t.encode(text, allowed_special="all")) == text
        with pytest.raises(ValueError, match=r"'<\|user\|>'"):
            t.encode_batch(["fine", text], allowed_special={"<|endoftext|>"})


def test_to_tiktoken_identical_ids(tok):
    enc = tok.to_tiktoken()
    assert enc.n_vocab == tok.n_vocab
    assert enc.encode(MIXED, allowed_special="all") == tok.set_backend("python").encode(MIXED, allowed_special="all")
    tok.set_backend("auto")
    assert enc.eot_token == tok.eot_token
    assert all(enc.decode_single_token_bytes(i) == tok.token_bytes(i) for i in range(tok.n_vocab))


def test_decode_rejects_unknown_ids(tok):
    for bad in (tok.n_vocab, -1):
        with pytest.raises(TokenizerError, match=f"token id {bad} is not in this vocabulary"):
            tok.decode([1, bad])
    assert tok.decode([0xE4, 0xBD]) == "\ufffd"  # a cut UTF-8 sequence decodes with replacement
    assert tok.decode_bytes([0xE4, 0xBD]) == b"\xe4\xbd"


def test_unknown_allowed_special(tok):
    for t in python_and_tiktoken(tok):
        with pytest.raises(TokenizerError, match="unknown special tokens"):
            t.encode("x", allowed_special={"<|nope|>"})
        with pytest.raises(TokenizerError, match="unknown special tokens"):
            t.encode_batch(["x"], allowed_special={"<|nope|>"})
        # a list works as well as a set
        assert t.encode("a<|end|>", allowed_special=["<|end|>"]) == [*t.encode("a"), tok.special_tokens["<|end|>"]]


def test_lone_surrogates_and_pickle(tok):
    import pickle
    text = "a\ud800b \udfff"
    py, tt = python_and_tiktoken(tok)
    assert py.encode(text) == tt.encode(text) == py.encode("a\ufffdb \ufffd")
    back = pickle.loads(pickle.dumps(py))
    assert back.backend == "python" and back.encode(MIXED) == tok.encode(MIXED)
