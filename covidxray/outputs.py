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

import datetime as _dt
import hashlib
import json
import math
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from covidxray.errors import DataError, os_error_line

RECORD_NAME = ".covidxray.json"
"""The ownership record of an output folder."""
PENDING_NAME = ".covidxray.pending.json"
"""The record of a swap in progress (the new files); becomes the record when the swap ends."""
SCRATCH_PREFIX = ".covidxray-tmp-"
"""Scratch folders (partial files, staged outputs, the old entries during a swap) inside an output folder."""
KEPT_NAMES = frozenset({"README.md"})
"""Top-level files of an output folder that belong to the repository: left in place, never replaced."""
FORMAT = 1
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


# ---------------------------------------------------------------------------------------------- ownership


def _new_record(verb: str, command: Sequence[str] | None) -> dict:
    return {"tool": "covidxray", "format": FORMAT, "verb": verb, "command": list(command or command_line()),
            "files": {}, "children": []}


def _load_record(path: Path) -> dict | None:
    """The record stored at ``path``, or None when there is none or it is not a covidxray record."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("tool") != "covidxray" or not isinstance(data.get("files"), dict):
        return None
    data.setdefault("children", [])
    return data


def _is_scratch(entry: Path) -> bool:
    """A scratch folder this package made (name and its own record both say so)."""
    if not entry.name.startswith(SCRATCH_PREFIX) or entry.is_symlink() or not entry.is_dir():
        return False
    record = _load_record(entry / RECORD_NAME)
    return record is not None and record.get("verb") == "scratch"


def _owned(folder: Path) -> tuple[dict[str, set[str]], set[str]]:
    """Files (relative path -> accepted hashes) and child folders the folder's record and pending record name."""
    files: dict[str, set[str]] = {}
    children: set[str] = set()
    for name in (RECORD_NAME, PENDING_NAME):
        record = _load_record(folder / name)
        if record is None:
            continue
        for rel, sha in record["files"].items():
            files.setdefault(rel, set()).add(sha)
        children.update(record["children"])
    return files, children


