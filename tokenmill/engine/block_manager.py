"""Paged KV blocks: a free list, reference counts, copy-on-write and a prefix cache of full blocks.

A full block is named by a hash chained through every block before it, so equal names mean equal
prefixes. Freed blocks keep their contents and name until they are reused; the free list is kept in
least-recently-used order, so reuse evicts the coldest cached prefix first.
"""

from __future__ import annotations

from collections import OrderedDict

from tokenmill.engine.sequence import Sequence

NO_HASH = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[tuple | None] = [NO_HASH] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.cached: dict[tuple, int] = {}
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_cached_free_blocks(self) -> int:
        return sum(1 for b in self.free_blocks if self.block_hash[b] is not NO_HASH)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _block_keys(self, seq: Sequence, num_blocks: int) -> list[tuple]:
        """Chained keys of the first num_blocks full blocks, reusing those the sequence already has."""
        keys = list(seq.block_hashes[:num_blocks])
        size = self.block_size
        for i in range(len(keys), num_blocks):
            parent = hash(keys[i - 1]) if i else 0
            keys.append((parent, tuple(seq.token_ids[i * size : (i + 1) * size])))
        return keys

    def acquire_cached_prefix(self, seq: Sequence) -> int:
        """Give a fresh sequence the cached blocks of its longest cached prefix; returns tokens reused.

        At least one token is left to compute, because the last prompt position must produce logits.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        keys = self._block_keys(seq, max_blocks)
        self.prefix_queries += max_blocks
        for key in keys:
            block = self.cached.get(key)
            if block is None:
                break
            self._take(block)
            seq.block_table.append(block)
        hits = len(seq.block_table)
        self.prefix_hits += hits
        seq.block_hashes = keys[:hits]
        seq.num_computed_tokens = hits * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        return seq.num_computed_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]] | None:
        """Make room for the next num_new_tokens of seq. Returns block copies to do first (copy-on-write),
        or None, changing nothing, when the pool has too few free blocks."""
        first = seq.num_computed_tokens // self.block_size
        shared = first < len(seq.block_table) and self.ref_counts[seq.block_table[first]] > 1
        new = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if max(new, 0) + shared > len(self.free_blocks):
            return None
        copies = []
        if shared:
            source = seq.block_table[first]
            target = self._pop_free()
            self._release(source)
            seq.block_table[first] = target
            copies.append((source, target))
        for _ in range(new):
            seq.block_table.append(self._pop_free())
        return copies

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Name the blocks that just became full of computed tokens so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= len(seq.block_hashes):
            return
        keys = self._block_keys(seq, full)
        for i in range(len(seq.block_hashes), full):
            block = seq.block_table[i]
            if keys[i] not in self.cached and self.block_hash[block] is NO_HASH:
                self.cached[keys[i]] = block
                self.block_hash[block] = keys[i]
        seq.block_hashes = keys

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Let child share every block of parent (n > 1 samples of one prompt)."""
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        for block in child.block_table:
            self.ref_counts[block] += 1

    def trim(self, seq: Sequence) -> None:
        """Give back blocks past the computed tokens (speculative slots whose guesses were rejected)."""
        keep = self.blocks_needed(seq.num_computed_tokens)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def free(self, seq: Sequence) -> None:
        # Tail blocks first, so a later prefix walk evicts a prompt's end before its shared start.
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def _pop_free(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        key = self.block_hash[block]
        if key is not NO_HASH:
            if self.cached.get(key) == block:
                del self.cached[key]
            self.block_hash[block] = NO_HASH
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} freed twice"
        if self.ref_counts[block] == 0:
            self.free_blocks[block] = None
            if self.block_hash[block] is NO_HASH:
                self.free_blocks.move_to_end(block, last=False)  # nothing worth keeping: reuse first
