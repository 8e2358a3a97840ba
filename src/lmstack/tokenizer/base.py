"""Pure helpers shared by the trainer and the tokenizer (minbpe's `base.py` role).

- `PATTERNS`: the named pre-tokenization regexes. Text is first cut into chunks by the
  pattern; BPE merges never cross a chunk boundary, which keeps " dog" and "dog." apart.
- The GPT-2 byte-level alphabet: the 256 bytes mapped to 256 printable characters, the
  alphabet Hugging Face's `tokenizer.json` uses to write byte tokens as strings.
- `bpe_merge`: encode one chunk by merge rank (the lowest-ranked adjacent pair merges first,
  leftmost first among equals), the algorithm of tiktoken and of HF `tokenizers`.
"""
from __future__ import annotations

import functools

import regex

from lmstack.utils.errors import LmstackError


class TokenizerError(LmstackError, ValueError):
    """Bad input to the tokenizer: one line naming the problem and the fix.

    Both an `LmstackError` (the CLI prints it as one line) and a `ValueError` (what Python
    code, and tiktoken's users, expect from a bad argument)."""


# cl100k-style ("gpt4") is the classic form minbpe uses; tiktoken's newer spelling adds
# possessive quantifiers and `\s++$`, whose `$` means end-of-LINE in Oniguruma (HF
# tokenizers' regex engine), so it is not portable across the three engines we test.
PATTERNS: dict[str, str | None] = {
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",
    # no pre-tokenization: each text (between special tokens) is one chunk. BPE cost grows
    # with chunk length, so this is for short texts (the textbook example, short records).
    "none": None,
}

# Special tokens every lmstack tokenizer carries: end of text plus the chat roles.
DEFAULT_SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]


def check_ids(vocab: dict[int, bytes], special_tokens: dict[str, int], max_id_gaps: int = 0) -> int:
    """Check the token ids before anything is sized by them -> n_vocab (max id + 1).

    Ids are non-negative ints, unique across the vocab and the special tokens, and the
    largest is below the number of tokens present (+ `max_id_gaps` allowed unused ids). A
    tokenizer is sized by its largest id (decode table, embedding rows), so an id of 10**9
    in a file of 300 tokens is a corrupt or hostile file, never a reason to allocate 8 GB."""
    if not isinstance(max_id_gaps, int) or max_id_gaps < 0:
        raise TokenizerError(f"max_id_gaps={max_id_gaps!r} must be an integer >= 0")
    if not vocab:
        raise TokenizerError("the vocab is empty; a byte-level BPE needs at least the 256 byte tokens")
    owner: dict[int, str] = {}
    named = [(repr(b), i) for i, b in vocab.items()] + [(repr(s), i) for s, i in special_tokens.items()]
    for name, i in named:
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TokenizerError(f"token {name} has id {i!r}, not a non-negative integer")
        if i in owner:
            raise TokenizerError(f"token {name} has id {i}, already used by token {owner[i]}; ids must be unique")
        owner[i] = name
    n, top = len(owner), max(owner)
    if top >= n + max_id_gaps:
        gaps = f" plus {max_id_gaps} allowed unused id(s)" if max_id_gaps else ""
        raise TokenizerError(f"token {owner[top]} has id {top}, but there are only {n} tokens{gaps}, so ids must "
                             f"be below {n + max_id_gaps}; the file is corrupt (pass max_id_gaps to allow "
                             f"unused ids in a sparse vocabulary)")
    return top + 1


def resolve_pattern(pattern: str) -> tuple[str, str | None]:
    """`pattern` is a name from PATTERNS or a regex string -> (name or regex, regex or None)."""
    if pattern in PATTERNS:
        return pattern, PATTERNS[pattern]
    for name, pat in PATTERNS.items():
        if pat == pattern:
            return name, pat
    if any(ch in pattern for ch in "\\[]()|?+*"):  # looks like a regex: compile it to check
        try:
            regex.compile(pattern)
        except regex.error as e:
            raise TokenizerError(f"pattern {pattern!r} is not a valid regex ({e}); "
                                 f"use one of: {', '.join(PATTERNS)}") from None
        return pattern, pattern
    raise TokenizerError(f"unknown pattern {pattern!r}; valid patterns: {', '.join(PATTERNS)}")


def compile_pattern(pat_str: str | None):
    return None if pat_str is None else regex.compile(pat_str)


@functools.lru_cache(maxsize=64)
def special_splitter(specials: frozenset[str]):
    """A regex that cuts text at the given special tokens (longest first), keeping them."""
    alts = sorted(specials, key=lambda s: (-len(s), s))
    return regex.compile("(" + "|".join(regex.escape(s) for s in alts) + ")") if alts else None


def _bytes_to_unicode() -> list[str]:
    """GPT-2's map: printable bytes stand for themselves, the other 68 are shifted to 256+n,
    so every byte is a visible character (space -> 'Ġ', newline -> 'Ċ')."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = [""] * 256, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


BYTE_TO_UNICODE: list[str] = _bytes_to_unicode()
UNICODE_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_UNICODE)}


def bytes_to_bytelevel(data: bytes) -> str:
    return "".join(BYTE_TO_UNICODE[b] for b in data)


def bytelevel_to_bytes(text: str) -> bytes:
    """Inverse of bytes_to_bytelevel; KeyError on a character outside the alphabet."""
    return bytes(UNICODE_TO_BYTE[c] for c in text)


def bpe_merge(ids: list[int], merges: dict[tuple[int, int], tuple[int, int]]) -> list[int]:
    """Merge `ids` (one chunk) by rank: `merges[(a, b)] = (rank, new_id)`.

    Repeatedly take the adjacent pair with the lowest rank and merge all its occurrences,
    left to right. Merging every occurrence at once equals tiktoken's one-at-a-time loop:
    the new token's own merges all rank later, so nothing can come between them.
    """
    while len(ids) >= 2:
        best, best_rank = None, None
        for pair in zip(ids, ids[1:]):
            hit = merges.get(pair)
            if hit is not None and (best_rank is None or hit[0] < best_rank):
                best, best_rank = pair, hit[0]
        if best is None:
            break
        a, b = best
        new_id = merges[best][1]
        out, i, n = [], 0, len(ids)
        while i < n:
            if i < n - 1 and ids[i] == a and ids[i + 1] == b:
                out.append(new_id)
                i += 2
            else:
                out.append(ids[i])
                i += 1
        ids = out
    return ids
