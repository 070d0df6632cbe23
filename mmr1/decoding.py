"""How the samplers run the language model: the prefix once (`prefill`), then one new position per `step`.

Each returns the head's logits at the last position, [rows, vocab]. Three ways, picked by `decoding_for`:
- `CachedDecoding`, the default: a KV cache preallocated for the whole run, attention over the filled slots only;
- `CompiledDecoding`, opt-in (`MMR1Model.compile_decoding`): the same prefill, then decode steps at fixed shapes
  compiled by torch.compile, and replayed as CUDA graphs on CUDA, where launching a 7B model's few hundred kernels
  one by one costs about as much as running them;
- `UncachedDecoding`: the whole sequence again at every step; the floor the benchmarks compare against.
"""

from __future__ import annotations

import functools
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .kv_cache import PreallocatedCache, SlotCache, cache_argument
from .prompting import BatchedPrefix

Head = Callable[[torch.Tensor], torch.Tensor]

# Compiled decoding rounds the cache up to this many positions, so prompts of similar length share one graph.
COMPILED_CAPACITY_MULTIPLE = 256


class Decoding(ABC):
    """What every way shares: the attention mask and the positions of the whole run, allocated once."""

    def __init__(self, mm, rows: BatchedPrefix, num_tokens: int, head: Head, capacity: int | None = None) -> None:
        self.language_model, self.head, self.rows = mm.language_model, head, rows
        self.cache_name = cache_argument(self.language_model)  # inspects the signature: once, not per token
        self.prefix_length = rows.embeds.shape[1]
        self.capacity = capacity or self.prefix_length + num_tokens
        self.attention_mask = rows.attention_mask.new_ones(rows.embeds.shape[0], self.capacity)
        self.attention_mask[:, : self.prefix_length] = rows.attention_mask
        steps = torch.arange(1, num_tokens + 1, device=rows.embeds.device)
        self.next_positions = rows.position_ids[:, -1:] + steps  # [rows, num_tokens]
        self.steps = 0

    def _forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, seen: int, **options) -> torch.Tensor:
        output = self.language_model(
            inputs_embeds=embeds, attention_mask=self.attention_mask[:, :seen], position_ids=position_ids, **options
        )
        return self.head(output.last_hidden_state[:, -1])

    @abstractmethod
    def prefill(self) -> torch.Tensor:
        """Logits after the prefix."""

    @abstractmethod
    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """Logits after appending `embeds` [rows, 1, hidden]."""


class CachedDecoding(Decoding):
    def __init__(self, mm, rows: BatchedPrefix, num_tokens: int, head: Head, capacity: int | None = None) -> None:
        super().__init__(mm, rows, num_tokens, head, capacity)
        self.cache = PreallocatedCache(self.capacity)

    def _cache_options(self) -> dict:
        return {self.cache_name: self.cache, "use_cache": True}

    def prefill(self) -> torch.Tensor:
        return self._forward(self.rows.embeds, self.rows.position_ids, self.prefix_length, **self._cache_options())

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        positions = self.next_positions[:, self.steps - 1 : self.steps]
        return self._forward(embeds, positions, self.prefix_length + self.steps, **self._cache_options())


class UncachedDecoding(Decoding):
    def __init__(self, mm, rows: BatchedPrefix, num_tokens: int, head: Head) -> None:
        super().__init__(mm, rows, num_tokens, head)
        self.embeds = rows.embeds.new_empty(rows.embeds.shape[0], self.capacity, rows.embeds.shape[2])
        self.embeds[:, : self.prefix_length] = rows.embeds
        self.positions = torch.cat([rows.position_ids, self.next_positions], dim=1)

    def prefill(self) -> torch.Tensor:
        return self._forward(self.rows.embeds, self.rows.position_ids, self.prefix_length, use_cache=False)

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        seen = self.prefix_length + self.steps
        self.embeds[:, seen - 1 : seen] = embeds
        return self._forward(self.embeds[:, :seen], self.positions[:, :seen], seen, use_cache=False)


