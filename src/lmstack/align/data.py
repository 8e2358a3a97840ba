"""Alignment data: preference pairs and prompts with answers, tokenized, checked, and served as
padded, resumable batches of pairs for the one Trainer.

    pairs = tokenize_pairs(tok, records, fmt="chat", max_len=256)    # -> PreferenceExamples
    batches = PairBatches(pairs, batch_size=8, seed=0)                # next_batch() -> PairBatch
    train, held = tinyworld_pairs(seed=0, n=2000), tinyworld_pairs(seed=0, n=200, heldout=True)
    probs = tinyworld_prompts(seed=0, n=200, heldout=True)            # {"prompt", "answer", "task"}

Records are {"prompt", "chosen", "rejected"} (JSONL, or tinyworld's {"prompt", "response",
"rejected"}, where "response" is the chosen answer). Two formats:
  chat   the tokenizer's chat template (data/chat_examples.py): the prompt is a user turn, the
         response an assistant turn closed by its end token. For SFT models.
  plain  prompt and response as raw text, tokenized separately and concatenated (the tinyworld
         pretraining layout "Q: ...\\nA: 47+38=" + "85"). For pretrained base models.
Every record is checked at the door; an error names its source (file:line or "name #i").

Held-out sets are drawn from tinyworld's task generators with the same held-out rule as
data/tinyworld.py (`_eval_keep`), so no held-out problem is ever a training pair.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
from torch import Tensor

from lmstack.data.chat_examples import (ChatExampleError, ChatExampleOptions, PreferenceExample, SFTExample,
                                        preference_example, read_chat_jsonl)
from lmstack.utils import LmstackError

FORMATS = ("chat", "plain")
PAD_ID = 0   # any valid id: right padding is never attended to by a real token and carries no loss


class AlignDataError(LmstackError, ValueError):
    """A bad preference record or prompt; the message names its source."""


# --------------------------------------------------------------------------- records -> tokens

def _pair_fields(record, source: str) -> tuple[object, object, object]:
    if not isinstance(record, dict):
        raise AlignDataError(f"{source}: a preference record must be an object, got {type(record).__name__}")
    chosen_key = "chosen" if "chosen" in record else "response"
    missing = [k for k in ("prompt", chosen_key, "rejected") if k not in record]
    if missing:
        raise AlignDataError(f"{source}: a preference record needs \"prompt\", \"chosen\" (or tinyworld's "
                             f"\"response\") and \"rejected\"; missing {missing} (keys: {sorted(record)})")
    return record["prompt"], record[chosen_key], record["rejected"]


def prompt_ids(tok, prompt: str, fmt: str) -> list[int]:
    """The ids a response continues: the chat template's generation prompt, or the raw text."""
    if fmt == "chat":
        return list(tok.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)[0])
    return list(tok.encode_ordinary(prompt) if hasattr(tok, "encode_ordinary") else tok.encode(prompt))


def _plain_pair(tok, prompt, chosen, rejected, max_len: int | None, source: str) -> PreferenceExample:
    for name, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(v, str) or (name != "prompt" and not v.strip()):
            raise AlignDataError(f"{source}: {name} must be a non-empty string in the plain format, got {v!r:.60}")
    if chosen == rejected:
        raise AlignDataError(f"{source}: chosen and rejected are the same response ({chosen!r:.60}); a preference "
                             f"pair needs two different responses")
    p = prompt_ids(tok, prompt, "plain")
    if not p:
        raise AlignDataError(f"{source}: the prompt is empty")
    seqs = {}
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        r = prompt_ids(tok, text, "plain")
        ids = p + r
        if max_len is not None and len(ids) > max_len:
            raise AlignDataError(f"{source}: prompt + {name} is {len(ids)} tokens, longer than the model's context "
                                 f"({max_len}); shorten it or drop the record")
        seqs[name] = SFTExample(ids, [0] * len(p) + [1] * len(r), f"{source} ({name})")
    return PreferenceExample(seqs["chosen"], seqs["rejected"], len(p), source)


def tokenize_pairs(tok, records: Iterable, fmt: str = "chat", max_len: int | None = None,
                   source: str = "pair") -> list[PreferenceExample]:
    """Records (or (source, record) tuples, as read_preference_jsonl yields) -> checked pairs."""
    if fmt not in FORMATS:
        raise AlignDataError(f"format={fmt!r}; valid: {', '.join(FORMATS)}")
    out = []
    for i, item in enumerate(records):
        src, rec = item if isinstance(item, tuple) else (f"{source} #{i}", item)
        prompt, chosen, rejected = _pair_fields(rec, src)
        if fmt == "plain":
            out.append(_plain_pair(tok, prompt, chosen, rejected, max_len, src))
            continue
        try:
            out.append(preference_example(tok, prompt, chosen, rejected, ChatExampleOptions(max_len=max_len), src))
        except ChatExampleError as e:
            raise AlignDataError(str(e)) from None
    if not out:
        raise AlignDataError(f"no preference pairs in {source}")
    return out


def read_preference_jsonl(path) -> list[tuple[str, dict]]:
    """(f"{path}:{line}", record) for each line of a JSONL file."""
    try:
        return list(read_chat_jsonl(path))
    except ChatExampleError as e:
        raise AlignDataError(str(e)) from None


# --------------------------------------------------------------------------- tinyworld

