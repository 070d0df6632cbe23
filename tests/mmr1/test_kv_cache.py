"""The preallocated KV cache: the same hidden states as a full forward, views of the filled length, a clear
error past its capacity."""

from __future__ import annotations

import pytest
import torch

from mmr1.kv_cache import PreallocatedCache, cache_argument


def test_steps_through_the_cache_equal_one_full_forward(tiny_model):
    language_model = tiny_model.language_model
    embeds = torch.randn(2, 9, language_model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(9).expand(2, -1)
    with torch.no_grad():
        full = language_model(inputs_embeds=embeds, position_ids=positions, use_cache=False).last_hidden_state
        cache = PreallocatedCache(capacity=12)
        options = {cache_argument(language_model): cache, "use_cache": True}
        stepped = [language_model(inputs_embeds=embeds[:, :6], position_ids=positions[:, :6], **options).last_hidden_state]
        for index in range(6, 9):
            stepped.append(language_model(inputs_embeds=embeds[:, index : index + 1],
                                          position_ids=positions[:, index : index + 1], **options).last_hidden_state)
    assert torch.allclose(torch.cat(stepped, dim=1), full, atol=1e-5)
    assert cache.get_seq_length() == 9
    assert all(keys.shape[-2] == 12 for keys, _ in cache._buffers)  # allocated once, at full capacity


def test_overflowing_the_capacity_is_an_error(tiny_model):
    language_model = tiny_model.language_model
    embeds = torch.zeros(1, 5, language_model.config.hidden_size)
    cache = PreallocatedCache(capacity=4)
    with torch.no_grad(), pytest.raises(RuntimeError, match="holds 4 positions"):
        language_model(inputs_embeds=embeds, use_cache=True, **{cache_argument(language_model): cache})