@dataclass
class CompiledState:
    """What compiled decoding keeps between runs of one shape: CUDA graphs replay at fixed addresses, so the
    cache, its write slot and the positions are written again rather than reallocated (as transformers keeps its
    StaticCache); a run of another shape replaces them."""

    shape: tuple
    cache: SlotCache
    positions: torch.Tensor


# One state per language model (the latest shape), dropped with the model or by `release_compiled_state`.
_STATES: weakref.WeakKeyDictionary[torch.nn.Module, CompiledState] = weakref.WeakKeyDictionary()


def release_compiled_state(language_model: torch.nn.Module) -> None:
    """Free the buffers compiled decoding keeps for `language_model` (when it leaves its device, say)."""
    _STATES.pop(language_model, None)


def compiled_state(language_model: torch.nn.Module) -> CompiledState | None:
    return _STATES.get(language_model)


class CompiledDecoding(CachedDecoding):
    def __init__(self, mm, rows: BatchedPrefix, num_tokens: int, head: Head) -> None:
        needed = rows.embeds.shape[1] + num_tokens
        capacity = -(-needed // COMPILED_CAPACITY_MULTIPLE) * COMPILED_CAPACITY_MULTIPLE
        super().__init__(mm, rows, num_tokens, head, capacity)
        self.device = rows.embeds.device
        self.shape = (rows.embeds.shape[0], capacity, rows.embeds.dtype, self.device)
        self.previous = _STATES.get(self.language_model)
        if self.previous is not None and self.previous.shape != self.shape:
            release_compiled_state(self.language_model)  # before allocating the new shape's buffers
            self.previous = None
        if self.previous is not None:
            self.cache = PreallocatedCache(capacity, self.previous.cache.buffers)
        self.compiled_step = compiled_decode_step("reduce-overhead" if self.device.type == "cuda" else "default")

    def prefill(self) -> torch.Tensor:
        """Eager (the prefix length varies from call to call); the filled cache then moves to fixed shapes."""
        logits = super().prefill()
        first_positions = self.next_positions[:, :1]
        if self.previous is None:
            self.cache = SlotCache(self.cache)
            self.positions = first_positions.clone()
            torch._dynamo.mark_static_address(self.positions)
        else:
            self.cache = SlotCache(self.cache, self.previous.cache.slot)
            self.positions = self.previous.positions.copy_(first_positions)
        _STATES[self.language_model] = CompiledState(self.shape, self.cache, self.positions)
        self.visible = self.attention_mask.bool()
        return logits

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's logits are consumed by now
        return self.compiled_step(self.language_model, self.head, self.cache_name, embeds, self.cache,
                                  self.positions, self.visible)


def decode_step(language_model, head: Head, cache_name: str, embeds: torch.Tensor, cache: SlotCache,
                positions: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """One step at fixed shapes: the new position attends to every written, unpadded slot (an additive mask over
    the full capacity); then the write slot and the positions advance in place."""
    slots = torch.arange(visible.shape[-1], device=visible.device)
    allowed = (visible & (slots <= cache.slot))[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=embeds.dtype, device=embeds.device)
    mask = mask.masked_fill(~allowed, torch.finfo(embeds.dtype).min)
    output = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                            **{cache_name: cache})
    cache.slot.add_(1)
    positions.add_(1)
    return head(output.last_hidden_state[:, -1])


@functools.cache
def compiled_decode_step(mode: str) -> Callable:
    """`decode_step` compiled once per process and mode; torch.compile keeps a graph per model and shapes."""
    return torch.compile(decode_step, mode=mode)


def decoding_for(mm, rows: BatchedPrefix, num_tokens: int, head: Head, use_cache: bool = True) -> Decoding:
    if not use_cache:
        return UncachedDecoding(mm, rows, num_tokens, head)
    if mm.compile_decoding:
        return CompiledDecoding(mm, rows, num_tokens, head)
    return CachedDecoding(mm, rows, num_tokens, head)
