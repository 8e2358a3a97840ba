"""The server against the official `openai` client, checked against the offline engine
(`LLM.generate` on the same run dir): greedy text, usage counts, log-probs, n, stop, seed,
streaming, and 32 concurrent streaming clients."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from lmstack.infer import LLM, SamplingParams

PROMPTS = ["Once upon a time", "The quick brown fox", "Alice counted: one, two,", "Bob said hello to",
           "a little cat", "the world said", "jumps over the lazy", "three, four, five."]


@pytest.fixture(scope="module")
def llm(run_dir):
    return LLM(str(run_dir))


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def greedy(llm, prompts, max_tokens, **kw):
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw))
    return [o.outputs[0] for o in outs]


def test_models_lists_the_run_dir(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.run_dir.name]


def test_completion_greedy_matches_offline_engine(client, model_id, llm):
    ref = greedy(llm, [PROMPTS[0]], 12)[0]
    r = client.completions.create(model=model_id, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == ref.text
    assert r.choices[0].finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(llm.tokenizer.encode(PROMPTS[0]))
    assert r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_stream_equals_non_stream(client, model_id):
    kw = dict(model=model_id, prompt=PROMPTS[1], max_tokens=10, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_matches_offline_engine_and_counts_cached_tokens(client, model_id, llm):
    tok = llm.tokenizer
    messages = [{"role": "system", "content": "You are a cat who likes warm mats and long stories."},
                {"role": "user", "content": "Tell me about the quick brown fox, please."}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    ref = greedy(llm, [ids], 8, stop_token_ids=[tok.special_tokens["<|end|>"]])[0]
    r1 = client.chat.completions.create(model=model_id, messages=messages, max_tokens=8, temperature=0)
    assert r1.choices[0].message.role == "assistant"
    assert r1.choices[0].message.content == ref.text
    assert r1.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model=model_id, messages=messages, max_completion_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    usage = chunks[-1].usage
    # The same prompt again: its full blocks come from the prefix cache.
    assert usage.prompt_tokens_details.cached_tokens >= (len(ids) // 16 - 1) * 16 > 0


def test_n_and_seed_determinism(client, model_id):
    kw = dict(model=model_id, prompt=PROMPTS[2], max_tokens=12, temperature=1.0, n=3)
    a = client.completions.create(seed=7, **kw)
    b = client.completions.create(seed=7, **kw)
    c = client.completions.create(seed=8, **kw)
    assert sorted(ch.index for ch in a.choices) == [0, 1, 2]
    texts = lambda r: [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)]  # noqa: E731
    assert texts(a) == texts(b)
    assert texts(a) != texts(c)
    assert 3 <= a.usage.completion_tokens <= 36
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, n=2, seed=3, temperature=1.0)
    assert sorted(ch.index for ch in chat.choices) == [0, 1]


def test_stop_string_truncates_like_the_engine(client, model_id, llm):
    ref = greedy(llm, [PROMPTS[3]], 16)[0].text
    assert len(ref) > 6
    stop = ref[3:6]
    r = client.completions.create(model=model_id, prompt=PROMPTS[3], max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == ref[:ref.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_completion_logprobs_match_offline_engine(client, model_id, llm):
    ref = llm.generate([PROMPTS[4]], SamplingParams(temperature=0, max_tokens=6, logprobs=3))[0].outputs[0]
    r = client.completions.create(model=model_id, prompt=PROMPTS[4], max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ref.token_ids) == len(lp.token_logprobs) == len(lp.top_logprobs)
    for i, tid in enumerate(ref.token_ids):
        assert lp.token_logprobs[i] == pytest.approx(ref.logprobs[i][tid].logprob, abs=1e-4)
        top = lp.top_logprobs[i]
        assert 1 <= len(top) <= 4
        # greedy: the chosen token is the most likely one
        assert lp.token_logprobs[i] == pytest.approx(max(top.values()), abs=1e-6)
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset[0] == 0


def test_chat_logprobs_shape(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=5, temperature=0, logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert content and len(content) == r.usage.completion_tokens
    for tok in content:
        assert len(tok.top_logprobs) == 2
        assert tok.top_logprobs[0].logprob >= tok.top_logprobs[1].logprob
        assert tok.logprob == pytest.approx(tok.top_logprobs[0].logprob, abs=1e-6)  # greedy
        assert bytes(tok.bytes).decode("utf-8", "replace") == tok.token or "\ufffd" in tok.token


def test_32_concurrent_streams_match_offline_greedy(server, model_id, llm):
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} {i}" for i in range(32)]
    refs = [o.text for o in greedy(llm, prompts, 16)]

    async def one(client, prompt):
        stream = await client.completions.create(model=model_id, prompt=prompt, max_tokens=16, temperature=0,
                                                 stream=True)
        parts, finish = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        return "".join(parts), finish

    async def main():
        client = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        try:
            return await asyncio.gather(*(one(client, p) for p in prompts))
        finally:
            await client.close()

    results = asyncio.run(main())
    assert [t for t, _ in results] == refs
    assert all(f in ("stop", "length") for _, f in results)


def test_raw_responses_follow_the_documented_models(server, model_id):
    from lmstack.serve.protocol import ChatCompletionResponse, CompletionResponse

    r = httpx.post(server.url + "/v1/completions", json={"model": model_id, "prompt": "hi", "max_tokens": 3,
                                                         "logprobs": 2, "n": 2}).json()
    assert CompletionResponse.model_validate(r).model_dump(exclude_none=False).keys() == r.keys()
    c = httpx.post(server.url + "/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "logprobs": True,
                         "top_logprobs": 1}).json()
    parsed = ChatCompletionResponse.model_validate(c)
    assert parsed.usage.total_tokens == c["usage"]["total_tokens"] and parsed.object == "chat.completion"
