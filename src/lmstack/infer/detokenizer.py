"""Incremental detokenization and stop strings.

Tokens arrive one at a time, but one character may span several byte-level tokens (an
emoji is 4 UTF-8 bytes, often 2-4 tokens). So we keep the output's bytes that do not yet
form complete characters and only turn complete characters into text; a multi-byte
character is never split, never shown half-formed as U+FFFD.

Stop strings are searched in the text, only in the part that can contain a new match (the
new characters plus len(stop) - 1 before them). On a match the text is cut where the stop
string starts: the stop text is not returned. While a sequence runs, the last
len(longest stop) - 1 characters are held back from streaming, since they might be the start
of a stop string that the next token completes.

Two classes: `Detokenizer` maps token ids to bytes for the engine's tokenizer (shared,
cached); `IncrementalDetokenizer` is one completion's text state (the request owns one per
completion). Ids the tokenizer has no text for decode to nothing: a checkpoint's vocab is
often padded past its tokenizer's (to a multiple of 64 or 128 for fast matmuls), and a
sampled padding id must not fail the batch.
"""
from __future__ import annotations

from lmstack.tokenizer.base import TokenizerError


def split_complete_utf8(buf: bytes) -> tuple[bytes, bytes]:
    """(complete, pending): pending is a trailing, still incomplete UTF-8 sequence."""
    n = len(buf)
    for back in range(1, min(4, n) + 1):
        b = buf[n - back]
        if b & 0xC0 == 0x80:          # continuation byte: keep looking for the lead byte
            continue
        if b & 0x80 == 0:             # ASCII: nothing pending
            return buf, b""
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        if back < need:               # lead byte whose sequence is not complete yet
            return buf[:n - back], buf[n - back:]
        return buf, b""
    return buf, b""                   # only continuation bytes: invalid, decode with replacement


class Detokenizer:
    """Token id -> bytes (and text, for logprobs) for one tokenizer; None = no text at all."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        specials = getattr(tokenizer, "special_tokens", None) or {}
        self.special_ids = set(specials.values())
        self.n_vocab: int | None = getattr(tokenizer, "n_vocab", None)
        self._cache: dict[int, bytes] = {}

    def token_bytes(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            b = self._cache[token_id] = self._lookup(token_id)
        return b

    def _lookup(self, token_id: int) -> bytes:
        if self.tokenizer is None or (self.n_vocab is not None and not 0 <= token_id < self.n_vocab):
            return b""                      # a padding id past the tokenizer's vocab
        try:
            return self.tokenizer.decode_bytes([token_id])
        except (TokenizerError, KeyError, IndexError):
            return b""                      # an id inside the range that has no text (a hole)

    def decode_token(self, token_id: int) -> str:
        """One token as text (for logprobs); partial characters show as U+FFFD."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def incremental(self, params) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, params)


class IncrementalDetokenizer:
    """One completion's text: complete characters so far (stop text cut) + pending bytes."""

    def __init__(self, detokenizer: Detokenizer, params):
        self.detokenizer = detokenizer
        self.params = params
        self.text = ""                    # detokenized output with the stop text removed
        self.pending = b""                # bytes of output tokens not yet valid UTF-8 text

    def append(self, token_id: int, num_output_tokens: int) -> str | None:
        """Add one token's text (the sequence now has num_output_tokens); return the stop
        string matched, if any."""
        detok, params = self.detokenizer, self.params
        if detok.tokenizer is None:
            return None
        if not (params.skip_special_tokens and token_id in detok.special_ids):
            self.pending += detok.token_bytes(token_id)
        done, self.pending = split_complete_utf8(self.pending)
        if not done:
            return None
        old_len = len(self.text)
        self.text += done.decode("utf-8", errors="replace")
        if params.stop and num_output_tokens >= params.min_tokens:
            for stop in params.stop:
                idx = self.text.find(stop, max(0, old_len - len(stop) + 1))
                if idx != -1:
                    self.text = self.text[:idx]
                    return stop
        return None

    def flush(self) -> None:
        """At the end: whatever bytes are left become text (invalid ones as U+FFFD)."""
        if self.pending:
            self.text += self.pending.decode("utf-8", errors="replace")
            self.pending = b""

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: all of it when finished, else minus a possible stop prefix."""
        if finished or not self.params.stop:
            return self.text
        hold = max(len(s) for s in self.params.stop) - 1
        return self.text[:max(len(self.text) - hold, 0)]
