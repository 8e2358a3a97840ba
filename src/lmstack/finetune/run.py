"""`finetune(cfg)`: one finetuning run, from a base model folder to a run directory.

    result = finetune(FinetuneConfig(model="runs/tinyworld", method="lora", data="tinyworld",
                                     out="runs/tw-sft", max_steps=300))
    LLM("runs/tw-sft")          # loads base + recorded transforms (LoRA, NF4) + trained weights

Order, so that bad input fails before anything is written: read the base (our run directory
or a Hugging Face folder: config.json, model.safetensors, tokenizer.json, and its chat
template) -> read and check every example and probe -> apply the method (full: every weight
trains; lora: add_lora / load_adapter on the frozen base; qlora: quantize_model to NF4, then
the adapters) -> score the probes (before) -> Trainer(cfg, model, SFTObjective(), SFTBatches)
-> score the probes (after) -> write OUT/:

    model.safetensors + config.json   the trained model; config.json records its transforms
    adapter/                          lora/qlora: the adapters as a PEFT folder (save_adapter)
    tokenizer.json (+ the HF chat template files), recipe.yaml, metrics.jsonl, checkpoints/
    finetune.json                     exact match per task before and after, abstention rates,
                                      the base's bits per weight, peak training memory, speed
    report.html                       the same on one page
and, with export_hf, a transformers folder of the merged model (adapters folded into the
float base: QLoRA's adapters too, which is how QLoRA models are shipped).

Under torchrun every rank trains; rank 0 alone scores and writes (the Trainer's own files
aside).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import torch
import yaml

from lmstack.finetune.config import FinetuneConfig
from lmstack.finetune.data import SFTData, chat_tokenizer, end_token, load_sft_data
from lmstack.finetune.instruct import evaluate_chat
from lmstack.finetune.measure import PeakMemory, base_bits_per_param
from lmstack.finetune.sft import SFTBatches, SFTObjective
from lmstack.utils import LmstackError, atomic_write_json, atomic_write_text

TEMPLATE_FILES = ("tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def _layout(cfg: FinetuneConfig) -> tuple[int, int]:
    """(rank, world size) the Trainer will run with (torchrun's environment)."""
    from lmstack.train.distributed import launched_by_torchrun
    if cfg.distributed == "none" or not launched_by_torchrun():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def _world_seed(cfg: FinetuneConfig, base: Path) -> int:
    """tinyworld's seed: given, else the base run's corpus seed (its recipe.yaml), else 0."""
    if cfg.tinyworld_seed is not None:
        return cfg.tinyworld_seed
    try:
        recipe = yaml.safe_load((base / "recipe.yaml").read_text()) or {}
        return int(recipe.get("seed", 0))
    except (OSError, yaml.YAMLError, TypeError, ValueError, AttributeError):
        return 0


def load_base(cfg: FinetuneConfig):
    """(base folder, model in float32, tokenizer, chat tokenizer), every check done."""
    from lmstack.model import Transformer
    from lmstack.model.transforms import get_transforms
    from lmstack.tokenizer import Tokenizer
    base = Path(cfg.model)
    if not (base / "config.json").is_file():
        raise LmstackError(f"{base} is not a model folder (no config.json); pass a run directory or a Hugging "
                           f"Face folder as RUN")
    if not (base / "tokenizer.json").is_file():
        raise LmstackError(f"{base} has no tokenizer.json; SFT renders chats with the model's own tokenizer")
    tok = Tokenizer.load(base / "tokenizer.json")
    model = Transformer.from_pretrained(base, dtype=torch.float32)
    mcfg = model.config
    kinds = [t["kind"] for t in get_transforms(model)]
    if kinds:
        raise LmstackError(f"{base} carries transforms {kinds}; finetune a plain model (merge adapters first, or "
                           f"start from the float base and pass adapter=DIR)")
    if mcfg.mask != "causal":
        raise LmstackError(f"{base} is a mask={mcfg.mask!r} model; SFT trains causal decoders")
    if cfg.seq_len > mcfg.context_length:
        raise LmstackError(f"seq_len={cfg.seq_len} exceeds {base}'s context_length={mcfg.context_length}; "
                           f"lower --seq-len")
    if tok.n_vocab > mcfg.vocab_size:
        raise LmstackError(f"{base}/tokenizer.json has {tok.n_vocab} tokens but the model's vocab_size is "
                           f"{mcfg.vocab_size}; the tokenizer belongs to another model")
    return base, model, tok, chat_tokenizer(tok, base)


def apply_method(model, cfg: FinetuneConfig) -> list[str]:
    """Make `model` what the method trains; returns the adapted module names (full: [])."""
    from lmstack.finetune import LoraConfig, add_lora, load_adapter
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return []
    if cfg.method == "qlora":
        from lmstack.quant import QuantConfig, QuantError, quantize_model
        try:
            quantize_model(model, QuantConfig(method="nf4", group_size=cfg.nf4_blocksize))
        except QuantError as e:
            raise LmstackError(f"qlora with nf4_blocksize={cfg.nf4_blocksize}: {e}") from None
    if cfg.adapter:
        return load_adapter(model, cfg.adapter)
    return add_lora(model, LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                      targets=tuple(cfg.lora_targets), use_rslora=cfg.use_rslora))


