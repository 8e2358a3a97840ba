"""What several labs share: tinyworld data built by lmstack.data, micro models, training
through the one Trainer, a tiny tinyworld LM, and toy-task batch sources.

    data = tinyworld_data(seed=0, size_mb=0.2, vocab_size=384)     # built once per process
    run = train(ctx, "rope", ModelConfig(...), steps=100, data=data, seq_len=32)
    run.model, run.curve("train"), run.result["val_loss"]
    run = train(ctx, "copy", cfg, steps=100, batches=TaskBatches(offset_copy(16, 24, 2), 16, seed))
    lm = tiny_lm(ctx)                                              # a trained LM (cached per seed/mode)

Data and the tiny LM are cached for the life of the process (labs run one after another in
`lab all` and in the tests), in a temporary folder removed at exit. Both are pure functions of
their arguments, so caching never changes a number.
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lmstack.labs.base import LabContext
from lmstack.model import ModelConfig, Transformer
from lmstack.report.figures import read_metrics
from lmstack.tokenizer import Tokenizer
from lmstack.train import Batch, IGNORE_INDEX, TrainConfig, Trainer
from lmstack.utils import seed_everything

_ROOT: Path | None = None


def cache_root() -> Path:
    """A scratch folder shared by the labs of this process, removed at exit."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="lmstack-labs-cache-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


