"""Fetch the two public data sources into the project folders: resumable downloads and safe archive extraction.

ieee8023/covid-chestxray-dataset comes as the GitHub archive of one pinned commit (or of today's master with
``ref="latest"``), verified by SHA-256 and recorded in ``download.json`` beside the data; Kermany "Chest X-Ray
Images (Pneumonia)" comes from Kaggle (through ``kagglehub`` or the older ``kaggle`` package when one is
installed, otherwise by hand). Downloads are kept in a cache folder so a rerun does not fetch them again, and
extraction never touches user files that the archive does not contain.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import importlib.util
import os
import re
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from covidxray import __version__
from covidxray.errors import DataError
from covidxray.outputs import RESERVED_NAMES, file_sha256, read_json, record_files, refusal, replaceable, write_json
from covidxray.paths import CHEST_XRAY_DIR, COVID_XRAY_DIR
from covidxray.progress import progress_bar

IEEE8023_REPOSITORY = "ieee8023/covid-chestxray-dataset"
IEEE8023_COMMIT = "6a4242344473ccb5ed0d2148d8c7bfb1691e4ed8"
"""The commit of ieee8023/covid-chestxray-dataset downloaded by default, so that every build starts from the same
files (its metadata.csv has the late 29-column schema with RT_PCR_positive and folder, and patients up to 481).
``ref="latest"`` takes today's master instead."""
IEEE8023_ARCHIVE_SHA256: dict[str, str] = {}
"""Known SHA-256 of GitHub's zip archive, by commit. A commit fixes the files, and GitHub serves the same archive
bytes for it in practice, but the hash of the pinned commit's archive could not be measured when it was pinned
(no network). Until one is entered here, the first download records the hash it got in ``download.json`` and
every later download of the same commit into that folder must match it."""
DOWNLOAD_RECORD_NAME = "download.json"
"""What was downloaded (repository, ref, commit, URL, archive SHA-256), written beside the data."""
KAGGLE_DATASET = "paultimothymooney/chest-xray-pneumonia"
KAGGLE_DATASET_URL = f"https://www.kaggle.com/datasets/{KAGGLE_DATASET}"
DEFAULT_IEEE8023_URL = f"https://github.com/{IEEE8023_REPOSITORY}/archive/{IEEE8023_COMMIT}.zip"
CACHE_DIRNAME = ".download"
"""Downloaded archives are kept in ``<dest>/.download/`` unless a cache folder is given."""

_CHUNK = 1 << 20
_USER_AGENT = f"covidxray/{__version__} (+urllib)"
_JUNK_DIRS = frozenset({"__MACOSX"})


class _CorruptArchiveError(DataError):
    """The archive itself cannot be read: the only fix is to fetch it again."""


# Downloads


def _part_path(dest: Path) -> Path:
    return dest.with_suffix(dest.suffix + ".part")


