"""Endpoints behind the web dashboard: tokenization, the next-token distribution, attention.

These call the model directly (one forward of a short prompt), not the engine, so they run
in a worker thread (`asyncio.to_thread`) under a lock: the event loop keeps streaming other
requests while a forward runs, and two dashboard forwards never compete for the cores.

    POST /v1/internal/tokenize                 text -> tokens (ids, bytes) and spans: a character
                                               cut across tokens is one span with all its ids (as
                                               `lmstack tokenizer viz`); at most
                                               --max-tokenize-tokens tokens (a record is ~70 bytes:
                                               the answer must not dwarf the request)
    POST /v1/internal/next_token_distribution  text + sampler settings -> the distribution the
                                               engine's sampler draws from (temperature, top-k,
                                               top-p, min-p over the whole vocabulary), its
                                               entropy and the number of tokens kept, plus the
                                               top-N tokens. The last prompts' logits are cached,
                                               so moving a slider costs no forward.
    POST /v1/internal/attention                short text -> attention weights per layer and head
    GET  /v1/internal/model_info               whether the model is chat-tuned, as far as its
                                               folder tells (the chat view warns on a base model)
"""
from __future__ import annotations

import asyncio
import json
import math
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, Request

from lmstack.infer.sampler import sampling_probs
from lmstack.infer.sampling_params import SamplingParams
from lmstack.serve.api import ERROR_RESPONSES, ServeState, state_of
from lmstack.serve.convert import chat_prompt_ids, encode_text
from lmstack.serve.errors import APIError
from lmstack.serve.protocol import AttentionRequest, NextTokenRequest, TokenizeRequest, _TextInput
from lmstack.tokenizer.viz import token_spans

router = APIRouter(prefix="/v1/internal", tags=["dashboard"])
_model_lock = threading.Lock()
_logits_cache: OrderedDict = OrderedDict()     # (id(model), prompt ids) -> (vocab,) logits
_CACHE_SIZE = 8


def _specials(s: ServeState) -> set[int]:
    return set((getattr(s.tokenizer, "special_tokens", None) or {}).values())


def _ids(s: ServeState, body: _TextInput) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise APIError(400, "send exactly one of 'prompt' (text) or 'messages' (chat)", param="prompt")
    if body.prompt is not None:
        return encode_text(s.tokenizer, body.prompt)
    return chat_prompt_ids(body.messages, s.tokenizer, s.chat_template)


def _too_many(body: _TextInput, n: int, cap: int, what: str) -> APIError:
    return APIError(400, f"the {'prompt' if body.prompt is not None else 'chat'} has {n} tokens; {what} "
                         f"{cap} tokens, shorten it", param="prompt" if body.prompt is not None else "messages",
                    code="too_many_tokens")


def _token_record(tokenizer, tid: int, specials: set[int]) -> dict:
    raw = bytes(tokenizer.token_bytes(tid))
    return {"id": tid, "text": raw.decode("utf-8", errors="replace"), "bytes": raw.hex(),
            "n_bytes": len(raw), "special": tid in specials}


def _model_of(s: ServeState):
    model = getattr(s.engine, "model", None)
    if model is None:
        raise APIError(503, "the engine does not expose its model; the dashboard's model views are unavailable")
    return model


def _forward(model, ids: list[int], introspect: bool):
    """One forward pass of a single prompt, on the model's device. Called in a thread."""
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    with _model_lock, torch.inference_mode():
        if introspect:
            return model.introspect(x)
        return model(x)[0, -1].float().cpu()                   # (vocab,) logits of the next token


@router.post("/tokenize", responses=ERROR_RESPONSES)
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    s = state_of(request)
    ids = await asyncio.to_thread(_ids, s, body)
    cap = request.app.state.max_tokenize_tokens
    if len(ids) > cap:
        raise _too_many(body, len(ids), cap, "the token view shows at most")
    specials = _specials(s)
    tokens = [_token_record(s.tokenizer, t, specials) for t in ids]
    n_bytes = sum(t["n_bytes"] for t in tokens)
    spans, first = [], 0
    for text, group in token_spans(s.tokenizer, ids):
        spans.append({"text": text, "ids": group, "first": first})
        first += len(group)
    return {"tokens": tokens, "spans": spans, "n_tokens": len(ids), "n_bytes": n_bytes,
            "n_chars": len(body.prompt) if body.prompt is not None else len(s.tokenizer.decode(ids)),
            "bytes_per_token": n_bytes / len(ids) if ids else 0.0}


