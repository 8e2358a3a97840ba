"""Chat answers grounded in a retrieval index: `lmstack serve RUN --rag-index IDX`.

The index and its retrievers live in lmstack.rag (floor 5), above the server (floor 4), so
the server takes any object of this shape, built by the CLI (`rag.ServerRetrieval`):

    retrieval.search(question) -> [{"doc_id", "start", "end", "text", "score"}, ...]
                                  best first; [] = nothing relevant
    retrieval.user_turn(question, sources) -> str   the user turn that lists them, numbered
    retrieval.abstain_text                          the answer when nothing is relevant

A chat request whose last message is the user's is answered with retrieval unless it sends
`"retrieval": false`: that message's text is the query, and the turn the model reads is
`user_turn` (for lmstack's models 'Context: [1] <chunk> [2] <chunk>\\n<question>', the
format SFT's grounded chats teach). The chunks that do not fit the context with the answer's
`max_tokens` are dropped from the lowest rank up. The response carries `sources`: the chunks
the model read, `index` n being the `[n]` of the prompt, so an answer's citations can be
checked against them. When nothing relevant is retrieved, the answer is `abstain_text`
(finish_reason "stop", no tokens generated): the model is not asked, since its guess about
something the index does not know would be a hallucination.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from lmstack.serve import convert, generation
from lmstack.serve.errors import APIError

_FIELDS = ("doc_id", "start", "end", "text", "score")


@dataclass
class Grounding:
    ids: list[int] = field(default_factory=list)      # the prompt with the retrieved chunks
    sources: list[dict] = field(default_factory=list)  # what the response lists, [n] = index n
    abstained: bool = False


def wanted(s, body) -> bool:
    """Whether this request is answered with retrieval."""
    if body.retrieval and s.retrieval is None:
        raise APIError(400, "retrieval: true needs a server started with an index (lmstack serve RUN "
                            "--rag-index IDX)", param="retrieval")
    return s.retrieval is not None and body.retrieval is not False and body.messages[-1].role == "user"


def _sources(found) -> list[dict]:
    out = []
    for n, src in enumerate(found, start=1):
        if not isinstance(src, dict) or any(k not in src for k in _FIELDS):
            raise TypeError(f"retrieval.search must return dicts with {', '.join(_FIELDS)}; got {src!r:.80}")
        out.append({"index": n, **{k: src[k] for k in _FIELDS}})
    return out


async def ground(s, body, tools: list[dict], max_tokens: int | None) -> Grounding:
    """Retrieve for the last user message and build the prompt that lists the chunks (the most
    that fit with `max_tokens`, or one token, of answer)."""
    question = body.messages[-1].text()
    sources = _sources(await asyncio.to_thread(s.retrieval.search, question))
    if not sources:
        return Grounding(abstained=True)
    room = s.limits.context_length - (max_tokens or 1)
    for n in range(len(sources), 0, -1):
        turn = s.retrieval.user_turn(question, [{k: v for k, v in src.items() if k != "index"}
                                                for src in sources[:n]])
        messages = body.messages[:-1] + [body.messages[-1].model_copy(update={"content": turn})]
        ids = await asyncio.to_thread(convert.chat_prompt_ids, messages, s.tokenizer, s.chat_template, tools)
        if len(ids) <= room:
            return Grounding(ids, sources[:n])
    raise APIError(400, f"the question with even one retrieved chunk ({len(ids)} tokens) and {max_tokens or 1} "
                        f"tokens of answer does not fit the model's context of {s.limits.context_length} tokens; "
                        f"shorten the question, lower max_tokens or send retrieval: false",
                   param="messages", code="context_length_exceeded")


def abstention(s, body, cid: str, created: int, model: str):
    """The answer when nothing relevant was retrieved, streamed or not: abstain_text."""
    from fastapi.responses import JSONResponse, StreamingResponse

    text = s.retrieval.abstain_text
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if not body.stream:
        return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": model,
                             "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                                          "logprobs": None, "finish_reason": "stop"} for i in range(body.n)],
                             "usage": usage, "sources": []})
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            **({"usage": None} if include_usage else {})}

    async def chunks():
        for i in range(body.n):
            for k, (delta, finish) in enumerate((({"role": "assistant", "content": ""}, None),
                                                 ({"content": text}, None), ({}, "stop"))):
                extra = {"sources": []} if i == k == 0 else {}
                yield generation.sse({**head, **extra, "choices": [{"index": i, "delta": delta, "logprobs": None,
                                                                    "finish_reason": finish}]})
        if include_usage:
            yield generation.sse({**head, "choices": [], "usage": usage})
        yield generation.SSE_DONE
    return StreamingResponse(chunks(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
