"""Text cleaning and noise injection.

`normalize` puts every document in one canonical form before dedupe and tokenization:
Unicode NFC (so "é" is one code point however it was typed), "\\n" line endings, no
control characters, no trailing spaces, no leading/trailing blank lines.

`add_noise` corrupts a fraction of training documents on purpose, to study robustness:
typos (character swaps, drops, doublings, substitutions), shuffles (two neighbouring words
swapped), and label noise on task records (the correct response swapped with the rejected
one). It is seeded, so the same corpus and seed give the same noise.
"""
from __future__ import annotations

import random
import re
import unicodedata

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING = re.compile(r"[ \t]+\n")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    return _TRAILING.sub("\n", text).strip()


def typo(rng: random.Random, text: str, n_edits: int = 1) -> str:
    """`n_edits` random character edits, only inside letters (keeps numbers and layout)."""
    chars = list(text)
    for _ in range(n_edits):
        letters = [i for i, c in enumerate(chars) if c.isalpha()]
        if not letters:
            break
        i = rng.choice(letters)
        kind = rng.choice(("swap", "drop", "double", "replace"))
        if kind == "swap" and i + 1 < len(chars) and chars[i + 1].isalpha():
            chars[i], chars[i + 1] = chars[i + 1], chars[i]
        elif kind == "drop":
            del chars[i]
        elif kind == "double":
            chars.insert(i, chars[i])
        else:
            chars[i] = rng.choice("abcdefghijklmnopqrstuvwxyz")
    return "".join(chars)


def shuffle_words(rng: random.Random, text: str) -> str:
    """Swap two neighbouring words on one line."""
    lines = text.split("\n")
    candidates = [i for i, line in enumerate(lines) if len(line.split(" ")) >= 2]
    if not candidates:
        return text
    li = rng.choice(candidates)
    words = lines[li].split(" ")
    j = rng.randrange(len(words) - 1)
    words[j], words[j + 1] = words[j + 1], words[j]
    lines[li] = " ".join(words)
    return "\n".join(lines)


def add_noise(rng: random.Random, text: str, record: dict | None, p: float) -> tuple[str, dict | None, str]:
    """With probability p corrupt one document: label noise for a task record, else a typo or a
    shuffle. Returns (text, record, kind) with kind in {"", "typo", "shuffle", "label"}."""
    if p <= 0 or rng.random() >= p:
        return text, record, ""
    if record is not None and record.get("rejected"):
        # the record stays self-consistent: answer == response.strip(), document == prompt + response
        noisy = dict(record, response=record["rejected"], rejected=record["response"],
                     answer=record["rejected"].strip())
        return noisy["prompt"] + noisy["response"], noisy, "label"
    if rng.random() < 0.5:
        return typo(rng, text, n_edits=rng.randint(1, 3)), record, "typo"
    return shuffle_words(rng, text), record, "shuffle"
