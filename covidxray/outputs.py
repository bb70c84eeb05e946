"""Output folders the tool owns, atomic file writes and JSON conversion: nothing of the user's is ever lost.

Every verb that writes claims its output folder with :func:`claim_output`. The folder then holds a hidden
ownership record, ``.covidxray.json``, naming each file the verb wrote with its SHA-256. The tool replaces or
deletes only files that a record names and that are unchanged since; anything else in the folder (a dotfile, a
same-named file, a folder the user added, a symlink) is the user's, and the claim refuses before any work is
done, naming up to five such entries and the fix. A top-level ``README.md`` (the placeholder this repository
ships in its output folders) is left where it is and never touched.

Two ways to write, both atomic per file and both leaving no half-written output:

* :meth:`OutputDir.put` (and ``write_text``/``write_json``/``save_figure``) writes one file through a scratch
  folder inside the output and renames it into place, then records it (training runs, heatmaps, tables).
* :meth:`OutputDir.stage` gives a scratch folder to fill with a complete new output; :meth:`OutputDir.commit_stage`
  swaps it in entry by entry, replacing only recorded entries (dataset builds, evaluations, probes). The folder
  itself is never renamed, so ``--out .``, a mount point or a symlinked folder work like any other folder.

Scratch folders carry a record of their own, so a killed run's leftovers are recognised and removed by the next
claim; a killed swap leaves a pending record, so the next claim knows both the old and the new files as ours.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import fnmatch
import hashlib
import io
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxray.errors import DataError, os_error_line

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

RECORD_NAME = ".covidxray.json"
"""The ownership record of an output folder."""
PENDING_NAME = ".covidxray.pending.json"
"""The record of a swap in progress (the new files); becomes the record when the swap ends."""
SCRATCH_PREFIX = ".covidxray-tmp-"
"""Scratch folders (partial files, staged outputs, the old entries during a swap) inside an output folder."""
KEPT_NAMES = frozenset({"README.md"})
"""Top-level files of an output folder that belong to the repository: left in place, never replaced."""
LOCK_NOTE = ".covidxray.lock"
"""Who holds an output folder's lock (pid and command), present while a verb writes there."""
FORMAT = 2
KNOWN_FORMATS = frozenset({1, 2})
"""Record formats this version reads: 1 (no kind, version or data; the kind follows from the verb) and 2."""
RESERVED_NAMES = frozenset({RECORD_NAME, PENDING_NAME, LOCK_NOTE})
"""Top-level names of an output folder that are the package's bookkeeping, never data (nor taken from an archive)."""
_RESERVED = RESERVED_NAMES
MAX_NAMED = 5


# ---------------------------------------------------------------------------------------------- JSON and files


def _json_key(key: Any) -> str:
    if isinstance(key, np.generic):
        key = key.item()
    return key if isinstance(key, str) else str(key)


def to_jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars and arrays converted, NaN and infinities -> None, tuples -> lists."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {_json_key(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, pd.DataFrame):
        return to_jsonable(obj.to_dict(orient="records"))
    if isinstance(obj, pd.Series):
        return to_jsonable(obj.to_dict())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return [to_jsonable(v) for v in sorted(obj, key=str)]
    if isinstance(obj, Path):
        return obj.as_posix()
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    raise TypeError(f"cannot write a {type(obj).__name__} to JSON")


def json_text(obj: Any, *, sort_keys: bool = True) -> str:
    """``obj`` as the package writes JSON: converted by :func:`to_jsonable`, indent 2, newline, keys sorted
    unless ``sort_keys`` is False (records whose field order is meaningful, e.g. a training history)."""
    return json.dumps(to_jsonable(obj), indent=2, sort_keys=sort_keys, allow_nan=False) + "\n"


def json_line(obj: Any) -> str:
    """``obj`` as one line of JSON Lines: converted by :func:`to_jsonable`, keys in their order, newline ended."""
    return json.dumps(to_jsonable(obj), allow_nan=False) + "\n"


