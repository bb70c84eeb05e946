"""Progress bars for the steps that take more than a few seconds, always on stderr (stdout carries results).

One switch for the whole process: the command line's ``--quiet`` turns every bar off (:func:`set_progress`).
Otherwise a bar shows where stderr is a terminal and stays out of logs, pipes and notebooks (tqdm's
``disable=None``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

_state = {"enabled": True}


def set_progress(enabled: bool) -> None:
    """Turn every progress bar of the package on (where stderr is a terminal) or off."""
    _state["enabled"] = bool(enabled)


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None,
                 unit: str = "it") -> tqdm:
    """A tqdm bar on stderr over ``iterable`` (or to ``update`` by hand), off when disabled or not on a terminal."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, leave=False,
                disable=None if _state["enabled"] else True)
