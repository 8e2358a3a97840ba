"""BlockManager bookkeeping: refcounts, copy-on-write, prefix hashes (hits, collisions), LRU."""
from __future__ import annotations

import pytest

from lmstack.infer.block_manager import BlockManager
from lmstack.infer.sampling_params import SamplingParams
from lmstack.infer.sequence import Sequence
from lmstack.utils import LmstackError

SP = SamplingParams()


def seq(tokens, sid=0):
    return Sequence(sid, f"r{sid}", 0, tokens, SP)


def computed(bm, s, n=None):
    """Pretend the runner computed the first n tokens of s (all by default)."""
    n = len(s) if n is None else n
    assert bm.allocate(s, n)
    s.num_computed_tokens = n
    bm.register_full_blocks(s)


def test_allocate_free_and_refcounts():
    bm = BlockManager(8, block_size=4)
    a = seq(list(range(10)))
    assert bm.allocate(a, 10) and len(bm.block_table(a.seq_id)) == 3
    assert bm.num_free_blocks == 5 and all(bm.ref_count[b] == 1 for b in bm.block_table(a.seq_id))
    assert not bm.allocate(seq([1] * 40, 1), 40)        # 10 blocks > 8: refused, nothing taken
    assert bm.num_free_blocks == 5
    bm.free(a)
    bm.check_no_leaks()


def test_fork_shares_then_copy_on_write():
    bm = BlockManager(8, block_size=4, enable_prefix_caching=False)
    parent = seq(list(range(6)))                         # blocks: [full, partial (2 of 4)]
    computed(bm, parent)
    child = parent.fork(1, 1, None)
    bm.fork(parent, child)
    assert all(bm.ref_count[b] == 2 for b in bm.block_table(parent.seq_id))
    child.append_token(99)                               # writes position 6, in the shared partial block
    assert bm.allocate(child, 7)
    assert bm.block_table(child.seq_id)[0] == bm.block_table(parent.seq_id)[0]          # full block still shared
    assert bm.block_table(child.seq_id)[1] != bm.block_table(parent.seq_id)[1]          # partial block copied
    assert bm.pending_copies == [(bm.block_table(parent.seq_id)[1], bm.block_table(child.seq_id)[1])]
    ptable = bm.block_table(parent.seq_id)
    assert bm.ref_count[ptable[1]] == 1 and bm.ref_count[ptable[0]] == 2
    bm.free(child)
    bm.free(parent)
    bm.check_no_leaks()


def test_prefix_hit_reuses_full_blocks_and_keeps_one_token():
    bm = BlockManager(16, block_size=4)
    a = seq(list(range(12)))
    computed(bm, a)                                      # 3 full blocks registered
    b = seq(list(range(12)) + [50, 51], sid=1)
    assert bm.match_prefix(b) == 12 and bm.block_table(b.seq_id) == bm.block_table(a.seq_id)
    c = seq(list(range(12)), sid=2)                      # identical prompt: last token must be recomputed
    assert bm.match_prefix(c) == 8
    d = seq(list(range(4)) + [7, 7, 7, 7] + list(range(8, 12)) + [1], sid=3)
    assert bm.match_prefix(d) == 4                       # chain breaks at block 1: block 2 not reused
    for s in (a, b, c, d):
        bm.free(s)
    bm.check_no_leaks()
    assert bm.prefix_hits == 24


def test_hash_collision_is_caught():
    bm = BlockManager(16, block_size=4, hash_fn=lambda parent, tokens: 42)   # everything collides
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    computed(bm, a)
    b = seq([0, 0, 0, 0, 5, 6, 7, 8, 9], sid=1)
    assert bm.match_prefix(b) == 0                       # hash says hit, tokens say no
    c = seq([1, 2, 3, 4, 5, 6, 7, 8, 0], sid=2)
    assert bm.match_prefix(c) == 4                       # block 0 verified; block 1's hash maps to block 0
    for s in (a, b, c):
        bm.free(s)
    bm.check_no_leaks()


def test_same_block_tokens_under_different_prefix_do_not_match():
    bm = BlockManager(16, block_size=2)
    a = seq([1, 2, 3, 4, 0])
    computed(bm, a)
    b = seq([9, 9, 3, 4, 0], sid=1)                      # block 1 equal, block 0 not
    assert bm.match_prefix(b) == 0


def test_lru_eviction_only_of_free_cached_blocks():
    bm = BlockManager(5, block_size=2)
    a = seq([1, 2, 3, 4, 5])                             # 3 blocks: 2 full + 1 partial
    computed(bm, a)
    a0, a1, a2 = bm.block_table(a.seq_id)
    held = seq([7, 7, 8], sid=9)
    computed(bm, held)                                   # the other 2 blocks, in use
    bm.free(a)                                           # full blocks -> cached-free, partial -> free
    assert list(bm.cached_free) == [a1, a0]              # freed tail first: the tail is evicted first
    assert bm.num_free_blocks == 3
    b = seq([1, 2, 3, 4, 6], sid=1)
    assert bm.match_prefix(b) == 4                       # still cached: hit
    bm.free(b)
    c = seq([5, 5, 5], sid=2)
    assert bm.allocate(c, 3)                             # 2 blocks: the free one, then evict LRU a1
    assert bm.block_table(c.seq_id) == [a2, a1]
    assert bm.match_prefix(seq([1, 2, 3, 4, 9], sid=3)) == 2     # a0 still hits, a1 is gone
    assert all(bm.ref_count[x] == 1 for x in bm.block_table(held.seq_id))   # in-use blocks never evicted
    assert not bm.allocate(seq([0] * 9, sid=4), 9)               # 5 blocks needed, 1 evictable: refused


def test_reset_prefix_cache_forgets_every_hash_and_refuses_while_blocks_are_held():
    bm = BlockManager(8, block_size=4)
    a = seq(list(range(13)))
    computed(bm, a)                                      # 3 full blocks registered, 4 blocks held
    with pytest.raises(LmstackError, match="4 blocks are held by running sequences"):
        bm.reset_prefix_cache()
    assert len(bm.hash_to_block) == 3                    # refused: nothing changed
    bm.free(a)
    assert len(bm.cached_free) == 3
    bm.reset_prefix_cache()
    assert not bm.hash_to_block and not bm.cached_free and bm.num_free_blocks == 8
    assert bm.match_prefix(seq(list(range(13)), sid=1)) == 0     # the same prompt no longer hits
    bm.check_no_leaks()