def foreign_entries(folder: str | Path, children: Iterable[str] = ()) -> list[str]:
    """Entries of ``folder`` (relative paths) that no covidxray record accounts for, unchanged, in order.

    Recorded files must still have their recorded hash; recorded child folders are checked against their own
    record; our scratch folders and a top-level README.md are not foreign; empty folders hold nothing to lose.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found: list[str] = []
    files, known = _owned(folder)
    _scan(folder, folder, files, known | set(children), found, top=True)
    return found


def _scan(root: Path, folder: Path, files: dict[str, set[str]], children: set[str], found: list[str],
          *, top: bool) -> None:
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        rel = entry.relative_to(root).as_posix()
        if top and _is_scratch(entry):
            continue
        if top and entry.name in (RECORD_NAME, PENDING_NAME) and not entry.is_symlink() \
                and _load_record(entry) is not None:
            continue
        if top and entry.name in KEPT_NAMES and entry.is_file() and not entry.is_symlink():
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
    record = _load_record(folder / RECORD_NAME) or _new_record(verb, None)
    for rel in rels:
        record["files"][Path(rel).as_posix()] = file_sha256(folder / rel)
    write_text(json_text(record), folder / RECORD_NAME)


def refusal(path: Path, foreign: list[str], flag: str = "--out") -> DataError:
    """The error for an output holding entries the tool did not write: up to five named, and the fix."""
    return _refusal(path, foreign, flag)


def _refusal(path: Path, foreign: list[str], flag: str = "--out") -> DataError:
    named = ", ".join(foreign[:MAX_NAMED]) + (f" and {len(foreign) - MAX_NAMED} more" if len(foreign) > MAX_NAMED
                                              else "")
    return DataError(f"{path}: holds {len(foreign)} entr{'y' if len(foreign) == 1 else 'ies'} covidxray did not "
                     f"write or that changed since ({named}); nothing was changed. Choose another {flag}, or move "
                     "those entries out of the folder.")


class OutputDir:
    """An output folder claimed by one verb: writes go through it and are recorded as the verb's own."""

    def __init__(self, path: Path, verb: str, command: Sequence[str] | None, created: list[Path]) -> None:
        self.path = path
        self.verb = verb
        self.created = created
        self.record = _load_record(path / RECORD_NAME) or _new_record(verb, command)
        pending = _load_record(path / PENDING_NAME)
        if pending is not None:
            self.record["files"].update(pending["files"])
        self.record.update(verb=verb, command=list(command or command_line()))
        self._scratch: Path | None = None
        self.written: set[str] = set()
        """Files recorded during this claim (what :meth:`discard` removes)."""

    # ----------------------------------------------------------------------------- record

    def _save(self) -> None:
        """Write the record; child folders that nested claims named on disk meanwhile are kept."""
        on_disk = _load_record(self.path / RECORD_NAME)
        if on_disk is not None:
            self.record["children"].extend(c for c in on_disk["children"] if c not in self.record["children"]
                                           and (self.path / c).is_dir())
        write_text(json_text(self.record), self.path / RECORD_NAME)

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
        """Write file ``rel`` with ``write(tmp)`` through the scratch folder, rename it into place, record it."""
        rel = Path(rel).as_posix()
        target = self.path / rel
        if not self.owns(rel):
            raise _refusal(self.path, [rel])
        tmp = self.scratch() / f"{uuid.uuid4().hex[:8]}-{target.name}"
        try:
            write(tmp)
            sha = file_sha256(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.record["files"][rel] = sha
        self.written.add(rel)
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

    def adopt(self, rel: str) -> None:
        """Record a file that a library call wrote inside the scratch folder and the caller renamed into place."""
        self.record["files"][Path(rel).as_posix()] = file_sha256(self.path / rel)
        self.written.add(Path(rel).as_posix())
        self._save()

    def remove(self, rel: str) -> None:
        """Delete file ``rel`` if this folder's record names it and it is unchanged; refuse otherwise."""
        rel = Path(rel).as_posix()
        if not self.owns(rel):
            raise _refusal(self.path, [rel])
        (self.path / rel).unlink(missing_ok=True)
        self.record["files"].pop(rel, None)
        self._save()

    def discard(self) -> None:
        """Remove the files this claim wrote (a failed run that left nothing worth keeping) and emptied folders."""
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
        if name not in self.record["children"]:
            self.record["children"].append(name)
            self._save()

    # ----------------------------------------------------------------------------- a whole new output

    def stage(self) -> Path:
        """A scratch folder to fill with the complete new output; :meth:`commit_stage` swaps it in."""
        folder = self.scratch() / "stage"
        folder.mkdir(exist_ok=True)
        return folder

    def commit_stage(self, prefix: str | None = None) -> None:
        """Replace this folder's recorded entries by the staged ones, entry by entry; kept files stay.

        With ``prefix``, only recorded top-level entries whose names start with it are replaced (one model's
        heatmaps among several); the others stay recorded and in place.

        Order: the pending record (new files) is written first, the old entries move into the scratch folder,
        the new ones move in, the pending record becomes the record. A kill anywhere leaves every file named by
        the record or the pending record, so the next claim removes the leftovers and proceeds.
        """
        stage = self.stage()
        new_files = {p.relative_to(stage).as_posix(): file_sha256(p)
                     for p in sorted(stage.rglob("*")) if p.is_file()}
        new_top = sorted({rel.split("/")[0] for rel in new_files})
        clash = [name for name in new_top if name in KEPT_NAMES or name in (RECORD_NAME, PENDING_NAME)]
        if clash:
            raise DataError(f"{self.path}: the output may not write {clash} (kept for the repository).")
        recorded_top = {rel.split("/")[0] for rel in self.record["files"]} | set(self.record["children"])
        old_top = sorted(name for name in recorded_top if prefix is None or name.startswith(prefix))
        kept = {rel: sha for rel, sha in self.record["files"].items() if rel.split("/")[0] not in old_top}
        children = [name for name in self.record["children"] if name not in old_top]
        clash = [name for name in new_top if name in recorded_top and name not in old_top]
        if clash:
            raise DataError(f"{self.path}: the new output would replace {clash}, which this run does not own.")
        pending = {**self.record, "files": {**kept, **new_files}, "children": children}
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
            for folder in reversed(self.created):
                try:
                    folder.rmdir()
                except OSError:
                    break


def _clean_leftovers(path: Path) -> None:
    """Remove scratch folders of earlier, killed sessions (ours by name and record) and a finished pending swap."""
    for entry in path.iterdir():
        if _is_scratch(entry):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(SCRATCH_PREFIX) and entry.is_dir() and not entry.is_symlink() \
                and not any(entry.iterdir()):
            entry.rmdir()  # killed before its record was written: empty, so nothing of anyone's is in it


def _register_in_parent(path: Path) -> None:
    """When the parent folder is itself a covidxray output, name ``path`` there as a child output."""
    parent_record = path.parent / RECORD_NAME
    record = _load_record(parent_record)
    if record is not None and path.name not in record["children"] and path.name not in record["files"]:
        record["children"].append(path.name)
        write_text(json_text(record), parent_record)


@contextmanager
def claim_output(
    path: str | Path,
    verb: str,
    *,
    sources: Iterable[str | Path | None] = (),
    command: Sequence[str] | None = None,
    flag: str = "--out",
    children: Sequence[str] = (),
) -> Iterator[OutputDir]:
    """Claim ``path`` for ``verb`` and yield it; refuse (before any work) if it holds anything not ours.

    ``sources`` are folders or files the verb reads: the output may not be, lie inside, or contain any of them.
    ``children`` are sub-folders the verb claims as outputs of their own: each is checked as its own claim would
    check it (its record, or a fresh folder whose README.md is kept).
    On an error inside the block, scratch files are removed and a folder this claim created is removed again
    when nothing was recorded in it.
    """
    path = Path(path)
    check_outside_sources(path, sources, flag)
    if path.is_symlink() and not path.exists():
        raise DataError(f"{flag} {path}: a symlink to a missing folder; create its target or choose another {flag}.")
    if path.exists() and not path.is_dir():
        raise DataError(f"{flag} {path}: exists and is not a folder; choose another {flag}.")
    foreign = foreign_entries(path, children)
    if foreign:
        raise _refusal(path, foreign, flag)
    created = [p for p in reversed([path, *path.absolute().parents]) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        _clean_leftovers(path)
        out = OutputDir(path, verb, command, created)
        out.record["children"].extend(c for c in children if c not in out.record["children"])
        out._save()
    except OSError as exc:
        raise DataError(os_error_line(exc, flag)) from exc
    _register_in_parent(path)
    try:
        yield out
    except BaseException:
        out._abandon()
        raise
    out._drop_scratch()


@contextmanager
def staged_output(
    path: str | Path,
    verb: str,
    *,
    sources: Iterable[str | Path | None] = (),
    flag: str = "--out",
    prefix: str | None = None,
) -> Iterator[Path]:
    """Claim ``path`` (see :func:`claim_output`) and yield a staging folder for the complete new output; when
    the block succeeds, the staged entries replace the previous output's (those starting with ``prefix`` when
    given, see :meth:`OutputDir.commit_stage`), else nothing changes."""
    with claim_output(path, verb, sources=sources, flag=flag) as out:
        yield out.stage()
        out.commit_stage(prefix)
