"""The valid range of every numeric setting, in one place for the command line and the configs' ``validate()``.

The command line checks each flag with these ranges while parsing (``covidxray data --test-fraction 1.5`` exits 2
naming the flag and its range before any work), and ``BuildConfig``, ``TrainConfig`` and ``ReproduceConfig``
check the same ranges, so a notebook user gets the same protection. This module imports nothing heavy: the
parser uses it before TensorFlow is loaded.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

SEED_MAX = 2**32 - 1
"""Largest seed numpy's legacy seeding and ``keras.utils.set_random_seed`` accept."""
MIN_IMAGE_SIZE = 32
"""Smallest input side every model accepts (VGG16 halves it five times)."""
MAX_NEAR_DUP_BITS = 24
"""Largest useful dHash distance for near duplicates (of 256 bits). Re-encoded or rescaled copies differ by 0-10
bits; unrelated chest X-rays start at about 20 (on the 340-image seed set the largest group of linked images is 14
at 24 bits, 72 at 28 and 129 at 32), so beyond 24 unrelated images merge into one split group and pairs across the
two labels are dropped as conflicting duplicates."""
MIN_N_BOOT = 20
"""Fewest bootstrap resamples that still give an interval (0 turns intervals off)."""
MAX_AGE = 150.0
"""Oldest plausible patient age in years."""
MAX_STARTUP_TIMEOUT = 86400.0
"""Longest wait, in seconds, for the other machines of a multi-worker run (a day)."""


@dataclass(frozen=True)
class Range:
    """A closed or half-open interval of numbers, optionally integers only, plus single extra allowed values."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    also: tuple[float, ...] = ()

    def __contains__(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return False
        if self.integer and not isinstance(value, numbers.Integral):
            return False
        if value in self.also:
            return True
        if not math.isfinite(value):
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return self.hi is None or not (value > self.hi or (self.hi_open and value == self.hi))

    def __str__(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.lo is not None and self.hi is not None:
            left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
            text = f"{kind} in {left}{_num(self.lo)}, {_num(self.hi)}{right}"
        elif self.lo is not None:
            text = f"{kind} {'>' if self.lo_open else '>='} {_num(self.lo)}"
        elif self.hi is not None:
            text = f"{kind} {'<' if self.hi_open else '<='} {_num(self.hi)}"
        else:
            text = kind
        return " or ".join([*(_num(a) for a in self.also), text])


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


FRACTION = Range(0.0, 1.0, hi_open=True)
PROBABILITY = Range(0.0, 1.0)
SEED = Range(0, SEED_MAX, integer=True)
POSITIVE_INT = Range(1, integer=True)
NON_NEGATIVE_INT = Range(0, integer=True)
IMAGE_SIZE = Range(MIN_IMAGE_SIZE, integer=True)
AGE = Range(0.0, MAX_AGE)
LEARNING_RATE = Range(0.0, 1.0, lo_open=True)
N_BOOT = Range(MIN_N_BOOT, integer=True, also=(0,))
NEAR_DUP_BITS = Range(0, MAX_NEAR_DUP_BITS, integer=True)
STARTUP_TIMEOUT = Range(0.0, MAX_STARTUP_TIMEOUT, lo_open=True)
PORT = Range(1, 65535, integer=True)


def out_of_range(name: str, value: object, valid: Range, flag: str | None = None) -> str | None:
    """The problem with ``value`` for the setting ``name`` (and its command-line ``flag``), or None when valid."""
    if value in valid:
        return None
    where = f"{name} ({flag})" if flag else name
    return f"{where} is {value!r}; it must be {valid}"
