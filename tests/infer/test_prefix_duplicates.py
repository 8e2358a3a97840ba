"""Prefix caching when requests that share a prefix are computed in the same step: each
computes the shared blocks, one copy is cached, and the others' later blocks still get cached
(chained through that copy), so their continuations hit the whole prefix."""
from __future__ import annotations

from lmstack.infer import LLM, SamplingParams
from lmstack.infer.block_manager import BlockManager
from lmstack.infer.sequence import Sequence
from tests.infer.conftest import tiny_model


def seq(tokens, sid):
    return Sequence(sid, f"r{sid}", 0, tokens, SamplingParams())


def test_duplicate_blocks_chain_through_the_cached_copy():
    bm = BlockManager(32, block_size=4)
    shared = [1, 2, 3, 4]
    a, b = seq(shared + [10, 11, 12, 13, 9], 0), seq(shared + [20, 21, 22, 23, 9], 1)
    for s in (a, b):                      # admitted together: neither finds the other's blocks
        assert bm.match_prefix(s) == 0 and bm.allocate(s, len(s))
    for s in (a, b):
        s.num_computed_tokens = len(s)
        bm.register_full_blocks(s)
    assert bm.block_table(a.seq_id)[0] != bm.block_table(b.seq_id)[0]      # two copies of the shared block
    c = seq(shared + [20, 21, 22, 23, 5, 6], 2)
    assert bm.match_prefix(c) == 8                                         # a's copy of block 0, then b's block 1
    assert bm.block_table(c.seq_id) == [bm.block_table(a.seq_id)[0], bm.block_table(b.seq_id)[1]]
    d = seq(shared + [10, 11, 12, 13, 7], 3)
    assert bm.match_prefix(d) == 8
    for s in (a, b, c, d):
        bm.free(s)
    bm.check_no_leaks()


def test_engine_reuses_prefixes_of_requests_run_together():
    model = tiny_model(2)
    llm = LLM(model, block_size=4, kv_cache_tokens=1024)
    preamble = list(range(10, 22))                       # 12 tokens shared by every prompt
    prompts = [preamble + [30 + q] * 8 + [5] for q in range(4)]
    greedy = SamplingParams(temperature=0, max_tokens=2)
    first = llm.generate(prompts, greedy)                # all admitted in one step
    again = llm.generate([p[:-1] + [6] for p in prompts], greedy)
    # everything but the last block (20 of 21 tokens -> 5 whole blocks) comes from the cache
    assert [o.num_cached_tokens for o in again] == [20] * 4
    fresh = LLM(model, block_size=4, kv_cache_tokens=1024, enable_prefix_caching=False)
    want = fresh.generate([p[:-1] + [6] for p in prompts], greedy)
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in want]
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in
                                                       fresh.generate(prompts, greedy)]
