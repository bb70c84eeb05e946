"""What every source reader returns."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SourceImage:
    """One candidate image found in a source, with what the source says about it."""

    path: Path
    """The file on disk (never moved, changed or deleted)."""
    rel_path: str
    """Relative to the source root, POSIX separators; stable across machines."""
    label: str
    """"normal" or "covid"."""
    patient_id: str
    """"<source>:<id>", so ids never collide across sources."""
    source: str
    view: str = ""
    sex: str = ""
    age: float = math.nan
    split: str | None = None
    """Only for pre-split imports, which keep their train/test split."""


@dataclass
class SourceScan:
    """The result of reading one source: the images selected and the files or rows skipped, with reasons."""

    images: list[SourceImage] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(relative path or metadata row, reason)."""
    stats: dict[str, int] = field(default_factory=dict)
    """Counts a reader wants to report (rows read, rows selected, ...)."""