def _verify_problem(path: Path, expected_size: int | None, sha256: str | None) -> str | None:
    """What is wrong with ``path`` against the expected size and checksum, or None when it matches."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        return f"has {size} bytes, expected {expected_size}"
    if sha256:
        actual = file_sha256(path)
        if actual.lower() != sha256.strip().lower():
            return f"has SHA-256 {actual}, expected {sha256.strip().lower()}"
    return None


def _network_error(url: str, dest: Path, exc: BaseException) -> DataError:
    if isinstance(exc, urllib.error.HTTPError):
        reason = f"HTTP {exc.code} {exc.reason}"
    elif isinstance(exc, urllib.error.URLError):
        reason = str(exc.reason)
    else:
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return DataError(
        f"{url}: download failed ({reason}). Check the connection and rerun the same command to retry: the "
        f"partial file {_part_path(dest)} is kept and the download resumes where it stopped. Or download the "
        f"file by hand (for example in a browser) and save it as {dest}."
    )


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """(first byte, total size) from ``bytes 100-199/200`` or ``bytes */200``; None where absent."""
    match = re.match(r"\s*bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value or "")
    if not match:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(2)) if match.group(2) != "*" else None
    return start, total


def _fetch(url: str, dest: Path, offset: int, *, progress: bool, timeout: float) -> None:
    """Stream ``url`` into the .part file of ``dest``, continuing at byte ``offset`` when the server allows it."""
    part = _part_path(dest)
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            _, total = _parse_content_range(exc.headers.get("Content-Range"))
            exc.close()
            if total == offset:
                return
            part.unlink(missing_ok=True)
            return _fetch(url, dest, 0, progress=progress, timeout=timeout)
        raise _network_error(url, dest, exc) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _network_error(url, dest, exc) from exc
    with response:
        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if offset and response.status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                response.close()
                part.unlink(missing_ok=True)
                return _fetch(url, dest, 0, progress=progress, timeout=timeout)
            if total is None and length is not None:
                total = offset + length
            mode = "ab"
        else:
            offset, total, mode = 0, length, "wb"
        try:
            out = part.open(mode)
        except OSError as exc:
            raise DataError(f"{part}: cannot write the download ({exc}); check the folder's permissions.") from exc
        with out, progress_bar(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                               desc=dest.name, enabled=progress) as bar:
            while True:
                try:
                    chunk = response.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _network_error(url, dest, exc) from exc
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise DataError(
                        f"{part}: cannot write the download ({exc}); free some disk space and rerun to resume."
                    ) from exc
                bar.update(len(chunk))
    received = part.stat().st_size
    if total is not None and received < total:
        raise _network_error(url, dest, ConnectionError(f"connection closed after {received} of {total} bytes"))


def download_file(url: str, dest: Path, *, expected_size: int | None = None, sha256: str | None = None,
                  progress: bool = True, timeout: float = 60) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` and verifying size/SHA-256 when given.

    ``dest`` only appears once the file is complete and verified, so its presence means a finished download.
    """
    dest = Path(dest)
    if dest.is_file():
        problem = _verify_problem(dest, expected_size, sha256)
        if problem:
            raise DataError(f"{dest}: already exists but {problem}; delete it and rerun to download {url} again.")
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    offset = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()
        offset = 0
    if not (offset and offset == expected_size):
        _fetch(url, dest, offset, progress=progress, timeout=timeout)
    problem = _verify_problem(part, expected_size, sha256)
    if problem:
        part.unlink(missing_ok=True)
        raise DataError(
            f"{url}: the downloaded file {problem}; the partial download was deleted. Rerun to download it "
            "again; if this repeats, the file on the server changed or the expected size/checksum is wrong."
        )
    os.replace(part, dest)
    return dest


# Archive extraction


@dataclass(frozen=True)
class _Member:
    rel: str
    kind: str  # "file" | "dir" | "symlink"
    size: int
    crc: int | None
    link: str
    ref: zipfile.ZipInfo | tarfile.TarInfo | Path


