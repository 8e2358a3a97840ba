"""TrainConfig: every knob of a training run. Each field is a recipe key and a `--flag`.

The defaults are the CPU-sized run: the `tiny` model preset, 128-token sequences, batches of
16, which learns tinyworld on two cores in minutes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.train.objectives import OBJECTIVES
from lmstack.train.optim import SCHEDULES
from lmstack.train.parallel import MODES
from lmstack.train.resume import SAVE_WEIGHTS

DTYPES = ("auto", "float32", "bfloat16", "float16")
DISTRIBUTED = ("auto", "none", *MODES)
PP_SCHEDULES = ("1f1b", "gpipe")


def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    data: str | None = _h("data dir with shards/ and tokenizer.json (from `lmstack data`); "
                          "the CLI builds tinyworld when omitted", default=None)
    out: str = _h("run directory (metrics.jsonl, checkpoints/, final model)", default="runs/train")
    model: str = _h("model preset name (tiny, llama-tiny, mixtral-tiny, gpt2-124m) or a model dir to "
                    "continue from", default="tiny")
    model_overrides: dict = _h("ModelConfig fields on top of the preset, e.g. {n_layer: 2}", default_factory=dict)
    objective: str = _h(f"pretraining objective: {' | '.join(OBJECTIVES)} (unless the caller passes its own)",
                        default="causal")
    mask_prob: float = _h("masked LM: fraction of positions chosen for the loss", default=0.15)
    max_steps: int = _h("optimizer steps", default=1000)
    batch_size: int = _h("sequences per micro-batch per device", default=16)
    grad_accum: int = _h("micro-batches per optimizer step", default=1)
    seq_len: int = _h("tokens per sequence", default=128)
    lr: float = _h("peak learning rate", default=3e-3)
    min_lr_ratio: float = _h("final lr as a fraction of the peak", default=0.1)
    schedule: str = _h(f"lr schedule: {' | '.join(SCHEDULES)}", default="cosine")
    warmup_steps: int = _h("linear warmup steps", default=50)
    decay_frac: float = _h("wsd: fraction of steps spent decaying", default=0.2)
    weight_decay: float = _h("AdamW weight decay (not on norms, biases, embeddings)", default=0.1)
    beta1: float = _h("AdamW beta1", default=0.9)
    beta2: float = _h("AdamW beta2", default=0.95)
    eps: float = _h("AdamW epsilon", default=1e-8)
    grad_clip: float = _h("clip the global grad norm to this (0 = off)", default=1.0)
    device: str = _h("auto | cpu | cuda | cuda:N", default="auto")
    dtype: str = _h("autocast dtype: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16 "
                    "(CUDA, with GradScaler)", default="auto")
    compile: bool = _h("torch.compile the model", default=False)
    activation_checkpointing: bool = _h("recompute each block's activations in backward", default=False)
    distributed: str = _h("auto (DDP under torchrun) | none | ddp | zero1 (sharded optimizer state) | zero2 (+ "
                          "gradients) | zero3 = fsdp (+ parameters) | tp (tensor parallel) | pp (pipeline) | tp+dp",
                          default="auto")
    tp_size: int = _h("tensor-parallel degree under tp+dp (ranks per tensor-parallel group); 0 = all ranks under "
                      "tp", default=0)
    pp_schedule: str = _h("pipeline schedule under pp: 1f1b | gpipe; its micro-batches are the step's --grad-accum",
                          default="1f1b")
    eval_every: int = _h("evaluate val loss every N steps (0 = only at the end)", default=100)
    eval_batches: int = _h("val batches per evaluation", default=8)
    sample_every: int = _h("call the on_sample callback every N steps (0 = never)", default=0)
    log_every: int = _h("write a train metrics line every N steps", default=1)
    ckpt_every: int = _h("checkpoint every N steps (0 = only at the end)", default=100)
    keep_last: int = _h("checkpoints to keep", default=2)
    save_weights: str = _h("weights in checkpoints: all | trainable (only parameters with requires_grad; the "
                           "frozen base comes from the caller on resume and no final model.safetensors is "
                           "written)", default="all")
    seed: int = _h("random seed (init, data order, masking)", default=0)
    resume: bool = _h("continue from the latest checkpoint in out/checkpoints", default=False)
    tensorboard: bool = _h("also log to out/tb (when tensorboard is installed)", default=True)
    peak_tflops: float | None = _h("peak device TFLOP/s for MFU (default: a per-device table)", default=None)

    def __post_init__(self) -> None:
        def bad(name: str, why: str):
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")
        if self.objective not in OBJECTIVES:
            bad("objective", f"valid: {', '.join(OBJECTIVES)}")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"valid: {', '.join(SCHEDULES)}")
        if self.dtype not in DTYPES:
            bad("dtype", f"valid: {', '.join(DTYPES)}")
        if self.save_weights not in SAVE_WEIGHTS:
            bad("save_weights", f"valid: {', '.join(SAVE_WEIGHTS)}")
        if self.distributed not in DISTRIBUTED:
            bad("distributed", f"valid: {', '.join(DISTRIBUTED)}")
        if self.pp_schedule not in PP_SCHEDULES:
            bad("pp_schedule", f"valid: {', '.join(PP_SCHEDULES)}")
        if self.tp_size < 0:
            bad("tp_size", "must be >= 0 (0 = all ranks under tp)")
        for name in ("max_steps", "batch_size", "grad_accum", "seq_len", "eval_batches"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        for name in ("warmup_steps", "eval_every", "sample_every", "ckpt_every", "keep_last", "log_every"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.lr <= 0:
            bad("lr", "must be > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "must be in [0, 1]")
        if not 0 < self.decay_frac <= 1:
            bad("decay_frac", "must be in (0, 1]")
        if not 0 < self.mask_prob < 1:
            bad("mask_prob", "must be in (0, 1)")
        if self.grad_clip < 0:
            bad("grad_clip", "must be >= 0 (0 = off)")
        if not isinstance(self.model_overrides, dict):
            bad("model_overrides", "must be a mapping of ModelConfig fields")
