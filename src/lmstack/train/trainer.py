"""The one training loop of lmstack: pretraining here, finetuning and alignment reuse it.

    from lmstack.train import TrainConfig, Trainer
    result = Trainer(TrainConfig(data="data/tinyworld", out="runs/x", max_steps=200)).fit()

One optimizer step = `grad_accum` micro-batches of `batch_size` sequences on each rank.
Each step: set the lr from the schedule -> forward under autocast (+ MoE aux loss) ->
backward -> unscale, clip -> stop on a non-finite loss -> AdamW step. Then, as configured:
a metrics line, a val evaluation, an `on_sample(model, step)` callback, a checkpoint.

Everything that decides the next loss is in the checkpoint (weights, AdamW moments, step ->
lr, RNG streams, the sampler's position), so a run killed at any instant and resumed with
`resume=True` logs exactly the losses an uninterrupted run logs (on CPU, same threads).

The loss is pluggable: pass `objective=` (an `Objective`: batch building + loss) and
`train_sampler=` / `val_sampler=` (anything with next_batch() -> (x, y) and state_dict()).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from lmstack.train import checkpoint as ckpt
from lmstack.train import distributed as dd
from lmstack.train.config import TrainConfig
from lmstack.train.metrics import MetricsLog, peak_flops
from lmstack.train.objectives import Objective, build_objective
from lmstack.train.optim import build_optimizer, lr_multiplier, set_lr
from lmstack.utils import LmstackError, atomic_write_json, autocast, ensure_writable_dir, progress, seed_everything


class NonFiniteLossError(LmstackError):
    """The loss or gradient became NaN/inf; the run stopped without writing a checkpoint."""


def enable_activation_checkpointing(model: torch.nn.Module) -> int:
    """Recompute each transformer block's activations during backward (memory for compute)."""
    from torch.utils.checkpoint import checkpoint
    blocks = dd.find_blocks(model)
    for block in blocks:
        forward = block.forward
        block.forward = lambda *a, _f=forward, **kw: checkpoint(_f, *a, use_reentrant=False, **kw)
    return len(blocks)


def file_sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


