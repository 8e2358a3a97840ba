"""The encoder-only model (arch="encoder", BERT): the bidirectional Transformer with a masked-LM
head, a mean-pooled output (a dense retriever's embedding) and a sequence classifier.

    model = Encoder(ModelConfig.preset("bert-tiny"))
    logits = model(input_ids)                               # (B, T, vocab_size) masked-LM logits
    vecs = model.embed(input_ids, attention_mask)           # (B, n_embd) mean over real tokens
    clf = model.with_labels(4)                              # + a classifier on the pooled vector
    label_logits = clf.classify(input_ids, attention_mask)  # (B, 4)

The stack is the Transformer's (mask="bidirectional"; BERT's segments and embedding norm are
config fields there). What the encoder adds is its heads:
  - the masked-LM head of BERT: transform (dense -> the MLP's activation -> norm), then the LM
    head (tied to the token embedding unless tie_embeddings=False) with a bias per word;
  - `embed`: the mean of the final hidden states over non-padding tokens (Sentence-BERT's
    mean pooling), the vector a dense retriever compares;
  - with n_labels > 0, `score`: a linear layer on that pooled vector -> label logits.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lmstack.model.config import ModelConfig
from lmstack.model.layers import activation, make_norm
from lmstack.model.transformer import Transformer, positions_from_mask
from lmstack.utils import LmstackError


class Encoder(Transformer):
    ARCH = "encoder"

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        C = cfg.n_embd
        self.lm_head.bias = nn.Parameter(torch.zeros(cfg.vocab_size))      # BERT's per-word output bias
        self.head_transform = nn.Linear(C, C)
        self.head_act = activation(cfg.mlp)
        self.head_norm = make_norm(cfg)
        self.score = nn.Linear(C, cfg.n_labels) if cfg.n_labels else None
        self._init_params(self.head_transform, cfg.n_layer)
        if self.score is not None:
            self._init_params(self.score, cfg.n_layer)

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                      token_type_ids: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> the final hidden states (B, T, n_embd). attention_mask (B, T):
        1 = token, 0 = padding (never attended); token_type_ids (B, T): BERT's segments."""
        positions = None if attention_mask is None else positions_from_mask(attention_mask, tuple(input_ids.shape))
        x, ctx = self._embed(input_ids, positions, None, None, token_type_ids=token_type_ids)
        for block in self.blocks:
            x = block(x, ctx)
        return self.norm_f(x)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """input_ids (B, T) -> masked-LM logits (B, T, vocab_size)."""
        return self.logits(self.hidden_states(input_ids, attention_mask, token_type_ids))

    def logits(self, h: Tensor) -> Tensor:
        """The masked-LM head: (..., C) -> (..., vocab_size)."""
        return super().logits(self.head_norm(self.head_act(self.head_transform(h))))

    def embed(self, input_ids: Tensor, attention_mask: Tensor | None = None,
              token_type_ids: Tensor | None = None, normalize: bool = False) -> Tensor:
        """The pooled output (B, n_embd): the mean of the final hidden states over the tokens
        attention_mask marks (all when None); unit length if `normalize` (cosine retrieval)."""
        h = self.hidden_states(input_ids, attention_mask, token_type_ids)          # (B, T, C)
        if attention_mask is None:
            pooled = h.mean(dim=1)
        else:
            w = attention_mask.to(h.dtype).unsqueeze(-1)                            # (B, T, 1)
            pooled = (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1)
        return nn.functional.normalize(pooled, dim=-1) if normalize else pooled

    def classify(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 token_type_ids: Tensor | None = None) -> Tensor:
        """Label logits (B, n_labels) from the pooled output."""
        if self.score is None:
            raise LmstackError("classify() needs a classification head: this encoder has n_labels=0; make one "
                               "with model.with_labels(n) (or ModelConfig(n_labels=n))")
        return self.score(self.embed(input_ids, attention_mask, token_type_ids))

    def with_labels(self, n_labels: int) -> "Encoder":
        """A copy of this encoder with a fresh classification head of n_labels (the start of
        finetuning a pretrained encoder as a classifier); every other weight is copied."""
        new = Encoder(self.config.replace(n_labels=n_labels)).to(self.wte.weight.device, self.wte.weight.dtype)
        body = {k: v for k, v in self.state_dict().items() if not k.startswith("score.")}
        new.load_state_dict(body, strict=False)            # strict but for the new head
        return new
