"""Ranges of numeric settings: NaN and infinities are never in one, bounds are open or closed as declared, and the
error names the setting as the caller spells it."""

from __future__ import annotations

import math

import pytest

from mmr1.errors import InputError, MMR1Error
from mmr1.ranges import Range


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, "1", None])
def test_non_finite_and_non_numbers_are_in_no_range(value):
    assert value not in Range()
    assert value not in Range(0.0)


def test_bounds_are_closed_unless_declared_open():
    closed, open_ = Range(0.0, 1.0), Range(0.0, 1.0, low_open=True, high_open=True)
    assert 0.0 in closed and 1.0 in closed and 0 in closed
    assert 0.0 not in open_ and 1.0 not in open_ and 0.5 in open_
    assert -1e-9 not in closed and 1 + 1e-9 not in closed
    assert 2**70 in Range(0) and 2**70 not in Range(0, 2**64 - 1)


def test_the_error_names_the_setting_and_says_what_it_takes():
    with pytest.raises(InputError, match=r"^--top-p must be a finite number in \(0, 1\] \(1: off\), got nan\.$"):
        Range(0, 1, low_open=True, note="1: off").check("--top-p", math.nan)

    class ConfigLikeError(MMR1Error):
        pass

    with pytest.raises(ConfigLikeError, match=r"config key 'beta' must be a finite number >= 0, got -1"):
        Range(0).check("config key 'beta'", -1, ConfigLikeError)
    Range(0).check("config key 'beta'", 0)  # in range: no error
