"""KV-cache block bookkeeping: block ids, reference counts, copy-on-write, prefix caching.

No tensors live here. The paged cache (runner side) holds `num_blocks * block_size` token
slots per layer; this class decides which block ids a sequence owns, and keeps each
sequence's block table (by `seq_id`): `block_table(seq_id)[i]` is the physical block that
holds its tokens `i*block_size .. (i+1)*block_size - 1`. The runner reads the tables; only
this class writes them.

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

LoRA adapters. The same tokens under two adapters have different K/V, so a sequence's
chain starts from its adapter: h_{-1} = hash((seed, adapter id)) and block 0's recorded
parent is (-1, adapter id) (real block ids are >= 0). Requests under different adapters
(or one under an adapter and one on the base) then never share a block, even on a hash
collision; requests under the same adapter share as usual. The base keeps the plain seed.

Eviction. A cached block whose refcount drops to 0 is not wiped: it joins an LRU list of
"cached-free" blocks and can still be hit. Allocation takes truly free blocks first, then
evicts the least-recently-freed cached block (dropping its hash). Blocks in use (refcount
> 0) are never evicted.

Reset. Cached K/V are only valid for the weights that computed them: after a weight update
`reset_prefix_cache` forgets every hash (the engine first preempts the running sequences,
so no block is held and none can be registered later with stale K/V).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from lmstack.infer.sequence import Sequence
from lmstack.utils import LmstackError

_ROOT = 0x5EED  # h_{-1}: chain value before the first block
_BROKEN = ("broken",)   # a chain that no cached block continues (see _SeqBlocks.chain_parent)


def chain_root(seq: Sequence) -> tuple[int, tuple[int, int] | None]:
    """(h_{-1}, block 0's parent) of seq's chain: the plain seed for the base, one per adapter."""
    if not seq.lora_id:
        return _ROOT, None
    return hash((_ROOT, "lora", seq.lora_id)), (-1, seq.lora_id)


def chain_hash(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """h_i = hash((h_{i-1}, tokens_i)); Python's tuple hash is deterministic for ints."""
    return hash((parent_hash, token_ids))


@dataclass
class _SeqBlocks:
    """One sequence's blocks and how far its prefix hashing has got."""
    table: list[int] = field(default_factory=list)
    num_hashed: int = 0          # leading full blocks already hashed (registered or passed over)
    last_hash: int = _ROOT       # chain value h of block num_hashed - 1 (the chain root when none)
    # (id, gen) of the cached block that holds this prefix through block num_hashed - 1: the
    # parent block num_hashed records (our own block, or the cached one it duplicates);
    # _BROKEN when no cached block does (a hash collision), so nothing later is registered
    chain_parent: tuple | None = None


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
        # (parent id, parent gen); for block 0: None on the base, (-1, adapter id) under an adapter
        self.block_parent: list[tuple[int, int] | None] = [None] * num_blocks
        self._gen = [0] * num_blocks
        self.pending_copies: list[tuple[int, int]] = []  # copy-on-write (src, dst) for the runner
        self._seqs: dict[int, _SeqBlocks] = {}            # seq_id -> its blocks (only while it holds some)
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

    def block_table(self, seq_id: int) -> list[int]:
        """The physical blocks of seq_id's tokens, in order (read-only; [] if it holds none)."""
        entry = self._seqs.get(seq_id)
        return entry.table if entry is not None else []

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks for seq to hold `num_tokens` tokens in total (plus one if CoW needed)."""
        need = -(-num_tokens // self.block_size) - len(self.block_table(seq.seq_id))
        return max(need, 0) + (1 if self._needs_cow(seq, num_tokens) else 0)

    def filled_slots(self, seqs: Iterable[Sequence]) -> int:
        """Token slots holding a token (or a draft token) in the distinct blocks seqs hold."""
        seen, tokens = set(), 0
        for seq in seqs:
            for i, b in enumerate(self.block_table(seq.seq_id)):
                if b not in seen:
                    seen.add(b)
                    tokens += min(self.block_size, len(seq) + len(seq.spec_token_ids) - i * self.block_size)
        return tokens

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
        table = self.block_table(seq.seq_id)
        first = seq.num_computed_tokens // self.block_size
        return (seq.num_computed_tokens < num_tokens and first < len(table)
                and self.ref_count[table[first]] > 1)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give seq slots for `num_tokens` tokens in total; False (nothing changed) if short."""
        if self.blocks_needed(seq, num_tokens) > self.num_free_blocks:
            return False
        entry = self._seqs.setdefault(seq.seq_id, _SeqBlocks(last_hash=chain_root(seq)[0]))
        if self._needs_cow(seq, num_tokens):
            i = seq.num_computed_tokens // self.block_size
            src = entry.table[i]
            dst = self._take_block()
            self._release(src)
            entry.table[i] = dst
            self.pending_copies.append((src, dst))
        while len(entry.table) * self.block_size < num_tokens:
            entry.table.append(self._take_block())
        return True

    def free(self, seq: Sequence) -> None:
        """Release all of seq's blocks. Tail first, so LRU eviction takes a prefix's tail
        before its head (the head is the part other requests are likelier to share)."""
        entry = self._seqs.pop(seq.seq_id, None)
        for block in reversed(entry.table if entry is not None else []):
            self._release(block)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares all of parent's blocks (and its prefix-hash progress)."""
        entry = self._seqs.get(parent.seq_id) or _SeqBlocks(last_hash=chain_root(parent)[0])
        self._seqs[child.seq_id] = _SeqBlocks(list(entry.table), entry.num_hashed, entry.last_hash,
                                              entry.chain_parent)
        for block in entry.table:
            self.ref_count[block] += 1

    # -- prefix caching -------------------------------------------------------------------
    def match_prefix(self, seq: Sequence, limit: int | None = None) -> int:
        """Attach cached blocks for seq's leading full blocks; return how many tokens they
        hold (the caller counts them as computed).

        At least one token is always left to compute: the forward pass over it yields the
        logits for the first new token. `limit` caps the hit further (whole blocks of at
        most `limit` tokens): a request scoring its prompt needs logits from that position on."""
        if not self.enable_prefix_caching or self.block_table(seq.seq_id):
            return 0
        tokens = seq.token_ids
        bs = self.block_size
        self.prefix_queries += len(tokens)
        entry = _SeqBlocks()
        h, parent = chain_root(seq)
        n_blocks = (len(tokens) - 1) // bs
        if limit is not None:
            n_blocks = min(n_blocks, limit // bs)
        for i in range(n_blocks):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            h = self.hash_fn(h, chunk)
            block = self.hash_to_block.get(h)
            if (block is None or self.block_tokens[block] != chunk
                    or self.block_parent[block] != parent):
                break  # miss, or a hash collision caught by the exact check
            if self.ref_count[block] == 0:
                del self.cached_free[block]
            self.ref_count[block] += 1
            entry.table.append(block)
            entry.num_hashed, entry.last_hash = i + 1, h
            parent = entry.chain_parent = (block, self._gen[block])
        if entry.table:
            self._seqs[seq.seq_id] = entry
        hit = len(entry.table) * bs
        self.prefix_hits += hit
        return hit

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: put seq's newly completed (full, computed) blocks in the prefix cache."""
        entry = self._seqs.get(seq.seq_id)
        if not self.enable_prefix_caching or entry is None:
            return
        bs = self.block_size
        n_full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        h = entry.last_hash
        root_parent = chain_root(seq)[1]
        for i in range(entry.num_hashed, n_full):
            block = entry.table[i]
            chunk = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self.hash_fn(h, chunk)
            # A lookup walks through the cached block of each hash, so a block's parent is the
            # cached block holding the same prefix, which need not be our own previous block:
            # two requests sharing a prefix, computed in the same step, each compute it, one
            # copy gets cached, and the other request's later blocks chain on through that copy.
            parent = root_parent if i == 0 else entry.chain_parent
            cached = self.hash_to_block.get(h)
            if parent is _BROKEN:
                chained = _BROKEN
            elif cached is None and self.block_hash[block] is None:
                self._gen[block] += 1
                self.hash_to_block[h] = block
                self.block_hash[block] = h
                self.block_tokens[block] = chunk
                self.block_parent[block] = parent
                chained = (block, self._gen[block])
            elif cached is not None and self.block_tokens[cached] == chunk and self.block_parent[cached] == parent:
                chained = (cached, self._gen[cached])          # a duplicate of a cached block
            else:
                chained = _BROKEN                              # a hash collision: stop here
            entry.num_hashed, entry.last_hash, entry.chain_parent = i + 1, h, chained

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (their K/V came from other weights). Only with no block
        held: a held block's K/V would be just as stale, and it could be registered later."""
        held = sum(1 for r in self.ref_count if r)
        if held:
            raise LmstackError(f"reset_prefix_cache: {held} blocks are held by running sequences; "
                               f"preempt them first (their K/V would be stale too)")
        for block in self.cached_free:
            self._unregister(block)
            self.free_blocks.append(block)
        self.cached_free.clear()
        assert not self.hash_to_block, "a hashed block was neither held nor cached-free"

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def check_no_leaks(self) -> None:
        """Assert every block is free or cached-free (used by tests after all requests end)."""
        held = [b for b in range(self.num_blocks) if self.ref_count[b]]
        assert not held, f"blocks still referenced: {held[:10]}"
        assert len(self.free_blocks) + len(self.cached_free) == self.num_blocks
        assert not self._seqs, f"block tables of seqs {list(self._seqs)[:10]} were never freed"
