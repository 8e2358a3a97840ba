"""Token windows with overlap: hand-computed spans on a byte tokenizer, and span/token
invariants on a trained BPE tokenizer with multi-byte characters."""
from __future__ import annotations

import pytest

from lmstack.rag import chunk_documents, chunk_text
from lmstack.tokenizer import Tokenizer
from lmstack.utils import LmstackError


@pytest.fixture(scope="module")
def byte_tok():
    return Tokenizer({i: bytes([i]) for i in range(256)}, [])


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train("the capital of Velmora is Tinar. Bolo lives in Tinar. héllo wörld 🙂 " * 30,
                           vocab_size=320)


def test_hand_computed_windows(byte_tok):
    # 10 one-byte tokens, windows of 4 every 3: [0,4) [3,7) [6,10)
    chunks = chunk_text("d", "abcdefghij", byte_tok, chunk_tokens=4, overlap=1)
    assert [(c.id, c.start, c.end, c.text) for c in chunks] == [
        ("d#0", 0, 4, "abcd"), ("d#1", 3, 7, "defg"), ("d#2", 6, 10, "ghij")]
    # the last window ends at the document's end; no empty or duplicate tail window
    assert [c.text for c in chunk_text("d", "abcdefg", byte_tok, 4, 1)] == ["abcd", "defg"]
    assert [c.text for c in chunk_text("d", "abc", byte_tok, 4, 1)] == ["abc"]
    assert chunk_text("d", "", byte_tok, 4, 1) == []


def test_multibyte_characters_are_never_split(byte_tok):
    text = "aé🙂b"                      # bytes: a(1) é(2) 🙂(4) b(1)
    for c in chunk_text("d", text, byte_tok, chunk_tokens=2, overlap=0):
        assert c.text == text[c.start:c.end] and c.text
    spans = [(c.start, c.end) for c in chunk_text("d", text, byte_tok, chunk_tokens=2, overlap=0)]
    # windows of bytes [0,2) [2,4) [4,6) [6,8) widen to chars [0,2) [1,3) [2,3) [2,4)
    assert spans == [(0, 2), (1, 3), (2, 3), (2, 4)]


def test_bpe_windows_cover_the_text_with_the_requested_overlap(bpe):
    text = "the capital of Velmora is Tinar. héllo wörld 🙂 Bolo lives in Tinar. " * 5
    ids = bpe.encode_ordinary(text)
    size, overlap = 16, 5
    chunks = chunk_text("doc", text, bpe, size, overlap)
    assert len(chunks) == -(-(len(ids) - overlap) // (size - overlap))      # ceil((n - o) / step)
    assert chunks[0].start == 0 and chunks[-1].end == len(text)
    for i, c in enumerate(chunks):
        assert c.text == text[c.start:c.end] and c.doc_id == "doc" and c.id == f"doc#{i}"
        lo = i * (size - overlap)
        assert bpe.decode(ids[lo:lo + size]) in c.text         # the window's tokens, whole
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end                                   # neighbours overlap


def test_errors(byte_tok):
    with pytest.raises(LmstackError, match="overlap"):
        chunk_text("d", "abc", byte_tok, chunk_tokens=4, overlap=4)
    with pytest.raises(LmstackError, match="chunk_tokens"):
        chunk_text("d", "abc", byte_tok, chunk_tokens=0, overlap=0)
    with pytest.raises(LmstackError, match="appears twice"):
        chunk_documents([("a", "x"), ("a", "y")], byte_tok)
