"""Incremental byte-level BPE training.

    merges = train_bpe(texts, n_merges=3840, pat_str=PATTERNS["gpt4"], special_tokens=[...])

The classic loop (minbpe) recounts every pair of the whole corpus after each merge. Here:

1. Pre-tokenize once and count *unique* chunks: Shakespeare's 1.2M chunks are 46k distinct
   words. Each word is held with its frequency and counts that many times.
2. Keep `pair -> count` over all words and `pair -> {word indices}` (where it occurs).
3. A merge touches only the words in `where[pair]`. Its count changes are local: only the
   pairs next to each new token change, so we add/remove those around each occurrence.
4. The best pair comes from a max-heap with lazy deletion: counts of old pairs only ever
   go down (every new pair contains the new token), so a popped entry whose count is stale
   is pushed back with its true count; a fresh entry is the true maximum.

A word is a Python `str` with one character per token: merging a pair in a word is then
`word.replace(pair, new_char)`, which runs in C and is exactly BPE's left-to-right,
non-overlapping merge. Characters are chosen so that comparing two pair strings gives the
tie-break order: bytes sort by their GPT-2 byte-level character (Hugging Face's alphabet
order) and merged tokens after all bytes in creation order. Equal counts therefore go to
the smallest pair in HF `tokenizers`' order, which makes our merges match its BpeTrainer.
"""
from __future__ import annotations

import heapq
from collections import Counter
from typing import Iterable

from lmstack.tokenizer.base import BYTE_TO_UNICODE, compile_pattern, special_splitter
from lmstack.utils.progress import progress

# byte b -> character BYTE_CHAR[b]; chars 0..255 sort like HF's byte-level alphabet.
_ORDER = sorted(range(256), key=lambda b: BYTE_TO_UNICODE[b])
BYTE_CHAR = [""] * 256
for _rank, _b in enumerate(_ORDER):
    BYTE_CHAR[_b] = chr(_rank)
# translate table for a latin-1 decoded UTF-8 string (char i is byte i)
_LATIN1_TO_SYMBOL = {b: BYTE_CHAR[b] for b in range(256)}


def count_chunks(texts: Iterable[str], pat_str: str | None, special_tokens: Iterable[str] = (),
                 show_progress: bool | None = None) -> Counter:
    """Pre-tokenize `texts` and count each distinct chunk. Special-token strings found in
    the text are cut out so that BPE never learns them as ordinary merges."""
    pat = compile_pattern(pat_str)
    specials = list(special_tokens)
    splitter = special_splitter(frozenset(specials))
    counts: Counter = Counter()
    quiet = True if show_progress is False else None   # None: progress() decides (TTY, env)
    for text in progress(texts, desc="pre-tokenizing", unit="text", disable=quiet):
        if not isinstance(text, str):
            raise TypeError(f"training texts must be str, got {type(text).__name__}")
        pieces = [text]
        if splitter is not None and any(s in text for s in specials):
            pieces = [p for p in splitter.split(text) if p and p not in specials]
        for piece in pieces:
            if pat is None:
                counts[piece] += 1
            else:
                counts.update(pat.findall(piece))
    counts.pop("", None)
    return counts


def train_bpe(chunk_counts: Counter, n_merges: int, min_frequency: int = 2,
              show_progress: bool | None = None) -> list[tuple[int, int]]:
    """Learn up to `n_merges` merges from `{chunk: count}`; merge i creates id 256 + i.

    Returns merges as pairs of ids (bytes are ids 0..255). Stops early when no pair occurs
    at least `min_frequency` times (so the vocabulary may come out smaller than asked).
    """
    # words: one symbol string per distinct chunk of >= 2 bytes, with its frequency
    words: list[str] = []
    freqs: list[int] = []
    for chunk, f in chunk_counts.items():
        try:
            data = chunk.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: mended to U+FFFD, as encode() does
            data = chunk.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")
        w = data.decode("latin-1").translate(_LATIN1_TO_SYMBOL)
        if len(w) >= 2:
            words.append(w)
            freqs.append(f)

    pair_counts: dict[str, int] = {}
    # where[pair]: indices of words that contain (or once contained) the pair; duplicates
    # and stale entries are allowed and skipped when the merge finds no pair in the word
    where: dict[str, list[int]] = {}
    for wi, w in enumerate(words):
        f = freqs[wi]
        for i in range(len(w) - 1):
            p = w[i:i + 2]
            pair_counts[p] = pair_counts.get(p, 0) + f
            lst = where.get(p)
            if lst is None:
                where[p] = [wi]
            else:
                lst.append(wi)
    heap = [(-c, p) for p, c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[str] = []
    get = pair_counts.get
    heappush, heappop = heapq.heappush, heapq.heappop
    quiet = True if show_progress is False else None
    bar = progress(total=n_merges, desc="bpe merges", unit="merge", disable=quiet)
    while len(merges) < n_merges and heap:
        neg, pair = heappop(heap)
        count = get(pair, 0)
        if count != -neg:           # stale: the count dropped since this entry was pushed
            if count > 0:
                heappush(heap, (-count, pair))
            continue
        if count < min_frequency:
            break
        new = chr(256 + len(merges))
        merges.append(pair)
        a, b = pair
        touched: dict[str, list[int]] = {}   # new pairs -> words they occur in
        for wi in where.pop(pair):
            w = words[wi]
            if pair not in w:       # stale index: an earlier merge consumed the pair here
                continue
            nw = w.replace(pair, new)
            words[wi] = nw
            if len(nw) == 1:        # the whole word became one token: only (a, b) disappears
                continue
            f = freqs[wi]
            last = len(nw) - 1
            j = nw.find(new)
            while j != -1:
                # left neighbour: pair (L, a) becomes (L, new); in a run of new tokens the
                # previous occurrence's right side already counted (new, new)
                if j > 0:
                    left = nw[j - 1]
                    if left != new:
                        pair_counts[left + a] -= f
                        q = left + new
                        pair_counts[q] = get(q, 0) + f
                        touched.setdefault(q, []).append(wi)
                if j < last:
                    right = nw[j + 1]
                    pair_counts[b + (a if right == new else right)] -= f
                    q = new + right
                    pair_counts[q] = get(q, 0) + f
                    touched.setdefault(q, []).append(wi)
                j = nw.find(new, j + 1)
        del pair_counts[pair]
        for q, lst in touched.items():   # every new pair contains `new`: none existed before
            where[q] = lst
            heappush(heap, (-pair_counts[q], q))
        bar.update(1)
    bar.close()
    return [(_symbol_id(p[0]), _symbol_id(p[1])) for p in merges]


def _symbol_id(ch: str) -> int:
    o = ord(ch)
    return _ORDER[o] if o < 256 else o
