"""The library side of `lmstack align rm|dpo|ppo|grpo`: load the starting model, build the
method's objective and batch source, run the one Trainer, measure on held-out data before and
after, and write the run directory.

    summary = run_align(AlignConfig(method="grpo", model="runs/sft", out="runs/grpo", format="plain"))

OUT holds what every run holds (metrics.jsonl, checkpoints/, model.safetensors + config.json,
tokenizer.json) plus summary.json (held-out numbers before and after), samples.json/.md (the
same held-out prompts answered before and after) and figures/*.png. Under torchrun each rank
builds its own share of the data and its own engine; rank 0 measures and writes.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path

import torch

from lmstack.align import data as D
from lmstack.align.config import AlignConfig
from lmstack.utils import LmstackError, atomic_write_bytes, atomic_write_json, atomic_write_text, ensure_writable_dir


def _dist() -> tuple[int, int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    return 0, 1, 0


def _device_dtype(cfg: AlignConfig, local_rank: int) -> tuple[torch.device, torch.dtype]:
    from lmstack.utils import pick_device
    dev = pick_device(cfg.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if cfg.dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(cfg.dtype)
        if dt is None:
            raise LmstackError(f"dtype={cfg.dtype!r}; valid: auto, float32, bfloat16")
    return dev, dt


def load_policy(path: str):
    """(Transformer in fp32, tokenizer, tokenizer.json bytes) of a run dir or HF folder."""
    from lmstack.model import Transformer
    from lmstack.tokenizer import Tokenizer
    p = Path(path)
    if not (p / "config.json").is_file():
        raise LmstackError(f"{path} is not a model dir (no config.json); give a run dir or a HF folder")
    if not (p / "tokenizer.json").is_file():
        raise LmstackError(f"{path} has no tokenizer.json; alignment needs the model's tokenizer")
    model = Transformer.from_pretrained(p, dtype=torch.float32)
    return model, Tokenizer.load(p / "tokenizer.json"), (p / "tokenizer.json").read_bytes()


def _records(path: str | None, make) -> list[dict]:
    if path is None:
        return make()
    return [dict(rec, source=src) if isinstance(rec, dict) else rec for src, rec in D.read_preference_jsonl(path)]


def _stops(tok, fmt: str) -> dict:
    eot = [tok.eot_token] if tok.eot_token is not None else []
    if fmt == "chat":
        from lmstack.tokenizer.chat import END
        return {"stop_token_ids": [tok.special_tokens[END], *eot], "stop": None}
    return {"stop_token_ids": eot, "stop": ["\n"]}


def frozen_copy(model):
    return copy.deepcopy(model).requires_grad_(False).eval()


class _Run:
    """Everything one method needs; `build_<method>` fills model, objective, batches, val, measure."""

    def __init__(self, cfg: AlignConfig):
        self.cfg = cfg
        self.rank, self.world, local = _dist()
        self.device, self.dtype = _device_dtype(cfg, local)
        self.policy, self.tok, self.tok_bytes = load_policy(cfg.model)
        if cfg.format == "chat":
            from lmstack.tokenizer.chat import has_chat_tokens
            if not has_chat_tokens(self.tok):
                raise LmstackError(f"{cfg.model}'s tokenizer has no chat tokens; use --format plain for a base model")
        if cfg.lora_r:
            from lmstack.finetune import LoraConfig, add_lora
            add_lora(self.policy, LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets)))
        self.policy.to(self.device)
        self.ctx = self.policy.config.context_length
        self.val, self.eval_batches, self.on_sample, self.engine = None, 1, None, None
        self.sample_prompts: list[str] = []

    # ---------------------------------------------------------------- preference methods
    def _pairs(self):
        c = self.cfg
        tw = dict(seed=c.tinyworld_seed, tasks=tuple(c.tasks))
        train = _records(c.data, lambda: D.tinyworld_pairs(n=c.n_train, **tw))
        held = _records(c.eval_data, lambda: D.tinyworld_pairs(n=c.n_eval, heldout=True, **tw))
        pairs = D.tokenize_pairs(self.tok, train, c.format, self.ctx, source=c.data or "tinyworld pair")
        held_pairs = D.tokenize_pairs(self.tok, held, c.format, self.ctx, source=c.eval_data or "held-out pair")
        self.sample_prompts = [r["prompt"] for r in held[:c.n_samples]]
        return pairs, held_pairs

    def _pair_sources(self, pairs, held, extras=None, held_extras=None):
        c = self.cfg
        self.batches = D.PairBatches(pairs, c.batch_size, c.seed, self.rank, self.world, extras=extras)
        self.val = D.PairBatches(held, c.batch_size, c.seed, self.rank, self.world, shuffle=False,
                                 extras=held_extras, what="the held-out pairs")
        self.eval_batches = self.val.per_epoch

    def build_rm(self):
        from lmstack.align.reward_model import RewardObjective, pairwise_accuracy, reward_model_from
        pairs, held = self._pairs()
        self.model = reward_model_from(self.policy, self.cfg.seed).to(self.device)
        self.objective = RewardObjective()
        self._pair_sources(pairs, held)
        self.measure = lambda: {"acc": pairwise_accuracy(self.model, held)}   # held-out pairwise

    def build_dpo(self):
        from lmstack.align.dpo import DPOObjective, reference_logps
        from lmstack.align.evaluate import preference_accuracy
        pairs, held = self._pairs()
        ref = reference_logps(self.policy, pairs, 32, self.device, self.dtype)      # once, then cached
        ref_held = reference_logps(self.policy, held, 32, self.device, self.dtype)
        self.model, self.objective = self.policy, DPOObjective(self.cfg.beta, self.cfg.loss_type, self.cfg.rpo_alpha)
        self._pair_sources(pairs, held, ref, ref_held)
        self.measure = lambda: preference_accuracy(self.policy, held, dtype=self.dtype)
        self._sample_engine()

    def _sample_engine(self):
        from lmstack.align.rollout import RolloutEngine
        self.engine = RolloutEngine(self.policy, self.tok, max_completion_len=self.cfg.max_completion_len,
                                    temperature=self.cfg.temperature, **_stops(self.tok, self.cfg.format))

    # ---------------------------------------------------------------- RL methods
    def _prompts(self):
        c = self.cfg
        tw = dict(seed=c.tinyworld_seed, tasks=tuple(c.tasks))
        train = _records(c.data, lambda: D.tinyworld_prompts(n=c.n_train, **tw))
        held = _records(c.eval_data, lambda: D.tinyworld_prompts(n=c.n_eval, heldout=True, **tw))
        for i, r in enumerate(held):
            if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
                raise LmstackError(f"{r.get('source', f'held-out prompt #{i}') if isinstance(r, dict) else i}: "
                                   f"a prompt record needs a string \"prompt\"")
        held_ids = [D.prompt_ids(self.tok, r["prompt"], c.format) for r in held]
        for r, ids in zip(held, held_ids):
            if len(ids) + c.max_completion_len > self.ctx:
                raise LmstackError(f"{r.get('source', 'a held-out prompt')}: {len(ids)} prompt tokens + "
                                   f"max_completion_len={c.max_completion_len} exceed the context ({self.ctx})")
        self.sample_prompts = [r["prompt"] for r in held[:c.n_samples]]
        return train, held, held_ids

    def _rollout_kw(self):
        c = self.cfg
        return dict(prompts_per_rollout=c.prompts_per_rollout, batch_size=c.batch_size, grad_accum=c.grad_accum,
                    max_completion_len=c.max_completion_len, temperature=c.temperature, fmt=c.format, seed=c.seed,
                    rank=self.rank, world_size=self.world, engine_dtype=self.dtype, **_stops(self.tok, c.format))

    def build_grpo(self):
        from lmstack.align.evaluate import exact_match
        from lmstack.align.grpo import GRPOObjective, GRPOSource
        from lmstack.align.rewards import resolve_reward
        c = self.cfg
        train, held, held_ids = self._prompts()
        ref = frozen_copy(self.policy) if c.beta > 0 else None
        self.batches = GRPOSource(self.policy, self.tok, train, [resolve_reward(r) for r in c.rewards],
                                  reward_weights=c.reward_weights, group_size=c.group_size,
                                  num_iterations=c.num_iterations, ref_model=ref, scale_rewards=c.scale_rewards,
                                  **self._rollout_kw())
        self.model, self.engine = self.policy, self.batches.engine
        self.objective = GRPOObjective(c.loss_type, c.epsilon, c.beta, c.temperature, c.max_completion_len)
        score = resolve_reward(c.eval_reward)
        self.measure = lambda: exact_match(self.engine, held, held_ids, samples=c.eval_samples, score=score)
        self.on_sample = lambda model, step: self.measure()

    def build_ppo(self):
        from lmstack.align.evaluate import rm_score_and_kl
        from lmstack.align.ppo import PolicyAndValue, PPOObjective, PPOSource, value_model_from
        c = self.cfg
        rm, _, rm_tok = load_policy(c.reward_model)
        if rm_tok != self.tok_bytes:
            raise LmstackError(f"the reward model {c.reward_model} was trained with another tokenizer than "
                               f"{c.model} (their tokenizer.json differ); train the reward model from the same model")
        rm.to(self.device)
        train, held, held_ids = self._prompts()
        ref = frozen_copy(self.policy)
        self.model = PolicyAndValue(self.policy, value_model_from(rm))
        self.batches = PPOSource(self.model, self.tok, train, rm, ref, ppo_epochs=c.ppo_epochs, kl_coef=c.kl_coef,
                                 gamma=c.gamma, lam=c.lam, kl_target=c.kl_target, kl_horizon=c.kl_horizon,
                                 **self._rollout_kw())
        self.engine = self.batches.engine
        self.objective = PPOObjective(c.epsilon, c.cliprange_value, c.vf_coef, c.temperature)
        self.measure = lambda: rm_score_and_kl(self.engine, rm, ref, held_ids)
        self.on_sample = lambda model, step: self.measure()

    # ---------------------------------------------------------------- the run
    def samples(self) -> list[dict]:
        if self.engine is None or not self.sample_prompts:
            return []
        from lmstack.align.evaluate import samples
        ids = [D.prompt_ids(self.tok, p, self.cfg.format) for p in self.sample_prompts]
        return samples(self.engine, ids, self.sample_prompts)

    def train_config(self):
        from lmstack.train import TrainConfig
        c = self.cfg
        every = c.eval_every or c.max_steps
        kw = dict(out=c.out, max_steps=c.max_steps, batch_size=c.batch_size, grad_accum=c.grad_accum,
                  seq_len=self.ctx, lr=c.lr, warmup_steps=c.warmup_steps, schedule=c.schedule,
                  min_lr_ratio=c.min_lr_ratio, weight_decay=c.weight_decay, grad_clip=c.grad_clip,
                  device=str(self.device), dtype=c.dtype, eval_every=every, eval_batches=self.eval_batches,
                  sample_every=every if self.on_sample else 0, ckpt_every=c.ckpt_every, seed=c.seed,
                  resume=c.resume, tensorboard=False)
        kw.update(c.train_overrides)
        try:
            return TrainConfig(**kw)
        except (TypeError, ValueError) as e:
            raise LmstackError(f"train settings: {e}") from None


def _log_start(out: Path, method: str, before: dict) -> None:
    """The starting model's held-out numbers as metrics.jsonl's step-0 line (split "val" for the
    pair methods, "sample" for the RL ones, as their later measurements), so every curve of
    the run starts at the model it started from. The Trainer rewrites the log on a fresh run,
    so the line goes in after training; a resumed run keeps the one it has."""
    from lmstack.report.figures import read_metrics
    split = "val" if method in ("rm", "dpo") else "sample"
    path = out / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    if any(r.get("step") == 0 and r.get("split") == split for r in rows):
        return
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in [{"step": 0, "split": split, **before}, *rows]))


def run_align(cfg: AlignConfig) -> dict:
    from lmstack.align.figures import write_figures
    from lmstack.train import Trainer
    run = _Run(cfg)
    getattr(run, f"build_{cfg.method}")()
    out = Path(cfg.out)
    main = run.rank == 0
    before = before_samples = None
    if main:
        ensure_writable_dir(out, "choose another --out")
        # the tokenizer first: every checkpoint of the run is loadable (LLM, resume) from the start
        atomic_write_bytes(out / "tokenizer.json", run.tok_bytes)
        before, before_samples = run.measure(), run.samples()
        print(f"before: {json.dumps(before)}")
    result = Trainer(run.train_config(), run.model, run.objective, run.batches, val_batches=run.val,
                     on_sample=run.on_sample).fit()
    if not main:
        return result
    _log_start(out, cfg.method, before)
    final = run.model.policy if cfg.method == "ppo" else run.model
    final.save_pretrained(out)                      # the aligned model, loadable by LLM(out) (rm: by from_pretrained)
    after, after_samples = run.measure(), run.samples()
    print(f"after:  {json.dumps(after)}")
    summary = {"method": cfg.method, "model": cfg.model, "before": before, "after": after,
               "train": {k: v for k, v in result.items() if k in ("steps", "train_loss", "val_loss", "elapsed_s")},
               "generate_s": getattr(run.engine, "generate_s", None) if cfg.method in ("grpo", "ppo") else None,
               "config": dataclasses.asdict(cfg)}
    if before_samples:
        pairs = [{"prompt": b["prompt"], "before": b["completion"], "after": a["completion"]}
                 for b, a in zip(before_samples, after_samples)]
        atomic_write_json(out / "samples.json", pairs)
        md = ["# Held-out prompts before and after\n"] + [
            f"## {i + 1}\n```\n{p['prompt']}\n```\nbefore: `{p['before']!r}`  \nafter: `{p['after']!r}`\n"
            for i, p in enumerate(pairs)]
        atomic_write_text(out / "samples.md", "\n".join(md))
    summary["figures"] = write_figures(out, cfg.method, before)
    atomic_write_json(out / "summary.json", summary)
    return summary
