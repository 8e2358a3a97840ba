"""Rollouts for RL (GRPO, PPO): sampling through the one engine with the policy's current
weights, calling reward functions, and the resumable source that serves a rollout batch to
the Trainer as micro-batches over several epochs.

    engine = RolloutEngine(policy, tok, max_completion_len=16, temperature=1.0)
    groups = engine.sample([prompt_ids, ...], n=8, seed=0)     # n Rollouts per prompt
    rewards, per_fn = compute_rewards([exact_answer], records, texts)

The engine holds its own copy of the policy, made on first use (after the Trainer placed the
policy on its device); before each rollout batch `update_weights(policy)` copies the trained
weights into it in place and drops the prefix cache. Sampling uses temperature only (no
top-k/top-p), and the engine records each token's log-prob under softmax(logits / T)
("processed_logprobs"): the old-policy log-probs of the importance ratio, with no extra
forward pass. tests/align check them against a plain forward of the policy.

A reward function is any callable `(prompt, completion, **fields) -> float`, where fields are
the prompt record's other keys (tinyworld's "answer"). One that raises, or returns NaN or a
non-number, stops the run with an error naming the function and the record.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from lmstack.align.data import PAD_ID
from lmstack.utils import LmstackError


class RewardError(LmstackError):
    """A reward function raised or returned something that is not a finite number."""


@dataclass
class Rollout:
    prompt_ids: list[int]
    token_ids: list[int]          # every sampled token, the stop/EOS token included
    logprobs: list[float]         # log p(token) under the sampling distribution
    text: str                     # the completion's text (stop strings and special tokens removed)
    finish_reason: str


class RolloutEngine:
    """The LLM engine over a copy of `policy`, synced before every batch of samples."""

    def __init__(self, policy, tokenizer, *, max_completion_len: int, temperature: float = 1.0,
                 stop_token_ids: list[int] | None = None, stop: list[str] | None = None, max_num_seqs: int = 64,
                 max_prompt_len: int | None = None, dtype: torch.dtype | None = None, ignore_eos: bool = False):
        if not temperature > 0:
            raise LmstackError(f"temperature={temperature!r}: rollouts sample, so it must be > 0")
        self.policy, self.tokenizer = policy, tokenizer
        self.max_completion_len, self.temperature = max_completion_len, temperature
        self.stop_token_ids, self.stop = list(stop_token_ids or []), list(stop or [])
        self.max_num_seqs, self.max_prompt_len, self.dtype = max_num_seqs, max_prompt_len, dtype
        self.ignore_eos = ignore_eos      # sample past EOS (no masking: the recorded log-probs stay exact)
        self.llm = None
        self.generate_s = 0.0          # wall time spent sampling (the benchmark reports its share)

    def _engine(self):
        if self.llm is None:
            from lmstack.infer import LLM
            ctx = self.policy.config.context_length
            per_seq = (self.max_prompt_len or ctx) + self.max_completion_len
            copy_ = copy.deepcopy(self.policy).requires_grad_(False).eval()
            device = next(self.policy.parameters()).device
            self.llm = LLM(copy_, tokenizer=self.tokenizer, device=str(device), dtype=self.dtype,
                           max_num_seqs=self.max_num_seqs, kv_cache_tokens=max(ctx, self.max_num_seqs * per_seq) + 64)
        return self.llm

    @torch.no_grad()
    def sync(self) -> None:
        """The engine's weights := the policy's (in place; the prefix cache is dropped)."""
        llm = self._engine()
        if llm.model is not self.policy:
            # only what training changes: the engine's copy was made from this policy, so frozen
            # tensors (a LoRA base) already match; a tied head is one parameter, sent once
            llm.update_weights({n: p.detach() for n, p in self.policy.named_parameters() if p.requires_grad})

    def params(self, n: int, seed: int | None, greedy: bool = False, max_tokens: int | None = None):
        from lmstack.infer import SamplingParams
        return SamplingParams(n=n, temperature=0.0 if greedy else self.temperature, seed=seed,
                              max_tokens=max_tokens or self.max_completion_len, stop_token_ids=self.stop_token_ids,
                              stop=self.stop or None, logprobs=None if greedy else 0, ignore_eos=self.ignore_eos,
                              logprobs_mode="processed_logprobs")

    def sample(self, prompts: list[list[int]], n: int, seed: int, greedy: bool = False,
               max_tokens: int | None = None) -> list[list[Rollout]]:
        """n completions per prompt (token-id lists), with the policy's current weights."""
        self.sync()
        llm = self._engine()
        params = [self.params(n, None if greedy else seed * 100_003 + i, greedy, max_tokens)
                  for i in range(len(prompts))]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        self.generate_s += time.perf_counter() - t0
        groups = []
        for prompt, out in zip(prompts, outs):
            if out.error is not None:
                raise LmstackError(f"the engine failed on a rollout prompt ({out.error})")
            groups.append([Rollout(prompt, list(c.token_ids),
                                   [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)] if c.logprobs else [],
                                   c.text, c.finish_reason) for c in out.outputs])
        return groups


