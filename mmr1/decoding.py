"""How the samplers run the language model: the prefix once (`prefill`), then one new position per `step`.

Each returns the head's logits at the last position, [rows, vocab]. Rows that share one prefix (a prompt's
images, a GRPO group's rollouts) are given once with `repeats`: the prefix is prefilled for the distinct rows only
and its keys and values are broadcast to every row of the cache, which is what a single run of one row computes.
Three ways, picked by `decoding_for`:
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


def repeat_rows(prefix: BatchedPrefix, repeats: int) -> BatchedPrefix:
    """Each row of `prefix` `repeats` times in a row: row j of the result is row j // repeats."""
    if repeats == 1:
        return prefix
    return BatchedPrefix(*(tensor.repeat_interleave(repeats, dim=0)
                           for tensor in (prefix.embeds, prefix.attention_mask, prefix.position_ids)))


class Decoding(ABC):
    """What every way shares: the attention mask and the positions of the whole run, allocated once.

    `rows` holds the distinct prefixes; row j of the run is `rows` row j // `repeats`."""

    def __init__(self, mm, rows: BatchedPrefix, num_tokens: int, head: Head, capacity: int | None = None,
                 repeats: int = 1) -> None:
        self.language_model, self.head, self.rows, self.repeats = mm.language_model, head, rows, repeats
        self.cache_name = cache_argument(self.language_model)  # inspects the signature: once, not per token
        self.prefix_length = rows.embeds.shape[1]
        self.capacity = capacity or self.prefix_length + num_tokens
        self.batch = rows.embeds.shape[0] * repeats
        self.attention_mask = rows.attention_mask.new_ones(self.batch, self.capacity)
        self.attention_mask[:, : self.prefix_length] = rows.attention_mask.repeat_interleave(repeats, dim=0)
        steps = torch.arange(1, num_tokens + 1, device=rows.embeds.device)
        self.next_positions = rows.position_ids[:, -1:].repeat_interleave(repeats, dim=0) + steps  # [batch, tokens]
        self.steps = 0

    def _forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, seen: int,
                 attention_mask: torch.Tensor | None = None, **options) -> torch.Tensor:
        mask = self.attention_mask[:, :seen] if attention_mask is None else attention_mask
        output = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, **options)
        return self.head(output.last_hidden_state[:, -1])

    @abstractmethod
    def prefill(self) -> torch.Tensor:
        """Logits after the prefix."""

    @abstractmethod
    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        """Logits after appending `embeds` [rows, 1, hidden]."""


class CachedDecoding(Decoding):
    def __init__(self, mm, rows: BatchedPrefix, num_tokens: int, head: Head, capacity: int | None = None,
                 repeats: int = 1) -> None:
        super().__init__(mm, rows, num_tokens, head, capacity, repeats=repeats)
        self.cache = PreallocatedCache(self.capacity)

    def _cache_options(self) -> dict:
        return {self.cache_name: self.cache, "use_cache": True}

    def prefill(self) -> torch.Tensor:
        if self.repeats == 1:
            return self._forward(self.rows.embeds, self.rows.position_ids, self.prefix_length, **self._cache_options())
        shared = PreallocatedCache(self.prefix_length)
        logits = self._forward(self.rows.embeds, self.rows.position_ids, self.prefix_length,
                               self.rows.attention_mask, **{self.cache_name: shared, "use_cache": True})
        self.cache.broadcast(shared, self.repeats)
        return logits.repeat_interleave(self.repeats, dim=0)

    def step(self, embeds: torch.Tensor) -> torch.Tensor:
        self.steps += 1
        positions = self.next_positions[:, self.steps - 1 : self.steps]
        return self._forward(embeds, positions, self.prefix_length + self.steps, **self._cache_options())


class UncachedDecoding(Decoding):
    def __init__(self, mm, rows: BatchedPrefix, num_tokens: int, head: Head, repeats: int = 1) -> None:
        rows = repeat_rows(rows, repeats)  # the floor: shares nothing
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
    StaticCache)."""

    shape: tuple
    cache: SlotCache
    positions: torch.Tensor


# Shapes kept per language model: an X-CoT run decodes text (one row per subject) and then images (a row per image
# and guidance twin), so two, plus room for a second image batch size, before the least recently used goes.
COMPILED_SHAPES_KEPT = 3
# Per language model, its states by shape, least recently used first; dropped with the model or by
# `release_compiled_state`.
_STATES: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, CompiledState]] = weakref.WeakKeyDictionary()


def release_compiled_state(language_model: torch.nn.Module) -> None:
    """Free the buffers compiled decoding keeps for `language_model` (when it leaves its device, say)."""
    _STATES.pop(language_model, None)


def compiled_states(language_model: torch.nn.Module) -> list[CompiledState]:
    """The states compiled decoding keeps for `language_model`, least recently used first."""
    return list(_STATES.get(language_model, {}).values())


class CompiledDecoding(CachedDecoding):
    def __init__(self, mm, rows: BatchedPrefix, num_tokens: int, head: Head, repeats: int = 1) -> None:
        needed = rows.embeds.shape[1] + num_tokens
        capacity = -(-needed // COMPILED_CAPACITY_MULTIPLE) * COMPILED_CAPACITY_MULTIPLE
        super().__init__(mm, rows, num_tokens, head, capacity, repeats=repeats)
        self.device = rows.embeds.device
        self.shape = (self.batch, capacity, rows.embeds.dtype, self.device)
        states = _STATES.setdefault(self.language_model, {})
        self.previous = states.pop(self.shape, None)
        if self.previous is None and len(states) >= COMPILED_SHAPES_KEPT:
            states.pop(next(iter(states)))  # before allocating the new shape's buffers
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
        _STATES[self.language_model][self.shape] = CompiledState(self.shape, self.cache, self.positions)
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


def decoding_for(mm, rows: BatchedPrefix, num_tokens: int, head: Head, use_cache: bool = True,
                 repeats: int = 1) -> Decoding:
    """How to decode: uncached when asked, compiled when the model opts in, else cached; row j of the run
    continues `rows` row j // `repeats`."""
    if not use_cache:
        return UncachedDecoding(mm, rows, num_tokens, head, repeats=repeats)
    if mm.compile_decoding:
        return CompiledDecoding(mm, rows, num_tokens, head, repeats=repeats)
    return CachedDecoding(mm, rows, num_tokens, head, repeats=repeats)