def _safe_parts(name: str, archive: Path) -> list[str]:
    """The path components of an archive member, refusing absolute paths and ``..`` (zip-slip)."""
    norm = name.replace("\\", "/")
    if "\x00" in norm or norm.startswith("/") or re.match(r"^[A-Za-z]:", norm):
        raise DataError(f"{archive}: refusing member {name!r}: absolute path. The archive is unsafe; "
                        "do not extract it, download it again from the official source.")
    parts = [p for p in norm.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DataError(f"{archive}: refusing member {name!r}: it points outside the target folder (zip-slip). "
                        "The archive is unsafe; do not extract it, download it again from the official source.")
    return parts


_RawMember = tuple[str, str, int, "int | None", str, "zipfile.ZipInfo | tarfile.TarInfo | Path"]


def _folder_members(folder: Path) -> Iterator[_RawMember]:
    """The entries of an unpacked download (a folder) as archive members; the source is the entry's path."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in [*dirs, *sorted(files)]:
            path = Path(root, name)
            rel = path.relative_to(folder).as_posix()
            if path.is_symlink():
                yield rel, "symlink", 0, None, os.readlink(path), path
            elif path.is_dir():
                yield rel, "dir", 0, None, "", path
            elif path.is_file():
                yield rel, "file", path.stat().st_size, None, "", path
            else:
                raise DataError(f"{path}: refusing a special file (not a regular file, folder or link); move it "
                                f"out of {folder} and rerun.")


def _raw_members(archive: Path) -> Iterator[_RawMember]:
    """(name, kind, size, crc, link target, info) for every member of a zip or tar archive, or of a folder."""
    if archive.is_dir():
        yield from _folder_members(archive)
        return
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    yield info.filename, "dir", 0, None, "", info
                elif stat.S_ISLNK(info.external_attr >> 16):
                    yield info.filename, "symlink", 0, None, zf.read(info).decode("utf-8"), info
                else:
                    yield info.filename, "file", info.file_size, info.CRC, "", info
        return
    with tarfile.open(archive, "r:*") as tf:
        for info in tf.getmembers():
            if info.isdir():
                yield info.name, "dir", 0, None, "", info
            elif info.isreg():
                yield info.name, "file", info.size, None, "", info
            elif info.issym():
                yield info.name, "symlink", 0, None, info.linkname, info
            else:
                kind = "hard link" if info.islnk() else "special file"
                raise DataError(f"{archive}: refusing member {info.name!r}: {kind}s are not extracted. "
                                "Extract the archive by hand if you trust it.")


def _archive_kind(archive: Path) -> str:
    if archive.is_dir():
        return "folder"
    if not archive.is_file():
        raise DataError(f"{archive}: no such file; check the path (or download it again).")
    if zipfile.is_zipfile(archive):
        return "zip"
    try:
        if tarfile.is_tarfile(archive):
            return "tar"
    except (OSError, tarfile.TarError):
        pass
    raise _CorruptArchiveError(f"{archive}: not a zip or tar archive (or the file is truncated); "
                               "delete it and download it again.")


def _check_links(members: dict[str, _Member], archive: Path) -> None:
    """Refuse symlinks that resolve outside the extraction root, and paths that go through an archive symlink."""
    links = {rel for rel, m in members.items() if m.kind == "symlink"}
    for rel, member in members.items():
        parents = rel.split("/")[:-1]
        for i in range(1, len(parents) + 1):
            if "/".join(parents[:i]) in links:
                raise DataError(f"{archive}: refusing member {rel!r}: it goes through a symbolic link in the "
                                "archive. Extract the archive by hand if you trust it.")
        if member.kind != "symlink":
            continue
        target = member.link.replace("\\", "/")
        if not target or target.startswith("/") or re.match(r"^[A-Za-z]:", target):
            raise DataError(f"{archive}: refusing symbolic link {rel!r} -> {member.link!r}: absolute target. "
                            "The archive is unsafe; download it again from the official source.")
        current = parents.copy()
        steps = [p for p in target.split("/") if p not in ("", ".")]
        for i, step in enumerate(steps):
            if step == "..":
                if not current:
                    raise DataError(f"{archive}: refusing symbolic link {rel!r} -> {member.link!r}: it points "
                                    "outside the target folder. The archive is unsafe; download it again from "
                                    "the official source.")
                current.pop()
                continue
            current.append(step)
            if i < len(steps) - 1 and "/".join(current) in links:
                raise DataError(f"{archive}: refusing symbolic link {rel!r} -> {member.link!r}: it goes through "
                                "another link. Extract the archive by hand if you trust it.")


def _read_members(archive: Path, strip_top: bool) -> dict[str, _Member]:
    """The archive's members by safe relative path, without ``__MACOSX/`` litter, top folder stripped if asked."""
    entries: list[tuple[list[str], str, int, int | None, str, zipfile.ZipInfo | tarfile.TarInfo | Path]] = []
    for name, kind, size, crc, link, info in _raw_members(archive):
        parts = _safe_parts(name, archive)
        if not parts or any(p in _JUNK_DIRS for p in parts):
            continue
        entries.append((parts, kind, size, crc, link, info))
    if strip_top:
        tops = sorted({e[0][0] for e in entries})
        loose = [e[0][0] for e in entries if len(e[0]) == 1 and e[1] != "dir"]
        if len(tops) != 1 or loose:
            raise DataError(f"{archive}: expected a single top folder to strip, found {tops[:5]}. "
                            "Is this the right archive?")
        entries = [(e[0][1:], *e[1:]) for e in entries if len(e[0]) > 1]
    # an archive's own covidxray record is someone else's bookkeeping, never an instruction here: left out
    entries = [e for e in entries if e[0][0] not in RESERVED_NAMES]
    if not any(e[1] == "file" for e in entries):
        raise DataError(f"{archive}: the archive holds no files; delete it and download it again.")
    members: dict[str, _Member] = {}
    for parts, kind, size, crc, link, info in entries:
        rel = "/".join(parts)
        members[rel] = _Member(rel, kind, size, crc, link, info)
    for rel in members:
        parents = rel.split("/")[:-1]
        for i in range(1, len(parents) + 1):
            parent = members.get("/".join(parents[:i]))
            if parent is not None and parent.kind == "file":
                raise DataError(f"{archive}: member {rel!r} lies below the file {parent.rel!r}; the archive is "
                                "malformed, download it again.")
    _check_links(members, archive)
    return members


def _crc32_file(path: Path) -> int:
    crc = 0
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            crc = zlib.crc32(block, crc)
    return crc


def _same_bytes(path: Path, stream: IO[bytes]) -> bool:
    with path.open("rb") as fh:
        while True:
            ours, theirs = fh.read(_CHUNK), stream.read(_CHUNK)
            if ours != theirs:
                return False
            if not ours:
                return True


def _unchanged(member: _Member, target: Path, tf: tarfile.TarFile | None) -> bool:
    """True when ``target`` already holds exactly what the archive member would write there."""
    if member.kind == "dir":
        return target.is_dir()
    if member.kind == "symlink":
        return target.is_symlink() and os.readlink(target) == member.link
    if not target.is_file() or target.stat().st_size != member.size:
        return False
    if member.crc is not None:
        return _crc32_file(target) == member.crc
    if isinstance(member.ref, Path):
        with member.ref.open("rb") as source:
            return _same_bytes(target, source)
    assert tf is not None and isinstance(member.ref, tarfile.TarInfo)
    stream = tf.extractfile(member.ref)
    if stream is None:
        return False
    with stream:
        return _same_bytes(target, stream)


def _check_conflicts(members: dict[str, _Member], dest: Path, archive: Path) -> None:
    """Refuse to replace a user folder with a file (or a file with a folder): that would lose user data."""
    for rel, member in members.items():
        target = dest / rel
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = dest.joinpath(*parts[:i])
            if (parent.exists() or parent.is_symlink()) and not parent.is_dir():
                raise DataError(f"{archive}: cannot extract {rel!r}: {parent} is a file, not a folder. Move it "
                                "away and rerun.")
        if member.kind == "dir":
            if (target.exists() or target.is_symlink()) and not target.is_dir():
                raise DataError(f"{archive}: cannot extract folder {rel!r}: {target} is a file. Move it away "
                                "and rerun.")
        elif target.is_dir() and not target.is_symlink():
            raise DataError(f"{archive}: cannot extract {rel!r}: {target} is a folder. Move it away and rerun.")


def _move_into_place(src: Path, dst: Path) -> None:
    """Atomic rename; across file systems (a user-linked folder), copy next to ``dst`` and rename there."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        staged = dst.with_name(f".{dst.name}.extract-{os.getpid()}")
        if src.is_symlink():
            os.symlink(os.readlink(src), staged)
        else:
            shutil.copy2(src, staged)
        os.replace(staged, dst)


def _write_member(member: _Member, target: Path, zf: zipfile.ZipFile | None, tf: tarfile.TarFile | None) -> None:
    if member.kind == "dir":
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if member.kind == "symlink":
        os.symlink(member.link, target)
        return
    if isinstance(member.ref, Path):
        source: IO[bytes] = member.ref.open("rb")
    elif zf is not None:
        assert isinstance(member.ref, zipfile.ZipInfo)
        source = zf.open(member.ref)
    else:
        assert tf is not None and isinstance(member.ref, tarfile.TarInfo)
        extracted = tf.extractfile(member.ref)
        if extracted is None:
            raise tarfile.ReadError(f"cannot read member {member.rel!r}")
        source = extracted
    with source, target.open("wb") as out:
        shutil.copyfileobj(source, out, _CHUNK)


def extract_archive(archive: Path, dest: Path, *, strip_top: bool = False, progress: bool = False) -> Path:
    """Safely extract a zip or tar archive (or copy an unpacked download, a folder) into ``dest``; return ``dest``.

    Refuses absolute paths, ``..`` members and links that leave ``dest``; skips ``__MACOSX/``. Changed members
    are extracted into a temporary sibling folder first and then renamed into place, so an interrupted run
    leaves no half-written files; files in ``dest`` that the archive does not contain are never touched, and
    members already present with the same content are not rewritten (a rerun is a no-op).
    """
    archive, dest = Path(archive), Path(dest)
    kind = _archive_kind(archive)
    try:
        members = _read_members(archive, strip_top)
        with contextlib.ExitStack() as stack:
            zf = stack.enter_context(zipfile.ZipFile(archive)) if kind == "zip" else None
            tf = stack.enter_context(tarfile.open(archive, "r:*")) if kind == "tar" else None
            _check_conflicts(members, dest, archive)
            todo = [m for m in members.values() if not _unchanged(m, dest / m.rel, tf)]
            if not todo:
                return dest
            theirs = [m.rel for m in todo if m.kind != "dir" and not replaceable(dest, m.rel)]
            if theirs:
                raise refusal(dest, theirs, "destination")
            dest.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.extract-", dir=dest.parent))
            stack.callback(shutil.rmtree, staging, ignore_errors=True)
            tree = staging / "tree"
            tree.mkdir()
            for member in progress_bar(todo, desc=f"extract {archive.name}", unit="file", enabled=progress):
                _write_member(member, tree / member.rel, zf, tf)
            if not dest.exists():
                os.replace(tree, dest)
                record_files(dest, "download", [m.rel for m in todo if m.kind == "file"])
                return dest
            for member in todo:
                target = dest / member.rel
                if member.kind == "dir":
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    _move_into_place(tree / member.rel, target)
            record_files(dest, "download", [m.rel for m in todo if m.kind == "file"])
    except (zipfile.BadZipFile, zlib.error, EOFError, tarfile.TarError, RuntimeError, UnicodeDecodeError) as exc:
        raise _CorruptArchiveError(f"{archive}: the archive is corrupt or unreadable ({exc}); delete it and "
                                   "download it again.") from exc
    except OSError as exc:
        raise DataError(f"cannot extract {archive} into {dest} ({exc}); check free disk space and permissions, "
                        "then rerun.") from exc
    return dest


# Sources


def _cache_name(prefix: str, url: str) -> str:
    """A cache file name that is stable for one URL and differs between URLs."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", url.rstrip("/").rsplit("/", 1)[-1].split("?")[0]) or "download"
    return f"{prefix}-{hashlib.sha256(url.encode()).hexdigest()[:8]}-{base}"