# --------------------------------------------------------------------------- rewards

def _fn_name(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def compute_rewards(reward_fns, weights, records: list[dict], completions: list[str]) -> tuple[Tensor, dict]:
    """Weighted sum of every reward function on every (record, completion): (N,) and
    {"reward_<fn>": mean of that function}. records[i] is the prompt record of completion i."""
    total = torch.zeros(len(completions))
    per_fn = {}
    for fn, w in zip(reward_fns, weights):
        name = _fn_name(fn)
        vals = []
        for i, (rec, text) in enumerate(zip(records, completions)):
            fields = {k: v for k, v in rec.items() if k != "prompt"}
            where = f"record {rec.get('source', f'#{i}')} (prompt {rec['prompt']!r:.60}, completion {text!r:.60})"
            try:
                v = fn(rec["prompt"], text, **fields)
            except Exception as e:    # a user's function: any exception becomes one clear error
                raise RewardError(f"reward function {name} raised {type(e).__name__}: {e} on {where}") from None
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise RewardError(f"reward function {name} returned {v!r} on {where}; a reward must be a finite "
                                  f"number")
            vals.append(float(v))
        t = torch.tensor(vals)
        per_fn[f"reward_{getattr(fn, '__name__', name)}"] = float(t.mean()) if len(vals) else 0.0
        total += w * t
    return total, per_fn


# --------------------------------------------------------------------------- rollouts -> tensors

def rollout_tensors(rollouts: list[Rollout]) -> dict[str, Tensor]:
    """Right-padded rows of prompt + completion. input_ids (N, T); mask (N, T-1) 1 where the
    target ids[:, t+1] is a sampled token; old_logps (N, T-1) the engine's log-probs there."""
    T = max(len(r.prompt_ids) + len(r.token_ids) for r in rollouts)
    N = len(rollouts)
    ids = torch.full((N, T), PAD_ID, dtype=torch.long)
    mask, old = torch.zeros(N, T - 1), torch.zeros(N, T - 1)
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.token_ids)
        ids[i, :p + c] = torch.tensor(r.prompt_ids + r.token_ids)
        mask[i, p - 1:p - 1 + c] = 1.0
        old[i, p - 1:p - 1 + c] = torch.tensor(r.logprobs) if r.logprobs else 0.0
    return {"input_ids": ids, "mask": mask, "old_logps": old}


@torch.no_grad()
def response_logps(model, ids: Tensor, mask: Tensor, temperature: float = 1.0, batch_size: int = 32) -> Tensor:
    """log p(target) under softmax(logits / T) of `model` at every position, zero off the mask."""
    from lmstack.align.losses import token_logps
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for s in range(0, ids.size(0), batch_size):
            x = ids[s:s + batch_size].to(device)
            out.append(token_logps(model(x)[:, :-1], x[:, 1:], temperature).cpu())
    finally:
        model.train(was)
    return torch.cat(out) * mask


# --------------------------------------------------------------------------- the source

