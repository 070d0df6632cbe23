"""mmr1 never downloads at runtime: libraries that reach for the Hugging Face Hub as they import or load (bitsandbytes
asks it for kernels, peft and dreamsim load through it) run inside `hub_offline()`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """The Hub offline for the duration (huggingface_hub reads its HF_HUB_OFFLINE constant at call time, the
    environment variable only at its own import)."""
    import huggingface_hub.constants as hub

    offline = hub.HF_HUB_OFFLINE
    hub.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE = offline