def ieee8023_url(ref: str = IEEE8023_COMMIT) -> str:
    """The GitHub archive URL of ieee8023/covid-chestxray-dataset at ``ref``: a full commit SHA, or "latest"
    (today's master, which moves: a build from it cannot be repeated later)."""
    if ref == "latest":
        return f"https://github.com/{IEEE8023_REPOSITORY}/archive/refs/heads/master.zip"
    if not re.fullmatch(r"[0-9a-fA-F]{40}", ref):
        raise DataError(f"--ieee8023-ref {ref!r}: give a full 40-character commit SHA of {IEEE8023_REPOSITORY} "
                        f"(see https://github.com/{IEEE8023_REPOSITORY}/commits/master) or 'latest'; the default "
                        f"is the pinned commit {IEEE8023_COMMIT}.", usage=True)
    return f"https://github.com/{IEEE8023_REPOSITORY}/archive/{ref.lower()}.zip"


def read_download_record(folder: str | Path) -> dict[str, Any] | None:
    """The ``download.json`` that ``covidxray download`` wrote into a source folder, or None where there is none.

    The dataset build copies it into ``summary.json`` so a dataset names the exact source it was built from.
    """
    path = Path(folder) / DOWNLOAD_RECORD_NAME
    if not path.is_file():
        return None
    record = read_json(path, "delete it, or rerun `covidxray download` to write it again.",
                       what="the download record")
    return record


