"""The one training loop of lmstack: pretraining, finetuning, alignment and distillation are
objectives and batch sources for it, never a second loop.

    Trainer(TrainConfig(data="data/tinyworld", out="runs/x", max_steps=200)).fit()   # pretraining
    Trainer(cfg, model, objective, batches, val_batches=val).fit()                   # anything else

`model`: an nn.Module (a Transformer, perhaps transformed: frozen parameters, LoRA or quantized
linears), a ModelConfig to build, or None (cfg.model: a preset + overrides, or a model dir).
`objective`: batch -> (loss, metrics), see objectives.py; None = cfg.objective (pretraining).
`batches`: next_batch() + state_dict()/load_state_dict(), see batches.py; None = cfg.data's
token shards. `model_transform`: a callable applied to the built model in place before the
optimizer is made (and before a resume loads weights into it), that keeps the parameters and
their names, e.g. `lmstack.quant.QAT({"bits": 4})` for quantization-aware training: the
trainer knows nothing of what it does (floors above train/ pass such transforms down).
Only parameters with requires_grad get AdamW state (and, under cfg.save_weights="trainable",
a place in checkpoints).

One optimizer step = `grad_accum` micro-batches on each rank. Each step: set the lr from the
schedule -> per micro-batch: next_batch -> objective.prepare -> forward + loss under autocast
(+ MoE aux loss) -> backward -> unscale, clip -> stop on a non-finite loss -> AdamW step. Then,
as configured: a metrics line, a val evaluation, an `on_sample(model, step)` callback, a
checkpoint.

Everything that decides the next loss is in the checkpoint (weights, AdamW moments, step ->
lr, RNG streams incl. the objective's generator, the batch source's and objective's state),
so a run killed at any instant and resumed with `resume=True` logs exactly the losses and
metrics an uninterrupted run logs (on CPU, same threads).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lmstack.train import checkpoint as ckpt
from lmstack.train import distributed as dd
from lmstack.train.batches import check_source, file_sha256, move_to, open_pretraining_data, rescale_sampler_state
from lmstack.train.build import build_model
from lmstack.train.config import TrainConfig
from lmstack.train.metrics import MetricsLog, check_objective_output, metric_vector, peak_flops
from lmstack.train.objectives import as_objective
from lmstack.train.optim import lr_multiplier, set_lr
from lmstack.train.progress import TrainProgress
from lmstack.train.resume import check_checkpoint_fits, frozen_fingerprint, trainable_names
from lmstack.utils import LmstackError, atomic_write_json, autocast, ensure_writable_dir, seed_everything


class NonFiniteLossError(LmstackError):
    """The loss or gradient became NaN/inf; the run stopped without writing a checkpoint."""


class Trainer:
    def __init__(self, cfg: TrainConfig, model=None, objective=None, batches=None, *, val_batches=None,
                 on_sample: Callable | None = None, model_transform: Callable[[nn.Module], object] | None = None):
        from lmstack.model import ModelConfig
        if not isinstance(cfg, TrainConfig):
            raise TypeError(f"cfg must be a TrainConfig, got {type(cfg).__name__}")
        if model is not None and not isinstance(model, (nn.Module, ModelConfig)):
            raise TypeError(f"model must be an nn.Module, a ModelConfig or None, got {type(model).__name__}")
        for what, src in (("batches", batches), ("val_batches", val_batches)):
            if src is not None:
                check_source(src, what)
        if model_transform is not None and not callable(model_transform):
            raise TypeError(f"model_transform must be a callable model -> None, got {type(model_transform).__name__}")
        self.cfg, self.model_arg, self.on_sample = cfg, model, on_sample
        self.model_transform = model_transform
        self.objective = None if objective is None else as_objective(objective)
        self.batches, self.val_batches = batches, val_batches
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"

    # ------------------------------------------------------------------ setup: every check before step 1
    def _open_data(self) -> tuple[int | None, dict]:
        """Batch sources from cfg.data unless passed in; (the data's vocab size, tokenizer specials)."""
        cfg, n_vocab = self.cfg, None
        data_dir = Path(cfg.data) if cfg.data else None
        self.tokenizer_path = data_dir / "tokenizer.json" if data_dir else None
        self.tokenizer_id = None
        if self.batches is None:
            if data_dir is None:
                raise LmstackError("no training data: pass --data DIR (a dir built by `lmstack data`)")
            data = open_pretraining_data(data_dir, cfg.batch_size, cfg.seq_len, cfg.seed, self.info.dp_rank,
                                         self.info.dp_size)
            self.batches, n_vocab, self.tokenizer_id = data.train, data.vocab_size, data.tokenizer_id
            if self.val_batches is None and data.make_val is not None:
                self.val_batches = data.make_val()
        elif self.tokenizer_path is not None:  # sources passed in: the data dir's tokenizer.json names the data
            self.tokenizer_id = file_sha256(self.tokenizer_path)
        specials = {}
        if self.objective is None and cfg.objective == "masked" and self.tokenizer_path is not None \
                and self.tokenizer_path.is_file():
            from lmstack.tokenizer import Tokenizer
            specials = Tokenizer.load(self.tokenizer_path).special_tokens
        return n_vocab, specials

    def _check_disk(self) -> None:
        # A checkpoint holds the saved weights + two AdamW moments per trainable weight;
        # keep_last of them + one being written + the final model (save_weights="all") must fit.
        params = list(self.raw_model.parameters())   # a tied parameter once
        size = lambda ps: sum(p.numel() * p.element_size() for p in ps)  # noqa: E731
        trained = size(p for p in params if p.requires_grad)
        only_trainable = self.cfg.save_weights == "trainable"
        weights = trained if only_trainable else size(params)
        need = (weights + 2 * trained) * (max(1, self.cfg.keep_last) + 1) + (0 if only_trainable else weights)
        free = shutil.disk_usage(self.out).free
        if free < need:
            raise LmstackError(f"output dir {self.out} has {free / 2**20:.0f} MiB free but checkpoints need about "
                               f"{need / 2**20:.0f} MiB; free space, lower --keep-last or choose another --out")

    def _setup(self) -> None:
        cfg = self.cfg
        self.info = dd.init_distributed(cfg.device, cfg.distributed, cfg.tp_size)
        dd.check_model(self.info.mode, dd.planned_model_config(cfg, self.model_arg), self.info.tp, self.info.pp,
                       self.objective or cfg.objective, cfg.grad_accum, cfg.pp_schedule)   # before building it
        self.device = self.info.device
        if self.info.is_main:
            ensure_writable_dir(self.out, "choose another --out")
        seed_everything(cfg.seed)       # same init on every rank
        raw, self.objective = build_model(cfg, self.model_arg, self.objective, *self._open_data())
        if self.model_transform is not None:   # e.g. QAT: same parameters and names, so the loop is unchanged
            self.model_transform(raw)
        self.mcfg = getattr(raw, "config", None)
        self.trainable = trainable_names(raw)
        if not self.trainable:
            raise LmstackError("the model has no trainable parameters (every one has requires_grad=False)")
        self.fingerprint = frozen_fingerprint(raw, self.trainable)
        resume_from = self._find_resume()
        self.dtype = self._resolve_dtype()
        self.raw_model = raw.to(self.device)
        if self.info.is_main:
            self._check_disk()
        if cfg.activation_checkpointing:
            dd.enable_activation_checkpointing(self.raw_model)
        self.model = dd.wrap_model(self.raw_model, self.info, cfg, self.dtype)   # pp: cuts raw_model to a stage
        self.optimizer = dd.make_optimizer(self.raw_model, self.info, cfg.lr, cfg.weight_decay,
                                           (cfg.beta1, cfg.beta2), cfg.eps)
        self.fwd_model = torch.compile(self.model) if cfg.compile else self.model
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.gen = torch.Generator().manual_seed(cfg.seed * 1000 + self.info.dp_rank)  # objective randomness
        torch.manual_seed(cfg.seed + self.info.dp_rank)  # dropout: per data-parallel rank (tp, pp ranks share)
        self.step, self.tokens_seen, self.resumed_from = 0, 0, None
        self.pipelined = isinstance(self.model, dd.Pipelined)   # its loss is token CE: no metrics
        self._metric_keys, self._val_start = [] if self.pipelined else None, None
        self.metrics = MetricsLog(self.out, cfg.tensorboard) if self.info.is_main else None
        if resume_from is not None:
            self._load(resume_from)
        elif self.metrics is not None:
            self.metrics.reset()
        if self.info.is_main:
            atomic_write_json(self.out / "train_config.json", dataclasses.asdict(cfg))

    def _find_resume(self) -> Path | None:
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
        check_checkpoint_fits(latest, ckpt.read_meta(latest), self.mcfg and self.mcfg.to_dict(), self.tokenizer_id,
                              self.trainable, self.fingerprint)
        return latest

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
        only_trainable = self.cfg.save_weights == "trainable"
        model_sd, optim_sd = dd.full_state(self.model, self.optimizer, self.info, only_trainable)   # collective
        if only_trainable:   # (buffers too are part of the caller's base)
            model_sd = {k: v for k, v in model_sd.items() if k in self.trainable}
        per_rank = {k: dd.gather_objects(v, self.info) for k, v in (
            ("sampler", self.batches.state_dict()), ("objective_rng", self.gen.get_state()),
            ("rng", ckpt.rng_state()), ("objective", self.objective.state_dict()))}
        path = None
        if self.info.is_main:
            state = {"optimizer": optim_sd, "scaler": self.scaler.state_dict(), **per_rank}
            meta = {"config": dataclasses.asdict(self.cfg), "model_config": self.mcfg and self.mcfg.to_dict(),
                    "tokenizer": self.tokenizer_id, "tokens_seen": self.tokens_seen,
                    "world_size": self.info.world_size, "data_parallel": self.info.dp_size,
                    "lr": self.cfg.lr * self._lr_mult(self.step),
                    "schedule": self.cfg.schedule, "save_weights": self.cfg.save_weights,
                    "trainable": sorted(self.trainable), "frozen_fingerprint": self.fingerprint}
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, model_sd, state, meta, self.cfg.keep_last)
            self.last_checkpoint = path
        dd.barrier(self.info)
        return path

    def _load(self, path: Path) -> None:
        weights, state, meta = ckpt.load_checkpoint(path)
        partial = meta.get("save_weights") == "trainable"
        if partial and set(weights) != self.trainable:
            raise LmstackError(f"checkpoint {path} is damaged: its weights are not this run's trainable parameters")
        dd.load_full_state(self.model, self.optimizer, weights, state["optimizer"], self.info, strict=not partial)
        same_world = meta.get("data_parallel", meta.get("world_size", 1)) == self.info.dp_size   # states per dp rank
        own = self.info.dp_rank if same_world else 0
        ckpt.set_rng_state(state["rng"][own])
        self.gen.set_state(state["objective_rng"][own])
        sampler = state["sampler"][own] if same_world else \
            rescale_sampler_state(state["sampler"][0], self.cfg.batch_size, self.info.dp_size)
        self.batches.load_state_dict(sampler)
        if state.get("objective"):
            self.objective.load_state_dict(state["objective"][own])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.tokens_seen, self.resumed_from = meta["step"], meta.get("tokens_seen", 0), meta["step"]
        self.last_checkpoint = path
        if self.metrics is not None:
            self.metrics.truncate_after(self.step)

    # ------------------------------------------------------------------ one step
    def _lr_mult(self, step: int) -> float:
        c = self.cfg
        return lr_multiplier(step, c.max_steps, c.schedule, c.warmup_steps, c.min_lr_ratio, c.decay_frac)

    def _prepare(self, raw, generator: torch.Generator):
        return move_to(self.objective.prepare(raw, generator), self.device)

    def _micro_loss(self, model, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss, MoE aux loss, metrics) of one micro-batch, checked against the protocol."""
        with autocast(self.device, self.dtype):
            out = self.objective.loss(model, batch)
            aux = self.raw_model.aux_loss() if getattr(self.mcfg, "n_expert", 0) else None
        self._metric_keys = check_objective_output(self.objective.name, out, self._metric_keys)
        loss, metrics = out
        return loss, (loss.new_zeros(()) if aux is None else aux), metrics

    def _values(self, loss, aux, metrics) -> torch.Tensor:
        return metric_vector([loss, aux], metrics, self._metric_keys, self.device)

    def train_step(self) -> dict:
        cfg, accum = self.cfg, self.cfg.grad_accum
        lr = cfg.lr * self._lr_mult(self.step)
        set_lr(self.optimizer, lr)
        sums, tokens = None, 0
        if self.pipelined:   # the schedule runs forward + backward of every micro-batch
            batches = [self._prepare(self.batches.next_batch(), self.gen) for _ in range(accum)]
            sums, tokens = self.model.train_step(batches), sum(map(self.objective.tokens, batches))
        for micro in range(0 if self.pipelined else accum):
            batch = self._prepare(self.batches.next_batch(), self.gen)
            with dd.no_sync(self.model, micro < accum - 1):
                loss, aux, metrics = self._micro_loss(self.fwd_model, batch)
                self.scaler.scale((loss + aux) / accum).backward()
            vals = self._values(loss, aux, metrics)
            sums = vals if sums is None else sums + vals
            tokens += self.objective.tokens(batch)
        self.scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = dd.clip_grad_norm_(self.model, params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"),
                                       self.info)
        *means, tokens = dd.data_sum([*(sums / accum).tolist(), tokens], self.info)
        loss_val, aux_val, *metric_vals = [m / self.info.dp_size for m in means]
        if not math.isfinite(loss_val) or (not self.scaler.is_enabled() and not math.isfinite(grad_norm)):
            what = f"loss={loss_val}" if not math.isfinite(loss_val) else f"grad norm={grad_norm}"
            raise NonFiniteLossError(
                f"{what} at step {self.step + 1}; stopped without saving a checkpoint. Last good checkpoint: "
                f"{getattr(self, 'last_checkpoint', None) or 'none'}. Lower --lr or --grad-clip (or use "
                f"bfloat16/float32) and resume with --resume")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += int(tokens)
        rec = {"loss": loss_val, **dict(zip(self._metric_keys, metric_vals)), "lr": lr, "grad_norm": grad_norm}
        if getattr(self.mcfg, "n_expert", 0):
            rec["aux_loss"] = aux_val
        return rec

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Mean val loss and metrics over `eval_batches` batches (the same ones every time)."""
        if self.val_batches is None:
            return None
        if self._val_start is None:
            self._val_start = copy.deepcopy(self.val_batches.state_dict())   # a source may reuse its dict
        else:
            self.val_batches.load_state_dict(self._val_start)
        gen = torch.Generator().manual_seed(self.cfg.seed + 12345)
        self.model.eval()
        total = None
        for _ in range(self.cfg.eval_batches):
            batch = self._prepare(self.val_batches.next_batch(), gen)
            vals = self.model.eval_values(batch) if self.pipelined else \
                self._values(*self._micro_loss(self.model, batch))
            total = vals if total is None else total + vals
        self.model.train()
        means = [v / self.info.dp_size for v in dd.data_sum((total / self.cfg.eval_batches).tolist(), self.info)]
        rec = {"loss": means[0]}
        if self.objective.token_nll:
            rec["ppl"] = math.exp(min(means[0], 50.0))
        return {**rec, **dict(zip(self._metric_keys, means[2:]))}

    def _sample(self) -> None:
        if self.on_sample is None or not self.info.is_main or not self.info.whole_model:
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
        fpt = getattr(self.raw_model, "flops_per_token", None)
        flops_per_token = float(fpt(cfg.seq_len)) if callable(fpt) else 0.0
        peak = (cfg.peak_tflops * 1e12 if cfg.peak_tflops else peak_flops(self.device, self.dtype)) * info.world_size
        bar = TrainProgress(cfg.max_steps, self.step, enabled=info.is_main)   # a bar, or lines in logs
        last_train = last_val = None
        t_start = t_log = time.perf_counter()
        start_tokens = tokens_log = self.tokens_seen
        start_step = self.step
        self.model.train()
        while self.step < cfg.max_steps:
            rec = self.train_step()
            last_train, s = rec["loss"], self.step
            if s % max(1, cfg.log_every) == 0 or s == cfg.max_steps:
                now = time.perf_counter()
                tok_s = (self.tokens_seen - tokens_log) / max(now - t_log, 1e-9)
                t_log, tokens_log = now, self.tokens_seen
                mfu = tok_s * flops_per_token / peak if peak else 0.0
                self._log({"step": s, "split": "train", **rec, "tokens": self.tokens_seen,
                           "tok_per_s": round(tok_s, 1), "mfu": round(mfu, 5)})
                bar.set_postfix(loss=rec["loss"], tok_s=tok_s, mfu=mfu)
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
        return {"out": str(self.out), "steps": self.step, "resumed_from": self.resumed_from,
                "train_loss": last_train, "val_loss": last_val and last_val["loss"],
                "val_ppl": last_val and last_val.get("ppl"), "tokens": self.tokens_seen,
                "num_params": sum(p.numel() for p in self.raw_model.parameters()),
                "trainable_params": sum(p.numel() for p in self.raw_model.parameters() if p.requires_grad),
                "elapsed_s": elapsed, "tokens_per_s": (self.tokens_seen - start_tokens) / max(elapsed, 1e-9),
                "steps_run": self.step - start_step,
                "checkpoint": str(getattr(self, "last_checkpoint", "")) or None}

    def _export(self) -> None:
        """Final model: out/model.safetensors + config.json (save_pretrained) + out/tokenizer.json.
        Under save_weights="trainable" no model is written: the base is the caller's and the
        trained tensors are in the last checkpoint (result["checkpoint"])."""
        if self.cfg.save_weights == "all":
            model_sd, _ = dd.full_state(self.model, self.optimizer, self.info)
            if self.info.is_main:
                from safetensors import SafetensorError
                try:
                    self._write_model(model_sd)
                except (OSError, SafetensorError) as e:
                    raise LmstackError(f"could not write the final model to {self.out}: {ckpt.write_error(e)}; "
                                       f"the last checkpoint is intact; free disk space and resume") from None
        if self.info.is_main and self.tokenizer_path is not None and self.tokenizer_path.is_file():
            from lmstack.utils import atomic_write_bytes
            atomic_write_bytes(self.out / "tokenizer.json", self.tokenizer_path.read_bytes())

    def _write_model(self, model_sd: dict) -> None:
        raw = self.raw_model
        if not callable(getattr(raw, "save_pretrained", None)):  # a plain nn.Module: its tensors only
            from safetensors.torch import save_file
            save_file(ckpt._dedupe(model_sd)[0], str(self.out / "model.safetensors"))
            return
        if not self.info.whole_model:  # parameters are sharded or split: rebuild a plain copy to save
            from lmstack.model import build_model as build_arch
            from lmstack.model.transforms import apply_transforms, get_transforms
            plain = build_arch(self.mcfg)   # the config's arch: decoder, encoder or encoder-decoder
            apply_transforms(plain, get_transforms(raw) or None)
            plain.load_state_dict(model_sd)
            raw = plain
        raw.save_pretrained(self.out)
