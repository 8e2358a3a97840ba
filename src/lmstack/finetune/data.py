"""The data of a finetuning run: the chat template, the SFT examples, their val split, the probes.

    chat = chat_tokenizer(tok, base_dir)          # lmstack's template, or the folder's Jinja one
    data = load_sft_data(cfg, chat)               # SFTData(train, val, probes), every check done

Everything is read and checked here, before a run directory exists: a chat with an unknown
role, an empty assistant turn, an example longer than seq_len + 1 tokens (each refused with
its file:line), a probe file line without prompt/answer.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmstack.data.chat_examples import ChatExampleError, ChatExampleOptions, SFTExample, load_sft_jsonl, sft_examples
from lmstack.finetune.config import FinetuneConfig
from lmstack.finetune.instruct import TinyWorldChats, tinyworld_chats
from lmstack.tokenizer.chat import has_chat_tokens
from lmstack.utils import LmstackError

if TYPE_CHECKING:
    from lmstack.data.probes import Probe


class TemplateChat:
    """A tokenizer whose chats are rendered by a Hugging Face Jinja template (ChatTemplate):
    what chat_examples needs (`special_tokens`, `render_chat`) plus `encode_ordinary`."""

    def __init__(self, tok, template):
        self.tok, self.template = tok, template

    def __getattr__(self, name: str):
        # everything else is the wrapped tokenizer's (the engine decodes with decode_bytes, eot_token ...)
        if name in ("tok", "template"):
            raise AttributeError(name)
        return getattr(self.tok, name)

    @property
    def end_token(self) -> str | None:
        """Where an assistant turn ends: the template's eos_token (ChatML's <|im_end|> ...)."""
        return self.template.eos_token

    @property
    def special_tokens(self) -> dict[str, int]:
        return self.tok.special_tokens

    def encode_ordinary(self, text: str) -> list[int]:
        return self.tok.encode_ordinary(text)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], None]:
        text = self.template.render(messages, add_generation_prompt=add_generation_prompt)
        return self.tok.encode(text, allowed_special="all"), None


def chat_tokenizer(tok, folder: Path):
    """`tok` itself when it has lmstack's chat tokens; else the folder's Jinja chat template
    around it; else an error saying what is missing."""
    if has_chat_tokens(tok):
        return tok
    from lmstack.tokenizer.chat_template import ChatTemplate
    template = ChatTemplate.from_pretrained(folder)
    if template is None:
        raise LmstackError(f"{folder}: the tokenizer has no lmstack chat tokens and the folder has no chat template "
                           f"(chat_template.jinja or tokenizer_config.json 'chat_template'); SFT needs one")
    return TemplateChat(tok, template)


@dataclass
class SFTData:
    train: list[SFTExample]
    val: list[SFTExample]
    probes: dict[str, list[Probe]]
    tasks: dict[str, int]              # training examples per task (tinyworld) or {"file": n}


def _split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val): a seeded `fraction` of the examples (at least one when fraction > 0) for val."""
    n_val = int(round(fraction * len(examples)))
    if fraction > 0 and len(examples) > 1:
        n_val = max(1, n_val)
    order = np.random.default_rng([seed, 7]).permutation(len(examples))
    val = set(order[:n_val].tolist())
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


def read_probes(path: str) -> dict[str, list[Probe]]:
    """{"task", "prompt", "answer"} lines (task optional: "probes") -> {task: [Probe]}."""
    from lmstack.data.probes import Probe
    p = Path(path)
    if not p.is_file():
        raise LmstackError(f"eval_probes file {p} not found")
    out: dict[str, list[Probe]] = {}
    for lineno, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            probe = Probe(str(rec.get("task") or "probes"), str(rec["prompt"]), str(rec["answer"]))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise LmstackError(f"{p}:{lineno}: a probe must be a JSON object with 'prompt' and 'answer'") from None
        out.setdefault(probe.task, []).append(probe)
    return out


def end_token(cfg: FinetuneConfig, chat) -> str:
    """The special token that closes a turn: cfg.end_token, else the template's."""
    from lmstack.tokenizer.chat import END
    name = cfg.end_token or (chat.end_token if isinstance(chat, TemplateChat) else END)
    if not name or name not in chat.special_tokens:
        raise LmstackError(f"end_token={name!r} is not a special token of this tokenizer; pass --end-token, one of "
                           f"{sorted(chat.special_tokens)}")
    return name


def load_sft_data(cfg: FinetuneConfig, chat, world_seed: int) -> SFTData:
    """The run's examples (split into train and val) and probes, every example checked."""
    try:
        return _load(cfg, chat, world_seed)
    except ChatExampleError as e:
        if "max_len" in str(e):   # say it in the finetune options' words: max_len is seq_len + 1
            raise ChatExampleError(f"{e} (max_len = seq_len + 1: raise --seq-len or pass --truncate)") from None
        raise


def _load(cfg: FinetuneConfig, chat, world_seed: int) -> SFTData:
    opts = ChatExampleOptions(train_on=cfg.train_on, max_len=cfg.seq_len + 1, truncate=cfg.truncate,
                              end_token=end_token(cfg, chat))
    probes: dict[str, list[Probe]] = {}
    if cfg.data == "tinyworld":
        tw = tinyworld_chats(TinyWorldChats(seed=world_seed, size_mb=cfg.tinyworld_mb,
                                            tasks=tuple(cfg.tinyworld_tasks), per_task=cfg.per_task,
                                            probes_per_task=cfg.probes_per_task))
        examples = sft_examples(chat, [{"messages": r["messages"]} for r in tw.train], opts, source="tinyworld")
        tasks: dict[str, int] = {}
        for r in tw.train:
            tasks[r["task"]] = tasks.get(r["task"], 0) + 1
        probes = tw.probes
    else:
        path = Path(cfg.data)
        if not path.is_file():
            raise LmstackError(f"data={cfg.data!r} is neither 'tinyworld' nor an existing JSONL file")
        examples = load_sft_jsonl(path, chat, opts)
        if not examples:
            raise LmstackError(f"{path} holds no examples")
        tasks = {path.name: len(examples)}
    if cfg.eval_probes:
        probes = read_probes(cfg.eval_probes)
    if cfg.probes_per_task == 0:
        probes = {}
    probes = {t: ps[:cfg.probes_per_task] for t, ps in probes.items()}
    train, val = _split(examples, cfg.val_fraction, cfg.seed)
    return SFTData(train, val, probes, tasks)