class Trainer:
    def __init__(self, cfg: TrainConfig, model_config=None, on_sample: Callable | None = None, *,
                 objective: Objective | None = None, train_sampler=None, val_sampler=None):
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        self.cfg, self.model_config, self.on_sample = cfg, model_config, on_sample
        self.objective, self.sampler, self.val_sampler = objective, train_sampler, val_sampler
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"

    # ------------------------------------------------------------------ setup: every check before step 1
    def _check_out_dir(self) -> None:
        ensure_writable_dir(self.out, "choose another --out")

    def _check_disk(self, n_params: int) -> None:
        # A checkpoint holds fp32 weights + two AdamW moments; keep_last of them + one being
        # written + the final model must fit.
        per_ckpt = n_params * 4 * 3
        need = per_ckpt * (max(1, self.cfg.keep_last) + 1) + n_params * 4
        free = shutil.disk_usage(self.out).free
        if free < need:
            raise LmstackError(f"output dir {self.out} has {free / 2**20:.0f} MiB free but checkpoints need about "
                               f"{need / 2**20:.0f} MiB; free space, lower --keep-last or choose another --out")

    def _open_data(self):
        """Samplers for train/val from the data dir, unless they were passed in."""
        cfg = self.cfg
        self.data_dir = Path(cfg.data) if cfg.data else None
        self.tokenizer_path = self.data_dir / "tokenizer.json" if self.data_dir else None
        n_vocab, specials = None, {}
        # Tokenizer identity for resume checks: the shards' fingerprint when we open them
        # below; with samplers passed in, a hash of the data dir's tokenizer.json.
        self.tokenizer_id = None
        if self.sampler is not None and self.tokenizer_path is not None:
            self.tokenizer_id = file_sha256(self.tokenizer_path)
        if self.sampler is None:
            if self.data_dir is None:
                raise LmstackError("no training data: pass --data DIR (a dir built by `lmstack data`)")
            from lmstack.data import PackedSampler, ShardSet
            shards = self.data_dir / "shards"
            if not shards.is_dir():
                raise LmstackError(f"{shards} not found; build it with `lmstack data` (write_shards) or fix --data")
            try:
                train = ShardSet(shards, "train")   # checks every shard's size against meta.json
                val = ShardSet(shards, "val") if "val" in train.meta["splits"] else None
            except (ValueError, OSError) as e:
                raise LmstackError(f"cannot read the token shards in {shards}: {e}; rebuild them with "
                                   f"`lmstack data`") from None
            if len(train) < cfg.seq_len + 1:
                raise LmstackError(f"the train split has {len(train)} tokens, fewer than seq_len+1={cfg.seq_len + 1}; "
                                   f"lower --seq-len or build more data")
            n_vocab = int(train.vocab_size)
            self.tokenizer_id = train.tokenizer_fingerprint
            kw = dict(batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                      rank=self.info.rank, world_size=self.info.world_size)
            self.sampler = PackedSampler(train, **kw)
            if val is not None and len(val) >= cfg.seq_len + 1:
                self._make_val_sampler = lambda: PackedSampler(val, **kw)
            else:
                self._make_val_sampler = None
        else:
            self._make_val_sampler = (lambda: self.val_sampler) if self.val_sampler is not None else None
        if self.tokenizer_path is not None and self.tokenizer_path.is_file() and self.cfg.objective == "masked":
            from lmstack.tokenizer import Tokenizer
            specials = Tokenizer.load(self.tokenizer_path).special_tokens
        return n_vocab, specials

    def _model_config(self, n_vocab: int | None, specials: dict):
        from lmstack.model import ModelConfig
        cfg = self.cfg
        src = Path(cfg.model)
        if self.model_config is not None:
            mcfg = self.model_config
        elif src.is_dir():  # continue from a saved model (ours or Hugging Face's)
            from lmstack.model import Transformer
            self._init_model = Transformer.from_pretrained(src, dtype=torch.float32)
            mcfg = self._init_model.config
        else:
            over = dict(cfg.model_overrides)
            if n_vocab is not None:
                over.setdefault("vocab_size", n_vocab)
            mcfg = ModelConfig.preset(cfg.model, **over)
        vocab = n_vocab if n_vocab is not None else mcfg.vocab_size
        objective, model_vocab = build_objective(cfg.objective, specials, vocab, cfg.mask_prob)
        if self.objective is None:
            self.objective = objective
        changes = {"mask": self.objective.model_mask}
        if model_vocab > mcfg.vocab_size:
            changes["vocab_size"] = model_vocab
        mcfg = mcfg.replace(**changes)
        if cfg.seq_len > mcfg.context_length:
            raise LmstackError(f"seq_len={cfg.seq_len} exceeds the model's context_length={mcfg.context_length}; "
                               f"lower --seq-len or set model_overrides: {{context_length: {cfg.seq_len}}}")
        return mcfg

    def _check_resume(self, mcfg) -> Path | None:
        """The checkpoint to resume from (None = fresh start), after checking it fits this run."""
        if self.info.is_main:
            ckpt.recover(self.ckpt_root)
        dd.barrier(self.info)
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        if latest is None:
            return None
        if not self.cfg.resume:
            raise LmstackError(f"{self.out} already has checkpoints (latest {latest.name}); pass --resume to continue "
                               f"that run, or choose a new --out")
        meta = ckpt.read_meta(latest)
        saved = meta.get("model_config", {})
        diff = sorted(k for k in set(saved) | set(mcfg.to_dict()) if saved.get(k) != mcfg.to_dict().get(k))
        if diff:
            pairs = ", ".join(f"{k}: {saved.get(k)!r} -> {mcfg.to_dict().get(k)!r}" for k in diff)
            raise LmstackError(f"cannot resume {latest}: it was trained with another model config ({pairs}); use "
                               f"the same model settings or a new --out")
        if meta.get("tokenizer") and self.tokenizer_id and meta["tokenizer"] != self.tokenizer_id:
            raise LmstackError(f"cannot resume {latest}: it was trained on data from another tokenizer than "
                               f"{self.data_dir}'s; use the run's original --data or a new --out")
        return latest

    def _setup(self) -> None:
        cfg = self.cfg
        self.info = dd.init_distributed(cfg.device, cfg.distributed)
        self.device = self.info.device
        if self.info.is_main:
            self._check_out_dir()
        n_vocab, specials = self._open_data()
        self._init_model = None
        mcfg = self._model_config(n_vocab, specials)
        resume_from = self._check_resume(mcfg)
        self.dtype = self._resolve_dtype()

        from lmstack.model import Transformer
        seed_everything(cfg.seed)  # same init on every rank
        raw = Transformer(mcfg)
        if self._init_model is not None:
            raw.load_state_dict(self._init_model.state_dict())
            self._init_model = None
        self.raw_model = raw.to(self.device)
        if self.info.is_main:
            self._check_disk(sum(p.numel() for p in raw.parameters()))
        if cfg.activation_checkpointing:
            enable_activation_checkpointing(self.raw_model)
        self.model = dd.wrap_model(self.raw_model, self.info)
        self.optimizer = build_optimizer(self.raw_model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.eps)
        self.fwd_model = torch.compile(self.model) if cfg.compile else self.model
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.info.rank)  # objective randomness
        torch.manual_seed(cfg.seed + self.info.rank)  # dropout differs per rank
        self.mcfg = mcfg
        self.step, self.tokens_seen, self.resumed_from = 0, 0, None
        self.metrics = MetricsLog(self.out, cfg.tensorboard) if self.info.is_main else None
        if resume_from is not None:
            self._load(resume_from)
        elif self.metrics is not None:
            self.metrics.reset()
        if self.info.is_main:
            atomic_write_json(self.out / "train_config.json", dataclasses.asdict(cfg))

    def _resolve_dtype(self) -> torch.dtype:
        name = self.cfg.dtype
        if name == "auto":
            cuda_bf16 = self.device.type == "cuda" and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if cuda_bf16 else torch.float32
        if name == "float16" and self.device.type != "cuda":
            raise LmstackError("dtype=float16 (with GradScaler) needs CUDA; use bfloat16 or float32 on CPU")
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]

    # ------------------------------------------------------------------ checkpoints
    def _save(self) -> Path | None:
        model_sd, optim_sd = dd.full_state(self.model, self.optimizer)   # collective under FSDP
        samplers = dd.gather_objects(self.sampler.state_dict(), self.info)
        gens = dd.gather_objects(self.gen.get_state(), self.info)
        rngs = dd.gather_objects(ckpt.rng_state(), self.info)
        path = None
        if self.info.is_main:
            state = {"optimizer": optim_sd, "sampler": samplers, "objective_rng": gens, "rng": rngs,
                     "scaler": self.scaler.state_dict()}
            meta = {"config": dataclasses.asdict(self.cfg), "model_config": self.mcfg.to_dict(),
                    "tokenizer": self.tokenizer_id,
                    "tokens_seen": self.tokens_seen, "world_size": self.info.world_size,
                    "lr": self.cfg.lr * self._lr_mult(self.step), "schedule": self.cfg.schedule}
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, model_sd, state, meta, self.cfg.keep_last)
            self.last_checkpoint = path
        dd.barrier(self.info)
        return path

    def _load(self, path: Path) -> None:
        weights, state, meta = ckpt.load_checkpoint(path)
        dd.load_full_state(self.model, self.optimizer, weights, state["optimizer"])
        r, same_world = self.info.rank, meta.get("world_size", 1) == self.info.world_size
        own = r if same_world else 0
        ckpt.set_rng_state(state["rng"][own])
        self.gen.set_state(state["objective_rng"][own])
        if same_world:
            self.sampler.load_state_dict(state["sampler"][r])
        else:
            self.sampler.load_state_dict(self._rescale_sampler_state(state["sampler"][0]))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen, self.resumed_from = meta["step"], meta.get("tokens_seen", 0), meta["step"]
        self.last_checkpoint = path
        if self.metrics is not None:
            self.metrics.truncate_after(self.step)

    def _rescale_sampler_state(self, sd: dict) -> dict:
        """A PackedSampler position saved under another world size. Its position is global:
        step g of W ranks x batch B consumed windows [0, g*W*B). With the same global batch the
        data order continues exactly; otherwise we continue at the first unseen window."""
        if not (isinstance(sd, dict) and {"step", "batch_size", "world_size"} <= set(sd)):
            return sd
        old = sd["batch_size"] * sd["world_size"]
        new = self.cfg.batch_size * self.info.world_size
        if old != new:
            print(f"note: the checkpoint's global batch was {old} sequences, this run's is {new}; the data order "
                  f"continues at the first unseen window but differs from the original run's")
        return {**sd, "batch_size": self.cfg.batch_size, "world_size": self.info.world_size,
                "step": -(-sd["step"] * old // new)}

    # ------------------------------------------------------------------ one step
    def _lr_mult(self, step: int) -> float:
        c = self.cfg
        return lr_multiplier(step, c.max_steps, c.schedule, c.warmup_steps, c.min_lr_ratio, c.decay_frac)

    def _micro_loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(self.device, self.dtype):
            loss = self.objective.loss(model, batch)
            aux = self.raw_model.aux_loss() if self.mcfg.n_expert else loss.new_zeros(())
        return loss, aux

    def train_step(self) -> dict:
        cfg, accum = self.cfg, self.cfg.grad_accum
        lr = cfg.lr * self._lr_mult(self.step)
        set_lr(self.optimizer, lr)
        loss_sum = torch.zeros((), device=self.device)
        aux_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            x, y = self.sampler.next_batch()
            batch = self.objective.make_batch(x, y, self.gen).to(self.device)
            with dd.no_sync(self.model, micro < accum - 1):
                loss, aux = self._micro_loss(self.fwd_model, batch)
                self.scaler.scale((loss + aux) / accum).backward()
            loss_sum += loss.detach().float()
            aux_sum += aux.detach().float()
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        loss_val = dd.all_reduce_mean(float(loss_sum) / accum, self.info)
        if not math.isfinite(loss_val) or (not self.scaler.is_enabled() and not math.isfinite(grad_norm)):
            what = f"loss={loss_val}" if not math.isfinite(loss_val) else f"grad norm={grad_norm}"
            last = getattr(self, "last_checkpoint", None)
            raise NonFiniteLossError(
                f"{what} at step {self.step + 1}; stopped without saving a checkpoint. Last good checkpoint: "
                f"{last or 'none'}. Lower --lr or --grad-clip (or use bfloat16/float32) and resume with --resume")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += accum * cfg.batch_size * cfg.seq_len * self.info.world_size
        rec = {"loss": loss_val, "lr": lr, "grad_norm": grad_norm}
        if self.mcfg.n_expert:
            rec["aux_loss"] = dd.all_reduce_mean(float(aux_sum) / accum, self.info)
        return rec

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean val loss over `eval_batches` fixed batches (the same ones every time) and its perplexity."""
        if self._make_val_sampler is None:
            return None
        sampler = self._make_val_sampler()
        if hasattr(sampler, "load_state_dict") and hasattr(self, "_val_start"):
            sampler.load_state_dict(self._val_start)
        elif hasattr(sampler, "state_dict"):
            self._val_start = sampler.state_dict()
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)
        self.model.eval()
        total = 0.0
        for _ in range(self.cfg.eval_batches):
            x, y = sampler.next_batch()
            loss, _ = self._micro_loss(self.model, self.objective.make_batch(x, y, gen).to(self.device))
            total += float(loss)
        self.model.train()
        loss = dd.all_reduce_mean(total / self.cfg.eval_batches, self.info)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}

    def _sample(self) -> None:
        if self.on_sample is None or not self.info.is_main or self.info.mode == "fsdp":
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # sampling must not move the training RNG
            self.raw_model.eval()
            try:
                out = self.on_sample(self.raw_model, self.step)
            finally:
                self.raw_model.train()
        if isinstance(out, dict):
            self.metrics.write({"step": self.step, "split": "sample", **out})

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        self._setup()
        try:
            return self._fit()
        finally:
            if self.metrics is not None:
                self.metrics.close()
            dd.shutdown(self.info)

    def _log(self, record: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(record)

    def _fit(self) -> dict:
        cfg, info = self.cfg, self.info
        tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len * info.world_size
        flops_per_token = float(self.raw_model.flops_per_token(cfg.seq_len))
        peak = (cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(self.device, self.dtype)) * info.world_size
        bar = progress(total=cfg.max_steps, initial=self.step, desc="train", disable=None if info.is_main else True)
        last_train = last_val = None
        t_start, t_log, step_log = time.perf_counter(), time.perf_counter(), self.step
        start_step = self.step
        self.model.train()
        while self.step < cfg.max_steps:
            rec = self.train_step()
            last_train, s = rec["loss"], self.step
            if s % max(1, cfg.log_every) == 0 or s == cfg.max_steps:
                now = time.perf_counter()
                tok_s = (s - step_log) * tokens_per_step / max(now - t_log, 1e-9)
                t_log, step_log = now, s
                mfu = tok_s * flops_per_token / peak if peak else 0.0
                self._log({"step": s, "split": "train", **rec, "tokens": self.tokens_seen,
                           "tok_per_s": round(tok_s, 1), "mfu": round(mfu, 5)})
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{tok_s:.0f}", mfu=f"{100 * mfu:.1f}%")
            bar.update(1)
            if (cfg.eval_every and s % cfg.eval_every == 0) or s == cfg.max_steps:
                ev = self.evaluate()
                if ev is not None:
                    last_val = ev
                    self._log({"step": s, "split": "val", **ev})
            if cfg.sample_every and s % cfg.sample_every == 0:
                self._sample()
            if (cfg.ckpt_every and s % cfg.ckpt_every == 0) or s == cfg.max_steps:
                self._save()
        bar.close()
        elapsed = time.perf_counter() - t_start
        if last_val is None and self.resumed_from is not None:
            last_val = self.evaluate()
        self._export()
        steps_run = self.step - start_step
        return {"out": str(self.out), "steps": self.step, "resumed_from": self.resumed_from,
                "train_loss": last_train, "val_loss": last_val and last_val["loss"],
                "val_ppl": last_val and last_val["ppl"], "tokens": self.tokens_seen,
                "num_params": sum(p.numel() for p in self.raw_model.parameters()),
                "elapsed_s": elapsed, "tokens_per_s": steps_run * tokens_per_step / max(elapsed, 1e-9),
                "checkpoint": str(getattr(self, "last_checkpoint", "")) or None}

    def _export(self) -> None:
        """Final model: out/model.safetensors + config.json (save_pretrained) + out/tokenizer.json."""
        model_sd, _ = dd.full_state(self.model, self.optimizer)
        if not self.info.is_main:
            return
        if self.info.mode == "fsdp":  # parameters are sharded: rebuild a plain copy to save
            from lmstack.model import Transformer
            plain = Transformer(self.mcfg)
            plain.load_state_dict(model_sd)
        else:
            plain = self.raw_model
        plain.save_pretrained(self.out)
        if self.tokenizer_path is not None and self.tokenizer_path.is_file():
            from lmstack.utils import atomic_write_bytes
            atomic_write_bytes(self.out / "tokenizer.json", self.tokenizer_path.read_bytes())
