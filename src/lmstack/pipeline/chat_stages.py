"""The stages that turn the base model into a chat model and ship it: import -> sft -> dpo -> grpo
-> quantize -> export. Each calls the library that owns the method (lmstack.finetune,
lmstack.align, lmstack.quant, lmstack.quant.export) with the recipe's *_config, reads the model
of the stage before it (`model_input`) and writes its own folder in the run directory:

    RUN/            the pretrained model (pretrain)      RUN/base/   an imported HF model (import)
    RUN/sft/        the instruction-tuned model          RUN/dpo/    DPO on preference pairs
    RUN/grpo/       GRPO on arithmetic                   RUN/quantized/  weight-only INT4 (GPTQ/AWQ)
    RUN/export/     model.gguf and hf/ of the final model

Every model folder holds tokenizer.json (+ the HF chat template files), so `LLM(folder)` and
`lmstack serve folder` load it. The held-out numbers of every model are the measure stage's.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from lmstack.pipeline.options import RunOptions, model_chain, model_input, stage_configs
from lmstack.pipeline.runner import Run, clear_outputs
from lmstack.utils import LmstackError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
FOLDERS = {"import": "base", "sft": "sft", "dpo": "dpo", "grpo": "grpo", "quantize": "quantized"}


def model_dir(run: Run, stage: str) -> Path:
    """Where the model of `stage` lives (a LoRA SFT: its merged copy, a plain model)."""
    if stage == "pretrain":
        return run.dir
    if stage == "sft" and run.opts.sft_config.get("method", "full") in ("lora", "qlora"):
        return run.dir / "sft" / "merged"
    return run.dir / FOLDERS[stage]


def final_model(run: Run) -> Path:
    return model_dir(run, model_chain(run.opts)[-1])


def copy_tokenizer(src: Path, dest: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and (src / name).resolve() != (dest / name).resolve():
            shutil.copyfile(src / name, dest / name)


def _fresh_or_resume(run: Run, out: Path) -> bool:
    """True to resume the interrupted run of this stage from its checkpoints, else clear `out`."""
    from lmstack.train.checkpoint import latest_checkpoint
    if run.resuming and latest_checkpoint(out / "checkpoints") is not None:
        run.log(f"resuming the interrupted stage from {out / 'checkpoints'}")
        return True
    clear_outputs([out])
    return False


def _input(run: Run, stage: str) -> Path:
    src = model_dir(run, model_input(run.opts, stage))
    if not (src / "config.json").is_file():
        raise LmstackError(f"the model stage {stage!r} starts from ({src}) is missing; run the stages before it")
    return src


# --------------------------------------------------------------------------- import
def import_base(run: Run) -> dict:
    """Copy the base model (a Hugging Face folder or a run dir) into RUN/base in lmstack's format."""
    import torch

    from lmstack.model import Transformer
    src = Path(run.opts.base_model)
    if not (src / "config.json").is_file():
        raise LmstackError(f"base_model={src} is not a model folder (no config.json); give a Hugging Face folder")
    if not (src / "tokenizer.json").is_file():
        raise LmstackError(f"base_model={src} has no tokenizer.json; the chat stages need the model's tokenizer")
    out = run.dir / "base"
    clear_outputs([out])
    model = Transformer.from_pretrained(src, dtype=torch.float32)
    model.save_pretrained(out)
    copy_tokenizer(src, out)
    c = model.config
    return {"params": sum(p.numel() for p in model.parameters()), "n_layer": c.n_layer, "n_embd": c.n_embd,
            "vocab_size": c.vocab_size, "context_length": c.context_length}


# --------------------------------------------------------------------------- sft
def sft(run: Run) -> dict:
    from lmstack.finetune.run import finetune
    out = run.dir / "sft"
    resume = _fresh_or_resume(run, out)
    cfg = stage_configs(run.opts, str(_input(run, "sft")), str(out))["sft_config"]()
    cfg = dataclasses.replace(cfg, resume=resume, export_hf=str(out / "merged") if cfg.adapters else None)
    res = finetune(cfg)
    t = res["train"]
    return {"method": cfg.method, "examples": res["examples"]["train"], "trainable_params": res["trainable_params"],
            "steps": t["steps"], "train_loss": t["train_loss"], "val_loss": t["val_loss"],
            "tokens_per_s": t["tokens_per_s"]}


# --------------------------------------------------------------------------- dpo / grpo
def _align(run: Run, stage: str) -> dict:
    from lmstack.align.runner import run_align
    out = run.dir / stage
    resume = _fresh_or_resume(run, out)
    src = _input(run, stage)
    cfg = dataclasses.replace(stage_configs(run.opts, str(src), str(out))[f"{stage}_config"](), resume=resume)
    if stage == "grpo" and cfg.format == "chat" and cfg.data is None and cfg.eval_data is None:
        cfg = dataclasses.replace(cfg, **chat_prompt_files(cfg, out / "prompts"))
    res = run_align(cfg)
    copy_tokenizer(src, out)            # run_align writes tokenizer.json; the chat template files too
    numbers = {"steps": res["train"].get("steps"), "train_loss": res["train"].get("train_loss")}
    for when in ("before", "after"):        # the method's own held-out measure (the measure stage has more)
        for k, v in (res.get(when) or {}).items():
            if isinstance(v, (int, float)):
                numbers[f"{k}_{when}"] = v
    return numbers


