"""Hugging Face chat templates: the Jinja text a checkpoint ships, rendered as transformers does.

    tpl = ChatTemplate.from_pretrained("path/to/hf_folder")     # None if the folder has none
    text = tpl.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    ids = tokenizer.encode(text, allowed_special="all")         # = apply_chat_template(tokenize=True)
    ids = encode_chat(messages, tokenizer, tpl)                 # tpl, else lmstack's own template
    stop = chat_stop_token_ids(tokenizer, tpl)                  # where the assistant's turn ends

`encode_chat` and `chat_stop_token_ids` are the one place that decides which template a model
chats with (the server and `LLM.chat` both call them): the checkpoint's Jinja when it has
one, else lmstack's own (`chat.py`, our run directories).

A checkpoint keeps its template in `chat_template.jinja` (transformers >= 4.47 writes it
there) or under `chat_template` in `tokenizer_config.json` (a string, or a list of
{"name", "template"} of which "default" is used). `--chat-template FILE` replaces it.

What `transformers.PreTrainedTokenizerBase.apply_chat_template` does, and so do we:
- a sandboxed Jinja environment (templates from the Hub are untrusted code) with
  `trim_blocks` and `lstrip_blocks` on, and the `loopcontrols` extension ({% break %});
- `raise_exception(msg)` and `strftime_now(fmt)` as globals; `tojson` as json.dumps with
  ensure_ascii=False (Jinja's own filter would HTML-escape `<` and `&`);
- `{% generation %}...{% endgeneration %}` (marks assistant text for training masks)
  renders its body unchanged;
- variables: `messages` (keys whose value is None dropped), `add_generation_prompt`,
  `tools`/`documents` (None here) and the named special tokens from the config
  (`bos_token`, `eos_token`, `unk_token`, `sep_token`, `pad_token`, `cls_token`, `mask_token`).
The rendered text already holds every control token (a BOS, role markers), so it is
encoded with special tokens allowed and nothing added, as transformers does.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from lmstack.tokenizer.base import TokenizerError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"


class ChatTemplateError(TokenizerError):
    """The template cannot be read or compiled, or it refused these messages."""


class NoChatTemplate(ChatTemplateError):
    """The model has no Jinja template and its tokenizer lacks lmstack's chat tokens."""


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: "<s>" or {"content": "<s>", ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_template(raw: Any, source: str) -> str | None:
    if raw is None or isinstance(raw, str):
        return raw
    if isinstance(raw, list):  # [{"name": "default", "template": "..."}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in raw if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise ChatTemplateError(f"{source}: chat_template holds the templates {sorted(map(str, named))} but no "
                                "'default'; pass one with --chat-template FILE")
    raise ChatTemplateError(f"{source}: chat_template must be a string or a list of {{name, template}}, "
                            f"got {type(raw).__name__}")


@lru_cache(maxsize=8)
def _compile(source: str):
    """Compile once per template text: the environment transformers builds, minus its
    training-mask bookkeeping."""
    try:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("chat templates need jinja2; install it with: pip install 'lmstack[serve]'") from None

    class Generation(Extension):
        """`{% generation %}body{% endgeneration %}` -> body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {e.message} (line {e.lineno})") from None


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None, origin: str = "chat template"):
        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"{origin}: the chat template is empty")
        self.source, self.origin = source, origin
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if k in SPECIAL_TOKEN_NAMES and v}
        self._template = _compile(source)

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @classmethod
    def from_pretrained(cls, path: str | Path, template_file: str | Path | None = None) -> "ChatTemplate | None":
        """The template of a checkpoint folder, or `template_file`'s text in its place (the
        folder still supplies bos_token/eos_token). None when there is neither."""
        path = Path(path)
        config: dict = {}
        config_file = path / CONFIG_FILE
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ChatTemplateError(f"cannot read {config_file}: {e}") from None
            if not isinstance(config, dict):
                raise ChatTemplateError(f"{config_file} must hold a JSON object")
        specials = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        if template_file is not None:
            template_file = Path(template_file)
            try:
                return cls(template_file.read_text(encoding="utf-8"), specials, origin=str(template_file))
            except (OSError, UnicodeDecodeError) as e:
                raise ChatTemplateError(f"cannot read the chat template file {template_file}: {e}") from None
        if (path / TEMPLATE_FILE).is_file():   # transformers reads this file before the config entry
            return cls((path / TEMPLATE_FILE).read_text(encoding="utf-8"), specials, origin=str(path / TEMPLATE_FILE))
        source = _pick_template(config.get("chat_template"), str(config_file))
        return None if source is None else cls(source, specials, origin=str(config_file))

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
        """The prompt text for `messages` (dicts with 'role' and 'content', as OpenAI sends)."""
        import jinja2

        if not isinstance(messages, (list, tuple)) or not messages:
            raise ChatTemplateError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
        if not all(isinstance(m, dict) for m in messages):
            raise ChatTemplateError("every message must be a dict with 'role' and 'content'")
        # transformers drops None values: templates test `message.content is defined`.
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        context = {**self.special_tokens, "tools": None, "documents": None, **variables}
        try:
            return self._template.render(messages=plain, add_generation_prompt=add_generation_prompt, **context)
        except jinja2.exceptions.TemplateError as e:  # raise_exception(...), a security refusal, a bad filter
            raise ChatTemplateError(f"the chat template refused these messages: {e}") from None
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from None


def encode_chat(messages: list[dict], tokenizer, template: ChatTemplate | None = None,
                add_generation_prompt: bool = True, tools: list[dict] | None = None) -> list[int]:
    """Prompt ids for `messages` ({"role", "content"} dicts): rendered by `template` when there
    is one (its text holds every control token, so specials are honoured, as transformers
    does), else by lmstack's own template, which needs the tokenizer's chat tokens.
    `tools` (OpenAI tool definitions) reach a Jinja template as its `tools` variable; lmstack's
    own template has no place for them (the caller writes tool turns as text)."""
    from lmstack.tokenizer.chat import has_chat_tokens

    if template is not None:
        extra = {"tools": tools} if tools else {}
        return tokenizer.encode(template.render(messages, add_generation_prompt=add_generation_prompt, **extra),
                                allowed_special="all")
    if not has_chat_tokens(tokenizer):
        raise NoChatTemplate("this model has no chat template: no Jinja template came with it and its tokenizer "
                             "lacks lmstack's chat tokens")
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return list(tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt))


def chat_stop_token_ids(tokenizer, template: ChatTemplate | None = None) -> list[int] | None:
    """Where the assistant's turn ends: `<|end|>` in our template; a Jinja template's
    `eos_token` (e.g. <|im_end|>, <|eot_id|>), which may differ from the model's EOS."""
    from lmstack.tokenizer.chat import END

    specials = getattr(tokenizer, "special_tokens", None) or {}
    end = template.eos_token if template is not None else END
    return [specials[end]] if end in specials else None