@router.post("/next_token_distribution", responses=ERROR_RESPONSES)
async def next_token_distribution(body: NextTokenRequest, request: Request) -> dict[str, Any]:
    s = state_of(request)
    ids = await asyncio.to_thread(_ids, s, body)
    if not ids:
        raise APIError(400, "the prompt is empty; type some text first", param="prompt")
    if len(ids) > s.limits.context_length:
        raise APIError(400, f"the prompt has {len(ids)} tokens, above the context length "
                            f"{s.limits.context_length}; shorten it", param="prompt", code="context_length_exceeded")
    model = _model_of(s)
    key = (id(model), tuple(ids))
    logits = _logits_cache.get(key)
    if logits is None:
        logits = await asyncio.to_thread(_forward, model, ids, False)
        _logits_cache[key] = logits
        while len(_logits_cache) > _CACHE_SIZE:
            _logits_cache.popitem(last=False)
    _logits_cache.move_to_end(key)
    try:
        params = SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, min_p=body.min_p)
    except ValueError as e:
        raise APIError(400, f"invalid sampler settings: {e}") from None
    probs = sampling_probs(logits[None].float(), [params])[0].double()   # (vocab,) what the engine draws from
    kept = probs > 0
    sampled_entropy = max(0.0, float(-(probs[kept] * probs[kept].log()).sum()))
    logp = torch.log_softmax(logits.double(), dim=-1)
    entropy = float(-(logp.exp() * logp).sum())      # nats, full vocabulary, temperature 1
    top = torch.topk(logits, min(body.top_n, logits.numel()))
    lse = float(torch.logsumexp(logits.double(), dim=-1))
    specials = _specials(s)
    tokens = []
    for value, tid in zip(top.values.tolist(), top.indices.tolist()):
        rec = _token_record(s.tokenizer, tid, specials)
        rec["logit"] = value
        rec["prob"] = math.exp(value - lse)          # temperature 1, no filter
        rec["p"] = float(probs[tid])                 # after the sampler's settings
        tokens.append(rec)
    return {"prompt_tokens": len(ids), "n_vocab": int(logits.numel()), "logsumexp": lse,
            "entropy": entropy, "sampled_entropy": sampled_entropy, "kept": int(kept.sum()),
            "top_mass": float(probs[top.indices].sum()), "tokens": tokens}


@router.post("/attention", responses=ERROR_RESPONSES)
async def attention(body: AttentionRequest, request: Request) -> dict[str, Any]:
    s = state_of(request)
    cap = request.app.state.max_attention_tokens
    ids = await asyncio.to_thread(_ids, s, body)
    if not ids:
        raise APIError(400, "the prompt is empty; type some text first", param="prompt")
    if len(ids) > cap:
        raise _too_many(body, len(ids), cap, "attention maps are limited to")
    model = _model_of(s)
    if not hasattr(model, "introspect"):
        raise APIError(503, "this model has no introspect() hook; attention maps are unavailable")
    result = await asyncio.to_thread(_forward, model, ids, True)
    # attentions: one (1, H, T, T) tensor per layer -> [layer][head][query][key], 4 decimals
    maps = [[[[round(v, 4) for v in row] for row in head] for head in layer[0].float().cpu().tolist()]
            for layer in result["attentions"]]
    return {"tokens": [_token_record(s.tokenizer, t, _specials(s)) for t in ids],
            "n_layer": len(maps), "n_head": len(maps[0]) if maps else 0, "attentions": maps}


def chat_tuned(path: Path | None) -> tuple[bool | None, str]:
    """(True / False / None = cannot tell, why) from what lmstack writes into a model folder:
    finetune.json (SFT) or an alignment summary mean tuned; a trainer's train_config.json
    without either means pretrained only. A checkpoint (RUN/checkpoints/step_N) is judged by
    its run directory. Hugging Face folders do not say: None."""
    if path is None:
        return None, "the server was given an engine, not a folder"
    if (path / "state.json").is_file() and path.parent.name == "checkpoints":
        path = path.parent.parent
    if (path / "finetune.json").is_file():
        return True, "finetuned on instructions (lmstack finetune)"
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        summary = None
    if isinstance(summary, dict) and "method" in summary:
        return True, f"aligned ({summary['method']})"
    if (path / "train_config.json").is_file():
        return False, "pretrained only: it continues text and was never taught to answer in a chat"
    return None, "the folder does not say whether the model was chat-tuned"


@router.get("/model_info", responses=ERROR_RESPONSES)
async def model_info(request: Request) -> dict[str, Any]:
    tuned, why = chat_tuned(getattr(request.app.state, "model_path", None))
    return {"chat_tuned": tuned, "chat_tuned_reason": why}
