"""Chat examples for finetuning: messages -> token ids + an assistant-only loss mask.

    ex = sft_example(tok, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    ex.ids, ex.loss_mask, ex.labels         # loss on "4" and the <|end|> that closes the turn
    pair = preference_example(tok, "2+2?", chosen="4", rejected="5")
    pair.chosen.ids[:pair.prompt_len] == pair.rejected.ids[:pair.prompt_len]   # shared prompt
    load_sft_jsonl("sft.jsonl", tok); load_preference_jsonl("prefs.jsonl", tok)

What is trained. The loss covers each assistant turn's content tokens and the end-of-turn
token that closes it (a model that never sees its stop token trained never learns to stop),
and nothing else: not system/user turns, not the template's assistant header, not glue the
template puts after the end-of-turn token. `train_on="last"` trains only the final turn.

How the turns are found. Only through the tokenizer's chat template (`tok.render_chat`),
never by re-implementing it: for assistant turn k, render messages[:k] with the generation
prompt (everything up to and including the assistant header) and messages[:k+1]; the turn is
what the second adds to the first, up to its last end-of-turn token. So any template that
renders a chat prefix as a prefix of the whole chat works, and one that does not is refused.
`tok` is a lmstack Tokenizer or any object with `special_tokens` (name -> id) and
`render_chat(messages, add_generation_prompt) -> (ids, ...)`; for a template whose turns end
with another token (ChatML's "<|im_end|>"), say so with ChatExampleOptions(end_token=...).

Every example is checked and refused with its source (file:line or "example #i") and the
reason: unknown role, missing or non-string content, an empty assistant turn, a chat that
does not end with the assistant, a mask of all zeros or all ones, a turn whose end-of-turn
token the template did not produce, an example over max_len (or truncated to it with
truncate=True), identical chosen and rejected responses.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from lmstack.tokenizer.base import TokenizerError
from lmstack.tokenizer.chat import END, ROLES
from lmstack.utils.errors import LmstackError

IGNORE_INDEX = -100  # a label that carries no loss (F.cross_entropy's default; train/objectives.py agrees)
TRAIN_ON = ("all", "last")


class ChatExampleError(LmstackError, ValueError):
    """A bad chat example; the message starts with its source (file:line or "example #i")."""


@dataclass(frozen=True)
class ChatExampleOptions:
    """How chats become examples.

    train_on:  "all" assistant turns, or only the "last" one.
    max_len:   the longest example in tokens (None: no limit). A longer one is an error...
    truncate:  ...unless truncate=True: cut it to max_len on the right (the turn cut short
               keeps its trained tokens but loses its end-of-turn token).
    end_token: the special token that closes a turn in the chat template."""
    train_on: str = "all"
    max_len: int | None = None
    truncate: bool = False
    end_token: str = END

    def __post_init__(self):
        if self.train_on not in TRAIN_ON:
            raise ChatExampleError(f"train_on={self.train_on!r} is not valid; use one of: {', '.join(TRAIN_ON)}")
        if self.max_len is not None and (not isinstance(self.max_len, int) or self.max_len < 2):
            raise ChatExampleError(f"max_len={self.max_len!r} must be an integer >= 2, or None for no limit")
        if not isinstance(self.end_token, str) or not self.end_token:
            raise ChatExampleError(f"end_token={self.end_token!r} must be the name of a special token")


@dataclass(frozen=True)
class SFTExample:
    """One tokenized chat. `loss_mask[t] = 1` where token t is trained (assistant content + end)."""
    ids: list[int]
    loss_mask: list[int]
    source: str

    @property
    def labels(self) -> list[int]:
        """ids where trained, IGNORE_INDEX elsewhere; aligned with ids (HF's `labels`)."""
        return [i if m else IGNORE_INDEX for i, m in zip(self.ids, self.loss_mask)]

    def inputs_and_targets(self) -> tuple[list[int], list[int]]:
        """(x, y) for next-token training: x = ids[:-1], y[t] = the label of token t+1."""
        return self.ids[:-1], self.labels[1:]

    @property
    def n_trained(self) -> int:
        return sum(self.loss_mask)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class PreferenceExample:
    """A prompt with two responses. Both sequences start with the same `prompt_len` ids (the
    rendered prompt up to the assistant header); each mask covers its response + end only."""
    chosen: SFTExample
    rejected: SFTExample
    prompt_len: int
    source: str

    @property
    def prompt_ids(self) -> list[int]:
        return self.chosen.ids[:self.prompt_len]


# --------------------------------------------------------------------------- checking messages

def _check_messages(messages: Any, source: str, what: str = "messages") -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ChatExampleError(f"{source}: {what} must be a non-empty list of {{'role', 'content'}} objects, "
                               f"got {messages!r:.60}")
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatExampleError(f"{source}: message #{k} must be an object {{'role', 'content'}}, got {m!r:.60}")
        for key in ("role", "content"):
            if key not in m:
                raise ChatExampleError(f"{source}: message #{k} has no {key!r} (keys: {sorted(m)})")
        if m["role"] not in ROLES:
            raise ChatExampleError(f"{source}: message #{k} has unknown role {m['role']!r}; "
                                   f"valid roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise ChatExampleError(f"{source}: message #{k} content must be a string, "
                                   f"got {type(m['content']).__name__}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise ChatExampleError(f"{source}: message #{k} is an empty assistant turn; there is nothing to train")
        if m["role"] == "assistant" and k == 0:
            raise ChatExampleError(f"{source}: message #0 is an assistant turn with no prompt before it")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _prompt_messages(prompt: Any, source: str) -> list[dict]:
    """A prompt is a string (one user turn) or a list of messages that does not end with the assistant."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    messages = _check_messages(prompt, source, "prompt")
    if messages[-1]["role"] == "assistant":
        raise ChatExampleError(f"{source}: the prompt ends with an assistant turn; the response would be a "
                               f"second assistant turn in a row")
    return messages


def _response_text(response: Any, source: str, field: str) -> str:
    """A response is a string or [{"role": "assistant", "content": str}] (TRL's conversational form)."""
    if isinstance(response, list) and len(response) == 1 and isinstance(response[0], dict) \
            and response[0].get("role") == "assistant":
        response = response[0].get("content")
    if not isinstance(response, str):
        raise ChatExampleError(f"{source}: {field} must be a string or [{{'role': 'assistant', 'content': str}}], "
                               f"got {response!r:.60}")
    if not response.strip():
        raise ChatExampleError(f"{source}: {field} is empty; there is nothing to train")
    return response


# --------------------------------------------------------------------------- rendering + mask

def _render(tok, messages: list[dict], add_generation_prompt: bool, source: str) -> list[int]:
    try:
        return list(tok.render_chat(messages, add_generation_prompt=add_generation_prompt)[0])
    except TokenizerError as e:
        raise ChatExampleError(f"{source}: {e}") from None


def _mask_chat(tok, messages: list[dict], opts: ChatExampleOptions, source: str) -> tuple[list[int], list[int], int]:
    """-> (ids, loss_mask, start of the last assistant turn's content) for checked `messages`."""
    if messages[-1]["role"] != "assistant":
        raise ChatExampleError(f"{source}: the chat ends with a {messages[-1]['role']} turn; an SFT example "
                               f"must end with the assistant turn it trains")
    end = tok.special_tokens.get(opts.end_token)
    if end is None:
        raise ChatExampleError(f"{source}: the tokenizer has no special token {opts.end_token!r} to end a turn; "
                               f"pass end_token= one of {sorted(tok.special_tokens)}")
    ids = _render(tok, messages, False, source)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tok, messages[:k], True, source)     # ... up to and including the assistant header
        upto = _render(tok, messages[:k + 1], False, source)
        if upto[:len(head)] != head or ids[:len(upto)] != upto:
            raise ChatExampleError(f"{source}: the chat template does not render messages[:{k + 1}] as a prefix "
                                   f"of the whole chat, so assistant turn #{k} cannot be located")
        turn = upto[len(head):]                              # content, end-of-turn, any glue after it
        if end not in turn:
            raise ChatExampleError(f"{source}: assistant turn #{k} is not closed by {opts.end_token!r}, so its "
                                   f"end-of-turn token would not be trained (the model would not learn to stop)")
        spans.append((len(head), len(head) + len(turn) - turn[::-1].index(end)))
    if opts.train_on == "last":
        spans = spans[-1:]
    mask = [0] * len(ids)
    for a, b in spans:
        mask[a:b] = [1] * (b - a)
    return ids, mask, spans[-1][0]


def _fit(ids: list[int], mask: list[int], opts: ChatExampleOptions, source: str) -> SFTExample:
    """Apply max_len (error or truncate) and refuse a mask that trains nothing or everything."""
    if opts.max_len is not None and len(ids) > opts.max_len:
        if not opts.truncate:
            raise ChatExampleError(f"{source}: the example is {len(ids)} tokens, longer than max_len={opts.max_len}; "
                                   f"raise max_len, shorten it, or pass truncate=True")
        ids, mask = ids[:opts.max_len], mask[:opts.max_len]
    if not any(mask):
        raise ChatExampleError(f"{source}: the loss mask is all zeros (no assistant token within "
                               f"{len(ids)} tokens); the example would train nothing")
    if all(mask):
        raise ChatExampleError(f"{source}: the loss mask is all ones; the chat template put no prompt or header "
                               f"before the response, so the loss would cover the prompt")
    return SFTExample(ids, mask, source)


# --------------------------------------------------------------------------- builders

def sft_example(tok, messages: list[dict], options: ChatExampleOptions | None = None,
                source: str = "example") -> SFTExample:
    """A chat [{"role", "content"}, ...] ending with an assistant turn -> SFTExample."""
    opts = options or ChatExampleOptions()
    ids, mask, _ = _mask_chat(tok, _check_messages(messages, source), opts, source)
    return _fit(ids, mask, opts, source)


def prompt_response_example(tok, prompt: str | list[dict], response: str | list[dict],
                            options: ChatExampleOptions | None = None, source: str = "example") -> SFTExample:
    """{"prompt", "response"} -> the chat [user: prompt, assistant: response] (prompt may be messages)."""
    messages = _prompt_messages(prompt, source) + [
        {"role": "assistant", "content": _response_text(response, source, "response")}]
    return sft_example(tok, messages, options, source)


def preference_example(tok, prompt: str | list[dict], chosen: str | list[dict], rejected: str | list[dict],
                       options: ChatExampleOptions | None = None, source: str = "example") -> PreferenceExample:
    """A prompt and two responses -> two sequences sharing the prompt's ids; masks on the response
    (+ end-of-turn) only, whatever `options.train_on` says (earlier assistant turns are context)."""
    opts = options or ChatExampleOptions()
    prompt_msgs = _prompt_messages(prompt, source)
    texts = {"chosen": _response_text(chosen, source, "chosen"),
             "rejected": _response_text(rejected, source, "rejected")}
    if texts["chosen"] == texts["rejected"]:
        raise ChatExampleError(f"{source}: chosen and rejected are the same response ({texts['chosen']!r:.60}); "
                               f"a preference pair needs two different responses")
    last = ChatExampleOptions("last", opts.max_len, opts.truncate, opts.end_token)
    pair, starts = {}, set()
    for field, text in texts.items():
        messages = _check_messages(prompt_msgs + [{"role": "assistant", "content": text}], source)
        ids, mask, start = _mask_chat(tok, messages, last, source)
        pair[field] = _fit(ids, mask, last, f"{source} ({field})")
        starts.add(start)
    if len(starts) != 1 or pair["chosen"].ids[:start] != pair["rejected"].ids[:start]:
        raise ChatExampleError(f"{source}: the chat template renders the prompt differently before the two "
                               f"responses; they cannot share a prompt prefix")
    if pair["chosen"].ids == pair["rejected"].ids:
        raise ChatExampleError(f"{source}: chosen and rejected are identical after truncation to "
                               f"max_len={opts.max_len}; raise max_len")
    return PreferenceExample(pair["chosen"], pair["rejected"], start, source)


def _sft_record(tok, record: Any, opts: ChatExampleOptions, source: str) -> SFTExample:
    if isinstance(record, dict) and "messages" in record:
        return sft_example(tok, record["messages"], opts, source)
    if isinstance(record, dict) and "prompt" in record and "response" in record:
        return prompt_response_example(tok, record["prompt"], record["response"], opts, source)
    keys = sorted(record) if isinstance(record, dict) else type(record).__name__
    raise ChatExampleError(f"{source}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., \"response\": ...}}, "
                           f"got {keys}")


def _preference_record(tok, record: Any, opts: ChatExampleOptions, source: str) -> PreferenceExample:
    missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(record, dict) or k not in record]
    if missing:
        raise ChatExampleError(f"{source}: a preference example needs \"prompt\", \"chosen\" and \"rejected\"; "
                               f"missing {missing}")
    return preference_example(tok, record["prompt"], record["chosen"], record["rejected"], opts, source)


def sft_examples(tok, records: Iterable[dict], options: ChatExampleOptions | None = None,
                 source: str = "example") -> list[SFTExample]:
    """In-memory records ({"messages"} or {"prompt", "response"}); errors name f"{source} #{i}"."""
    opts = options or ChatExampleOptions()
    return [_sft_record(tok, r, opts, f"{source} #{i}") for i, r in enumerate(records)]


def preference_examples(tok, records: Iterable[dict], options: ChatExampleOptions | None = None,
                        source: str = "example") -> list[PreferenceExample]:
    """In-memory {"prompt", "chosen", "rejected"} records; errors name f"{source} #{i}"."""
    opts = options or ChatExampleOptions()
    return [_preference_record(tok, r, opts, f"{source} #{i}") for i, r in enumerate(records)]


# --------------------------------------------------------------------------- JSONL files

def read_chat_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(f"{path}:{line}", JSON value) for each non-blank line; bad JSON names file and line."""
    p = Path(path)
    if not p.is_file():
        raise ChatExampleError(f"{p} not found (expected a .jsonl file of chat examples)")
    with open(p, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield f"{p}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise ChatExampleError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None


def load_sft_jsonl(path: str | os.PathLike, tok, options: ChatExampleOptions | None = None) -> list[SFTExample]:
    """A JSONL file of {"messages": [...]} and/or {"prompt", "response"} lines -> SFT examples."""
    opts = options or ChatExampleOptions()
    return [_sft_record(tok, rec, opts, src) for src, rec in read_chat_jsonl(path)]


def load_preference_jsonl(path: str | os.PathLike, tok,
                          options: ChatExampleOptions | None = None) -> list[PreferenceExample]:
    """A JSONL file of {"prompt", "chosen", "rejected"} lines -> preference examples."""
    opts = options or ChatExampleOptions()
    return [_preference_record(tok, rec, opts, src) for src, rec in read_chat_jsonl(path)]
