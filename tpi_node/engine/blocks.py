"""The master's KV block pool: which block of every node's paged KV cache holds which tokens.

Every node keeps the KV cache of its own heads in `num_blocks` blocks of BLOCK_TOKENS tokens
(engine/kv_cache.py); the master alone decides which blocks a sequence uses and sends the block
tables with every step, so all nodes hold the same blocks for the same tokens and a worker keeps
no per-sequence state.

Prefix caching: a block whose BLOCK_TOKENS tokens are all computed gets a key, the hash of
(the previous block's key, its tokens), so a key names a whole prefix. A new sequence reuses the
longest run of its prompt's blocks whose keys are cached. A block nobody uses any more stays
cached (its key kept) until it is needed for something else, least recently used first.

    pool = BlockPool(num_blocks=1024)
    hit = pool.admit(seq_id, prompt_ids, need=len(prompt_ids) + 1)   # None: not enough blocks now
    pool.grow(seq_id, tokens=n)          # False: out of blocks (preempt someone)
    pool.computed(seq_id, token_ids, n)  # the first n tokens are in the cache now: key full blocks
    pool.release(seq_id)                 # ended: its blocks go back (cached ones stay findable)
"""

from __future__ import annotations

import collections
import hashlib
import struct
from dataclasses import dataclass

from tpi_node.engine.limits import BLOCK_TOKENS


def block_key(prev: bytes, tokens: list[int]) -> bytes:
    """The key of a full block: it names the block's tokens and everything before them."""
    return hashlib.blake2b(prev + struct.pack(f"<{len(tokens)}q", *tokens), digest_size=16).digest()


@dataclass
class _Table:
    blocks: list[int]  # block ids, in position order
    keys: list[bytes]  # keys of the leading full, computed blocks (len <= len(blocks))


@dataclass
class PoolStats:
    hit_tokens: int = 0  # prompt tokens found in the cache
    prompt_tokens: int = 0  # prompt tokens admitted
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


class BlockPool:
    def __init__(self, num_blocks: int, prefix_cache: bool = True) -> None:
        self.num_blocks, self.prefix_cache = num_blocks, prefix_cache
        self.free: collections.deque[int] = collections.deque(range(num_blocks))  # never used, or dropped
        self.cached: collections.OrderedDict[int, bytes] = collections.OrderedDict()  # unused, keyed (LRU first)
        self.by_key: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.refs = [0] * num_blocks
        self.tables: dict[int, _Table] = {}
        self.stats = PoolStats()

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * BLOCK_TOKENS

    def available(self) -> int:
        """Blocks that can be had now (free, or cached and unused)."""
        return len(self.free) + len(self.cached)

    def used(self) -> int:
        return self.num_blocks - self.available()

    def table(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self.tables[seq_id].blocks)

    # ---- a sequence's life --------------------------------------------------------------------
    def admit(self, seq_id: int, prompt: list[int], need: int, reuse: bool = True) -> int | None:
        """Blocks for a new sequence's first `need` tokens, reusing the cached prefix of `prompt`.
        -> how many leading tokens are cached already (a multiple of BLOCK_TOKENS, always fewer
        than len(prompt): the last prompt token is computed again for its logits); None when the
        blocks cannot be had now (nothing changes). `reuse=False`: no prefix is taken from the
        cache (the sequence needs every row computed: prompt logprobs, embeddings); its own full
        blocks are still keyed for others as they are computed."""
        hits: list[int] = []
        keys: list[bytes] = []
        if self.prefix_cache and reuse:
            prev = b""
            for start in range(0, len(prompt) - 1 - (len(prompt) - 1) % BLOCK_TOKENS, BLOCK_TOKENS):
                key = block_key(prev, prompt[start : start + BLOCK_TOKENS])
                block = self.by_key.get(key)
                if block is None:
                    break
                hits.append(block)
                keys.append(key)
                prev = key
        fresh = _blocks_for(need) - len(hits)
        reusable = sum(1 for b in hits if self.refs[b] == 0)  # cached hits leave the LRU, not the count
        if fresh > self.available() - reusable:
            return None
        for b in hits:
            self._take(b)
        blocks = hits + [self._new_block() for _ in range(max(0, fresh))]
        self.tables[seq_id] = _Table(blocks, keys)
        cached = len(hits) * BLOCK_TOKENS
        self.stats.hit_tokens += cached
        self.stats.prompt_tokens += len(prompt)
        return cached

    def grow(self, seq_id: int, tokens: int) -> bool:
        """Room for the sequence's first `tokens` tokens; False when blocks ran out (nothing changes)."""
        t = self.tables[seq_id]
        more = _blocks_for(tokens) - len(t.blocks)
        if more > self.available():
            return False
        t.blocks += [self._new_block() for _ in range(max(0, more))]
        return True

    def computed(self, seq_id: int, token_ids: list[int], n: int) -> None:
        """The first n tokens of the sequence are in every node's cache: key its full blocks."""
        if not self.prefix_cache:
            return
        t = self.tables[seq_id]
        while (len(t.keys) + 1) * BLOCK_TOKENS <= n:
            i = len(t.keys)
            key = block_key(t.keys[-1] if t.keys else b"", token_ids[i * BLOCK_TOKENS : (i + 1) * BLOCK_TOKENS])
            t.keys.append(key)
            block = t.blocks[i]
            if key not in self.by_key and block not in self.key_of:
                self.by_key[key], self.key_of[block] = block, key

    def trim(self, seq_id: int, tokens: int) -> None:
        """The sequence holds `tokens` tokens: blocks past them (rejected drafts' KV) go back."""
        t = self.tables[seq_id]
        while len(t.blocks) > max(_blocks_for(tokens), len(t.keys)):
            self._drop(t.blocks.pop())

    def release(self, seq_id: int) -> None:
        """The sequence ended (or is preempted): its blocks go back; keyed ones stay findable."""
        t = self.tables.pop(seq_id, None)
        if t is None:
            return
        for b in reversed(t.blocks):  # the tail first: a later prompt needs the head more
            self._drop(b)

    # ---- blocks -------------------------------------------------------------------------------
    def _drop(self, b: int) -> None:
        """One holder less; an unheld block stays findable when keyed, else it is free."""
        self.refs[b] -= 1
        if self.refs[b] == 0:
            if b in self.key_of:
                self.cached[b] = self.key_of[b]
            else:
                self.free.append(b)

    def _take(self, b: int) -> None:
        if self.refs[b] == 0:
            self.cached.pop(b, None)
        self.refs[b] += 1

    def _new_block(self) -> int:
        if self.free:
            b = self.free.popleft()
        else:  # evict the least recently used cached block
            b, key = self.cached.popitem(last=False)
            del self.by_key[key], self.key_of[b]
            self.stats.evictions += 1
        self.refs[b] = 1
        return b


def _blocks_for(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)
