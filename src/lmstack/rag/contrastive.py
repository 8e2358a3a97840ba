"""A small dense encoder trained contrastively on the corpus it will search.

    enc = train_encoder(model, tok, docs, out="runs/x/encoder", steps=300)
    index = Index.build(docs, tok, encoder=enc)            # then DenseRetriever(index, enc)
    enc = ContrastiveEncoder.load("runs/x/encoder", tok)    # later: the same query encoder

The encoder is the language model's first `layer` blocks (a copy) whose LM head became a
projection n_embd -> n_embd (the score-head seam of model/heads.py, started at the identity,
so before training it embeds as the mean-pooled hidden states do, after the final norm).
One block is the default: on tinyworld's KB, one block trained 300 steps reached recall@1
0.95 and recall@3 0.99 on the reported questions of benchmarks/bench_rag.py (mean-pooled
hidden states: 0.66 / 0.78); all four blocks trained 150 steps reached recall@3 0.82 (a side
run over all 152 questions) at 4x the cost per step. An embedding is the mean of the
projected token features, L2-normalised (dense.mean_pool).

Training pairs come from the corpus. Every chunk of the index gives cloze pairs (the inverse
cloze task, Lee et al., ACL 2019): a sentence of the chunk is the pseudo-query, the rest of
the chunk its passage; with probability `keep_query` the passage keeps the sentence, so the
encoder also learns plain overlap. Optional `pairs` add (query, passage) texts, e.g. the
corpus's own questions about other documents (tinyworld's questions about the pretraining
world's people, never about the knowledge base searched). The loss is InfoNCE with in-batch
negatives (DPR, Karpukhin et al., EMNLP 2020): for B pairs with distinct passages,
S = Q P^T / tau and the loss is the cross-entropy of S (and of S^T) against the diagonal;
metric `acc`, the share of queries whose own passage scores highest in the batch.

It runs in the one Trainer: `ContrastiveObjective` and `ClozeBatches` are an objective and a
batch source, and the trained encoder is saved as a model directory (safetensors +
config.json, its head recorded as a transform), which `ContrastiveEncoder.load` reads.
"""
from __future__ import annotations

import copy
import random
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from lmstack.rag.chunking import chunk_documents
from lmstack.rag.dense import DenseEncoder, mean_pool, right_pad
from lmstack.train.objectives import Objective
from lmstack.utils import LmstackError

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    return [s for s in (p.strip() for p in SENTENCE_END.split(text)) if s]


def cloze_pair(text: str, rng: random.Random, keep_query: float = 0.1) -> tuple[str, str]:
    """(pseudo-query, passage) from one chunk: a random sentence, and the chunk without it
    (with it, with probability keep_query, or when the chunk is a single sentence)."""
    sents = sentences(text)
    if not sents:
        raise LmstackError("a chunk with no text cannot make a training pair")
    i = rng.randrange(len(sents))
    if len(sents) == 1 or rng.random() < keep_query:
        return sents[i], text
    return sents[i], " ".join(sents[:i] + sents[i + 1:])


class ClozeBatches:
    """Batch source: each batch is `batch_size` distinct passages drawn at random, each with a
    query: a cloze sentence of a chunk of `texts`, or one of the queries given for it in
    `pairs` ([(query, passage)], e.g. questions about other documents of the same corpus).
    Returned as {"q_ids", "q_pos", "p_ids", "p_pos"} (right-padded, position -1 = padding).
    Passages of a batch are distinct, so no in-batch negative is a positive. Batch n is a
    function of (seed, n), so the state is the batch count (exact resume)."""

    def __init__(self, texts: list[str], tokenizer, batch_size: int = 32, max_tokens: int = 128,
                 keep_query: float = 0.1, seed: int = 0, pairs: list[tuple[str, str]] | None = None):
        units: dict[str, list[str]] = {t: [] for t in texts if t.strip()}       # passage -> given queries
        for i, pair in enumerate(pairs or []):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(x, str) and x.strip()
                                                                               for x in pair)):
                raise LmstackError(f"pairs[{i}] must be a (query, passage) pair of non-empty strings, "
                                   f"got {pair!r:.80}")
            units.setdefault(pair[1], []).append(pair[0])
        if len(units) < 2:
            raise LmstackError(f"contrastive training needs at least 2 distinct non-empty passages (in-batch "
                               f"negatives), got {len(units)}")
        if not isinstance(batch_size, int) or batch_size < 2:
            raise LmstackError(f"batch_size must be an int >= 2 (one positive, >= 1 negative), got {batch_size!r}")
        self.units, self.tokenizer = list(units.items()), tokenizer
        self.batch_size = min(batch_size, len(self.units))
        self.max_tokens, self.keep_query, self.seed = max_tokens, keep_query, seed
        self.n = 0

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer.encode_ordinary(text)[:self.max_tokens]

    def next_batch(self) -> dict:
        rng = random.Random(f"cloze:{self.seed}:{self.n}")
        self.n += 1
        pairs = []
        for i in rng.sample(range(len(self.units)), self.batch_size):
            passage, queries = self.units[i]
            pairs.append((rng.choice(queries), passage) if queries else cloze_pair(passage, rng, self.keep_query))
        q_ids, q_pos = right_pad([self._ids(q) for q, _ in pairs])
        p_ids, p_pos = right_pad([self._ids(p) for _, p in pairs])
        return {"q_ids": q_ids, "q_pos": q_pos, "p_ids": p_ids, "p_pos": p_pos}

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, sd: dict) -> None:
        self.n = int(sd["n"])


