"""A KV cache preallocated for a whole generation, for transformers' language models.

transformers' `DynamicCache` concatenates every step's keys and values onto the past ones, so a step copies the
whole cache (quadratic traffic over an image of 576 tokens, and most of a step's memory traffic at 16 images);
its `StaticCache` avoids the copies but attends over the full preallocated length at every step. This cache
writes each step into buffers sized for prefix plus generation and hands attention views of the filled length:
no copies and no attention over empty slots.

It stays a `DynamicCache` to the model (masks and positions read the filled length through the usual methods),
which keeps it working on transformers 4.52 (per-layer lists) and 5.x (per-layer objects) alike.

`SlotCache` takes over a prefilled cache's buffers for compiled decoding, where every step must have the same
shapes: it attends over the full capacity (the caller masks unwritten slots) and writes at a slot held in a tensor.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class PreallocatedCache(DynamicCache):
    def __init__(self, capacity: int, buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        """`buffers`: a previous run's per-layer keys and values of the same shapes, to write into again."""
        super().__init__()
        self.capacity = capacity
        self._buffers = [] if buffers is None else buffers
        self._filled: list[int] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the new [B, H, T, D] keys and values after the filled slots; return views of everything filled."""
        if layer_idx == len(self._filled):
            if layer_idx == len(self._buffers):
                shape = (*key_states.shape[:2], self.capacity, key_states.shape[-1])
                self._buffers.append((key_states.new_empty(shape), value_states.new_empty(shape)))
            self._filled.append(0)
        keys, values = self._buffers[layer_idx]
        start = self._filled[layer_idx]
        end = start + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"The preallocated KV cache holds {self.capacity} positions; step needs {end}.")
        keys[:, :, start:end].copy_(key_states)
        values[:, :, start:end].copy_(value_states)
        self._filled[layer_idx] = end
        filled = keys[:, :, :end], values[:, :, :end]
        self._expose(layer_idx, *filled)
        return filled

    def broadcast(self, prefilled: "PreallocatedCache", repeats: int) -> None:
        """Fill this (empty) cache with `prefilled`'s keys and values, each row `repeats` times in a row: rows
        that share a prefix get the keys and values its single prefill computed."""
        for layer_idx, (keys, values) in enumerate(prefilled._buffers):
            filled = prefilled._filled[layer_idx]
            self.update(keys[:, :, :filled].repeat_interleave(repeats, dim=0),
                        values[:, :, :filled].repeat_interleave(repeats, dim=0), layer_idx)

    def _expose(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Let the inherited length queries (mask sizes, positions) see the filled views."""
        if hasattr(self, "layers"):  # transformers >= 4.54: one layer object per decoder layer
            from transformers.cache_utils import DynamicLayer

            while len(self.layers) <= layer_idx:
                self.layers.append(DynamicLayer())
            layer = self.layers[layer_idx]
            layer.keys, layer.values = keys, values
            layer.device, layer.is_initialized = keys.device, True
        elif layer_idx == len(self.key_cache):  # 4.52: per-layer lists
            self.key_cache.append(keys)
            self.value_cache.append(values)
        else:
            self.key_cache[layer_idx], self.value_cache[layer_idx] = keys, values


class SlotCache(DynamicCache):
    """Fixed shapes for compiled decode steps: full-capacity keys and values, written at `slot` (a tensor, so
    advancing it changes no shape and no guard). Buffers and slot are marked static: CUDA graphs replay at their
    addresses, so `mmr1.decoding` reuses them from run to run."""

    def __init__(self, prefilled: PreallocatedCache, slot: torch.Tensor | None = None) -> None:
        """`slot`: a previous run's slot tensor, reused so that its address stays the same too."""
        super().__init__()
        self.buffers = prefilled._buffers
        filled = prefilled._filled[0]
        for keys, values in self.buffers:
            # Masked slots get zero attention weight, but a NaN in uninitialised memory would still poison the sum.
            keys[:, :, filled:].zero_()
            values[:, :, filled:].zero_()
            torch._dynamo.mark_static_address(keys)
            torch._dynamo.mark_static_address(values)
        if slot is None:
            slot = torch.empty(1, dtype=torch.long, device=self.buffers[0][0].device)
            torch._dynamo.mark_static_address(slot)
        self.slot = slot.fill_(filled)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write the new keys and values at `slot` onwards; return the whole buffers."""
        keys, values = self.buffers[layer_idx]
        index = self.slot + torch.arange(key_states.shape[-2], device=self.slot.device)
        keys.index_copy_(2, index, key_states)
        values.index_copy_(2, index, value_states)
        return keys, values


def cache_argument(language_model: torch.nn.Module) -> str:
    """The forward argument that takes the cache: `cache` from transformers 5.24 (where `past_key_values` is
    deprecated), `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(language_model.forward).parameters else "past_key_values"
