"""The contrastive encoder: cloze pairs, the batch source (distinct passages, exact resume),
InfoNCE against a hand float64 computation, the identity-started head against the
mean-pooled hidden states, and a short training run in the one Trainer that lowers the loss
and saves an encoder that loads back with the same embeddings."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from lmstack.rag import DenseEncoder, DenseRetriever, Index, tinyworld_kb
from lmstack.rag.contrastive import (ClozeBatches, ContrastiveEncoder, ContrastiveObjective, cloze_pair,
                                     encoder_from, sentences, train_encoder)
from lmstack.tokenizer import Tokenizer
from lmstack.utils import LmstackError
from tests.infer.conftest import tiny_model

DOCS = [(d["id"], d["text"]) for d in tinyworld_kb(0)[0][:12]]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(" ".join(t for _, t in DOCS) * 5, vocab_size=320)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(2, vocab_size=tok.n_vocab, context_length=128, init_std=0.02)


def test_cloze_pairs():
    text = "Bolo lives in Tinar. Bolo is a baker. Bolo's pet is Nuno."
    assert sentences(text) == ["Bolo lives in Tinar.", "Bolo is a baker.", "Bolo's pet is Nuno."]
    for seed in range(5):
        q, p = cloze_pair(text, random.Random(seed), keep_query=0.0)
        assert q in sentences(text) and q not in p and sorted(sentences(p) + [q]) == sorted(sentences(text))
        assert cloze_pair(text, random.Random(seed), keep_query=1.0)[1] == text
    assert cloze_pair("One sentence only.", random.Random(0), keep_query=0.0) == ("One sentence only.",) * 2


def test_batches_have_distinct_passages_and_resume_exactly(tok):
    pairs = [("Q: where does Sami live?", "Sami lives in Porak."), ("Q: what is Sami's job?", "Sami lives in Porak.")]
    src = ClozeBatches([t for _, t in DOCS], tok, batch_size=8, pairs=pairs, seed=3)
    assert len(src.units) == len(DOCS) + 1                             # the two questions share a passage
    first = [src.next_batch() for _ in range(3)]
    for b in first:
        rows = [tuple(r[r >= 0].tolist()) for r in b["p_ids"].where(b["p_pos"] >= 0, torch.tensor(-1))]
        assert len(set(rows)) == 8
    again = ClozeBatches([t for _, t in DOCS], tok, batch_size=8, pairs=pairs, seed=3)
    again.load_state_dict({"n": 2})
    resumed = again.next_batch()
    assert all(torch.equal(resumed[k], first[2][k]) for k in first[2])
    with pytest.raises(LmstackError, match="at least 2 distinct non-empty passages"):
        ClozeBatches(["only one.", "  "], tok)
    with pytest.raises(LmstackError, match="batch_size must be an int >= 2"):
        ClozeBatches(["a.", "b."], tok, batch_size=1)
    with pytest.raises(LmstackError, match=r"pairs\[0\] must be a \(query, passage\) pair"):
        ClozeBatches(["a.", "b."], tok, pairs=[("question only",)])


def test_infonce_equals_a_hand_computation(model, tok):
    enc = encoder_from(model)
    batch = ClozeBatches([t for _, t in DOCS], tok, batch_size=6, seed=0).next_batch()
    loss, metrics = ContrastiveObjective(tau=0.1).loss(enc, batch)

    def embed_alone(ids, pos):                          # one text at a time, no padding, float64
        out = []
        for r, p in zip(ids, pos):
            x = r[p >= 0][None]
            with torch.no_grad():
                h = enc(x)[0].double().mean(0)
            out.append(h / h.norm())
        return torch.stack(out)

    q, p = embed_alone(batch["q_ids"], batch["q_pos"]), embed_alone(batch["p_ids"], batch["p_pos"])
    s = q @ p.T / 0.1
    want = -(s.log_softmax(1).diagonal().mean() + s.log_softmax(0).diagonal().mean()) / 2
    assert loss.item() == pytest.approx(want.item(), abs=1e-5)
    assert metrics["acc"].item() == pytest.approx((s.argmax(1) == torch.arange(6)).double().mean().item())
    with pytest.raises(LmstackError, match="tau"):
        ContrastiveObjective(tau=0)


def test_untrained_encoder_embeds_as_the_mean_pooled_last_layer(model, tok):
    texts = [t for _, t in DOCS[:4]]
    start = ContrastiveEncoder(encoder_from(model), tok).encode(texts)
    np.testing.assert_allclose(start, DenseEncoder(model, tok, layer=-1).encode(texts), rtol=1e-4, atol=1e-5)
    with pytest.raises(LmstackError, match="keeps blocks 1..layer"):
        encoder_from(model, layer=3)
    with pytest.raises(LmstackError, match="needs an encoder model"):
        ContrastiveEncoder(model, tok)


def test_training_lowers_the_loss_and_the_encoder_loads_back(model, tok, tmp_path):
    probe = ClozeBatches([t for _, t in DOCS], tok, batch_size=12, seed=99).next_batch()
    objective = ContrastiveObjective()
    with torch.no_grad():
        before = objective.loss(encoder_from(model).eval(), probe)[0].item()
    enc, result = train_encoder(model, tok, DOCS, tmp_path / "enc", steps=12, batch_size=12, lr=3e-3)
    assert result["steps"] == 12
    with torch.no_grad():
        after = objective.loss(enc.model, probe)[0].item()
    assert after < 0.5 * before
    back = ContrastiveEncoder.load(tmp_path / "enc", tok)
    texts = [t for _, t in DOCS]
    np.testing.assert_array_equal(back.encode(texts), enc.encode(texts))
    assert back.fingerprint == enc.fingerprint
    index = Index.build(DOCS, tok, encoder=enc)
    hits = DenseRetriever(index, back).search(DOCS[3][1], k=1)
    assert hits[0].chunk.doc_id == DOCS[3][0]
    with pytest.raises(LmstackError, match="not an encoder directory"):
        ContrastiveEncoder.load(tmp_path, tok)
