"""The allowed values of a numeric setting, defined once and checked wherever the setting is read (a CLI option,
a training config key, the sampler), each front end naming the setting as its user typed it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import InputError, MMR1Error


@dataclass(frozen=True)
class Range:
    """Finite numbers from `low` to `high` (None: unbounded), each bound included unless its `*_open` flag is set;
    `note` says what a bound value means (e.g. "0: off")."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    note: str = ""

    def __contains__(self, value: object) -> bool:
        """Whether `value` is a finite int or float (not a bool) within the bounds: NaN and infinities never are."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            bounds = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            bounds = f"{'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            bounds = f"{'<' if self.high_open else '<='} {self.high}"
        else:
            bounds = ""
        return " ".join(filter(None, ("a finite number", bounds, self.note and f"({self.note})")))

    def check(self, name: str, value: object, error: type[MMR1Error] = InputError) -> None:
        """Raise `error` naming the setting as `name` when `value` is outside the range."""
        if value not in self:
            raise error(f"{name} must be {self}, got {value!r}.")
