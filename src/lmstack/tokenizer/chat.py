"""The lmstack chat template: messages -> token ids plus a loss mask.

Each message is its role token, its content encoded as ordinary text, and `<|end|>`:

    <|system|>You are terse.<|end|><|user|>2+2?<|end|><|assistant|>4<|end|>

- Roles: "system", "user", "assistant" (role tokens `<|system|>`, `<|user|>`,
  `<|assistant|>`); no newlines or other glue are added between the pieces.
- Content is encoded with `encode_ordinary`: a user typing "<|end|>" gets the plain-text
  tokens for those characters, never the control token (no prompt injection).
- `add_generation_prompt=True` appends `<|assistant|>` so the model continues with the
  reply; generation should stop at `<|end|>`.
- loss_mask (same length as ids) is 1 on every assistant content token and on the
  `<|end|>` that closes an assistant message (the model must learn to stop), 0 elsewhere.

Checkpoints from elsewhere bring their own template as Jinja text: see chat_template.py.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from lmstack.tokenizer.base import TokenizerError

if TYPE_CHECKING:
    from lmstack.tokenizer.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"


def role_token(role: str) -> str:
    return f"<|{role}|>"


def chat_tokens() -> list[str]:
    """The special tokens this template needs."""
    return [role_token(r) for r in ROLES] + [END]


def has_chat_tokens(tok) -> bool:
    specials = getattr(tok, "special_tokens", None) or {}
    return all(s in specials for s in chat_tokens())


def _check(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise TokenizerError(f"message #{k} must be a dict with 'role' and 'content', got {m!r:.80}")
        if m["role"] not in ROLES:
            raise TokenizerError(f"message #{k} has unknown role {m['role']!r}; valid roles: {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise TokenizerError(f"message #{k} content must be a str, got {type(m['content']).__name__}")


def render_chat(tok: "Tokenizer", messages, add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """-> (ids, loss_mask) for `messages` in the format above."""
    _check(messages)
    specials = tok.special_tokens
    needed = chat_tokens()
    missing = [s for s in needed if s not in specials]
    if missing:
        raise TokenizerError(f"this tokenizer lacks the chat special tokens {missing}; train it with "
                             f"special_tokens including {needed}")
    end = specials[END]
    ids: list[int] = []
    mask: list[int] = []
    for m in messages:
        body = tok.encode_ordinary(m["content"]) + [end]
        learn = 1 if m["role"] == "assistant" else 0
        ids.append(specials[role_token(m["role"])])
        mask.append(0)
        ids.extend(body)
        mask.extend([learn] * len(body))
    if add_generation_prompt:
        ids.append(specials[role_token("assistant")])
        mask.append(0)
    return ids, mask
