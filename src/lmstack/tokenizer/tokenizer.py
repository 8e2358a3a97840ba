"""`Tokenizer`: byte-level BPE with special tokens, mirroring tiktoken's API.

    tok = Tokenizer.train(texts, vocab_size=4096, pattern="gpt4", special_tokens=["<|endoftext|>"])
    ids = tok.encode("hello <|endoftext|>", allowed_special="all")
    tok.decode(ids); tok.save("tokenizer.json"); Tokenizer.load("tokenizer.json")

Two encoders give identical ids: our own (`bpe_merge` per pre-tokenized chunk, with a chunk
cache) and tiktoken, used when installed and when the vocabulary is one tiktoken can
express (ids of merged tokens follow merge order, every token reachable by its merges).
`set_backend("python")` forces ours. On disk a tokenizer is a Hugging Face tokenizer.json
(see hf_json.py); the chat template lives in chat.py.
"""
from __future__ import annotations

import os
from typing import AbstractSet, Collection, Iterable, Literal

from lmstack.tokenizer import chat, hf_json
from lmstack.tokenizer.base import (DEFAULT_SPECIAL_TOKENS, TokenizerError, bpe_merge, check_ids,
                                    compile_pattern, resolve_pattern, special_splitter)
from lmstack.tokenizer.trainer import count_chunks, train_bpe

_CACHE_LIMIT = 200_000  # chunks remembered by the pure-Python encoder before it starts over


