"""Split documents into overlapping windows of tokens that remember where they came from.

    chunks = chunk_documents([("doc-1", text)], tokenizer, chunk_tokens=128, overlap=32)
    chunks[0].text == text[chunks[0].start:chunks[0].end]     # a char span of the source

Windows are counted in the model's own tokens, so a chunk's size says what it costs in the
prompt. A window starts every `chunk_tokens - overlap` tokens; the overlap keeps a sentence
cut by one window boundary whole in the next window. The last window of a document ends at
the document's end (a short tail is not padded or dropped).

Spans are character offsets into the source text. Tokens are byte sequences and a window
boundary may fall inside a multi-byte character; a span is widened to whole characters
(start rounded down, end rounded up), so `text[start:end]` always decodes and always
contains every byte of the window.
"""
from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass

from lmstack.utils import LmstackError


@dataclass(frozen=True)
class Chunk:
    id: str          # f"{doc_id}#{index within the document}"
    doc_id: str
    start: int       # char offsets into the source document: text == doc[start:end]
    end: int
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


def check_window(chunk_tokens: int, overlap: int) -> None:
    if not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise LmstackError(f"chunk_tokens must be an integer >= 1, got {chunk_tokens!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < chunk_tokens:
        raise LmstackError(f"overlap must be an integer in [0, chunk_tokens={chunk_tokens}), got {overlap!r}")


def _char_starts(text: str) -> list[int]:
    """Byte offset where each character starts, plus the total byte length at the end."""
    out, pos = [], 0
    for ch in text:
        out.append(pos)
        pos += len(ch.encode("utf-8"))
    out.append(pos)
    return out


def chunk_text(doc_id: str, text: str, tokenizer, chunk_tokens: int = 128, overlap: int = 32) -> list[Chunk]:
    """The chunks of one document (none for an empty document)."""
    check_window(chunk_tokens, overlap)
    ids = tokenizer.encode_ordinary(text)
    if not ids:
        return []
    # byte offset of every token boundary: bounds[i] = bytes before token i
    bounds = [0]
    for t in ids:
        bounds.append(bounds[-1] + len(tokenizer.token_bytes(t)))
    starts = _char_starts(text)
    if bounds[-1] != starts[-1]:
        raise LmstackError(f"document {doc_id!r}: the tokenizer does not round-trip this text "
                           f"({bounds[-1]} token bytes for {starts[-1]} text bytes)")
    chunks, step = [], chunk_tokens - overlap
    for k, lo in enumerate(range(0, len(ids), step)):
        hi = min(lo + chunk_tokens, len(ids))
        # widen to whole characters: start down to the char holding byte bounds[lo], end up
        c0 = bisect.bisect_right(starts, bounds[lo]) - 1
        c1 = bisect.bisect_left(starts, bounds[hi])
        chunks.append(Chunk(f"{doc_id}#{k}", doc_id, c0, c1, text[c0:c1]))
        if hi == len(ids):
            break
    return chunks


def chunk_documents(docs, tokenizer, chunk_tokens: int = 128, overlap: int = 32) -> list[Chunk]:
    """Chunks of (doc_id, text) pairs, in document order; doc ids must be unique."""
    out, seen = [], set()
    for doc_id, text in docs:
        if doc_id in seen:
            raise LmstackError(f"document id {doc_id!r} appears twice; ids must be unique")
        seen.add(doc_id)
        out += chunk_text(doc_id, text, tokenizer, chunk_tokens, overlap)
    return out