def _write_download_record(dest: Path, record: dict[str, Any]) -> None:
    """Write ``download.json`` into ``dest`` (recorded as ours) unless it already says the same."""
    if read_download_record(dest) == record:
        return
    if not replaceable(dest, DOWNLOAD_RECORD_NAME):
        raise refusal(dest, [DOWNLOAD_RECORD_NAME], "destination")
    write_json(record, dest / DOWNLOAD_RECORD_NAME)
    record_files(dest, "download", [DOWNLOAD_RECORD_NAME])


def _archive_commit(archive: Path) -> str | None:
    """The commit a GitHub (git archive) zip was made from: git writes its SHA as the zip comment."""
    if not zipfile.is_zipfile(archive):
        return None
    with zipfile.ZipFile(archive) as zf:
        comment = zf.comment.decode("ascii", errors="replace").strip()
    return comment.lower() if re.fullmatch(r"[0-9a-fA-F]{40}", comment) else None


_GIVEN, _PINNED, _FIRST = "given (--ieee8023-sha256)", "pinned in covidxray", "recorded by the first download"


def _expected_sha256(dest: Path, url: str, ref: str | None, sha256: str | None) -> tuple[str | None, str]:
    """The archive hash to verify against and where it comes from: given, pinned in covidxray, or recorded in
    ``download.json`` by the first download of the same URL into ``dest`` (None: nothing known yet). Today's
    master ("latest") moves, so no earlier record applies to it."""
    if sha256:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", sha256.strip()):
            raise DataError(f"--ieee8023-sha256 {sha256!r}: give the 64 hex digits of a SHA-256 (as in the "
                            f"archive_sha256 of a {DOWNLOAD_RECORD_NAME}).", usage=True)
        return sha256.strip().lower(), _GIVEN
    if ref is not None and ref.lower() in IEEE8023_ARCHIVE_SHA256:
        return IEEE8023_ARCHIVE_SHA256[ref.lower()], _PINNED
    previous = read_download_record(dest)
    if ref != "latest" and previous and previous.get("url") == url and previous.get("archive_sha256"):
        return str(previous["archive_sha256"]), str(previous.get("archive_sha256_origin", _FIRST))
    return None, _FIRST