class Tokenizer:
    """A byte-level BPE vocabulary: `vocab[id] = bytes`, `merges` in rank order, specials."""

    def __init__(self, vocab: dict[int, bytes], merges: list[tuple[int, int]],
                 special_tokens: dict[str, int] | None = None, pattern: str = "gpt4",
                 ignore_merges: bool = False, max_id_gaps: int = 0):
        # ids first: n_vocab = max id + 1 sizes the decode table, so a corrupt or hostile id
        # (10**9) must be refused before anything is allocated.
        self.n_vocab = check_ids(vocab, special_tokens or {}, max_id_gaps)
        self.pattern, self.pat_str = resolve_pattern(pattern)
        self._pat = compile_pattern(self.pat_str)
        self.vocab = dict(vocab)
        self.merges = [tuple(m) for m in merges]
        self.ignore_merges = ignore_merges  # HF option: a chunk that is a whole token skips BPE
        self._special_tokens = dict(special_tokens or {})
        self._bytes_to_id = {b: i for i, b in self.vocab.items()}
        if len(self._bytes_to_id) != len(self.vocab):
            raise TokenizerError("vocab maps two ids to the same bytes; every token must be distinct")
        self._byte_ids = [self._bytes_to_id.get(bytes([b])) for b in range(256)]
        # (a, b) -> (rank, id of the merged token)
        self._ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (a, b) in enumerate(self.merges):
            if a not in self.vocab or b not in self.vocab:
                raise TokenizerError(f"merge #{rank} uses unknown token id {a if a not in self.vocab else b}")
            new = self._bytes_to_id.get(self.vocab[a] + self.vocab[b])
            if new is None:
                raise TokenizerError(f"merge #{rank} makes {self.vocab[a] + self.vocab[b]!r}, "
                                     f"which is not in the vocab")
            self._ranks.setdefault((a, b), (rank, new))
        self._decoder: list[bytes | None] = [None] * self.n_vocab
        for i, bts in self.vocab.items():
            self._decoder[i] = bts
        for s, i in self._special_tokens.items():
            self._decoder[i] = s.encode("utf-8")
        self._cache: dict[str, list[int]] = {}
        self._tiktoken = None            # built lazily by _fast()
        self._backend = "auto"
        self._self_consistent = False    # every merged token re-encodes to itself (checked lazily)

    # ------------------------------------------------------------------ construction
    @classmethod
    def train(cls, texts: Iterable[str] | str, vocab_size: int = 4096, pattern: str = "gpt4",
              special_tokens: Iterable[str] | None = None, min_frequency: int = 2,
              show_progress: bool | None = None) -> "Tokenizer":
        """Learn BPE merges from `texts`. `vocab_size` counts bytes, merges and specials.
        Progress bars show on a terminal unless show_progress=False (or LMSTACK_NO_PROGRESS=1)."""
        specials = list(DEFAULT_SPECIAL_TOKENS if special_tokens is None else special_tokens)
        name, pat_str = resolve_pattern(pattern)
        if len(set(specials)) != len(specials) or any(not isinstance(s, str) or not s for s in specials):
            raise TokenizerError(f"special tokens must be distinct non-empty strings, got {specials!r}")
        floor = 256 + len(specials)
        if not isinstance(vocab_size, int) or vocab_size < floor:
            raise TokenizerError(f"vocab_size={vocab_size} is too small: it must be at least 256 bytes + "
                                 f"{len(specials)} special tokens = {floor}")
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise TokenizerError(f"min_frequency={min_frequency} must be an integer >= 1")
        if isinstance(texts, str):
            texts = [texts]
        counts = count_chunks(texts, pat_str, specials, show_progress=show_progress)
        if not counts:
            raise TokenizerError("the training text is empty; pass at least one non-empty text")
        merges = train_bpe(counts, vocab_size - floor, min_frequency, show_progress=show_progress)
        vocab = {i: bytes([i]) for i in range(256)}
        for a, b in merges:
            vocab[len(vocab)] = vocab[a] + vocab[b]
        n = len(vocab)
        tok = cls(vocab, merges, {s: n + k for k, s in enumerate(specials)}, pattern=name)
        # Trained merges are self-consistent by construction: the bytes of a token merged
        # inside some chunk re-encode, alone, by the same merges in the same order (no merge
        # from outside its span could have touched them without crossing the token).
        tok._self_consistent = True
        return tok

    def save(self, path: str | os.PathLike) -> None:
        """Write a Hugging Face tokenizer.json (atomically)."""
        hf_json.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, max_id_gaps: int = 0) -> "Tokenizer":
        """Read a byte-level BPE tokenizer.json (ours or HF's); a folder means folder/tokenizer.json.
        Ids must be 0..n-1 for the n tokens in the file; `max_id_gaps` allows that many unused ids."""
        kwargs = hf_json.load(path)
        try:
            return cls(**kwargs, max_id_gaps=max_id_gaps)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    # ------------------------------------------------------------------ properties
    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def eot_token(self) -> int | None:
        return self._special_tokens.get("<|endoftext|>")

    def token_bytes(self, token_id: int) -> bytes:
        return self._lookup(token_id)

    def __getstate__(self) -> dict:   # pickle the vocabulary, not caches or the tiktoken object
        return {"vocab": self.vocab, "merges": self.merges, "special_tokens": self._special_tokens,
                "pattern": self.pattern, "ignore_merges": self.ignore_merges, "backend": self._backend,
                "max_id_gaps": self.n_vocab - len(self.vocab) - len(self._special_tokens)}

    def __setstate__(self, state: dict) -> None:
        backend = state.pop("backend", "auto")
        self.__init__(**state)
        self._backend = backend

    def __repr__(self) -> str:
        return (f"Tokenizer(n_vocab={self.n_vocab}, merges={len(self.merges)}, pattern={self.pattern!r}, "
                f"special_tokens={len(self._special_tokens)})")

    # ------------------------------------------------------------------ backends
    @property
    def backend(self) -> str:
        """The encoder in use: "tiktoken" or "python"."""
        return "tiktoken" if self._fast() is not None else "python"

    def set_backend(self, name: Literal["auto", "python", "tiktoken"]) -> "Tokenizer":
        if name not in ("auto", "python", "tiktoken"):
            raise TokenizerError(f"unknown backend {name!r}; valid: auto, python, tiktoken")
        if name == "tiktoken" and not self._tiktoken:
            self._tiktoken = self.to_tiktoken()  # raises with the reason when it cannot be used
        self._backend = name
        return self

    def _fast(self):
        if self._backend == "python":
            return None
        if self._tiktoken is None:
            try:
                self._tiktoken = self.to_tiktoken()
            except (ImportError, TokenizerError):
                self._tiktoken = False
        return self._tiktoken or None

    def to_tiktoken(self):
        """A `tiktoken.Encoding` giving the same ids (ranks = our ids)."""
        import tiktoken

        problem = self._tiktoken_problem()
        if problem:
            raise TokenizerError(f"this vocabulary cannot be expressed as tiktoken ranks: {problem}")
        # tiktoken needs a pattern; "none" = the whole text is one chunk
        pat_str = self.pat_str if self.pat_str is not None else r"[\s\S]+"
        return tiktoken.Encoding(name=f"lmstack-{self.n_vocab}", pat_str=pat_str,
                                 mergeable_ranks={b: i for i, b in self.vocab.items()},
                                 special_tokens=dict(self._special_tokens))

    def _tiktoken_problem(self) -> str | None:
        """Why tiktoken would encode differently from our BPE, or None if it would not.

        tiktoken merges any adjacent pair whose concatenation is a token, lowest id first,
        and looks a whole chunk up before running BPE. That equals merge-rank BPE when the
        vocab is exactly bytes + merge results, merged ids grow with merge rank, and every
        merged token's bytes encode back to that single token."""
        if any(i is None for i in self._byte_ids):
            return "some of the 256 single bytes have no token"
        if len(self.vocab) != 256 + len(self.merges):
            return "the vocab holds tokens that no merge produces"
        last = -1
        for rank in range(len(self.merges)):
            new = self._ranks[self.merges[rank]][1]
            if new <= last:
                return f"merge #{rank} makes id {new}, not larger than the previous merge's id {last}"
            last = new
        if not self._self_consistent:   # O(vocab) BPE runs: done once, for loaded files
            for pair in self.merges:
                new = self._ranks[pair][1]
                if self._bpe(self.vocab[new], whole_lookup=False) != [new]:
                    return f"token {new} ({self.vocab[new]!r}) does not encode to itself"
            self._self_consistent = True
        return None

    # ------------------------------------------------------------------ encoding
    def _bpe(self, data: bytes, whole_lookup: bool = True) -> list[int]:
        if self.ignore_merges and whole_lookup:
            whole = self._bytes_to_id.get(data)
            if whole is not None:
                return [whole]
        byte_ids = self._byte_ids
        try:
            ids = [byte_ids[b] for b in data]
            if None in ids:
                raise TypeError
        except TypeError:
            bad = next(b for b in data if byte_ids[b] is None)
            raise TokenizerError(f"byte 0x{bad:02x} has no token in this vocabulary; "
                                 f"use a tokenizer trained with all 256 bytes") from None
        return bpe_merge(ids, self._ranks)

    def _encode_chunks(self, text: str) -> list[int]:
        """Pure-Python ordinary encoding: pre-tokenize, then BPE each chunk once (cached)."""
        if not text:
            return []
        chunks = [text] if self._pat is None else self._pat.findall(text)
        cache = self._cache
        if len(cache) > _CACHE_LIMIT:
            cache.clear()
        out: list[int] = []
        extend = out.extend
        try:
            for chunk in chunks:
                ids = cache.get(chunk)
                if ids is None:
                    ids = cache[chunk] = self._bpe(chunk.encode("utf-8"))
                extend(ids)
        except UnicodeEncodeError:
            # lone surrogates cannot be UTF-8: mend them as tiktoken does (-> U+FFFD)
            return self._encode_chunks(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
        return out

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode with special-token strings treated as plain text."""
        fast = self._fast()
        return fast.encode_ordinary(text) if fast is not None else self._encode_chunks(text)

    def _allowed(self, allowed_special) -> Literal["all"] | AbstractSet[str]:
        """Normalize `allowed_special` (a list works too) and reject names we do not have."""
        if allowed_special == "all":
            return "all"
        if not isinstance(allowed_special, AbstractSet):
            allowed_special = frozenset(allowed_special)
        if allowed_special and not allowed_special <= self._special_tokens.keys():
            unknown = sorted(set(allowed_special) - set(self._special_tokens))
            raise TokenizerError(f"allowed_special names unknown special tokens {unknown}; "
                                 f"this tokenizer has {sorted(self._special_tokens)}")
        return allowed_special

    def _check_disallowed(self, text: str, allowed, disallowed_special) -> None:
        """Raise (tiktoken's rule) if `text` holds a special token that is not allowed."""
        allowed = set(self._special_tokens) if allowed == "all" else set(allowed)
        if disallowed_special == "all":
            disallowed = frozenset(set(self._special_tokens) - allowed)
        else:
            disallowed = frozenset(disallowed_special)
        found = special_splitter(disallowed).search(text) if disallowed else None
        if found:
            tok = found.group(0)
            raise TokenizerError(
                f"text contains the special token {tok!r}, which is disallowed; pass "
                f"allowed_special={{{tok!r}}} (or \"all\") to encode it as a special token, or "
                f"disallowed_special=() to encode it as ordinary text")

    def encode(self, text: str, allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
               disallowed_special: Literal["all"] | Collection[str] = "all") -> list[int]:
        """Encode like tiktoken: a special token in `text` becomes its id only if allowed;
        a disallowed one raises (ValueError); the rest are encoded as plain text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        allowed = self._allowed(allowed_special)
        fast = self._fast()
        if fast is not None:
            try:
                return fast.encode(text, allowed_special=allowed, disallowed_special=disallowed_special)
            except ValueError:  # re-raise with our message (which token, how to allow it)
                self._check_disallowed(text, allowed, disallowed_special)
                raise
        self._check_disallowed(text, allowed, disallowed_special)
        allowed = self._special_tokens.keys() if allowed == "all" else allowed
        if not allowed or not any(s in text for s in allowed):
            return self._encode_chunks(text)
        out: list[int] = []
        for k, piece in enumerate(special_splitter(frozenset(allowed)).split(text)):
            if k % 2:  # odd pieces are the captured special tokens
                out.append(self._special_tokens[piece])
            else:
                out.extend(self._encode_chunks(piece))
        return out

    def encode_batch(self, texts: list[str], allowed_special: Literal["all"] | AbstractSet[str] = frozenset(),
                     disallowed_special: Literal["all"] | Collection[str] = "all") -> list[list[int]]:
        allowed = self._allowed(allowed_special)
        fast = self._fast()
        if fast is not None:
            try:
                return fast.encode_batch(list(texts), allowed_special=allowed, disallowed_special=disallowed_special)
            except ValueError:
                pass  # fall through: the loop below raises our message
        return [self.encode(t, allowed, disallowed_special) for t in texts]

    def encode_ordinary_batch(self, texts: list[str]) -> list[list[int]]:
        fast = self._fast()
        if fast is not None:
            return fast.encode_ordinary_batch(list(texts))
        return [self._encode_chunks(t) for t in texts]

    # ------------------------------------------------------------------ decoding
    def _lookup(self, token_id: int) -> bytes:
        try:
            bts = self._decoder[token_id] if token_id >= 0 else None
        except (IndexError, TypeError):
            bts = None
        if bts is None:
            raise TokenizerError(f"token id {token_id!r} is not in this vocabulary (n_vocab={self.n_vocab})")
        return bts

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        ids = list(ids)
        if not ids or min(ids) >= 0:  # negative ids would index from the end: slow path
            try:
                return b"".join([self._decoder[i] for i in ids])
            except (IndexError, TypeError):
                pass
        return b"".join(self._lookup(i) for i in ids)  # slow path: find and name the bad id

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    # ------------------------------------------------------------------ chat
    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """Chat messages -> (ids, loss_mask); format in lmstack.tokenizer.chat."""
        return chat.render_chat(self, messages, add_generation_prompt)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        return chat.render_chat(self, messages, add_generation_prompt)[0]
