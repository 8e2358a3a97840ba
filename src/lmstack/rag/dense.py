"""Dense text embeddings from a language model's hidden states.

    enc = DenseEncoder(model, tokenizer, layer=-1)
    E = enc.encode(["text one", "text two"])     # (2, n_embd) float32, rows of unit length

An embedding is the mean of one layer's hidden states over the text's tokens, L2-normalised,
so a dot product of two embeddings is their cosine similarity. The hidden states come from
`Transformer.introspect` (the model's explicit-math forward that returns every layer), which
is exact for this: no new model code. Layer 0 is the token embeddings, layer n_layer the
last block's output after the final norm (Hugging Face's `hidden_states` convention);
negative indices count from the end. Middle layers of a small causal LM often carry more of
the "what is this about" than the last, which is busy predicting the next token; the RAG
benchmark reports recall per layer.

Batches are right-padded. Padded slots get position -1, which the attention mask treats as
padding (no query attends to them), and the mean is taken over the real tokens only, so a
text's embedding does not depend on what it was batched with. Texts longer than the
context are cut to the context (their first tokens), and the number cut is counted in
`truncated`.
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from lmstack.utils import LmstackError


class DenseEncoder:
    kind = "hidden_states"        # recorded in an index: which encoder class embeds its queries

    def __init__(self, model, tokenizer, layer: int = -1, batch_size: int = 32, max_tokens: int | None = None):
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(model, "introspect"):
            raise LmstackError(f"DenseEncoder needs an lmstack Transformer (with introspect()), "
                               f"got {type(model).__name__}")
        n_layers = cfg.n_layer + 1                       # embeddings + one per block
        if not -n_layers <= layer < n_layers:
            raise LmstackError(f"layer={layer} is out of range: the model has hidden states 0..{cfg.n_layer} "
                               f"(or -1..-{n_layers})")
        if batch_size < 1:
            raise LmstackError(f"batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer = model, tokenizer
        self.layer = layer % n_layers
        self.batch_size = batch_size
        self.max_tokens = min(max_tokens or cfg.context_length, cfg.context_length)
        self.dim = cfg.n_embd
        self.truncated = 0

    @property
    def fingerprint(self) -> str:
        """sha256 of the weights and the layer: an index records it, and a query encoder
        with another fingerprint would give embeddings from a different space."""
        h = hashlib.sha256(f"layer={self.layer}".encode())
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    @torch.no_grad()
    def encode(self, texts: list[str]) -> np.ndarray:
        """(len(texts), dim) float32 unit vectors; an empty text has no tokens and is an error."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        device = next(self.model.parameters()).device
        for s in range(0, len(texts), self.batch_size):
            ids = [self.tokenizer.encode_ordinary(t) for t in texts[s:s + self.batch_size]]
            for j, x in enumerate(ids):
                if not x:
                    raise LmstackError(f"text {s + j} is empty; there is nothing to embed")
                if len(x) > self.max_tokens:
                    self.truncated += 1
                    ids[j] = x[: self.max_tokens]
            tok, pos = right_pad(ids, device)
            out[s:s + len(ids)] = mean_pool(self.features(tok, pos), pos).cpu().numpy()
        return out

    def features(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """(B, T) ids and positions (-1 = padding) -> (B, T, dim) per-token features."""
        return self.model.introspect(tok, positions=pos)["hidden_states"][self.layer]


def right_pad(ids: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (B, T) ids (0 in padding) and positions (-1 = padding, which the
    attention mask treats as no token)."""
    T = max(len(x) for x in ids)
    tok = torch.zeros(len(ids), T, dtype=torch.long)
    pos = torch.full((len(ids), T), -1, dtype=torch.long)
    for j, x in enumerate(ids):
        tok[j, :len(x)] = torch.tensor(x, dtype=torch.long)
        pos[j, :len(x)] = torch.arange(len(x))
    return tok.to(device), pos.to(device)


def mean_pool(h: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """(B, T, C) features, (B, T) positions (-1 = padding) -> (B, C) unit vectors: the mean
    over each row's real tokens, L2-normalised."""
    mask = (pos >= 0).unsqueeze(-1).float()                                                # (B, T, 1)
    mean = (h.float() * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(mean, dim=-1)
