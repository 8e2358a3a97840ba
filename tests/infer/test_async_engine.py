"""AsyncLLM: background step loop, streaming, abort, bad requests, event loop never blocked."""
from __future__ import annotations

import asyncio
import time

import pytest

from lmstack.infer import AsyncLLM, LLM, RequestError, SamplingParams
from tests.infer.conftest import tiny_model

GREEDY = dict(temperature=0.0, ignore_eos=True)


def test_async_streams_match_offline_and_abort_frees():
    model = tiny_model()
    expected = LLM(model, block_size=4, kv_cache_tokens=1024).generate(
        [[1, 2, 3], [4, 5, 6, 7, 8]], SamplingParams(max_tokens=12, **GREEDY))

    async def main():
        engine = AsyncLLM(model, block_size=4, kv_cache_tokens=1024)

        async def collect(prompt, rid, max_tokens=12):
            outs = []
            async for out in engine.generate(prompt, SamplingParams(max_tokens=max_tokens, **GREEDY), rid):
                outs.append(out)
            return outs

        async def ticker():       # the event loop must keep turning while the model computes
            n = 0
            t_end = time.perf_counter() + 0.3
            while time.perf_counter() < t_end:
                await asyncio.sleep(0.005)
                n += 1
            return n

        async def aborted_midway():
            outs = []
            async for out in engine.generate([9] * 20, SamplingParams(max_tokens=200, **GREEDY), "long"):
                outs.append(out)
                if len(out.outputs[0].token_ids) == 3:
                    await engine.abort("long")
            return outs

        a, b, ticks, long_outs = await asyncio.gather(collect([1, 2, 3], "a"), collect([4, 5, 6, 7, 8], "b"),
                                                      ticker(), aborted_midway())
        with pytest.raises(RequestError, match="empty"):
            async for _ in engine.generate([], SamplingParams()):
                pass
        # the engine still serves after a bad request
        c = await collect([1, 2, 3], "c")
        await asyncio.sleep(0.05)
        stats = engine.stats()
        await engine.shutdown()
        return a, b, c, long_outs, ticks, stats, engine

    a, b, c, long_outs, ticks, stats, engine = asyncio.run(main())
    assert a[-1].finished and a[-1].outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert b[-1].outputs[0].token_ids == expected[1].outputs[0].token_ids
    assert c[-1].outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert len(a) > 1                                            # streamed, not one final blob
    assert [len(o.outputs[0].token_ids) for o in a] == sorted(len(o.outputs[0].token_ids) for o in a)
    assert long_outs[-1].finished and long_outs[-1].outputs[0].finish_reason == "abort"
    assert len(long_outs[-1].outputs[0].token_ids) < 200
    assert ticks > 10
    assert stats["kv_blocks_used"] == 0 and stats["finished_requests"] >= 3
    engine.engine.block_manager.check_no_leaks()


def test_consumer_that_stops_early_aborts_its_request():
    model = tiny_model()

    async def main():
        engine = AsyncLLM(model, block_size=4, kv_cache_tokens=512)
        gen = engine.generate([1, 2, 3], SamplingParams(max_tokens=100, **GREEDY), "r")
        async for out in gen:
            break
        await gen.aclose()
        for _ in range(200):
            if not engine.engine.requests:
                break
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return engine

    engine = asyncio.run(main())
    assert not engine.engine.requests
    engine.engine.block_manager.check_no_leaks()