def _eval_keep(seed: int):
    """tinyworld's held-out rule (data/tinyworld.py generate(): eval_keep); single-digit
    arithmetic is never held out (it is the times table the worked steps are made of)."""
    from lmstack.data.tinyworld_world import held_out

    def keep(key: tuple) -> bool:
        if key[0] == "arith" and max(key[2:]) < 10:
            return False
        return held_out(seed, *key)
    return keep


def _task_records(seed: int, n: int, heldout: bool, tasks: tuple[str, ...], salt: str) -> list[dict]:
    from lmstack.data import tinyworld_tasks as tw
    eval_keep = _eval_keep(seed)
    keep = eval_keep if heldout else (lambda key: not eval_keep(key))
    rng = random.Random(f"align:{salt}:{seed}:{'heldout' if heldout else 'train'}")
    makers = {"arithmetic": lambda: tw.arithmetic(rng, keep, steps=False, keep_steps=not heldout),
              "arithmetic_steps": lambda: tw.arithmetic(rng, keep, steps=True, keep_steps=not heldout),
              "instruction": lambda: tw.instruction(rng, keep)}
    unknown = [t for t in tasks if t not in makers]
    if unknown:
        raise AlignDataError(f"unknown tinyworld tasks {unknown}; valid: {sorted(makers)}")
    seen, out = set(), []
    for _ in range(50 * n):
        if len(out) >= n:
            break
        rec = makers[tasks[len(out) % len(tasks)]]()
        if rec["prompt"] not in seen:          # distinct prompts: an accuracy counts each once
            seen.add(rec["prompt"])
            out.append(rec)
    return out


def tinyworld_pairs(seed: int = 0, n: int = 2000, heldout: bool = False,
                    tasks: tuple[str, ...] = ("arithmetic", "instruction")) -> list[dict]:
    """{"prompt", "chosen", "rejected", "task"}: the right answer against a plausible wrong one."""
    return [{"prompt": r["prompt"], "chosen": r["response"], "rejected": r["rejected"], "task": r["task"]}
            for r in _task_records(seed, n, heldout, tuple(tasks), "pairs")]


def final_number(work: str) -> str:
    """The result a worked solution ends with: '7+8=15, ... so 47+38=85' -> '85'."""
    return work.rsplit("=", 1)[-1].strip()


def tinyworld_prompts(seed: int = 0, n: int = 256, heldout: bool = False,
                      tasks: tuple[str, ...] = ("arithmetic",)) -> list[dict]:
    """{"prompt", "answer", "task"}: problems with an exact answer (verifiable rewards). For
    arithmetic_steps ('... show your work.') the answer is the final number the worked steps
    end with (reward: rewards.final_answer), not the steps themselves."""
    return [{"prompt": r["prompt"], "task": r["task"],
             "answer": final_number(r["answer"]) if r["task"] == "arithmetic_steps" else r["answer"]}
            for r in _task_records(seed, n, heldout, tuple(tasks), "prompts")]


# --------------------------------------------------------------------------- batches of pairs

@dataclass
class PairBatch:
    """B pairs as one (2B, T) batch: rows [0, B) the chosen sequences, [B, 2B) the rejected.
    loss_mask (2B, T-1): 1 where target ids[:, t+1] is a response token. extras: per-pair
    tensors (B,) the source attached (e.g. the reference log-probs of DPO)."""
    input_ids: Tensor
    loss_mask: Tensor
    lengths: Tensor          # (2B,) real tokens per row
    index: Tensor            # (B,) the pairs' indices in the source
    extras: dict

    def to(self, device) -> "PairBatch":
        return PairBatch(self.input_ids.to(device), self.loss_mask.to(device), self.lengths.to(device),
                         self.index.to(device), {k: v.to(device) for k, v in self.extras.items()})


def collate_pairs(pairs: list[PreferenceExample], index: list[int], extras: dict | None = None) -> PairBatch:
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD_ID, dtype=torch.long)
    mask = torch.zeros(len(seqs), T - 1)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s.ids)
        mask[i, :len(s) - 1] = torch.tensor(s.loss_mask[1:], dtype=torch.float)
    idx = torch.tensor(index, dtype=torch.long)
    return PairBatch(ids, mask, torch.tensor([len(s) for s in seqs]), idx,
                     {k: v[idx] for k, v in (extras or {}).items()})


class PairBatches:
    """A resumable source of PairBatches. Each epoch is a seeded permutation of the pairs; the
    k-th micro-batch drawn on rank r takes pairs [(k * W + r) * B, ... + B) of it, so W ranks
    see disjoint pairs. shuffle=False: the given order (validation)."""

    def __init__(self, pairs: list[PreferenceExample], batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, extras: dict | None = None, what: str = "the pairs"):
        self.per_epoch = len(pairs) // (batch_size * world_size)
        if self.per_epoch == 0:
            raise LmstackError(f"{what}: {len(pairs)} pairs are fewer than one batch of {batch_size} x "
                               f"{world_size} rank(s); lower --batch-size or add pairs")
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.extras = extras or {}
        self.epoch, self.drawn = 0, 0

    def _order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.pairs))
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.pairs))

    def next_batch(self) -> PairBatch:
        if self.drawn >= self.per_epoch:
            self.epoch, self.drawn = self.epoch + 1, 0
        start = (self.drawn * self.world_size + self.rank) * self.batch_size
        index = [int(i) for i in self._order()[start:start + self.batch_size]]
        self.drawn += 1
        return collate_pairs([self.pairs[i] for i in index], index, self.extras)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "drawn": self.drawn}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.drawn = int(sd["epoch"]), int(sd["drawn"])
