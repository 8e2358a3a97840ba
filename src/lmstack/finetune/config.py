"""FinetuneConfig: every knob of a finetuning run. Each field is a recipe key and a `--flag`.

It is a TrainConfig (the one Trainer's knobs: steps, lr, batch, DDP, checkpoints ...) with
finetuning's defaults and fields on top: the base model, the method (full, LoRA, QLoRA), the
SFT data (tinyworld's tasks or a chat JSONL) and what to write besides the run directory.
TrainConfig fields that pretraining alone uses (objective, mask_prob, model_overrides) and
save_weights (decided by the method) are not flags.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmstack.data.chat_examples import TRAIN_ON
from lmstack.finetune.instruct import TASKS
from lmstack.train.config import TrainConfig

METHODS = ("full", "lora", "qlora")


def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


def _hidden(**kw):
    return field(metadata={"cli": False}, **kw)


@dataclass
class FinetuneConfig(TrainConfig):
    # ---- TrainConfig fields with a finetuning meaning or default
    model: str = _h("the model to finetune: a run directory (runs/NAME) or a Hugging Face folder; the CLI's RUN "
                    "argument", default="")
    data: str = _h("SFT data: 'tinyworld' (its tasks as chats) or a JSONL file of {\"messages\": [...]} or "
                   "{\"prompt\", \"response\"} lines", default="tinyworld")
    out: str = _h("run directory to write (model, adapter/, metrics.jsonl, finetune.json, report.html)",
                  default="runs/finetune")
    max_steps: int = _h("optimizer steps", default=300)
    seq_len: int = _h("positions per row; also the longest example allowed (+1 token)", default=256)
    lr: float = _h("peak learning rate", default=1e-3)
    warmup_steps: int = _h("linear warmup steps", default=20)
    weight_decay: float = _h("AdamW weight decay", default=0.0)
    eval_every: int = _h("val loss every N steps (0 = only at the end)", default=50)
    ckpt_every: int = _h("checkpoint every N steps (0 = only at the end)", default=100)
    activation_checkpointing: bool | None = _h(
        "recompute each block's activations in backward; unset: on for qlora only (without it the dequantized "
        "weight of every quantized linear stays alive for backward, and QLoRA holds more memory than LoRA)",
        default=None)
    model_overrides: dict = _hidden(default_factory=dict)
    objective: str = _hidden(default="causal")
    mask_prob: float = _hidden(default=0.15)
    save_weights: str = _hidden(default="all")
    # ---- the method
    method: str = _h(f"{' | '.join(METHODS)}: train every weight, LoRA adapters on a frozen base, or LoRA "
                     f"adapters on a frozen NF4-quantized base", default="lora")
    lora_r: int = _h("LoRA rank", default=8)
    lora_alpha: float = _h("LoRA alpha (scale = alpha / r)", default=16.0)
    lora_dropout: float = _h("dropout on the adapters' input", default=0.0)
    lora_targets: list[str] = _h("linears to adapt: roles (q k v o gate up down), module-name regexes, or "
                                 "all-linear", default_factory=lambda: ["all-linear"])
    use_rslora: bool = _h("rsLoRA scale alpha / sqrt(r)", default=False)
    adapter: str | None = _h("start from this PEFT LoRA adapter folder (lora/qlora) instead of fresh adapters",
                             default=None)
    nf4_blocksize: int = _h("qlora: weights per NF4 absmax block", default=64)
    # ---- the data
    packing: bool = _h("pack several examples into a row (attention kept within each example); false: pad "
                       "one example per row", default=True)
    train_on: str = _h(f"assistant turns that carry the loss: {' | '.join(TRAIN_ON)}", default="all")
    truncate: bool = _h("cut examples longer than seq_len+1 tokens instead of refusing them", default=False)
    end_token: str | None = _h("the special token that ends a chat turn (default: <|end|> for lmstack's chat "
                               "template, the template's eos_token for a Hugging Face one)", default=None)
    val_fraction: float = _h("share of the examples held out for val loss", default=0.05)
    tinyworld_seed: int | None = _h("tinyworld's world seed (default: the base run's recipe seed, else 0)",
                                    default=None)
    tinyworld_mb: float = _h("tinyworld text drawn to collect training chats", default=1.0)
    tinyworld_tasks: list[str] = _h(f"tinyworld tasks to train and probe: {' '.join(TASKS)}",
                                    default_factory=lambda: list(TASKS))
    per_task: int = _h("tinyworld: most training chats per task", default=400)
    probes_per_task: int = _h("held-out probes per task scored before and after (0 = none)", default=40)
    eval_probes: str | None = _h("JSONL of {\"task\", \"prompt\", \"answer\"} probes asked as chats, before "
                                 "and after (default with tinyworld: its held-out sets)", default=None)
    # ---- outputs
    export_hf: str | None = _h("also write a transformers-loadable folder here (adapters merged)", default=None)
    report: bool = _h("write OUT/report.html", default=True)

    def __post_init__(self) -> None:
        super().__post_init__()

        def bad(name: str, why: str):
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")
        if not self.model:
            bad("model", "give the model to finetune: a run directory or a Hugging Face folder")
        if not self.data:
            bad("data", "give 'tinyworld' or a JSONL file")
        if self.method not in METHODS:
            bad("method", f"valid: {', '.join(METHODS)}")
        if self.train_on not in TRAIN_ON:
            bad("train_on", f"valid: {', '.join(TRAIN_ON)}")
        if not 0 <= self.val_fraction < 1:
            bad("val_fraction", "must be in [0, 1)")
        if self.adapter and self.method == "full":
            bad("adapter", "an adapter trains with method lora or qlora")
        for name in ("per_task", "lora_r"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.probes_per_task < 0:
            bad("probes_per_task", "must be >= 0")
        defaults = {"model_overrides": {}, "objective": "causal", "mask_prob": 0.15}
        for name, value in defaults.items():
            if getattr(self, name) != value:
                bad(name, "is a pretraining setting; finetuning keeps the base model's architecture")

    @property
    def adapters(self) -> bool:
        return self.method in ("lora", "qlora")

    def trainer_config(self) -> TrainConfig:
        """The TrainConfig the Trainer runs with: this config's training fields; the base and the
        data are the finetuner's to load, and only adapters are checkpointed when the base is frozen."""
        from dataclasses import fields
        kw = {f.name: getattr(self, f.name) for f in fields(TrainConfig)}
        kw.update(data=None, model=str(self.model), save_weights="trainable" if self.adapters else "all")
        if self.activation_checkpointing is None:
            kw["activation_checkpointing"] = self.method == "qlora"
        return TrainConfig(**kw)
