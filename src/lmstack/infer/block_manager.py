"""KV-cache block bookkeeping: block ids, reference counts, copy-on-write, prefix caching.

No tensors live here. The paged cache (runner side) holds `num_blocks * block_size` token
slots per layer; this class decides which block ids a sequence owns. A sequence's
`block_table[i]` is the physical block that holds its tokens `i*block_size ..
(i+1)*block_size - 1`.

Reference counts. A block may be shared: by siblings forked from one prompt (n > 1) and by
requests that start with the same tokens (prefix caching). A block is written only while
exactly one sequence holds it; a sequence about to write into a shared block gets a private
copy first (copy-on-write). The copy itself is a tensor op, so we only *record* it as a
(src, dst) pair in `pending_copies`; the runner performs it before the next forward.

Prefix caching, and why the hash is chained. A *full* block is identified by everything
that precedes it, not just its own 16 tokens: the K/V of token t depend on all tokens
0..t. So block i's key is

    h_i = hash((h_{i-1}, tokens of block i))        with h_{-1} = a fixed seed

which folds the whole prefix into one int without storing it. Two requests that share
their first k full blocks compute the same h_0..h_{k-1} and find the same physical blocks.

Hashes can collide, so a hit is verified, exactly and cheaply, by induction: each cached
block remembers its own token ids and *which physical block (and which incarnation of it)
came before it*. Lookup walks the chain from block 0; block i is accepted only if its
stored tokens equal the request's tokens and its stored parent is the block we just
accepted for i-1. Since block 0's parent is "none", an accepted chain matches the request's
whole prefix token for token, whatever the hash function does. The incarnation counter
(`_gen`) bumps each time a block id is registered anew, so a child never attaches to a
parent block that was evicted and reused for other tokens.

Eviction. A cached block whose refcount drops to 0 is not wiped: it joins an LRU list of
"cached-free" blocks and can still be hit. Allocation takes truly free blocks first, then
evicts the least-recently-freed cached block (dropping its hash). Blocks in use (refcount
> 0) are never evicted.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Callable

from lmstack.infer.sequence import Sequence

_ROOT = 0x5EED  # h_{-1}: chain value before the first block


def chain_hash(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """h_i = hash((h_{i-1}, tokens_i)); Python's tuple hash is deterministic for ints."""
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True,
                 hash_fn: Callable[[int, tuple[int, ...]], int] = chain_hash):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn
        self.ref_count = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))   # refcount 0, no hash
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # refcount 0, hashed; LRU first
        # prefix cache: chain hash -> block id, and per block what was verified at registration
        self.hash_to_block: dict[int, int] = {}
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple[int, ...] | None] = [None] * num_blocks
        self.block_parent: list[tuple[int, int] | None] = [None] * num_blocks  # (parent id, parent gen)
        self._gen = [0] * num_blocks
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) for the runner
        # stats
        self.prefix_queries = 0   # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0      # of those, found cached

    # -- capacity -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable now: truly free plus evictable cached ones."""
        return len(self.free_blocks) + len(self.cached_free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks for seq to hold `num_tokens` tokens in total (plus one if CoW needed)."""
        need = -(-num_tokens // self.block_size) - len(seq.block_table)
        return max(need, 0) + (1 if self._needs_cow(seq, num_tokens) else 0)

    # -- allocation -----------------------------------------------------------------------
    def _take_block(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.cached_free.popitem(last=False)  # evict least recently used
            self._unregister(block)
        self.ref_count[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_count[block] -= 1
        assert self.ref_count[block] >= 0, f"block {block} freed twice"
        if self.ref_count[block] == 0:
            if self.block_hash[block] is not None:
                self.cached_free[block] = None   # most recently used end
            else:
                self.free_blocks.append(block)

    def _unregister(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None and self.hash_to_block.get(h) == block:
            del self.hash_to_block[h]
        self.block_hash[block] = None
        self.block_tokens[block] = None
        self.block_parent[block] = None

    def _needs_cow(self, seq: Sequence, num_tokens: int) -> bool:
        """Would writing tokens num_computed.. hit a block someone else also holds?"""
        first = seq.num_computed_tokens // self.block_size
        return (seq.num_computed_tokens < num_tokens and first < len(seq.block_table)
                and self.ref_count[seq.block_table[first]] > 1)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq slots for `num_tokens` tokens in total; False (nothing changed) if short."""
        if self.blocks_needed(seq, num_tokens) > self.num_free_blocks:
            return False
        if self._needs_cow(seq, num_tokens):
            i = seq.num_computed_tokens // self.block_size
            src = seq.block_table[i]
            dst = self._take_block()
            self._release(src)
            seq.block_table[i] = dst
            self.pending_copies.append((src, dst))
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self._take_block())
        return True

    def free(self, seq: Sequence) -> None:
        """Release all of seq's blocks. Tail first, so LRU eviction takes a prefix's tail
        before its head (the head is the part other requests are likelier to share)."""
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares parent's blocks (child.block_table already copied)."""
        for block in parent.block_table:
            self.ref_count[block] += 1

    # -- prefix caching -------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for seq's leading full blocks; return tokens now computed.

        At least one token is always left to compute: the forward pass over it yields the
        logits for the first new token."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        tokens = seq.token_ids
        bs = self.block_size
        self.prefix_queries += len(tokens)
        h, parent = _ROOT, None
        for i in range((len(tokens) - 1) // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = self.hash_fn(h, chunk)
            block = self.hash_to_block.get(h)
            if (block is None or self.block_tokens[block] != chunk
                    or self.block_parent[block] != parent):
                break  # miss, or a hash collision caught by the exact check
            if self.ref_count[block] == 0:
                del self.cached_free[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.num_hashed_blocks, seq.last_block_hash = i + 1, h
            parent = (block, self._gen[block])
        hit = len(seq.block_table) * bs
        self.prefix_hits += hit
        seq.num_computed_tokens = hit
        return hit

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: put seq's newly completed (full, computed) blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        n_full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        h = seq.last_block_hash if seq.num_hashed_blocks else _ROOT
        for i in range(seq.num_hashed_blocks, n_full):
            block = seq.block_table[i]
            chunk = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self.hash_fn(h, chunk)
            prev = seq.block_table[i - 1] if i else None
            parent = (prev, self._gen[prev]) if prev is not None else None
            # Register only under a registered parent: a lookup walks the chain through the
            # canonical block of each hash, so a child of a non-canonical duplicate is unreachable.
            parent_ok = prev is None or self.hash_to_block.get(self.block_hash[prev]) == prev
            if parent_ok and self.block_hash[block] is None and h not in self.hash_to_block:
                self._gen[block] += 1
                self.hash_to_block[h] = block
                self.block_hash[block] = h
                self.block_tokens[block] = chunk
                self.block_parent[block] = parent
            seq.num_hashed_blocks, seq.last_block_hash = i + 1, h

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def check_no_leaks(self) -> None:
        """Assert every block is free or cached-free (used by tests after all requests end)."""
        held = [b for b in range(self.num_blocks) if self.ref_count[b]]
        assert not held, f"blocks still referenced: {held[:10]}"
        assert len(self.free_blocks) + len(self.cached_free) == self.num_blocks
