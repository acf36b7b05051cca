"""The running batch's key/value cache: one row per sequence, left-padded to a common length.

transformers' models take any `Cache`; ours differs from `DynamicCache` in two ways that
continuous batching needs:
- each layer's keys/values live in a buffer that grows by doubling and is written in place, so
  a decode step costs O(new tokens), not a copy of the whole cache (`torch.cat` every step);
- rows can be added (a prefilled sequence joins the batch) and removed (a finished or cancelled
  one leaves, and its memory with it).
Rows shorter than the batch are padded on the left; the attention mask the engine passes marks
those columns, and the position ids are each row's own, so padding changes no result.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

MIN_CAPACITY = 64


class GrowingLayer(DynamicLayer):
    """Keys (B, H, capacity, Dk) and values (B, Hv, capacity, Dv); the first `length` columns are
    in use (`keys`/`values` are views of them).

    A forward that writes new columns itself (the C++ decode loop writes each layer's new key and
    value straight into the buffers) calls `reserve`, writes into `key_buffer`/`value_buffer`,
    then `expose`s the new length."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._k: Tensor | None = None
        self._v: Tensor | None = None
        self.length = 0

    @property
    def key_buffer(self) -> Tensor | None:
        """The whole key buffer (B, H, capacity, Dk); None before the first update."""
        return self._k

    @property
    def value_buffer(self) -> Tensor | None:
        """The whole value buffer (B, Hv, capacity, Dv); None before the first update."""
        return self._v

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self._k is None:
            self.set(key_states, value_states)
            return self.keys, self.values
        new = self.length + key_states.shape[-2]
        self.reserve(new)
        self._k[:, :, self.length:new] = key_states
        self._v[:, :, self.length:new] = value_states
        self.expose(new)
        return self.keys, self.values

    def set(self, keys: Tensor, values: Tensor) -> None:
        """Replace the contents with (B, H, T, D) tensors."""
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._k, self._v = keys, values
        self._grow(keys.shape[-2])
        self.expose(keys.shape[-2])

    def reserve(self, needed: int) -> None:
        """Make room for `needed` columns (doubling, so appends stay O(new tokens))."""
        if needed > self._k.shape[-2]:
            self._grow(needed)

    def _grow(self, needed: int) -> None:
        capacity = max(MIN_CAPACITY, 2 * needed)
        self._k, self._v = _grown(self._k, capacity), _grown(self._v, capacity)

    def expose(self, length: int) -> None:
        """Mark the first `length` columns of the buffers as the cache's contents."""
        self.length = length
        self.keys = self._k.narrow(2, 0, length)  # narrow: a third of the cost of [:, :, :length]
        self.values = self._v.narrow(2, 0, length)

    def get_seq_length(self) -> int:
        return self.length


def _grown(x: Tensor, capacity: int) -> Tensor:
    """`x` (B, H, T, D) copied into a zeroed (B, H, capacity, D) buffer. Keys and values are
    grown each by its own shape: they need not match (DeepSeek-V3's MLA caches a latent of
    kv_lora_rank as "keys" and the rotary part, of another width, as "values")."""
    b, h, t, d = x.shape
    out = x.new_zeros(b, h, capacity, d)
    out[:, :, :t] = x
    return out


def new_cache() -> Cache:
    return Cache(layer_class_to_replicate=GrowingLayer)


def cache_length(cache: Cache | None) -> int:
    return cache.layers[0].length if cache is not None and cache.layers else 0


def merge_rows(batch: Cache | None, joining: Cache) -> Cache:
    """A cache with `batch`'s rows followed by `joining`'s, both left-padded to the longer length."""
    if batch is None or not batch.layers:
        return joining
    length = max(cache_length(batch), cache_length(joining))
    merged = new_cache()
    for a, b in zip(batch.layers, joining.layers):
        layer = GrowingLayer()
        layer.set(torch.cat([_left_pad(a.keys, length), _left_pad(b.keys, length)]),
                  torch.cat([_left_pad(a.values, length), _left_pad(b.values, length)]))
        merged.layers.append(layer)
    return merged


def keep_rows(cache: Cache, rows: list[int], drop_leading: int = 0) -> Cache | None:
    """Only `rows` (in that order), without the first `drop_leading` columns (padding in every
    row kept). Returns None when no row is left, releasing the memory."""
    if not rows:
        return None
    index = torch.tensor(rows, device=cache.layers[0].keys.device)
    kept = new_cache()
    for old in cache.layers:
        layer = GrowingLayer()
        layer.set(old.keys[index, :, drop_leading:], old.values[index, :, drop_leading:])
        kept.layers.append(layer)
    return kept


def _left_pad(x: Tensor, length: int) -> Tensor:
    pad = length - x.shape[-2]
    if pad == 0:
        return x
    return torch.cat([x.new_zeros(*x.shape[:2], pad, x.shape[-1]), x], dim=-2)
