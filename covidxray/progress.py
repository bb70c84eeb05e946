"""Progress bars for the steps that take more than a few seconds, always on stderr (stdout carries results).

The one place that decides whether a bar is drawn (:func:`bar_wanted`): the stream is a terminal, the caller's
own switch is on (a library call's ``progress=``), and the process has not turned bars off (the command line's
``--quiet`` or ``--format jsonl``, through :func:`set_progress`). A log file, a pipe or a notebook gets no bar,
so no ``\\r``-redrawn lines. Behind TensorFlow's noise filter (:mod:`covidxray.tfenv`), fd 2 is a pipe: the
stream the filter writes to is what counts. Every bar of the package is a :func:`progress_bar`; Keras' training
bar asks :func:`bar_wanted` too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import IO, Any

from tqdm.auto import tqdm

from covidxray.tfenv import stderr_behind_filter

_state = {"enabled": True}


def set_progress(enabled: bool) -> None:
    """Turn every progress bar of the package on (where its stream is a terminal) or off."""
    _state["enabled"] = bool(enabled)


def bar_wanted(stream: IO[str] | None = None, *, enabled: bool = True) -> bool:
    """True when a bar is drawn on ``stream`` (default: the current ``sys.stderr``): ``enabled`` by the caller,
    not turned off for the process, and the stream is a terminal."""
    if not (enabled and _state["enabled"]):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        if stream.isatty():
            return True
        fd = stream.fileno()
    except (AttributeError, ValueError, OSError):  # no isatty or no descriptor (io.UnsupportedOperation), closed
        return False
    behind = stderr_behind_filter() if fd == 2 else None  # fd 2 piped through TensorFlow's noise filter
    return behind is not None and os.isatty(behind)


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str, total: int | None = None,
                 unit: str = "it", enabled: bool = True, stream: IO[str] | None = None, **options: Any) -> tqdm:
    """A tqdm bar on ``stream`` (default: stderr) over ``iterable`` (or to ``update`` by hand), drawn only where
    :func:`bar_wanted` says so; ``options`` go to tqdm (e.g. ``initial``, ``unit_scale``)."""
    stream = sys.stderr if stream is None else stream
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=stream, leave=False,
                disable=not bar_wanted(stream, enabled=enabled), **options)
