"""Prefix caching: the keys and values of prompts already prefilled, kept for prompts that start the same way.

Chat requests repeat a system prompt (and a conversation repeats its whole history): their first
hundreds of tokens give the same keys and values every time, since a token's KV depends only on
the tokens before it and on its position, and every row counts positions from its own first
token. After a prefill the engine stores each prompt's full blocks of `block_size` tokens here; a
later prompt that starts with stored blocks begins its prefill after them.

Blocks are chained as vLLM chains them: a block is found by (its parent block, its own tokens),
so a block matches only when everything before it matched too. The key holds the tokens
themselves, not a hash of them, so two different prefixes can never share a block.

Memory is bounded by `max_tokens` (whole blocks), least recently used first. A lookup or a store
touches a chain from its last block back to its first, so a block is always more recent than the
blocks after it and eviction takes chains from their ends: what remains is still a prefix that
can be found. The blocks live in one pool per cache layer, (blocks, H, block_size, D), grown by
doubling up to the bound, so that storing or reusing a prompt is a few copies per layer, not one
per block and layer (a 512-token prompt of a 30-layer model is 32 blocks: 1,920 tensors).

Only the engine's thread reads or writes a store (no lock); the counters are plain ints that
other threads may read.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK_SIZE = 16
MIN_POOL_BLOCKS = 64


@dataclass(eq=False)
class Block:
    """`block_size` tokens whose keys and values sit in slot `slot` of the pools."""

    ident: int
    key: tuple  # (the parent block's ident or -1, this block's tokens)
    slot: int


class PrefixCache:
    def __init__(self, max_tokens: int, block_size: int = BLOCK_SIZE):
        if block_size < 1:
            raise ValueError(f"block_size must be at least 1, got {block_size}")
        self.block_size = block_size
        self.max_blocks = max(0, max_tokens) // block_size
        self._blocks: collections.OrderedDict[tuple, Block] = collections.OrderedDict()  # LRU first
        self._pools: list[tuple[Tensor, Tensor]] = []  # per cache layer: keys, values (capacity, H, block, D)
        self._free: list[int] = []
        self._ids = itertools.count()
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # of those, tokens whose keys and values came from here (not computed)

    @property
    def num_tokens(self) -> int:
        return len(self._blocks) * self.block_size

    def lookup(self, ids: list[int], limit: int) -> list[Block]:
        """The stored blocks that begin `ids`, covering at most `limit` tokens (touched: recently used)."""
        size, chain, parent = self.block_size, [], -1
        for start in range(0, min(limit, len(ids)) - size + 1, size):
            block = self._blocks.get((parent, tuple(ids[start:start + size])))
            if block is None:
                break
            chain.append(block)
            parent = block.ident
        self._touch(chain)
        return chain

    def count(self, looked_up: int, reused: int) -> None:
        self.queries += looked_up
        self.hits += reused

    def store(self, ids: list[int], layers, row: int, first_column: int) -> None:
        """Keep the full blocks of the prompt `ids`, whose tokens sit in row `row` of the cache
        `layers` (GrowingLayers, keys (B, H, T, D)) from column `first_column` on."""
        size = self.block_size
        found = self.lookup(ids, min(len(ids), self.max_blocks * size))
        # A block is missing, so are all after it (their keys name it): the new ones are a suffix.
        parent, new = found[-1].ident if found else -1, []
        chain = {b.ident for b in found}
        for start in range(len(found) * size, min(len(ids), self.max_blocks * size) - size + 1, size):
            slot = self._take_slot(layers, keep=chain)
            if slot is None:
                break
            block = Block(next(self._ids), (parent, tuple(ids[start:start + size])), slot)
            self._blocks[block.key] = block
            new.append(block)
            chain.add(block.ident)
            parent = block.ident
        if not new:
            return
        self._touch(found + new)
        slots = self._index([b.slot for b in new])
        begin = first_column + len(found) * size
        for layer, (keys, values) in zip(layers, self._pools):
            for pool, x in ((keys, layer.keys), (values, layer.values)):
                span = x[row, :, begin:begin + len(new) * size]  # (H, n * block, D)
                pool[slots] = span.unflatten(1, (len(new), size)).transpose(0, 1)  # (n, H, block, D)

    def gather(self, chains: list[list[Block]], used: list[int], columns: int) -> list[tuple[Tensor, Tensor]]:
        """Per cache layer, keys and values (G, H, columns, D) for a prefill group: row i holds the
        first `used[i]` tokens of its chain right-aligned (left padding with zeros, masked)."""
        out = []
        slots = [self._index([b.slot for b in chain[:-(-n // self.block_size)]]) if n else None
                 for chain, n in zip(chains, used)]  # the blocks that hold each row's first n tokens
        for pools in self._pools:
            pair = []
            for pool in pools:
                x = pool.new_empty(len(chains), pool.shape[1], columns, pool.shape[-1])
                for row, (index, n) in enumerate(zip(slots, used)):
                    x[row, :, :columns - n].zero_()  # padding: masked, but never garbage (NaN * 0 is NaN)
                    if n:
                        x[row, :, columns - n:] = pool[index].transpose(0, 1).flatten(1, 2)[:, :n]
                pair.append(x)
            out.append(tuple(pair))
        return out

    def _index(self, slots: list[int]) -> slice | Tensor:
        """Pool rows `slots`: a slice (a view, no gather) when they are consecutive, as a chain
        stored into a pool with free room is."""
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        return torch.tensor(slots, device=self._pools[0][0].device)

    def _take_slot(self, layers, keep: set[int]) -> int | None:
        """A free pool slot, growing the pools or evicting the least recently used block; None
        when the next to evict is a block of `keep` (the idents of the chain being stored)."""
        if not self._free:
            capacity = self._pools[0][0].shape[0] if self._pools else 0
            if capacity < self.max_blocks:
                self._grow(layers, min(self.max_blocks, max(MIN_POOL_BLOCKS, 2 * capacity)))
            else:
                block = next(iter(self._blocks.values()))
                if block.ident in keep:
                    return None
                del self._blocks[block.key]
                self._free.append(block.slot)
        return self._free.pop()

    def _grow(self, layers, capacity: int) -> None:
        old = self._pools[0][0].shape[0] if self._pools else 0
        grown = []
        for index, layer in enumerate(layers):
            pair = []
            for x in (layer.keys, layer.values):  # (B, H, T, D): a pool per layer, of its own shape
                pool = x.new_zeros(capacity, x.shape[1], self.block_size, x.shape[-1])
                if old:
                    pool[:old] = self._pools[index][len(pair)]
                pair.append(pool)
            grown.append(tuple(pair))
        self._pools = grown
        self._free.extend(range(capacity - 1, old - 1, -1))

    def _touch(self, chain: list[Block]) -> None:
        for block in reversed(chain):  # the first block ends most recent: evicted last
            self._blocks.move_to_end(block.key)
