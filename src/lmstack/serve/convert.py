"""Map OpenAI requests onto the engine and the engine's outputs back onto OpenAI shapes.

Pure functions (no HTTP): request -> (prompt token ids, SamplingParams); per-token
log-probs -> the completions or chat `logprobs` object; the usage block. The checks that
need the served model's numbers (context length, vocabulary, the `n` limit) live here
too, so every rejection happens before the engine sees the request.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lmstack.serve.errors import APIError
from lmstack.serve.protocol import MAX_PROMPTS_PER_REQUEST, ChatMessage, CompletionRequest, _SamplingRequest
# chat_stop_token_ids is re-exported: api.py calls convert.chat_stop_token_ids
from lmstack.tokenizer.chat_template import NoChatTemplate, chat_stop_token_ids, encode_chat  # noqa: F401

NO_TEMPLATE = ("this model has no chat template: its folder has no 'chat_template' (tokenizer_config.json or "
               "chat_template.jinja) and its tokenizer lacks lmstack's chat tokens; restart the server with "
               "--chat-template FILE (a Jinja chat template, as Hugging Face checkpoints ship), or send the "
               "prompt as text to /v1/completions")


@dataclass
class Limits:
    context_length: int
    n_vocab: int
    max_n: int


def check_model(requested: str | None, served: str, adapters: list[str] = ()) -> str | None:
    """The LoRA adapter a request's `model` names (None: the base, also when `model` is left
    out); 404 naming every served model for any other name."""
    if requested in (None, "", served):
        return None
    if requested in adapters:
        return requested
    names = ", ".join(f"'{n}'" for n in [served, *adapters])
    raise APIError(404, f"model '{requested}' does not exist; this server serves {names} (see GET /v1/models)",
                   param="model", code="model_not_found")


def completion_prompts(req: CompletionRequest, tokenizer, limits: Limits) -> list[list[int] | str]:
    """Normalise `prompt` to a list of prompts, each text or token ids (ids range-checked)."""
    p = req.prompt
    if isinstance(p, str):
        prompts: list = [p]
    elif all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    else:
        prompts = list(p)
    if len(prompts) > MAX_PROMPTS_PER_REQUEST:
        raise APIError(400, f"at most {MAX_PROMPTS_PER_REQUEST} prompts per request, got {len(prompts)}",
                       param="prompt")
    for i, ids in enumerate(prompts):
        if isinstance(ids, list):
            bad = next((t for t in ids if not 0 <= t < limits.n_vocab), None)
            if bad is not None:
                raise APIError(400, f"prompt[{i}] has token id {bad} outside the vocabulary [0, {limits.n_vocab})",
                               param="prompt")
    return prompts


def encode_text(tokenizer, text: str) -> list[int]:
    # Special tokens written in a raw completion prompt are honoured, as HF and vLLM do.
    return tokenizer.encode(text, allowed_special="all")


def chat_prompt_ids(messages: list[ChatMessage], tokenizer, template=None,
                    tools: list[dict] | None = None) -> list[int]:
    """The prompt ids for `messages`, ending with the assistant's turn to speak: rendered by
    `template` (a ChatTemplate: the checkpoint's Jinja or --chat-template) when there is one,
    else by lmstack's own template (our run directories); see `encode_chat`. Text parts are
    joined into one string, as text-only templates expect; tool calls and tool answers are
    written as tools.py says, and `tools` reach a Jinja template."""
    from lmstack.serve.tools import template_messages

    plain = template_messages(messages, jinja=template is not None)
    try:
        return encode_chat(plain, tokenizer, template, tools=tools)
    except NoChatTemplate:
        raise APIError(400, NO_TEMPLATE, param="messages", code="no_chat_template") from None
    except (ValueError, KeyError) as e:
        raise APIError(400, f"messages cannot be rendered by the chat template: {e}", param="messages") from None


def resolve_max_tokens(requested: int | None, prompt_len: int, limits: Limits, param: str) -> int:
    """Default: the rest of the context. A prompt that does not fit is rejected, like OpenAI."""
    room = limits.context_length - prompt_len
    if room <= 0:
        raise APIError(400, f"this model's maximum context length is {limits.context_length} tokens, but the "
                            f"prompt has {prompt_len} tokens; shorten the prompt", param="messages"
                       if param == "max_completion_tokens" else "prompt", code="context_length_exceeded")
    if requested is None:
        return room
    if requested > room:
        raise APIError(400, f"this model's maximum context length is {limits.context_length} tokens, but "
                            f"{prompt_len} prompt tokens + {param}={requested} exceed it; set {param} <= {room}",
                       param=param, code="context_length_exceeded")
    return requested


def sampling_params(req: _SamplingRequest, max_tokens: int, limits: Limits, *, logprobs: int | None,
                    stop_token_ids: list[int] | None = None, extra_stop: list[str] | None = None,
                    prompt_logprobs: int | None = None):
    """SamplingParams for a request; `extra_stop`: the server's own stop strings (tool tags),
    after the client's; `prompt_logprobs`: score the prompt's tokens (completions' echo)."""
    from lmstack.infer import SamplingParams  # the engine is a floor below; import where used

    if req.n > limits.max_n:
        raise APIError(400, f"n={req.n} is above this server's limit of {limits.max_n}; lower n "
                            "(or start the server with a larger --max-n)", param="n")
    stop = req.stop_list() or []
    stop += [t for t in extra_stop or [] if t not in stop]
    try:
        return SamplingParams(
            n=req.n,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            min_p=req.min_p,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            seed=req.seed,
            stop=stop or None,
            stop_token_ids=stop_token_ids,
            ignore_eos=req.ignore_eos,
            max_tokens=max_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )
    except (ValueError, TypeError) as e:
        raise APIError(400, f"invalid sampling parameters: {e}") from None


# ------------------------------------------------------------------- log-probs

VERY_UNLIKELY = -9999.0   # OpenAI's log-prob for "no chance"; JSON has no -inf (or NaN)


def _lp_value(lp: Any) -> float:
    value = float(getattr(lp, "logprob", lp))
    return value if math.isfinite(value) else VERY_UNLIKELY


def token_text(tokenizer, token_id: int, lp: Any = None) -> str:
    decoded = getattr(lp, "decoded_token", None)
    return decoded if isinstance(decoded, str) else tokenizer.decode([token_id])


def _token_bytes(tokenizer, token_id: int) -> list[int]:
    return list(tokenizer.token_bytes(token_id))


def _ranked(entry: dict, k: int) -> list[tuple[int, Any]]:
    """The k most likely (token_id, Logprob) pairs of one position, best first."""
    return sorted(entry.items(), key=lambda kv: -_lp_value(kv[1]))[:k]


def completion_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict] | None, k: int,
                        text_offset: int) -> dict:
    """OpenAI legacy completions shape; `top_logprobs[i]` holds the top k plus the sampled token.
    An entry None (a prompt's first token: nothing predicts it) gives null log-probs."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    if logprobs is None:
        return out
    offset = text_offset
    for tid, entry in zip(token_ids, logprobs):
        text = token_text(tokenizer, tid, entry.get(tid) if entry is not None else None)
        out["tokens"].append(text)
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            out["text_offset"].append(offset)
            offset += len(text)
            continue
        out["token_logprobs"].append(_lp_value(entry[tid]) if tid in entry else None)
        top = {token_text(tokenizer, t, lp): _lp_value(lp) for t, lp in _ranked(entry, k)}
        if tid in entry:
            top.setdefault(text, _lp_value(entry[tid]))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict] | None, k: int) -> dict:
    """OpenAI chat shape: one record per token with its bytes and the top k alternatives."""
    content = []
    if logprobs is None:
        return {"content": content}
    for tid, entry in zip(token_ids, logprobs):
        content.append({
            "token": token_text(tokenizer, tid, entry.get(tid)),
            "logprob": _lp_value(entry[tid]) if tid in entry else VERY_UNLIKELY,
            "bytes": _token_bytes(tokenizer, tid),
            "top_logprobs": [{"token": token_text(tokenizer, t, lp), "logprob": _lp_value(lp),
                              "bytes": _token_bytes(tokenizer, t)} for t, lp in _ranked(entry, k)],
        })
    return {"content": content}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def stable_text(text: str, finished: bool) -> str:
    """Hold back a trailing U+FFFD while unfinished: it is usually half of a multi-byte
    character that the next token completes, and streamed text cannot be taken back."""
    if finished:
        return text
    return text.rstrip("\ufffd")
