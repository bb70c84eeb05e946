"""What every source reader returns."""

from __future__ import annotations

import csv
import io
import math
import re
from collections import Counter
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
    """The split the source names (a ``split`` column, a ``train/`` or ``test/`` folder), else None. Pre-split
    imports keep it; the build re-splits every other source by patient, and evaluation selects by it."""
    license: str = ""
    """The licence the source's metadata states for this image ("" when it states none per image)."""
    source_url: str = ""
    """Where the source says the image was published (its metadata's url or doi), "" when it says nothing."""


@dataclass
class SourceScan:
    """The result of reading one source: the images selected and the files or rows skipped, with reasons."""

    images: list[SourceImage] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(relative path or metadata row, reason)."""
    stats: dict[str, int] = field(default_factory=dict)
    """Counts a reader wants to report (rows read, rows selected, ...)."""


_AGE_UNITS = {"": 1.0, "Y": 1.0, "M": 1.0 / 12.0, "W": 7.0 / 365.25, "D": 1.0 / 365.25}
_AGE_PATTERN = re.compile(r"^(?P<value>\d+(?:\.\d*)?)\s*(?P<unit>[YMWD]?)$", re.IGNORECASE)
_UNKNOWN_AGES = frozenset({"", "nan", "na", "n/a", "none", "null", "unknown", "?"})
MAX_AGE = 130.0
"""Ages at or above this are data-entry errors (NIH's list has a few ages over 400) and read as unknown."""


def parse_age(value: object, *, strict: bool = True) -> float:
    """Age in years from what sources write: ``"58"``, ``"58.0"``, ``"058Y"``, ``"6M"``, ``"10D"``, ``58.0``.

    Blank, ``NaN``, ``None`` and ``unknown`` read as NaN, as does an age at or over :data:`MAX_AGE` (a known
    data-entry error, not a reason to drop the image). Other text (``"adult"``, ``"-3"``) raises ValueError so
    readers can say which row is wrong, or reads as NaN with ``strict=False`` (where a bad age must not cost
    the image, e.g. ieee8023's COVID rows). The one age parser of the package.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return math.nan
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = f"{value:f}" if value >= 0 else str(value)
    text = str(value).strip()
    if text.lower() in _UNKNOWN_AGES:
        return math.nan
    match = _AGE_PATTERN.match(text)
    if match is None:
        if strict:
            raise ValueError(f"age {text!r} is not a number of years (e.g. 45, 45.5, 045Y, 6M)")
        return math.nan
    age = float(match.group("value")) * _AGE_UNITS[match.group("unit").upper()]
    return age if age < MAX_AGE else math.nan


def parse_sex(text: str) -> str:
    """``"M"``, ``"F"`` or ``""`` from the spellings sources use (M, male, F, female, any case)."""
    value = (text or "").strip().upper()
    return {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}.get(value, "")


LABEL_ALIASES: dict[str, str] = {
    "normal": "normal", "no finding": "normal", "0": "normal", "0.0": "normal",
    "covid": "covid", "covid 19": "covid", "covid19": "covid", "1": "covid", "1.0": "covid",
}
"""Spellings of the two classes in label columns and class-folder names, after :func:`parse_label`'s
normalisation (lower case; ``-`` and ``_`` read as spaces): ``Normal``, ``NORMAL``, ``No Finding``, ``0``;
``COVID``, ``COVID-19``, ``covid_19``, ``covid19``, ``1``."""


def parse_label(text: str) -> str | None:
    """``"normal"`` or ``"covid"`` from any spelling in :data:`LABEL_ALIASES`; None for any other class."""
    key = " ".join((text or "").strip().lower().replace("-", " ").replace("_", " ").split())
    return LABEL_ALIASES.get(key)


def listed_file_problem(path: Path | None, folder: Path, listing: str) -> str | None:
    """Why a file that a source's list (``listing``: metadata.csv, Data_Entry_2017.csv) names cannot be used: it
    is not on disk (``path`` None) or it resolves outside the source's ``folder``; None when it can."""
    if path is None:
        return f"listed in {listing} but not on disk"
    return outside_reason(path, folder)


def outside_reason(path: Path, root: Path) -> str | None:
    """Why a file a source lists may not be read: it resolves (through ``..``, an absolute path or a symbolic
    link) outside the source's folder ``root``; None when it stays inside.

    Every source reader checks each file with this before yielding it, so a crafted list (``../../x.png``,
    ``/etc/...``) or a link out of the folder can never bring other files into a dataset.
    """
    try:
        target = path.resolve()
        inside = target.is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return "broken symbolic link or symlink loop"
    if inside:
        return None
    return f"path leaves the source folder (resolves to {target}; put the file inside {root} or list it there)"


def _first_line(csv_path: Path) -> str:
    """The first line of a CSV file as text ("" when it cannot be read: pandas then reports the problem)."""
    try:
        with open(csv_path, encoding="utf-8-sig", errors="replace", newline="") as handle:
            return handle.readline()
    except OSError:
        return ""


def duplicate_columns(text: str, *, lower: bool = False) -> list[str]:
    """Column names the header (first line of the CSV ``text``) holds more than once, compared stripped (and
    lower-cased with ``lower``), blanks ignored; [] when each is unique."""
    try:
        header = next(csv.reader(io.StringIO(text.lstrip("\ufeff"))), [])
    except csv.Error:
        return []
    counts = Counter(c.strip().lower() if lower else c.strip() for c in header)
    return sorted(c for c, n in counts.items() if c and n > 1)


def read_table(
    csv_path: Path, required: Sequence[str], fix: str, *, text: str | None = None, lower: bool = False,
    keep_blank_lines: bool = False,
) -> pd.DataFrame:
    """Read a label CSV as stripped text columns, drop pandas' ``Unnamed:`` trailing-comma columns and check the
    required ones; errors name the file and say ``fix``. ``text`` is the already decoded content, if any.

    ``lower`` lower-cases the column names (for hand-written lists, whose headers come in any case);
    ``keep_blank_lines`` keeps blank lines as empty rows, so that row ``i`` is on line ``i + 2`` of the file.
    Missing trailing fields read as ``""``.
    """
    try:
        df = pd.read_csv(io.StringIO(text) if text is not None else csv_path, dtype=str, keep_default_na=False,
                         skip_blank_lines=not keep_blank_lines)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: not a readable CSV ({exc}); {fix}") from exc
    duplicated = duplicate_columns(text if text is not None else _first_line(csv_path), lower=lower)
    if duplicated:
        raise DataError(f"{csv_path}: the header names column(s) {duplicated} more than once; a column must appear "
                        f"once (the reader would rename the copy {duplicated[0] + '.1'!r} and ignore it). Delete or "
                        f"rename the extra column. {fix}")
    df.columns = [str(c).strip().lower() if lower else str(c).strip() for c in df.columns]
    df = df.loc[:, [c for c in df.columns if c and not c.lower().startswith("unnamed:")]]
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataError(f"{csv_path}: missing required column(s) {missing} (has {list(df.columns)[:8]}...). {fix}")
    for column in df.columns:
        df[column] = df[column].fillna("").str.strip()
    return df
