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
"""
from __future__ import annotations

from lmstack.infer.sequence import Sequence


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
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        specials = getattr(tokenizer, "special_tokens", None) or {}
        self.special_ids = set(specials.values())
        self._cache: dict[int, bytes] = {}

    def token_bytes(self, token_id: int) -> bytes:
        b = self._cache.get(token_id)
        if b is None:
            b = self.tokenizer.decode_bytes([token_id])
            self._cache[token_id] = b
        return b

    def decode_token(self, token_id: int) -> str:
        """One token as text (for logprobs); partial characters show as U+FFFD."""
        if self.tokenizer is None:
            return ""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def append(self, seq: Sequence, token_id: int, final: bool = False) -> str | None:
        """Add one token's text to seq.text; return the stop string matched, if any."""
        if self.tokenizer is None:
            return None
        params = seq.sampling_params
        if not (params.skip_special_tokens and token_id in self.special_ids):
            seq.out_bytes += self.token_bytes(token_id)
        done, seq.out_bytes = (seq.out_bytes, b"") if final else split_complete_utf8(seq.out_bytes)
        if not done:
            return None
        old_len = len(seq.text)
        seq.text += done.decode("utf-8", errors="replace")
        if params.stop and len(seq.output_token_ids) >= params.min_tokens:
            for stop in params.stop:
                idx = seq.text.find(stop, max(0, old_len - len(stop) + 1))
                if idx != -1:
                    seq.text = seq.text[:idx]
                    return stop
        return None

    def flush(self, seq: Sequence) -> None:
        """At the end: whatever bytes are left become text (invalid ones as U+FFFD)."""
        if seq.out_bytes:
            seq.text += seq.out_bytes.decode("utf-8", errors="replace")
            seq.out_bytes = b""

    @staticmethod
    def visible_text(seq: Sequence) -> str:
        """Text safe to show now: all of it when finished, else minus a possible stop prefix."""
        if seq.is_finished or not seq.sampling_params.stop:
            return seq.text
        hold = max(len(s) for s in seq.sampling_params.stop) - 1
        return seq.text[:max(len(seq.text) - hold, 0)]