def as_chat_question(rec: dict) -> dict:
    """A tinyworld prompt record 'Q: what is 47+38?\nA: 47+38=' -> the user turn SFT trained on,
    'what is 47+38?' (lmstack.finetune.instruct.question), so RL asks what the chat model was taught."""
    from lmstack.finetune.instruct import question
    return {**rec, "prompt": question(rec["prompt"])}


def chat_prompt_files(cfg, folder: Path) -> dict:
    """GRPO's tinyworld prompts (train and held-out) as chat questions, in JSONL files for AlignConfig."""
    import json

    from lmstack.align.data import tinyworld_prompts
    from lmstack.utils import atomic_write_text
    files = {}
    for key, n, heldout in (("data", cfg.n_train, False), ("eval_data", cfg.n_eval, True)):
        recs = tinyworld_prompts(seed=cfg.tinyworld_seed, n=n, heldout=heldout, tasks=tuple(cfg.tasks))
        path = folder / f"{'heldout' if heldout else 'train'}.jsonl"
        atomic_write_text(path, "".join(json.dumps(as_chat_question(r)) + "\n" for r in recs))
        files[key] = str(path)
    return files


def dpo(run: Run) -> dict:
    return _align(run, "dpo")


def grpo(run: Run) -> dict:
    return _align(run, "grpo")


# --------------------------------------------------------------------------- quantize
def calibration_text(run: Run, chars: int = 400_000) -> str:
    """Calibration text for GPTQ/AWQ: the run's training documents (tinyworld's when imported)."""
    from lmstack.data import iter_texts
    if (run.data_dir / "docs").is_dir():
        texts, n = [], 0
        for text in iter_texts(run.data_dir, "train"):
            texts.append(text)
            n += len(text)
            if n >= chars:
                break
        return "\n".join(texts)
    from lmstack.data.tinyworld import TinyWorldConfig, generate
    return "\n".join(generate(TinyWorldConfig(seed=run.opts.seed, size_mb=chars / 1e6)).docs)


def quantize(run: Run) -> dict:
    import torch

    from lmstack.finetune.measure import base_bits_per_param
    from lmstack.model import Transformer
    from lmstack.quant import QuantError, quantize_model
    from lmstack.tokenizer import Tokenizer
    src, out = _input(run, "quantize"), run.dir / "quantized"
    clear_outputs([out])
    qcfg = stage_configs(run.opts)["quant_config"]()
    model = Transformer.from_pretrained(src, dtype=torch.float32)
    tok = Tokenizer.load(src / "tokenizer.json")
    calib = calibration_text(run) if qcfg.needs_calibration else None
    try:
        names = quantize_model(model, qcfg, calib=calib, tokenizer=tok)
    except QuantError as e:
        raise LmstackError(f"quant_config {run.opts.quant_config}: {e}") from None
    model.save_pretrained(out)
    copy_tokenizer(src, out)
    bits = base_bits_per_param(model)["stored"]
    return {"method": qcfg.method, "bits": qcfg.bits, "group_size": qcfg.group_size, "modules": len(names),
            "bits_per_weight": bits, "file_mb": _mb(out), "float_file_mb": _mb(src)}


def _mb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20, 3)


# --------------------------------------------------------------------------- export
def export(run: Run) -> dict:
    import torch

    from lmstack.infer.loader import load
    from lmstack.quant.export import export_gguf, export_hf_folder
    src, out = final_model(run), run.dir / "export"
    clear_outputs([out])
    out.mkdir(parents=True)
    model, tok, eos = load(str(src), device=torch.device("cpu"))
    numbers = {"model": str(src)}
    if "gguf" in run.opts.export_formats:
        r = export_gguf(model, tok, out / "model.gguf", type=run.opts.gguf_type, name=run.opts.name,
                        eos_token_id=eos)
        numbers.update(gguf_mb=round(r.nbytes / 2**20, 3), gguf_type=run.opts.gguf_type,
                       gguf_tensors=len(r.tensor_types))
    if "hf" in run.opts.export_formats:
        export_hf_folder(model, out / "hf", tokenizer=tok, eos_token_id=eos, dequantize=True)
        copy_tokenizer(src, out / "hf")
        numbers["hf"] = str(out / "hf")
    return numbers


def export_outputs(run: Run) -> list[Path]:
    fmts = run.opts.export_formats
    return ([run.dir / "export" / "model.gguf"] if "gguf" in fmts else []) + \
        ([run.dir / "export" / "hf" / "config.json"] if "hf" in fmts else [])


# --------------------------------------------------------------------------- time estimates (for ETAs)
def estimate_sft(o: RunOptions, tok_s: float) -> float:
    c = o.sft_config
    return c.get("max_steps", 300) * c.get("batch_size", 8) * c.get("seq_len", 256) / tok_s + 15


def estimate_dpo(o: RunOptions, tok_s: float) -> float:
    c = o.dpo_config     # pairs of ~40 tokens, chosen and rejected, forward + backward; reference log-probs
    return (c.get("max_steps", 100) + c.get("n_train", 2000) / 48) * c.get("batch_size", 8) * 80 / tok_s + 10


def estimate_grpo(o: RunOptions, tok_s: float) -> float:
    c = o.grpo_config    # rollouts: one token per engine step is far slower per token than training
    seqs = c.get("prompts_per_rollout", 4) * c.get("group_size", 8)
    return c.get("max_steps", 100) * seqs * 40 / tok_s * 4 + 15


def estimate_quantize(o: RunOptions, tok_s: float) -> float:
    return 20.0


def estimate_export(o: RunOptions, tok_s: float) -> float:
    return 10.0