def embed(model, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(B, T) ids/positions -> (B, dim) unit vectors through the encoder model (with grad)."""
    return mean_pool(model(ids, positions=pos), pos)


class ContrastiveObjective(Objective):
    """Symmetric InfoNCE over in-batch negatives at temperature `tau`."""
    name = "contrastive"

    def __init__(self, tau: float = 0.05):
        if not tau > 0:
            raise LmstackError(f"tau (the softmax temperature) must be > 0, got {tau!r}")
        self.tau = tau

    def loss(self, model, batch: dict):
        q = embed(model, batch["q_ids"], batch["q_pos"])
        p = embed(model, batch["p_ids"], batch["p_pos"])
        sims = q @ p.T / self.tau                                       # (B, B): row i's positive is column i
        labels = torch.arange(sims.shape[0], device=sims.device)
        loss = (F.cross_entropy(sims, labels) + F.cross_entropy(sims.T, labels)) / 2
        with torch.no_grad():
            acc = (sims.argmax(1) == labels).float().mean()
        return loss, {"acc": acc}

    def tokens(self, batch: dict) -> int:
        return int((batch["q_pos"] >= 0).sum() + (batch["p_pos"] >= 0).sum())


def encoder_from(model, layer: int | None = None):
    """A trainable copy of the language model's first `layer` blocks (default all) with a
    projection head n_embd -> n_embd started at the identity."""
    from lmstack.model.heads import add_score_head

    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(model, "blocks") or not hasattr(model, "lm_head"):
        raise LmstackError(f"encoder_from needs an lmstack Transformer, got {type(model).__name__}")
    layer = cfg.n_layer if layer is None else layer
    if not 1 <= layer <= cfg.n_layer:
        raise LmstackError(f"layer={layer}: the encoder keeps blocks 1..layer of the model's {cfg.n_layer}")
    enc = copy.deepcopy(model)
    enc.blocks = torch.nn.ModuleList(list(enc.blocks)[:layer])
    enc.config = enc.config.replace(n_layer=layer)
    add_score_head(enc, cfg.n_embd)
    with torch.no_grad():
        enc.lm_head.weight.copy_(torch.eye(cfg.n_embd))
    for p in enc.parameters():
        p.requires_grad_(True)
    return enc.train()


class ContrastiveEncoder(DenseEncoder):
    """DenseEncoder over a trained encoder model: the mean of its head's per-token outputs."""
    kind = "contrastive"

    def __init__(self, model, tokenizer, batch_size: int = 32, max_tokens: int | None = None):
        from lmstack.model.heads import has_score_head

        if not has_score_head(model):
            raise LmstackError("ContrastiveEncoder needs an encoder model (encoder_from / train_encoder); "
                               "for a language model's hidden states use DenseEncoder")
        super().__init__(model.eval(), tokenizer, layer=-1, batch_size=batch_size, max_tokens=max_tokens)
        self.dim = model.lm_head.out_features

    def features(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return self.model(tok, positions=pos)

    @classmethod
    def load(cls, path: str | Path, tokenizer, **kw) -> "ContrastiveEncoder":
        from lmstack.model import Transformer

        if not (Path(path) / "config.json").is_file():
            raise LmstackError(f"{path} is not an encoder directory (no config.json); train one with train_encoder")
        return cls(Transformer.from_pretrained(path), tokenizer, **kw)


def train_encoder(model, tokenizer, docs, out: str | Path, *, pairs: list[tuple[str, str]] | None = None,
                  layer: int | None = 1, steps: int = 300, batch_size: int = 32, lr: float = 3e-3,
                  tau: float = 0.05, chunk_tokens: int = 128, overlap: int = 32, keep_query: float = 0.1,
                  seed: int = 0, device: str = "cpu"):
    """Train an encoder on the chunks of `docs` ([(doc_id, text)], chunked as the index
    chunks them; cloze queries) and on `pairs` ([(query, passage)], optional), and save it to
    `out`; returns (ContrastiveEncoder, the Trainer's result)."""
    from lmstack.model import Transformer
    from lmstack.train import Trainer, TrainConfig

    chunks = [c.text for c in chunk_documents(docs, tokenizer, chunk_tokens, overlap)]
    enc = encoder_from(model, layer)
    batches = ClozeBatches(chunks, tokenizer, batch_size, max_tokens=enc.config.context_length,
                           keep_query=keep_query, seed=seed, pairs=pairs)
    cfg = TrainConfig(out=str(out), max_steps=steps, batch_size=batches.batch_size, lr=lr, min_lr_ratio=0.1,
                      warmup_steps=max(1, steps // 10), weight_decay=0.0, eval_every=0, ckpt_every=0, keep_last=1,
                      tensorboard=False, device=device, dtype="float32", seed=seed, seq_len=chunk_tokens)
    result = Trainer(cfg, enc, ContrastiveObjective(tau), batches).fit()
    return ContrastiveEncoder(Transformer.from_pretrained(out), tokenizer), result


ENCODER_DIR = "encoder"      # where `lmstack rag index --encoder-steps` keeps the encoder, inside the index


def query_encoder(index_dir: str | Path, index, model, tokenizer) -> DenseEncoder:
    """The encoder that embeds queries for an index: the contrastive encoder saved in
    IDX/encoder when the index was embedded by one, else the model's mean-pooled hidden
    states at the recorded layer."""
    info = index.encoder or {}
    if info.get("kind") == ContrastiveEncoder.kind:
        return ContrastiveEncoder.load(Path(index_dir) / ENCODER_DIR, tokenizer)
    return DenseEncoder(model, tokenizer, layer=info.get("layer", -1))
