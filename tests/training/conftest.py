"""accelerate keeps one process-wide state (mixed precision, device) from the first Accelerator on; runs in one
test process with different `dtype`s need it cleared between tests, as a fresh `python -m training.*` would be."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