def _sources(cfg: FinetuneConfig, data: SFTData, rank: int, world: int):
    kw = dict(seq_len=cfg.seq_len, packing=cfg.packing, seed=cfg.seed, rank=rank, world_size=world)
    train = SFTBatches(data.train, cfg.batch_size, grad_accum=cfg.grad_accum, **kw)
    val = None
    for bs in (cfg.batch_size, 1):     # a small val split still gets scored, a row per rank at least
        try:
            val = SFTBatches(data.val, bs, shuffle=False, what="the val split", **kw) if data.val else None
            break
        except LmstackError:
            continue
    return train, val


def _check_out(cfg: FinetuneConfig) -> None:
    from lmstack.train.checkpoint import latest_checkpoint
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise LmstackError(f"out={out} is a file; choose a directory")
    if not cfg.resume and latest_checkpoint(out / "checkpoints") is not None:
        raise LmstackError(f"{out} already has checkpoints; pass --resume to continue that run, or choose a new --out")


def finetune(cfg: FinetuneConfig) -> dict:
    """Run the finetune described by `cfg` (see the module docstring); returns finetune.json's dict."""
    if not isinstance(cfg, FinetuneConfig):
        raise TypeError(f"finetune needs a FinetuneConfig, got {type(cfg).__name__}")
    from lmstack.train import Trainer
    t0 = time.perf_counter()
    rank, world = _layout(cfg)
    _check_out(cfg)
    base, model, tok, chat = load_base(cfg)
    data = load_sft_data(cfg, chat, _world_seed(cfg, base))
    adapted = apply_method(model, cfg)
    train, val = _sources(cfg, data, rank, world)
    end_id = chat.special_tokens[end_token(cfg, chat)]
    device = cfg.device
    before = evaluate_chat(model, chat, data.probes, end_id, device) if rank == 0 and data.probes else None
    trainer = Trainer(cfg.trainer_config(), model, SFTObjective(), train, val_batches=val)
    with PeakMemory(trainer_device(cfg)) as peak:
        result = trainer.fit()
    if not trainer.info.is_main:
        return {"train": result}
    model = trainer.raw_model
    after = evaluate_chat(model, chat, data.probes, end_id, device) if data.probes else None
    model.train()
    summary = {
        "base": str(base), "method": cfg.method, "data": cfg.data, "examples": {"train": len(data.train),
                                                                                "val": len(data.val)},
        "tasks": data.tasks, "adapted_modules": len(adapted), "world_size": world,
        "trainable_params": result["trainable_params"], "num_params": result["num_params"],
        "train": {k: result[k] for k in ("steps", "train_loss", "val_loss", "tokens", "tokens_per_s", "elapsed_s")},
        "peak_train_memory_mb": None if peak.bytes is None else round(peak.bytes / 2**20, 1),
        "peak_memory_how": peak.how, "base_bits_per_param": base_bits_per_param(model),
        "before": before, "after": after,
    }
    write_outputs(cfg, base, model, summary)
    summary["elapsed_s"] = time.perf_counter() - t0
    atomic_write_json(Path(cfg.out) / "finetune.json", summary)
    if cfg.report:
        from lmstack.finetune.report import write_report
        write_report(Path(cfg.out), cfg, summary)
    return summary


def trainer_device(cfg: FinetuneConfig) -> torch.device:
    from lmstack.utils import pick_device
    return pick_device(cfg.device)


def write_outputs(cfg: FinetuneConfig, base: Path, model, summary: dict) -> None:
    """The model (adapters: written here, the Trainer saved only them), the adapter folder, the
    tokenizer and chat template, the recipe, and the HF export."""
    from lmstack.finetune import save_adapter
    out = Path(cfg.out)
    if cfg.adapters:
        model.save_pretrained(out)
        save_adapter(model, out / "adapter", base_model_name_or_path=str(base))
    _copy_tokenizer(base, out)
    atomic_write_text(out / "recipe.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if cfg.export_hf:
        summary["export_hf"] = str(export_merged(cfg, base, model, Path(cfg.export_hf)))


def _copy_tokenizer(base: Path, out: Path) -> None:
    for name in ("tokenizer.json",) + TEMPLATE_FILES:
        if (base / name).is_file() and (base / name).resolve() != (out / name).resolve():
            shutil.copyfile(base / name, out / name)


def export_merged(cfg: FinetuneConfig, base: Path, model, dest: Path) -> Path:
    """A transformers folder: full -> the trained model; lora/qlora -> the float base with the
    adapters (OUT/adapter) merged in."""
    from lmstack.finetune import load_adapter, merge_lora
    from lmstack.model import Transformer
    from lmstack.model.hf import export_hf
    if cfg.adapters:
        plain = Transformer.from_pretrained(base, dtype=torch.float32)
        load_adapter(plain, Path(cfg.out) / "adapter")
        merge_lora(plain)
    else:
        plain = model
    export_hf(plain.cpu(), dest)
    _copy_tokenizer(base, dest)
    return dest
