"""Dense embeddings against a hand mean-pool of the model's hidden states; the index's
save/load round trip and every damaged-file check."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmstack.rag import DenseEncoder, Index
from lmstack.rag.index import EMBEDDINGS, META
from lmstack.tokenizer import Tokenizer
from lmstack.utils import LmstackError
from tests.infer.conftest import tiny_model

DOCS = [("kb-0", "Velmora is a country. the capital of Velmora is Tinar."),
        ("kb-1", "Bolo lives in Tinar. Bolo's favourite colour is red. Bolo is a baker."),
        ("kb-2", "Sami lives in Porak. Sami's pet is called Nuno. Nuno is a fox.")]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(" ".join(t for _, t in DOCS) * 20, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(1, vocab_size=tok.n_vocab, context_length=64)


def test_embedding_is_the_normalised_mean_of_hidden_states(model, tok):
    enc = DenseEncoder(model, tok, layer=1)
    text = DOCS[1][1]
    ids = torch.tensor([tok.encode_ordinary(text)])
    h = model.introspect(ids)["hidden_states"][1][0]                   # (T, C), no padding
    want = (h.mean(0) / h.mean(0).norm()).numpy()
    np.testing.assert_allclose(enc.encode([text])[0], want, rtol=1e-5, atol=1e-6)


def test_batching_with_padding_does_not_change_embeddings(model, tok):
    texts = [t for _, t in DOCS] + ["Tinar"]
    batched = DenseEncoder(model, tok, batch_size=8).encode(texts)       # padded to the longest
    alone = np.concatenate([DenseEncoder(model, tok, batch_size=1).encode([t]) for t in texts])
    np.testing.assert_allclose(batched, alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, rtol=1e-5)


def test_encoder_errors(model, tok):
    with pytest.raises(LmstackError, match="layer=5 is out of range"):
        DenseEncoder(model, tok, layer=5)
    with pytest.raises(LmstackError, match="empty"):
        DenseEncoder(model, tok).encode([""])
    enc = DenseEncoder(model, tok)
    enc.encode(["Tinar " * 100])                                        # longer than the context: cut
    assert enc.truncated == 1


def test_save_load_round_trip(tmp_path, model, tok):
    index = Index.build(DOCS, tok, chunk_tokens=12, overlap=3, encoder=DenseEncoder(model, tok))
    index.save(tmp_path / "idx")
    back = Index.load(tmp_path / "idx")
    assert back.chunks == index.chunks and len(back) == len(index) > len(DOCS)
    assert np.array_equal(back.embeddings, index.embeddings) and back.embeddings.dtype == np.float32
    assert back.encoder == index.encoder and back.encoder["fingerprint"] == DenseEncoder(model, tok).fingerprint
    q = back.analyze("where does Bolo live?")
    np.testing.assert_array_equal(back.bm25.scores(q), index.bm25.scores(q))
    # saving again replaces the index in place
    Index.build(DOCS[:1], tok).save(tmp_path / "idx")
    assert len(Index.load(tmp_path / "idx")) == 1 and Index.load(tmp_path / "idx").embeddings is None


def _damage(path, **changes):
    meta = json.loads((path / META).read_text())
    meta.update(changes)
    (path / META).write_text(json.dumps(meta))


def test_load_checks_declared_sizes(tmp_path, model, tok):
    p = tmp_path / "idx"
    Index.build(DOCS, tok, chunk_tokens=64, encoder=DenseEncoder(model, tok)).save(p)
    _damage(p, n_chunks=7)
    with pytest.raises(LmstackError, match="declares n_chunks=7 but holds 3"):
        Index.load(p)
    _damage(p, n_chunks=3, dim=32)
    with pytest.raises(LmstackError, match=r"declares float32 \(3, 32\)"):
        Index.load(p)
    _damage(p, dim=64)
    (p / EMBEDDINGS).unlink()
    with pytest.raises(LmstackError, match="could not be read"):
        Index.load(p)
    (p / META).write_text("{not json")
    with pytest.raises(LmstackError, match="not valid JSON"):
        Index.load(p)
    with pytest.raises(LmstackError, match="not an index folder"):
        Index.load(tmp_path / "nothing")


def test_empty_index_is_an_error_and_save_protects_other_folders(tmp_path, tok):
    with pytest.raises(LmstackError, match="empty"):
        Index.build([], tok)
    with pytest.raises(LmstackError, match="empty"):
        Index.build([("a", ""), ("b", "")], tok)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(LmstackError, match="not an index folder"):
        Index.build(DOCS, tok).save(tmp_path / "notes")
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


def test_an_empty_index_is_refused(tok):
    """No documents, or only empty ones, is a clear error at build time, not an index whose
    every search returns nothing."""
    for docs in ([], [("a", ""), ("b", "")]):
        with pytest.raises(LmstackError, match="the index would be empty"):
            Index.build(docs, tok)
    with pytest.raises(LmstackError, match="the index is empty"):
        Index([])