def csv_text(table: pd.DataFrame | Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """``table`` as the package writes CSV: a header, one row per line, "\\n" line endings on every platform, no
    index. ``table`` is a DataFrame, or rows (mappings) written in ``columns`` order exactly as their values
    print (the manifest's contract)."""
    if isinstance(table, pd.DataFrame):
        return table.to_csv(index=False, lineterminator="\n")
    if columns is None:
        raise ValueError("csv_text of rows needs the columns")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buf.getvalue()


def write_csv(table: pd.DataFrame | Sequence[Mapping[str, Any]], path: str | Path,
              columns: Sequence[str] | None = None) -> Path:
    """Write ``table`` as CSV atomically (see :func:`csv_text`); returns the path."""
    return write_text(csv_text(table, columns), path)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Run ``write`` on a temporary file beside ``path`` (same suffix), then rename it into place.

    A crash or error leaves either the old file or the new one, never half of one, and no temporary file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.covidxray-partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_bytes(data: bytes, path: str | Path) -> Path:
    """Write ``data`` atomically; returns the path."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(text: str, path: str | Path) -> Path:
    """Write UTF-8 text atomically; returns the path."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` as JSON atomically (see :func:`json_text`); returns the path."""
    return write_text(json_text(obj), path)


def read_json(path: str | Path, fix: str, *, what: str = "the JSON file", error: type[Exception] = DataError,
              expect: type | None = dict) -> Any:
    """One JSON file the package reads (a summary, a record, a run file, a results file): its content, or one
    ``error`` (DataError, or ModelError for run files) naming the file, what is wrong and ``fix``. ``expect`` is the
    type the content must have (None: any)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise error(f"{path}: cannot read {what} ({exc}); {fix}") from exc
    if expect is not None and not isinstance(data, expect):
        raise error(f"{path}: {what} is not a JSON {'object' if expect is dict else expect.__name__}; {fix}")
    return data


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(path: str | Path) -> str:
    """Short fingerprint of one file's content (the first 16 hex digits of its SHA-256)."""
    return file_sha256(path)[:16]


JUPYTER_KERNELS = ("ipykernel_launcher.py", "ipykernel_launcher", "ipykernel")
"""Program names of a Jupyter (IPython) kernel process."""
JUPYTER_KERNEL_COMMAND = "a Jupyter notebook kernel"


def command_line() -> list[str]:
    """The command or call that is running: ``covidxray VERB ...`` from the shell, else the Python program; a
    Jupyter kernel is named as such (its arguments are a connection file in a temporary folder of the machine)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in JUPYTER_KERNELS:
        return [JUPYTER_KERNEL_COMMAND]
    if argv and Path(argv[0]).name in ("covidxray", "__main__.py"):
        argv[0] = "covidxray"
    elif argv:
        argv[0] = Path(argv[0]).name
    return argv


# ---------------------------------------------------------------------------------------------- where outputs go


def _inside(a: Path, b: Path) -> bool:
    """True when ``a`` is ``b`` or lies inside it (both resolved)."""
    return a == b or b in a.parents


def check_outside_sources(out: str | Path, sources: Iterable[str | Path | None], flag: str = "--out") -> None:
    """Refuse an output folder equal to, inside, or containing any source (resolved paths compared)."""
    target = Path(out).resolve()
    for source in sources:
        if source is None:
            continue
        src = Path(source).resolve()
        if _inside(target, src) or _inside(src, target):
            how = "is" if target == src else "lies inside" if _inside(target, src) else "contains"
            raise DataError(f"{flag} {out} {how} the source {source}; sources are only read, never written. "
                            f"Choose an {flag} folder outside every source folder.")


# ---------------------------------------------------------------------------------------------- kinds


@dataclass(frozen=True)
class Kind:
    """What an output folder is: the verbs that write it, the entries a rebuild may replace, what may nest in it."""

    name: str
    """The kind's name, as records and messages spell it."""
    verbs: tuple[str, ...]
    """The verbs that write this kind (the first is the one users type)."""
    replaces: tuple[str, ...] = ()
    """fnmatch patterns of the top-level entries a rebuild may remove when it no longer writes them. A record
    never widens this: a recorded entry outside it is kept in place (and stays recorded)."""
    nests: frozenset[str] = frozenset()
    """Kinds that may live in a direct sub-folder (each named in the record as a child, never removed by a
    rebuild of this one)."""
    phrase: str = ""
    """How a sentence names one such folder ("a folder of predictions"); default: the name with its article."""

    @property
    def article(self) -> str:
        """``a dataset``, ``an evaluation``, ``a folder of heatmaps``: the kind as a sentence names it."""
        return self.phrase or ("an " if self.name[0] in "aeiou" else "a ") + self.name


_RESULT_FILES = ("*.json", "*.csv", "*.md", "*.png", "*.txt")
KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("dataset", ("data",), ("train", "val", "test", "manifest.csv", "summary.json", "rejected.csv")),
    Kind("run", ("train",), nests=frozenset({"evaluation", "predictions", "heatmaps", "probes"})),
    Kind("evaluation", ("evaluate",), _RESULT_FILES),
    Kind("predictions", ("predict",), ("predictions.csv", "skipped.csv", "heatmaps", "*.json"),
         phrase="a folder of predictions"),
    Kind("heatmaps", ("cam",), _RESULT_FILES, phrase="a folder of heatmaps"),
    Kind("probes", ("probe",), _RESULT_FILES, phrase="a folder of shortcut probes"),
    Kind("reproduction", ("reproduce",), _RESULT_FILES,
         nests=frozenset({"reproduction", "dataset", "run", "evaluation", "heatmaps", "probes", "synthetic sources"})),
    Kind("demo", ("demo",), nests=frozenset({"synthetic sources", "dataset", "reproduction", "heatmaps"}),
         phrase="a demo folder"),
    Kind("synthetic sources", ("synthetic",), ("*",), nests=frozenset({"synthetic sources"}),
         phrase="a folder of synthetic sources"),
    Kind("download", ("download",), phrase="a downloaded source"),
    Kind("set-aside results", ("render",), phrase="a folder of results set aside by a render"),
    Kind("scratch", ("scratch",)),
)}
"""Every kind of output folder the package writes."""
KIND_OF_VERB: dict[str, Kind] = {verb: kind for kind in KINDS.values() for verb in kind.verbs}
"""The kind each verb writes."""


