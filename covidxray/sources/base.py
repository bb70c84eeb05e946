"""What every source reader returns."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from covidxray.errors import DataError


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


_AGE_UNITS = {"": 1.0, "Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}
_AGE_PATTERN = re.compile(r"^(?P<value>\d+(?:\.\d+)?)\s*(?P<unit>[YMWD]?)$", re.IGNORECASE)
MAX_AGE = 130.0
"""Ages at or above this are data-entry errors (NIH's list has a few ages over 400) and read as unknown."""


def parse_age(text: str) -> float:
    """Age in years from ``"58"``, ``"58.5"``, ``"058Y"``, ``"6M"``, ``"10D"``; NaN when blank.

    Raises ValueError for text that is not an age, so readers can say which row is wrong; an age at or
    over :data:`MAX_AGE` is returned as NaN (a known data-entry error, not a reason to drop the image).
    """
    text = (text or "").strip()
    if not text:
        return math.nan
    match = _AGE_PATTERN.match(text)
    if match is None:
        raise ValueError(f"age {text!r} is not a number of years (e.g. 45, 45.5, 045Y, 6M)")
    age = float(match.group("value")) * _AGE_UNITS[match.group("unit").upper()]
    return age if age < MAX_AGE else math.nan


def parse_sex(text: str) -> str:
    """``"M"``, ``"F"`` or ``""`` from the spellings sources use (M, male, F, female, any case)."""
    value = (text or "").strip().upper()
    return {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}.get(value, "")


def read_table(
    csv_path: Path, required: Sequence[str], fix: str, *, text: str | None = None
) -> pd.DataFrame:
    """Read a label CSV as stripped text columns, drop pandas' ``Unnamed:`` trailing-comma columns and check the
    required ones; errors name the file and say ``fix``. ``text`` is the already decoded content, if any."""
    try:
        df = pd.read_csv(io.StringIO(text) if text is not None else csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: not a readable CSV ({exc}); {fix}") from exc
    df.columns = [str(c).strip() for c in df.columns]
    df = df.loc[:, [c for c in df.columns if c and not c.startswith("Unnamed:")]]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{csv_path}: missing required column(s) {missing} (has {list(df.columns)[:8]}...). {fix}")
    for column in df.columns:
        df[column] = df[column].str.strip()
    return df