class RolloutSource:
    """Resumable batch source: make a rollout buffer (a dict of (N, ...) tensors, the `_rollout`
    of a subclass), then serve it as micro-batches of `batch_size` rows, `epochs` times over
    (a seeded shuffle each epoch when `shuffle`). N must be a multiple of batch_size * grad_accum,
    so every optimizer step sees whole micro-batches of one rollout. The state holds the buffer
    itself, so a resumed run continues inside the rollout where it stopped."""

    def __init__(self, batch_size: int, grad_accum: int, epochs: int, seed: int, rank: int, world_size: int,
                 shuffle: bool):
        self.batch_size, self.grad_accum, self.epochs = batch_size, grad_accum, epochs
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.rollouts_done, self.served = 0, 0
        self.buffer: dict | None = None

    def load_prompts(self, tokenizer, prompts: list[dict], fmt: str, max_completion_len: int, ctx: int,
                     per_rollout: int) -> None:
        """Check and tokenize the prompt records ({"prompt", ...fields}) into self.records and
        self.prompt_ids; every prompt must leave room for max_completion_len in the context."""
        from lmstack.align.data import prompt_ids
        self.records, self.prompt_ids, self.per_rollout = [], [], per_rollout
        for i, rec in enumerate(prompts):
            src = rec.get("source", f"prompt #{i}") if isinstance(rec, dict) else f"prompt #{i}"
            if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
                raise LmstackError(f"{src}: a prompt record needs a string \"prompt\", got {rec!r:.80}")
            ids = prompt_ids(tokenizer, rec["prompt"], fmt)
            if not ids or len(ids) + max_completion_len > ctx:
                raise LmstackError(f"{src}: the prompt has {len(ids)} tokens; with max_completion_len="
                                   f"{max_completion_len} it must fit the model's context of {ctx} tokens")
            self.records.append(dict(rec, source=src))
            self.prompt_ids.append(ids)
        if len(self.records) < per_rollout * self.world_size:
            raise LmstackError(f"{len(self.records)} prompts are fewer than prompts_per_rollout={per_rollout} x "
                               f"{self.world_size} rank(s)")

    def prompt_indices(self, index: int) -> list[int]:
        """This rank's prompts of rollout `index`: consecutive slices of seeded epochs of the
        records; the W ranks of one rollout take disjoint slices."""
        n, per = len(self.records), self.per_rollout * self.world_size
        epoch, k = divmod(index, n // per)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        start = k * per + self.rank * self.per_rollout
        return order[start:start + self.per_rollout].tolist()

    def sample_seed(self, index: int) -> int:
        """The engine seed of rollout `index` on this rank (distinct per rank and rollout)."""
        return (self.seed * 1_000_003 + index) * max(1, self.world_size) + self.rank

    def check_layout(self, n: int) -> None:
        """A rollout batch of n rows must split into whole optimizer steps."""
        if n % (self.batch_size * self.grad_accum):
            raise LmstackError(f"a rollout batch of {n} sequences (prompts_per_rollout x samples per prompt) is not "
                               f"a multiple of batch_size x grad_accum = {self.batch_size * self.grad_accum}; "
                               f"change one of them")

    def _rollout(self, index: int) -> dict:
        raise NotImplementedError

    def _micro(self, rows: dict, step_rows: dict) -> object:
        raise NotImplementedError

    def _order(self, n: int, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rollouts_done * 101 + epoch)
        return torch.randperm(n, generator=g)

    def next_batch(self):
        if self.buffer is None:
            self.buffer = self._rollout(self.rollouts_done)
            self.served = 0
            self.check_layout(self.buffer["input_ids"].size(0))
        n = self.buffer["input_ids"].size(0)
        per_epoch = n // self.batch_size
        epoch, k = divmod(self.served, per_epoch)
        order = self._order(n, epoch)
        rows = order[k * self.batch_size:(k + 1) * self.batch_size]
        step0 = (k // self.grad_accum) * self.grad_accum           # this optimizer step's rows
        step_rows = order[step0 * self.batch_size:(step0 + self.grad_accum) * self.batch_size]
        batch = self._micro({key: v[rows] for key, v in self.buffer.items() if isinstance(v, Tensor)},
                            {key: v[step_rows] for key, v in self.buffer.items() if isinstance(v, Tensor)})
        self.served += 1
        if self.served >= self.epochs * per_epoch:
            self.buffer, self.rollouts_done = None, self.rollouts_done + 1
        return batch

    def state_dict(self) -> dict:
        return {"rollouts_done": self.rollouts_done, "served": self.served, "buffer": self.buffer}

    def load_state_dict(self, sd: dict) -> None:
        self.rollouts_done, self.served = int(sd["rollouts_done"]), int(sd["served"])
        self.buffer = sd["buffer"]