@dataclass
class TinyData:
    """A data directory (lmstack.data layout) with its tokenizer and token shards."""
    dir: Path
    tokenizer: Tokenizer
    meta: dict                    # the corpus' meta.json (documents, duplicates, noise, splits)

    def tokens(self, split: str = "val") -> np.ndarray:
        from lmstack.data import ShardSet
        return np.asarray(ShardSet(self.dir / "shards", split).tokens, dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.n_vocab


@functools.lru_cache(maxsize=16)
def corpus_data(corpus: str, seed: int, size_mb: float, vocab_size: int, noise: float = 0.0,
                dedupe: bool = False, tokenizer_from: str | None = None) -> TinyData:
    """build_corpus + a BPE tokenizer + token shards (train/val/test), cached per process.
    `tokenizer_from`: the data dir whose tokenizer to reuse (losses then compare token for token)."""
    from lmstack.data import CorpusOptions, build_corpus
    from lmstack.data.shards import tokenize_corpus
    tag = hashlib.sha1(str(tokenizer_from).encode()).hexdigest()[:8]
    key = f"{corpus}-{seed}-{size_mb}-{vocab_size}-{noise}-{int(dedupe)}-{tag}"
    out = cache_root() / key
    meta = build_corpus(CorpusOptions(corpus=corpus, out=str(out), size_mb=size_mb, seed=seed, noise=noise,
                                      dedupe=dedupe))
    tok_path = str(Path(tokenizer_from) / "tokenizer.json") if tokenizer_from else None
    tokenize_corpus(out, vocab_size=vocab_size, tokenizer=tok_path)
    return TinyData(out, Tokenizer.load(out / "tokenizer.json"), meta)


def tinyworld_data(seed: int, size_mb: float = 0.2, vocab_size: int = 384) -> TinyData:
    return corpus_data("tinyworld", seed, size_mb, vocab_size)


def build_model(cfg: ModelConfig, seed: int) -> Transformer:
    """A Transformer initialised from `seed` (the same seed gives the same weights)."""
    seed_everything(seed)
    return Transformer(cfg)


@dataclass
class TrainRun:
    model: torch.nn.Module        # trained in place, in train mode off (eval) on return
    result: dict                  # Trainer.fit()'s summary (train_loss, val_loss, tokens_per_s, elapsed_s, ...)
    metrics: list[dict]           # metrics.jsonl rows

    def curve(self, split: str = "train", key: str = "loss") -> tuple[list[int], list[float]]:
        rows = [m for m in self.metrics if m.get("split") == split and key in m]
        return [int(m["step"]) for m in rows], [float(m[key]) for m in rows]

    def final(self, split: str = "val", last: int = 1) -> float:
        """Mean loss of the last `last` logged points of `split`."""
        _, ys = self.curve(split)
        return float(np.mean(ys[-last:])) if ys else float("nan")


def train(ctx: LabContext, name: str, model: torch.nn.Module | ModelConfig, *, steps: int,
          data: TinyData | None = None, batches=None, val_batches=None, objective=None,
          batch_size: int = 16, seq_len: int = 64, lr: float = 3e-3, eval_every: int = 0,
          eval_batches: int = 4, **cfg_fields) -> TrainRun:
    """Train through the one Trainer into ctx.work/name. `model`: a module (trained in place) or
    a ModelConfig, which the Trainer builds from ctx.seed with what the objective needs (its
    mask; the masked LM's extra mask-token row). `data`: pretrain on its shards; or `batches`
    (+ `val_batches`): a toy-task source. `objective`: an Objective, or the name of a built-in
    pretraining objective (TrainConfig.objective: causal, masked, prefix)."""
    if isinstance(objective, str):
        cfg_fields["objective"], objective = objective, None
    ctx.log(f"  train {name}: {steps} steps")
    cfg = TrainConfig(data=str(data.dir) if data is not None else None, out=str(ctx.work / name), max_steps=steps,
                      batch_size=batch_size, seq_len=seq_len, lr=lr, warmup_steps=max(1, min(50, steps // 10)),
                      eval_every=eval_every, eval_batches=eval_batches, ckpt_every=0, keep_last=1,
                      tensorboard=False, device="cpu", dtype="float32", seed=ctx.seed, **cfg_fields)
    trainer = Trainer(cfg, model, objective, batches, val_batches=val_batches)
    result = trainer.fit()
    trained = trainer.raw_model.eval()
    shutil.rmtree(ctx.work / name / "checkpoints", ignore_errors=True)   # scratch: keep the disk small
    return TrainRun(trained, result, read_metrics(ctx.work / name / "metrics.jsonl"))


def windows(tokens: np.ndarray, seq_len: int, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), each (N, seq_len): the first N = min(n_rows, what fits) consecutive windows of a 1-D
    id stream and their next-token targets."""
    n_rows = min(n_rows, (len(tokens) - 1) // seq_len)
    if n_rows < 1:
        raise ValueError(f"{len(tokens)} tokens are fewer than one window of {seq_len + 1}")
    rows = torch.from_numpy(tokens[: n_rows * seq_len + 1].copy())
    x = torch.stack([rows[i * seq_len:(i + 1) * seq_len] for i in range(n_rows)])
    y = torch.stack([rows[i * seq_len + 1:(i + 1) * seq_len + 1] for i in range(n_rows)])
    return x, y


@torch.no_grad()
def position_losses(model: Transformer, tokens: np.ndarray, seq_len: int, n_rows: int) -> np.ndarray:
    """(seq_len,) mean next-token loss at each position over `n_rows` consecutive windows of
    `tokens` (a 1-D id stream)."""
    x, y = windows(tokens, seq_len, n_rows)
    nll = torch.cat([torch.nn.functional.cross_entropy(model(xb).float().transpose(1, 2), yb, reduction="none")
                     for xb, yb in zip(x.split(64), y.split(64))])                         # (N, T), 64 rows a forward
    return nll.mean(0).numpy()


@torch.no_grad()
def next_token_scores(model, tokens: np.ndarray, seq_len: int, n_rows: int) -> dict:
    """Next-token loss and top-1 accuracy of `model` over `n_rows` consecutive windows of
    `tokens`: {"loss", "acc", "argmax" ((N, seq_len) int64 array of the top-1 predictions)}."""
    x, y = windows(tokens, seq_len, n_rows)
    was = model.training
    model.eval()
    nll, top = [], []
    for xb, yb in zip(x.split(64), y.split(64)):
        logits = model(xb).float()
        nll.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), yb, reduction="none"))
        top.append(logits.argmax(-1))
    model.train(was)
    nll_t, top_t = torch.cat(nll), torch.cat(top)
    return {"loss": float(nll_t.mean()), "acc": float((top_t == y).float().mean()), "argmax": top_t.numpy()}


def tiny_lm_config(vocab_size: int, context_length: int = 128, **over) -> ModelConfig:
    """The micro decoder most labs train: 2 layers, width 64, 4 heads."""
    fields = dict(vocab_size=vocab_size, n_layer=2, n_head=4, n_embd=64, context_length=context_length)
    return ModelConfig(**{**fields, **over})


@functools.lru_cache(maxsize=4)
def _tiny_lm(seed: int, quick: bool, work: str) -> tuple[TrainRun, TinyData]:
    data = tinyworld_data(seed)
    ctx = LabContext(quick=quick, seed=seed, work=Path(work))
    run = train(ctx, "tiny-lm", tiny_lm_config(data.vocab_size), steps=ctx.pick(150, 600), data=data,
                seq_len=64, batch_size=ctx.pick(8, 16), lr=ctx.pick(6e-3, 3e-3), eval_every=ctx.pick(50, 100))
    return run, data


def tiny_lm(ctx: LabContext) -> tuple[TrainRun, TinyData]:
    """A tiny tinyworld LM and its data, trained once per (seed, mode) in this process. Shared
    read-only: labs must not train it further or change it."""
    work = cache_root() / f"tiny-lm-{ctx.seed}-{int(ctx.quick)}"
    work.mkdir(exist_ok=True)
    return _tiny_lm(ctx.seed, ctx.quick, str(work))


# --------------------------------------------------------------------------- toy tasks

class TaskBatches:
    """A batch source (the Trainer's protocol) for a toy task: batch i is a pure function of
    (seed, i), so the state is one counter and a resumed run sees the same batches."""

    def __init__(self, make: Callable[[torch.Generator, int], Batch], batch_size: int, seed: int):
        self.make, self.batch_size, self.seed, self.step = make, batch_size, seed, 0

    def next_batch(self) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        self.step += 1
        return self.make(g, self.batch_size)

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])


def offset_copy(vocab: int, seq_len: int, offset: int) -> Callable[[torch.Generator, int], Batch]:
    """Random tokens; position t must output the token `offset` places back (x[t - offset]).
    Pure order: the same tokens in another order have other answers. Positions t < offset
    carry no loss."""
    def make(g: torch.Generator, B: int) -> Batch:
        x = torch.randint(0, vocab, (B, seq_len), generator=g)
        y = torch.full_like(x, IGNORE_INDEX)
        y[:, offset:] = x[:, :-offset]
        return Batch(x, y)
    return make


def periodic(vocab: int, seq_len: int, min_period: int, max_period: int) -> Callable[[torch.Generator, int], Batch]:
    """In-context copying: each row repeats a pattern of P distinct tokens (P drawn per row in
    [min_period, max_period]). Once the pattern has been seen, the next token is the one that
    followed the previous occurrence of the current token; positions before the first repeat
    (t < P) carry no loss. As P varies per row, no fixed offset solves it: the model must find
    the earlier occurrence by content and copy its successor (an induction head)."""
    if max_period >= vocab or min_period < 2:
        raise ValueError(f"need 2 <= min_period <= max_period < vocab, got {min_period}, {max_period}, {vocab}")

    def make(g: torch.Generator, B: int) -> Batch:
        periods = torch.randint(min_period, max_period + 1, (B,), generator=g)
        pattern = torch.rand(B, vocab, generator=g).argsort(dim=1)                 # distinct tokens per row
        t = torch.arange(seq_len + 1)
        rows = pattern.gather(1, t[None, :] % periods[:, None])                     # (B, T+1)
        x, y = rows[:, :-1].clone(), rows[:, 1:].clone()
        y[t[None, :seq_len] < periods[:, None]] = IGNORE_INDEX
        return Batch(x, y)
    return make