def kind_of_verb(verb: str) -> Kind:
    """The kind ``verb`` writes (ValueError for a verb the package does not have: a programming error)."""
    try:
        return KIND_OF_VERB[verb]
    except KeyError:
        raise ValueError(f"unknown verb {verb!r}; one of {sorted(KIND_OF_VERB)}") from None


# ---------------------------------------------------------------------------------------------- records


def _new_record(verb: str, command: Sequence[str] | None) -> dict:
    from covidxray import __version__

    return {"tool": "covidxray", "format": FORMAT, "kind": kind_of_verb(verb).name, "verb": verb,
            "version": __version__, "command": list(command or command_line()), "files": {}, "children": [],
            "data": None}


class RecordError(DataError):
    """A covidxray record that is damaged or tampered with: refused, never followed."""


def _bad_record(path: Path, what: str) -> RecordError:
    return RecordError(f"{path}: {what}; the record is damaged or was edited, so covidxray will not act on it. "
                       f"Move the folder {path.parent} aside (or delete {path.name} to have every entry there "
                       "treated as yours), then rerun.")


def plain_relative(name: object, *, single: bool) -> bool:
    """True for a plain relative name inside a folder: a non-empty string, not absolute, no ``..`` or ``.``
    part, no backslash or NUL, and (``single``) no separator at all."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name or name.startswith("/"):
        return False
    parts = name.split("/")
    if single and len(parts) != 1:
        return False
    return all(part not in ("", ".", "..") for part in parts)


def _check_record(data: dict, path: Path) -> dict:
    """``data`` as a valid record, or RecordError naming ``path`` and what is wrong."""
    fmt = data.get("format")
    if fmt not in KNOWN_FORMATS:
        raise _bad_record(path, f"record format {fmt!r} is not one this version reads ({sorted(KNOWN_FORMATS)}); "
                                "it was written by another covidxray version")
    files, children = data.get("files"), data.get("children", [])
    if not isinstance(files, dict) or not isinstance(children, list):
        raise _bad_record(path, "'files' must be an object and 'children' a list")
    for rel, sha in files.items():
        if not plain_relative(rel, single=False):
            raise _bad_record(path, f"file name {rel!r} is not a plain relative name inside the folder")
        if rel.split("/")[0] in _RESERVED or not isinstance(sha, str) or len(sha) != 64:
            raise _bad_record(path, f"entry {rel!r} is not a file this package records (name or hash)")
    for child in children:
        if not plain_relative(child, single=True) or child in _RESERVED:
            raise _bad_record(path, f"child name {child!r} is not a plain folder name inside the folder")
    verb = data.get("verb")
    kind = data.get("kind") or (KIND_OF_VERB[verb].name if verb in KIND_OF_VERB else None)
    if kind not in KINDS:
        raise _bad_record(path, f"kind {kind!r} (verb {verb!r}) is not one covidxray writes")
    data["kind"], data["children"] = kind, list(children)
    data.setdefault("data", None)
    return data


def read_record(path: str | Path) -> dict | None:
    """The covidxray record stored at ``path``: None when there is none (or it is another tool's JSON); a
    RecordError when it is covidxray's but damaged or unsafe (a name outside its folder, an unknown format)."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "covidxray":
        return None
    return _check_record(data, path)


def artifact(folder: str | Path) -> dict | None:
    """The record of output folder ``folder`` (its kind, writer, version, command, files, data), or None."""
    return read_record(Path(folder) / RECORD_NAME)


def describe(record: dict) -> str:
    """``a run (written by `covidxray train ...`, covidxray 0.1.0)``: what a folder is, for messages."""
    command = " ".join(record.get("command") or [])
    version = record.get("version")
    return (f"{KINDS[record['kind']].article} (written by `{command}`" + (f", covidxray {version}" if version else "")
            + ")")


def data_provenance(folder: str | Path, kind: str | None = None) -> dict | None:
    """The data an artifact came from, as its record says (see :func:`provenance`), or None (no record, a record
    of another ``kind``, or one written before records kept it)."""
    record = artifact(folder)
    if record is None or (kind is not None and record["kind"] != kind):
        return None
    return record.get("data")


def is_synthetic_artifact(folder: str | Path) -> bool:
    """True when ``folder``'s record says it was made from the embedded synthetic data set."""
    return bool((data_provenance(folder) or {}).get("synthetic"))


SYNTHETIC = "SYNTHETIC"
"""The word every artifact made from the embedded synthetic data set shows where a reader looks."""


def provenance(*, fingerprint: str | None, synthetic: bool, source: str,
               model: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The data an artifact came from, as records keep it: the data's fingerprint (a manifest's or a CSV's), whether
    it is the embedded synthetic set, where it was, and (for a model's outputs) the data the model was trained on.
    ``synthetic`` is true when either the data or the model's data is synthetic."""
    model = dict(model) if model else None
    return {"fingerprint": fingerprint, "synthetic": bool(synthetic or (model or {}).get("synthetic")),
            "source": source, "model": model}


def synthetic_note(data: Mapping[str, Any] | None, what: str = "these results") -> str:
    """A one-line warning for readers when ``data`` (a provenance) is synthetic, else an empty string."""
    if not (data or {}).get("synthetic"):
        return ""
    return (f"{SYNTHETIC} DATA: {what} come from the embedded synthetic data set (made-up images for checking the "
            "plumbing), not from chest X-rays; they say nothing about COVID-19.")


def _is_scratch(entry: Path) -> bool:
    """A scratch folder this package made (name and its own record both say so)."""
    if not entry.name.startswith(SCRATCH_PREFIX) or entry.is_symlink() or not entry.is_dir():
        return False
    try:
        record = read_record(entry / RECORD_NAME)
    except RecordError:
        return False
    return record is not None and record.get("verb") == "scratch"


def _owned(folder: Path) -> tuple[dict[str, set[str]], set[str]]:
    """Files (relative path -> accepted hashes) and child folders the folder's record and pending record name."""
    files: dict[str, set[str]] = {}
    children: set[str] = set()
    for name in (RECORD_NAME, PENDING_NAME):
        record = read_record(folder / name)
        if record is None:
            continue
        for rel, sha in record["files"].items():
            files.setdefault(rel, set()).add(sha)
        children.update(record["children"])
    return files, children


def foreign_entries(folder: str | Path, children: Iterable[str] = ()) -> list[str]:
    """Entries of ``folder`` (relative paths) that no covidxray record accounts for, unchanged, in order.

    Recorded files must still have their recorded hash; recorded child folders are checked against their own
    record; our scratch folders, the lock note and a top-level README.md are not foreign; empty folders hold
    nothing to lose. A damaged or unsafe record raises RecordError.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found: list[str] = []
    files, known = _owned(folder)
    _scan(folder, folder, files, known | set(children), found, top=True)
    return found


def _ours_at_top(entry: Path) -> bool:
    """A top-level entry that is the package's own bookkeeping (record, pending record, lock note, scratch)."""
    if entry.is_symlink():
        return False
    if entry.name in (RECORD_NAME, PENDING_NAME):
        return read_record(entry) is not None
    if entry.name == LOCK_NOTE:
        return entry.is_file() and _read_lock_note(entry) is not None
    return _is_scratch(entry) or (entry.name in KEPT_NAMES and entry.is_file())


def _scan(root: Path, folder: Path, files: dict[str, set[str]], children: set[str], found: list[str],
          *, top: bool) -> None:
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        rel = entry.relative_to(root).as_posix()
        if top and _ours_at_top(entry):
            continue
        if entry.is_symlink():
            found.append(rel)
        elif entry.is_dir():
            if rel in children:
                found.extend(f"{rel}/{sub}" for sub in foreign_entries(entry))
            else:
                _scan(root, entry, files, children, found, top=False)
        elif not entry.is_file() or rel not in files or file_sha256(entry) not in files[rel]:
            found.append(rel)


def replaceable(folder: str | Path, rel: str) -> bool:
    """True when file ``rel`` of ``folder`` is absent, or named by the folder's record and unchanged since."""
    target = Path(folder) / rel
    if not target.exists() and not target.is_symlink():
        return True
    accepted = _owned(Path(folder))[0].get(Path(rel).as_posix(), set())
    return target.is_file() and not target.is_symlink() and file_sha256(target) in accepted


def record_files(folder: str | Path, verb: str, rels: Iterable[str]) -> None:
    """Add files just written into ``folder`` (outside a claim, e.g. an archive merged into a source folder) to
    its ownership record, with their current hashes."""
    folder = Path(folder)
    record = read_record(folder / RECORD_NAME) or _new_record(verb, None)
    for rel in rels:
        if not plain_relative(Path(rel).as_posix(), single=False):
            raise ValueError(f"{rel!r} is not a plain relative name inside {folder}")
        record["files"][Path(rel).as_posix()] = file_sha256(folder / rel)
    write_text(json_text(record), folder / RECORD_NAME)


def refusal(path: Path, foreign: list[str], flag: str = "--out") -> DataError:
    """The error for an output holding entries the tool did not write: up to five named, and the fix."""
    named = ", ".join(foreign[:MAX_NAMED]) + (f" and {len(foreign) - MAX_NAMED} more" if len(foreign) > MAX_NAMED
                                              else "")
    return DataError(f"{path}: holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} covidxray did not "
                     f"write or that changed since ({named}); nothing was changed. Choose another {flag}, or move "
                     "those entries out of the folder.")


# ---------------------------------------------------------------------------------------------- one writer at a time


def _read_lock_note(path: Path) -> dict | None:
    try:
        note = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return note if isinstance(note, dict) and note.get("tool") == "covidxray" and "pid" in note else None


class _Lock:
    """An OS advisory lock (flock) on an output folder itself, held while one verb writes there.

    The lock dies with its process, so a killed writer never blocks the next one. A small note beside it
    (``.covidxray.lock``) names the holder for the refusal message; it is removed when the lock is released.
    """

    def __init__(self, folder: Path, flag: str) -> None:
        self.folder, self.flag = folder, flag
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover - platforms without flock (Windows): one writer is the user's care
            return
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            note = _read_lock_note(self.folder / LOCK_NOTE) or {}
            who = (f"process {note['pid']} (`{' '.join(note.get('command') or [])}`)" if note
                   else "another process")
            raise DataError(f"{self.flag} {self.folder}: {who} is writing this folder now; nothing was changed. "
                            f"Wait for it to finish, or choose another {self.flag}.") from None
        self.fd = fd
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(self.folder))
        except OSError:
            same = False
        if not same:  # removed or replaced between our open and our lock: another process's folder now
            self.release()
            raise DataError(f"{self.flag} {self.folder}: another process removed or replaced this folder while "
                            f"covidxray opened it; nothing was changed. Run again, or choose another {self.flag}.")
        try:
            with contextlib.suppress(OSError):  # a read-only folder fails later with its own message
                (self.folder / LOCK_NOTE).write_text(
                    json_text({"tool": "covidxray", "pid": os.getpid(), "command": command_line()}), encoding="utf-8")
        except BaseException:
            self.release()
            raise

    def release(self, remove: Sequence[Path] = ()) -> None:
        """Unlock; first remove the folders in ``remove`` (those a failed claim created) while still holding the
        lock, so that no other process can have taken the folder in between."""
        if self.fd is None:
            _remove_created(remove)
            return
        note = self.folder / LOCK_NOTE
        if (_read_lock_note(note) or {}).get("pid") == os.getpid():
            note.unlink(missing_ok=True)
        _remove_created(remove)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None


_HELD: dict[Path, OutputDir] = {}
"""Output folders this process holds now (resolved path -> its claim): nested claims register through them."""


# ---------------------------------------------------------------------------------------------- a claimed folder


class OutputDir:
    """An output folder claimed by one verb: writes go through it and are recorded as the verb's own."""

    def __init__(self, path: Path, verb: str, command: Sequence[str] | None, created: list[Path],
                 *, amend: bool = False) -> None:
        self.path = path
        self.verb = verb
        self.kind = kind_of_verb(verb)
        self.created = created
        existing = read_record(path / RECORD_NAME)
        self.record = existing or _new_record(verb, command)
        pending = read_record(path / PENDING_NAME)
        if pending is not None:
            self.record["files"].update(pending["files"])
        self.new = existing is None
        """True when the folder had no record before this claim."""
        self._writer: dict[str, Any] | None = None
        """Writer fields (kind, verb, version, command) put into the record at its first write by this claim: a
        claim that ends before writing anything (a refused resume) leaves the record as it was."""
        if amend and existing is not None:
            self.amended: list[str] | None = []
            """Files changed by a verb that amends an artifact it did not write (None: this verb is the writer)."""
        else:
            self.amended = None
            fresh = _new_record(verb, command)
            self._writer = {key: fresh[key] for key in ("kind", "verb", "version", "command", "format")}
        self._data: dict[str, Any] | None = None
        self._scratch: Path | None = None
        self.written: set[str] = set()
        """Files recorded during this claim (what :meth:`discard` removes)."""

    # ----------------------------------------------------------------------------- record

    def _save(self) -> None:
        """Write the record (with this claim's writer and data); child folders that nested claims named on disk
        meanwhile are kept."""
        if self._writer is not None:
            self.record.update(self._writer)
        if self._data is not None:
            self.record["data"] = self._data
        on_disk = read_record(self.path / RECORD_NAME)
        if on_disk is not None:
            self.record["children"].extend(c for c in on_disk["children"] if c not in self.record["children"]
                                           and (self.path / c).is_dir())
        write_text(json_text(self.record), self.path / RECORD_NAME)

    def set_data(self, provenance: Mapping[str, Any] | None) -> None:
        """Record the data this artifact came from (see :func:`provenance`)."""
        self._data = dict(provenance) if provenance else None
        self.record["data"] = self._data
        self._save()

    @property
    def synthetic(self) -> bool:
        """True when the recorded data is the embedded synthetic set."""
        return bool((self._data or self.record.get("data") or {}).get("synthetic"))

    def owns(self, rel: str) -> bool:
        """True when ``rel`` is a file this folder's record names and it is unchanged (or absent)."""
        target = self.path / rel
        if not target.exists() and not target.is_symlink():
            return True
        sha = self.record["files"].get(rel)
        return (sha is not None and target.is_file() and not target.is_symlink()
                and file_sha256(target) == sha)

    def files(self) -> list[str]:
        """Relative paths of the files this folder's record names."""
        return sorted(self.record["files"])

    def scratch(self) -> Path:
        """This session's scratch folder inside the output (removed when the claim ends)."""
        if self._scratch is None:
            folder = self.path / f"{SCRATCH_PREFIX}{uuid.uuid4().hex[:12]}"
            folder.mkdir()
            write_text(json_text(_new_record("scratch", [])), folder / RECORD_NAME)
            self._scratch = folder
        return self._scratch

    def _drop_scratch(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    # ----------------------------------------------------------------------------- one file at a time

    def put(self, rel: str, write: Callable[[Path], None]) -> Path:
        """Write file ``rel`` with ``write(tmp)`` through the scratch folder, rename it into place, record it.

        An amending claim (see :func:`amend_output`) whose new bytes equal the old ones changes nothing."""
        rel = Path(rel).as_posix()
        if not plain_relative(rel, single=False) or rel.split("/")[0] in _RESERVED:
            raise ValueError(f"{rel!r} is not a plain relative file name inside {self.path}")
        target = self.path / rel
        if not self.owns(rel):
            raise refusal(self.path, [rel])
        tmp = self.scratch() / f"{uuid.uuid4().hex[:8]}-{target.name}"
        try:
            write(tmp)
            sha = file_sha256(tmp)
            if self.amended is not None and self.record["files"].get(rel) == sha and target.is_file():
                tmp.unlink()
                return target
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.record["files"][rel] = sha
        self.written.add(rel)
        if self.amended is not None:
            self.amended.append(rel)
        self._save()
        return target

    def write_bytes(self, rel: str, data: bytes) -> Path:
        """Write and record one binary file."""
        return self.put(rel, lambda tmp: tmp.write_bytes(data))

    def write_text(self, rel: str, text: str) -> Path:
        """Write and record one UTF-8 text file."""
        return self.put(rel, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    def write_json(self, rel: str, obj: Any, *, sort_keys: bool = True) -> Path:
        """Write and record one JSON file (see :func:`json_text`)."""
        return self.write_text(rel, json_text(obj, sort_keys=sort_keys))

    def write_csv(self, rel: str, table: pd.DataFrame) -> Path:
        """Write and record one CSV file (see :func:`csv_text`)."""
        return self.write_text(rel, csv_text(table))

    def adopt(self, rel: str) -> None:
        """Record a file that a library call wrote inside the scratch folder and the caller renamed into place."""
        self.record["files"][Path(rel).as_posix()] = file_sha256(self.path / rel)
        self.written.add(Path(rel).as_posix())
        self._save()

    def remove(self, rel: str) -> None:
        """Delete file ``rel`` if this folder's record names it and it is unchanged; refuse otherwise."""
        rel = Path(rel).as_posix()
        if not self.owns(rel):
            raise refusal(self.path, [rel])
        (self.path / rel).unlink(missing_ok=True)
        self.record["files"].pop(rel, None)
        self._save()

    def discard(self) -> None:
        """Remove the files this claim wrote (a failed run that left nothing worth keeping) and emptied folders;
        a claim that wrote nothing changes nothing (the record stays as it was)."""
        if not self.written:
            return
        for rel in sorted(self.written):
            if self.owns(rel):
                (self.path / rel).unlink(missing_ok=True)
                self.record["files"].pop(rel, None)
        self.written.clear()
        self._save()
        for folder in sorted((p for p in self.path.rglob("*") if p.is_dir() and not p.is_symlink()), reverse=True):
            if not folder.name.startswith(SCRATCH_PREFIX) and not any(folder.iterdir()):
                folder.rmdir()

    def add_child(self, name: str) -> None:
        """Name a sub-folder with its own record (a nested output, e.g. a run inside a reproduction)."""
        if not plain_relative(name, single=True):
            raise ValueError(f"{name!r} is not a plain folder name inside {self.path}")
        if name not in self.record["children"]:
            self.record["children"].append(name)
            self._save()

    # ----------------------------------------------------------------------------- a whole new output

    def stage(self) -> Path:
        """A scratch folder to fill with the complete new output; :meth:`commit_stage` swaps it in."""
        folder = self.scratch() / "stage"
        folder.mkdir(exist_ok=True)
        return folder

    def _replaceable_top(self, name: str, new_top: Sequence[str], prefix: str | None) -> bool:
        """True when a recorded top-level entry ``name`` goes in a swap: the new output writes it again, or the
        kind itself (not the record) says a rebuild replaces entries of that name (and it has ``prefix``)."""
        if prefix is not None and not name.startswith(prefix):
            return False
        return name in new_top or any(fnmatch.fnmatchcase(name, pattern) for pattern in self.kind.replaces)

    def commit_stage(self, prefix: str | None = None) -> None:
        """Replace this folder's recorded entries by the staged ones, entry by entry; kept files stay.

        Only entries the new output writes, or that this kind's rebuild replaces by name (:attr:`Kind.replaces`),
        go; with ``prefix``, only those whose names start with it (one model's heatmaps among several). Child
        artifacts are never removed: a staged entry of a child's name is refused.

        Order: the pending record (new files) is written first, the old entries move into the scratch folder,
        the new ones move in, the pending record becomes the record. A kill anywhere leaves every file named by
        the record or the pending record, so the next claim removes the leftovers and proceeds.
        """
        stage = self.stage()
        new_files = {p.relative_to(stage).as_posix(): file_sha256(p)
                     for p in sorted(stage.rglob("*")) if p.is_file()}
        new_top = sorted({rel.split("/")[0] for rel in new_files})
        clash = [name for name in new_top if name in KEPT_NAMES or name in _RESERVED]
        if clash:
            raise DataError(f"{self.path}: the output may not write {clash} (kept for the repository).")
        clash = [name for name in new_top if name in self.record["children"]]
        if clash:
            raise DataError(f"{self.path}: the new output would replace {clash}, which hold outputs of their own.")
        recorded_top = {rel.split("/")[0] for rel in self.record["files"]}
        old_top = sorted(name for name in recorded_top if self._replaceable_top(name, new_top, prefix))
        clash = [name for name in new_top if name in recorded_top and name not in old_top]
        if clash:
            raise DataError(f"{self.path}: the new output would replace {clash}, which this run does not own.")
        kept = {rel: sha for rel, sha in self.record["files"].items() if rel.split("/")[0] not in old_top}
        pending = {**self.record, "files": {**kept, **new_files}}
        write_text(json_text(pending), self.path / PENDING_NAME)
        trash = self.scratch() / "old"
        trash.mkdir(exist_ok=True)
        for name in old_top:
            entry = self.path / name
            if entry.exists() or entry.is_symlink():
                os.replace(entry, trash / name)
        for name in new_top:
            os.replace(stage / name, self.path / name)
        os.replace(self.path / PENDING_NAME, self.path / RECORD_NAME)
        self.record = pending
        shutil.rmtree(trash, ignore_errors=True)

    # ----------------------------------------------------------------------------- ending

    def _abandon(self) -> None:
        """After a failure: drop the scratch folder; remove the folder itself when this claim made it empty."""
        self._drop_scratch()
        (self.path / PENDING_NAME).unlink(missing_ok=True)
        if self.created and not self.record["files"] and not self.record["children"]:
            (self.path / RECORD_NAME).unlink(missing_ok=True)


def _clean_leftovers(path: Path) -> None:
    """Remove scratch folders of earlier, killed sessions (ours by name and record) and a finished pending swap."""
    for entry in path.iterdir():
        if _is_scratch(entry):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(SCRATCH_PREFIX) and entry.is_dir() and not entry.is_symlink() \
                and not any(entry.iterdir()):
            entry.rmdir()  # killed before its record was written: empty, so nothing of anyone's is in it


# ---------------------------------------------------------------------------------------------- claiming


def _nearest_artifact(path: Path) -> tuple[Path, dict] | None:
    """The closest folder above ``path`` that is an artifact, with its record (None when there is none)."""
    for parent in path.absolute().parents:
        record = artifact(parent)
        if record is not None:
            return parent, record
    return None


def _kind_refusal(path: Path, record: dict, kind: Kind, verb: str, flag: str) -> DataError:
    return DataError(f"{flag} {path} is {describe(record)}; `covidxray {verb}` writes only into an empty or missing "
                     f"folder or {kind.article}, so nothing was changed. Choose another {flag}.")


def check_output(path: str | Path, verb: str, *, flag: str = "--out", children: Sequence[str] = ()) -> None:
    """Refuse, before any work, an output folder ``verb`` may not write: another kind of artifact, a folder
    nested inside an artifact that does not hold that kind, entries the tool did not write, a damaged record.
    Read-only: nothing is created or changed."""
    path = Path(path)
    kind = kind_of_verb(verb)
    if path.is_symlink() and not path.exists():
        raise DataError(f"{flag} {path}: a symlink to a missing folder; create its target or choose another {flag}.")
    if path.exists() and not path.is_dir():
        raise DataError(f"{flag} {path}: exists and is not a folder; choose another {flag}.")
    record = artifact(path)
    if record is not None and record["kind"] != kind.name:
        raise _kind_refusal(path, record, kind, verb, flag)
    outer = _nearest_artifact(path)
    if outer is not None:
        parent, parent_record = outer
        held = _HELD.get(parent.resolve())
        if parent_record["kind"] == "set-aside results" and held is None:
            raise DataError(f"{flag} {path} lies inside {parent}, results set aside by a notebook render; choose a "
                            f"{flag} outside it (or move the set-aside folder away first).")
        if kind.name not in KINDS[parent_record["kind"]].nests:
            raise DataError(f"{flag} {path} lies inside {parent}, which is {describe(parent_record)}; "
                            f"{KINDS[parent_record['kind']].article} does not hold {kind.article}, and its rebuild "
                            f"must not meet them, so nothing was changed. Choose a {flag} outside {parent}.")
        if path.absolute().parent != parent.absolute():
            raise DataError(f"{flag} {path} lies deeper inside {parent} ({describe(parent_record)}); a nested output "
                            f"must be a direct sub-folder of it, or outside it. Choose another {flag}.")
    foreign = foreign_entries(path, children)
    if foreign:
        raise refusal(path, foreign, flag)


def _register_in_parent(path: Path) -> None:
    """When the parent folder is itself an artifact, name ``path`` there as a child (through this process's
    claim when it holds the parent, else under the parent's lock for the moment of the write)."""
    parent = path.absolute().parent
    held = _HELD.get(parent.resolve())
    if held is not None:
        held.add_child(path.name)
        return
    record = artifact(parent)
    if record is None or path.name in record["children"]:
        return
    lock = _Lock(parent, "the folder")
    lock.acquire()
    try:
        record = artifact(parent)
        if record is not None and path.name not in record["children"] and path.name not in record["files"]:
            record["children"].append(path.name)
            write_text(json_text(record), parent / RECORD_NAME)
    finally:
        lock.release()


@contextmanager
def claim_output(
    path: str | Path,
    verb: str,
    *,
    sources: Iterable[str | Path | None] = (),
    command: Sequence[str] | None = None,
    flag: str = "--out",
    children: Sequence[str] = (),
    amend: bool = False,
    data: Mapping[str, Any] | None = None,
) -> Iterator[OutputDir]:
    """Claim ``path`` for ``verb`` and yield it; refuse (before any work) what :func:`check_output` refuses.

    ``sources`` are folders or files the verb reads: the output may not be, lie inside, or contain any of them.
    ``children`` are sub-folders the verb claims as outputs of their own: each is checked as its own claim would
    check it (its record, or a fresh folder whose README.md is kept). While the block runs the folder is locked
    (an OS advisory lock): a second writer is refused at once, naming this process. On an error inside the
    block, scratch files are removed and a folder this claim created is removed again when nothing was recorded.
    ``amend=True`` (see :func:`amend_output`) keeps the record's writer and lists what this verb changed.
    ``data`` is the provenance of the data the output comes from (see :func:`provenance`), kept in the record.
    """
    path = Path(path)
    check_outside_sources(path, sources, flag)
    check_output(path, verb, flag=flag, children=children)
    _check_no_synthetic_over_real(path, data, flag)
    if path.resolve() in _HELD:
        raise RuntimeError(f"{path} is already claimed by this process")
    created = [p for p in reversed([path, *path.absolute().parents]) if not p.exists()]
    lock = _Lock(path, flag)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_created(created)
        raise DataError(os_error_line(exc, flag)) from exc
    try:
        lock.acquire()  # refused: the folder is another process's now, so nothing of it is removed here
    except OSError as exc:
        raise DataError(os_error_line(exc, flag)) from exc
    try:
        check_output(path, verb, flag=flag, children=children)  # again, under the lock
        _clean_leftovers(path)
        out = OutputDir(path, verb, command, created, amend=amend)
        added = [c for c in children if c not in out.record["children"]]
        out.record["children"].extend(added)
        if data is not None and out.amended is None:
            out._data = dict(data)
        if out.new or added:
            out._save()
        _register_in_parent(path)
    except BaseException as exc:
        lock.release(remove=created)
        if isinstance(exc, OSError):
            raise DataError(os_error_line(exc, flag)) from exc
        raise
    _HELD[path.resolve()] = out
    try:
        yield out
    except BaseException:
        out._abandon()
        _HELD.pop(path.resolve(), None)
        lock.release(remove=created)
        raise
    out._drop_scratch()
    _HELD.pop(path.resolve(), None)
    lock.release()


def _check_no_synthetic_over_real(path: Path, data: Mapping[str, Any] | None, flag: str) -> None:
    """Refuse to replace an artifact made from real data by one made from the embedded synthetic set (the
    committed real-data heatmaps, say): the two never share a folder."""
    record = artifact(path)
    old = (record or {}).get("data") or {}
    if data and data.get("synthetic") and old.get("synthetic") is False and record and record["files"]:
        raise DataError(f"{flag} {path} holds {KINDS[record['kind']].name} made from real data, and these come from "
                        f"the embedded {SYNTHETIC} data: they never share a folder, so nothing was changed. Choose "
                        f"another {flag}.")


def _remove_created(created: Sequence[Path]) -> None:
    """Remove the folders a failed claim created, deepest first, while they are empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            break


@contextmanager
def amend_output(path: str | Path, verb: str, *, flag: str = "--model") -> Iterator[OutputDir]:
    """Claim an existing artifact of ``verb``'s kind to change documented files in it (a run's card after its
    test evaluation): the record keeps its writer; ``out.amended`` lists the files whose bytes changed."""
    path = Path(path)
    if artifact(path) is None:
        raise DataError(f"{flag} {path}: not an output covidxray wrote (no {RECORD_NAME}); nothing was changed.")
    with claim_output(path, verb, flag=flag, amend=True) as out:
        yield out


@contextmanager
def staged_output(
    path: str | Path,
    verb: str,
    *,
    sources: Iterable[str | Path | None] = (),
    flag: str = "--out",
    prefix: str | None = None,
    data: Mapping[str, Any] | None = None,
) -> Iterator[Path]:
    """Claim ``path`` (see :func:`claim_output`) and yield a staging folder for the complete new output; when
    the block succeeds, the staged entries replace the previous output's (those starting with ``prefix`` when
    given, see :meth:`OutputDir.commit_stage`), else nothing changes."""
    with claim_output(path, verb, sources=sources, flag=flag, data=data) as out:
        yield out.stage()
        out.commit_stage(prefix)