def download_ieee8023(dest: Path = COVID_XRAY_DIR, *, ref: str = IEEE8023_COMMIT, url: str | None = None,
                      sha256: str | None = None, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Download the ieee8023 covid-chestxray-dataset archive at ``ref`` and unpack it so ``dest/metadata.csv`` exists.

    ``ref`` is a commit SHA (default: the pinned :data:`IEEE8023_COMMIT`) or "latest"; ``url`` replaces the
    GitHub URL (a mirror). The archive is verified against ``sha256``, else the hash known for the commit, else
    the hash recorded by the first download into ``dest``; what was downloaded is written to ``dest/download.json``.
    The archive stays in ``cache_dir`` (default ``dest/.download/``): a rerun neither downloads nor rewrites (for
    "latest" too: delete the cached archive to fetch today's master again; ``download.json`` names its commit).
    """
    dest = Path(dest)
    ref_used = None if url is not None else ref
    url = url if url is not None else ieee8023_url(ref)
    if not replaceable(dest, DOWNLOAD_RECORD_NAME):
        raise refusal(dest, [DOWNLOAD_RECORD_NAME], "destination")
    expected, origin = _expected_sha256(dest, url, ref_used, sha256)
    cache = Path(cache_dir) if cache_dir is not None else dest / CACHE_DIRNAME
    archive = download_file(url, cache / _cache_name("ieee8023", url), progress=progress)
    actual = file_sha256(archive)
    if expected is not None and actual != expected:
        archive.unlink(missing_ok=True)
        accept = (f"delete {dest / DOWNLOAD_RECORD_NAME} (it holds the hash of the first download) and rerun"
                  if origin == _FIRST else f"rerun with --ieee8023-sha256 {actual}")
        raise DataError(f"{url}: the archive has SHA-256 {actual}, expected {expected} ({origin}); the download "
                        f"{archive} was deleted and nothing was extracted. Rerun to download it again; if the same "
                        f"hash comes back, the server now sends other bytes for this ref: check the files, then "
                        f"{accept}.")
    try:
        extract_archive(archive, dest, strip_top=True, progress=progress)
    except _CorruptArchiveError as exc:
        archive.unlink(missing_ok=True)
        raise DataError(f"{exc} The cached download {archive} was deleted: rerun to download it again.") from exc
    if not (dest / "metadata.csv").is_file() or not (dest / "images").is_dir():
        raise DataError(f"{url}: the archive unpacked into {dest} has no metadata.csv and images/; is the URL "
                        f"the covid-chestxray-dataset repository archive ({DEFAULT_IEEE8023_URL})?")
    commit = _archive_commit(archive) or (ref_used.lower() if ref_used not in (None, "latest") else None)
    _write_download_record(dest, {
        "source": IEEE8023_REPOSITORY,
        "ref": ref_used,
        "commit": commit,
        "url": url,
        "archive_sha256": actual,
        "archive_sha256_origin": origin,
    })
    return dest


def kermany_manual_steps(dest: Path) -> str:
    """How to get the Kermany dataset by hand (Kaggle needs an account, so it cannot always be automatic)."""
    dest = Path(dest)
    normal = (dest / "chest_xray" / "train" / "NORMAL").as_posix()
    return (
        'The Kermany "Chest X-Ray Images (Pneumonia)" dataset is on Kaggle and needs a free Kaggle account.\n'
        "Get it by hand:\n"
        f"  1. Open {KAGGLE_DATASET_URL}, sign in and click Download (you get archive.zip).\n"
        f"  2. Either run `covidxray download --kermany-zip archive.zip`, or unzip archive.zip into "
        f"{dest.as_posix()}/ so that {normal}/ exists.\n"
        "Or let `covidxray download` fetch it: `pip install kagglehub` (in a checkout: `pip install -e "
        "\".[kaggle]\"`; the older `kaggle` package works too), then rerun `covidxray download`. If Kaggle asks "
        "for credentials, create an API token on https://www.kaggle.com/settings (API > Create New Token) and save "
        "it as ~/.kaggle/kaggle.json (or set KAGGLE_USERNAME and KAGGLE_KEY)."
    )


def _kagglehub() -> ModuleType | None:
    """The ``kagglehub`` client (the current Kaggle one) when it is installed, else None."""
    try:
        import kagglehub
    except ImportError:
        return None
    return kagglehub


def _kagglehub_download(kagglehub: ModuleType, dest: Path) -> Path:
    """Download the Kermany dataset with kagglehub (into its own cache, once) and return the unpacked folder."""
    try:
        folder = Path(kagglehub.dataset_download(KAGGLE_DATASET))
    except Exception as exc:  # kagglehub raises many unrelated types; all mean "do it by hand"
        raise DataError(f"kagglehub download of {KAGGLE_DATASET} failed ({type(exc).__name__}: {exc}).\n"
                        f"{kermany_manual_steps(dest)}") from exc
    if not folder.exists():
        raise DataError(f"kagglehub download of {KAGGLE_DATASET} returned {folder}, which does not exist.\n"
                        f"{kermany_manual_steps(dest)}")
    return folder


def _kaggle_installed() -> bool:
    return importlib.util.find_spec("kaggle") is not None


def _kaggle_credentials_found() -> bool:
    """Whether the Kaggle client will find credentials (checked first: importing ``kaggle`` without them fails)."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    folders = [Path.home() / ".kaggle"]
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        folders.insert(0, Path(os.environ["KAGGLE_CONFIG_DIR"]))
    xdg = os.environ.get("XDG_CONFIG_HOME")
    folders.append((Path(xdg) if xdg else Path.home() / ".config") / "kaggle")
    return any((folder / "kaggle.json").is_file() for folder in folders)


def _kaggle_download(cache: Path, dest: Path, progress: bool) -> Path:
    """Download the Kermany zip with the Kaggle API into ``cache`` (once), via a staging folder."""
    archive = cache / f"{KAGGLE_DATASET.rsplit('/', 1)[-1]}.zip"
    if archive.is_file():
        return archive
    staging = cache / "kaggle.part"
    staging.mkdir(parents=True, exist_ok=True)
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        api.authenticate()
        api.dataset_download_files(KAGGLE_DATASET, path=str(staging), unzip=False, quiet=not progress)
    except Exception as exc:  # the Kaggle client raises many unrelated types; all mean "do it by hand"
        raise DataError(f"Kaggle download of {KAGGLE_DATASET} failed ({type(exc).__name__}: {exc}).\n"
                        f"{kermany_manual_steps(dest)}") from exc
    zips = sorted(staging.glob("*.zip"))
    if not zips:
        raise DataError(f"Kaggle download of {KAGGLE_DATASET} left no zip in {staging}.\n"
                        f"{kermany_manual_steps(dest)}")
    os.replace(zips[0], archive)
    shutil.rmtree(staging, ignore_errors=True)
    return archive


def _has_kermany_layout(folder: Path, depth: int = 4) -> bool:
    """Whether some ``train/NORMAL`` (any case) folder lies within ``depth`` levels of ``folder``."""
    level = [folder]
    for _ in range(depth):
        children = [c for d in level for c in d.iterdir() if c.is_dir() and c.name not in (CACHE_DIRNAME, *_JUNK_DIRS)]
        if any(c.name.lower() == "normal" and c.parent.name.lower() in ("train", "val", "test") for c in children):
            return True
        level = children
    return False


def download_kermany(dest: Path = CHEST_XRAY_DIR, *, zip_path: Path | None = None, progress: bool = True) -> Path:
    """Unpack the Kermany dataset into ``dest`` from ``zip_path``, else through kagglehub, else through the older
    Kaggle API, and return ``dest``.

    Raises DataError carrying the manual steps when there is no zip and no Kaggle client is usable.
    """
    dest = Path(dest)
    kagglehub = _kagglehub() if zip_path is None else None
    if zip_path is not None:
        source = Path(zip_path)
        if not source.is_file():
            raise DataError(f"{source}: no such file. Pass the archive.zip downloaded from {KAGGLE_DATASET_URL}.")
    elif kagglehub is not None:
        source = _kagglehub_download(kagglehub, dest)
    elif not _kaggle_installed():
        raise DataError("Neither `kagglehub` nor `kaggle` is installed, so the Kermany dataset cannot be downloaded "
                        f"automatically.\n{kermany_manual_steps(dest)}")
    elif not _kaggle_credentials_found():
        raise DataError("No Kaggle API credentials found (~/.kaggle/kaggle.json, or KAGGLE_USERNAME and "
                        f"KAGGLE_KEY), so the Kermany dataset cannot be downloaded automatically.\n"
                        f"{kermany_manual_steps(dest)}")
    else:
        source = _kaggle_download(dest / CACHE_DIRNAME, dest, progress)
    extract_archive(source, dest, progress=progress)
    if not _has_kermany_layout(dest):
        raise DataError(f"{source}: unpacked into {dest}, but no chest_xray/train/NORMAL/ folder is there. Is this "
                        f'the Kaggle "Chest X-Ray Images (Pneumonia)" archive ({KAGGLE_DATASET_URL})?')
    return dest
