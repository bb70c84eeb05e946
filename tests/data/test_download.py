"""Downloads and archive extraction against a local HTTP server (127.0.0.1 only; no internet)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import stat
import sys
import tarfile
import threading
import types
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from covidxray.data import download
from covidxray.data.build import build_dataset
from covidxray.data.download import (
    DEFAULT_IEEE8023_URL,
    IEEE8023_COMMIT,
    download_file,
    download_ieee8023,
    download_kermany,
    extract_archive,
    ieee8023_url,
    kermany_manual_steps,
    read_download_record,
)
from covidxray.data.manifest import dataset_summary
from covidxray.errors import DataError
from covidxray.outputs import RECORD_NAME


@dataclass
class Site:
    """What the test server serves and what it saw."""

    files: dict[str, bytes] = field(default_factory=dict)
    ignore_range: bool = False
    cut_after: int | None = None
    """Announce the full length but close the connection after this many body bytes (a dropped download)."""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    base: str = ""


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            range_header = self.headers.get("Range")
            site.requests.append((self.path, range_header))
            body = site.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            start = 0
            if range_header and not site.ignore_range:
                start = int(range_header.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            if site.cut_after is not None:
                self.wfile.write(body[start:start + site.cut_after])
                self.close_connection = True
                return
            self.wfile.write(body[start:])

    return Handler


@pytest.fixture
def site() -> Iterator[Site]:
    state = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _zip_bytes(entries: dict[str, bytes], comment: bytes = b"") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        zf.comment = comment
    return buffer.getvalue()


def _ieee_zip(comment: bytes = b"") -> bytes:
    """A GitHub-style archive of the repository (git writes the commit SHA as the zip comment)."""
    top = "covid-chestxray-dataset-master/"
    return _zip_bytes({
        top + "metadata.csv": b"patientid,finding,filename\n1,COVID-19,a.jpeg\n",
        top + "images/a.jpeg": os.urandom(3000),
        top + "volumes/v.txt": b"volume",
        "__MACOSX/" + top + "._metadata.csv": b"junk",
    }, comment)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_download_file_full(site: Site, tmp_path: Path) -> None:
    payload = os.urandom(100_000)
    site.files["/f.bin"] = payload
    dest = tmp_path / "sub" / "f.bin"
    assert download_file(site.base + "/f.bin", dest, expected_size=len(payload),
                         sha256=hashlib.sha256(payload).hexdigest(), progress=False) == dest
    assert dest.read_bytes() == payload
    assert not dest.with_suffix(".bin.part").exists()
    assert site.requests == [("/f.bin", None)]


@pytest.mark.parametrize("ignore_range", [False, True])
def test_download_file_resumes_or_restarts(site: Site, tmp_path: Path, ignore_range: bool) -> None:
    payload = os.urandom(50_000)
    site.files["/f.bin"] = payload
    site.ignore_range = ignore_range
    dest = tmp_path / "f.bin"
    part = tmp_path / "f.bin.part"
    part.write_bytes(payload[: len(payload) // 2])
    download_file(site.base + "/f.bin", dest, sha256=hashlib.sha256(payload).hexdigest(), progress=False)
    assert dest.read_bytes() == payload
    assert not part.exists()
    assert site.requests == [("/f.bin", f"bytes={len(payload) // 2}-")]


def test_download_file_dropped_connection_then_resume(site: Site, tmp_path: Path) -> None:
    payload = os.urandom(40_000)
    site.files["/f.bin"] = payload
    site.cut_after = 15_000
    dest = tmp_path / "f.bin"
    with pytest.raises(DataError, match="resumes") as info:
        download_file(site.base + "/f.bin", dest, progress=False)
    assert site.base + "/f.bin" in str(info.value)
    assert not dest.exists()
    assert (tmp_path / "f.bin.part").read_bytes() == payload[:15_000]
    site.cut_after = None
    download_file(site.base + "/f.bin", dest, progress=False)
    assert dest.read_bytes() == payload
    assert site.requests[-1] == ("/f.bin", "bytes=15000-")


def test_download_file_part_already_complete(site: Site, tmp_path: Path) -> None:
    payload = os.urandom(1000)
    site.files["/f.bin"] = payload
    (tmp_path / "f.bin.part").write_bytes(payload)
    dest = download_file(site.base + "/f.bin", tmp_path / "f.bin", progress=False)
    assert dest.read_bytes() == payload
    assert site.requests == [("/f.bin", "bytes=1000-")]


@pytest.mark.parametrize("check", ["size", "sha256"])
def test_download_file_mismatch(site: Site, tmp_path: Path, check: str) -> None:
    site.files["/f.bin"] = b"x" * 500
    dest = tmp_path / "f.bin"
    kwargs = {"expected_size": 499} if check == "size" else {"sha256": "0" * 64}
    with pytest.raises(DataError, match="expected") as info:
        download_file(site.base + "/f.bin", dest, progress=False, **kwargs)
    assert site.base + "/f.bin" in str(info.value)
    assert not dest.exists()
    assert not (tmp_path / "f.bin.part").exists()


def test_download_file_http_error(site: Site, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="HTTP 404"):
        download_file(site.base + "/missing.zip", tmp_path / "m.zip", progress=False)
    assert not (tmp_path / "m.zip").exists()


def test_download_file_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/data.zip"
    with pytest.raises(DataError) as info:
        download_file(url, tmp_path / "data.zip", progress=False, timeout=5)
    message = str(info.value)
    assert url in message
    assert "rerun" in message and "by hand" in message
    assert not (tmp_path / "data.zip").exists()


def test_download_ieee8023_layout_and_rerun(site: Site, tmp_path: Path) -> None:
    site.files["/master.zip"] = _ieee_zip()
    dest = tmp_path / "Covid_XRAY"
    dest.mkdir()
    (dest / "README.md").write_text("user notes")
    url = site.base + "/master.zip"
    assert download_ieee8023(dest, url=url, progress=False) == dest
    assert (dest / "metadata.csv").read_bytes().startswith(b"patientid")
    assert (dest / "images" / "a.jpeg").stat().st_size == 3000
    assert (dest / "volumes" / "v.txt").is_file()
    assert (dest / "README.md").read_text() == "user notes"
    assert not (dest / "__MACOSX").exists()
    assert not (dest / "covid-chestxray-dataset-master").exists()
    assert len(list((dest / ".download").glob("*.zip"))) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["Covid_XRAY"]  # no staging folder left behind
    record = read_download_record(dest)
    assert record == {"source": "ieee8023/covid-chestxray-dataset", "ref": None, "commit": None, "url": url,
                      "archive_sha256": hashlib.sha256(site.files["/master.zip"]).hexdigest(),
                      "archive_sha256_origin": "recorded by the first download"}
    assert "download.json" in json.loads((dest / RECORD_NAME).read_text())["files"]

    before = _snapshot(dest)
    assert download_ieee8023(dest, url=url, progress=False) == dest
    assert len(site.requests) == 1  # the cached archive is reused
    assert _snapshot(dest) == before  # nothing rewritten


def test_download_ieee8023_into_new_folder_with_cache_dir(site: Site, tmp_path: Path) -> None:
    site.files["/master.zip"] = _ieee_zip()
    dest = tmp_path / "data" / "Covid_XRAY"
    download_ieee8023(dest, url=site.base + "/master.zip", cache_dir=tmp_path / "cache", progress=False)
    assert (dest / "metadata.csv").is_file() and (dest / "images" / "a.jpeg").is_file()
    assert not (dest / ".download").exists()
    assert len(list((tmp_path / "cache").glob("*.zip"))) == 1


def test_download_ieee8023_corrupt_cache_is_deleted(site: Site, tmp_path: Path) -> None:
    site.files["/master.zip"] = b"this is not a zip archive at all"
    dest = tmp_path / "Covid_XRAY"
    with pytest.raises(DataError, match="rerun"):
        download_ieee8023(dest, url=site.base + "/master.zip", progress=False)
    assert not list((dest / ".download").glob("*.zip"))


def test_extract_refuses_to_replace_an_edited_file_and_keeps_user_files(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip_bytes({"top/x.txt": b"original", "top/d/y.txt": b"y"}))
    dest = tmp_path / "out"
    extract_archive(archive, dest, strip_top=True)
    (dest / "mine.txt").write_bytes(b"mine")
    y_before = (dest / "d" / "y.txt").stat().st_mtime_ns
    extract_archive(archive, dest, strip_top=True)
    assert (dest / "mine.txt").read_bytes() == b"mine"
    assert (dest / "d" / "y.txt").stat().st_mtime_ns == y_before
    (dest / "x.txt").write_bytes(b"edited")
    with pytest.raises(DataError, match=r"covidxray did not write or that changed since \(x.txt\)"):
        extract_archive(archive, dest, strip_top=True)
    assert (dest / "x.txt").read_bytes() == b"edited"
    (dest / "x.txt").unlink()
    extract_archive(archive, dest, strip_top=True)
    assert (dest / "x.txt").read_bytes() == b"original"
    assert (dest / "mine.txt").read_bytes() == b"mine"


@pytest.mark.parametrize("name", ["../evil.txt", "top/../../evil.txt", "/abs/evil.txt", "C:/evil.txt"])
def test_extract_refuses_path_traversal(tmp_path: Path, name: str) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip_bytes({"ok.txt": b"ok", name: b"evil"}))
    dest = tmp_path / "out" / "inner"
    with pytest.raises(DataError, match="refusing"):
        extract_archive(archive, dest)
    assert not dest.exists()
    assert not list(tmp_path.rglob("evil.txt"))


def _zip_with_symlink(path: Path, name: str, target: str) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ok.txt", b"ok")
        info = zipfile.ZipInfo(name)
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, target)


@pytest.mark.parametrize("target", ["../../etc", "/etc/passwd", "a/../../../x"])
def test_extract_refuses_symlink_outside(tmp_path: Path, target: str) -> None:
    archive = tmp_path / "link.zip"
    _zip_with_symlink(archive, "sub/link", target)
    with pytest.raises(DataError, match="symbolic link"):
        extract_archive(archive, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_extract_refuses_path_through_archive_symlink(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("link")
        info.create_system = 3
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "sub")
        zf.writestr("link/x.txt", b"x")
    with pytest.raises(DataError, match="symbolic link"):
        extract_archive(archive, tmp_path / "out")


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_extract_keeps_symlink_inside(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    _zip_with_symlink(archive, "sub/link", "../ok.txt")
    dest = extract_archive(archive, tmp_path / "out")
    assert (dest / "sub" / "link").is_symlink()
    assert (dest / "sub" / "link").read_bytes() == b"ok"
    extract_archive(archive, dest)


def test_extract_tar_gz_and_traversal(tmp_path: Path) -> None:
    def make(path: Path, names: dict[str, bytes]) -> None:
        with tarfile.open(path, "w:gz") as tf:
            for name, data in names.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))

    good = tmp_path / "good.tar.gz"
    make(good, {"top/a.txt": b"a", "top/b/c.txt": b"c"})
    dest = extract_archive(good, tmp_path / "out", strip_top=True)
    assert (dest / "b" / "c.txt").read_bytes() == b"c"
    before = _snapshot(dest)
    extract_archive(good, dest, strip_top=True)
    assert _snapshot(dest) == before

    bad = tmp_path / "bad.tar.gz"
    make(bad, {"a.txt": b"a", "../evil.txt": b"evil"})
    with pytest.raises(DataError, match="zip-slip"):
        extract_archive(bad, tmp_path / "out2")


def test_extract_refuses_to_replace_user_folder(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    archive.write_bytes(_zip_bytes({"data": b"file"}))
    dest = tmp_path / "out"
    (dest / "data").mkdir(parents=True)
    (dest / "data" / "keep.txt").write_text("keep")
    with pytest.raises(DataError, match="is a folder"):
        extract_archive(archive, dest)
    assert (dest / "data" / "keep.txt").read_text() == "keep"


def test_extract_not_an_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"nope")
    with pytest.raises(DataError, match="not a zip or tar"):
        extract_archive(junk, tmp_path / "out")
    with pytest.raises(DataError, match="no such file"):
        extract_archive(tmp_path / "missing.zip", tmp_path / "out")


def _no_kaggle_credentials(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setitem(sys.modules, "kagglehub", None)  # `import kagglehub` fails: the client is not installed


@pytest.mark.parametrize("installed", [False, True])
def test_kermany_without_kaggle_gives_manual_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   installed: bool) -> None:
    _no_kaggle_credentials(monkeypatch, tmp_path / "home")
    monkeypatch.setattr(download, "_kaggle_installed", lambda: installed)
    dest = tmp_path / "Chest_XRAY"
    with pytest.raises(DataError) as info:
        download_kermany(dest, progress=False)
    message = str(info.value)
    assert kermany_manual_steps(dest) in message
    assert ("Neither `kagglehub` nor `kaggle` is installed" in message) != installed
    assert "pip install kagglehub" in message
    assert "https://www.kaggle.com/datasets/paultimothymooney/chest-xray-pneumonia" in message
    assert "--kermany-zip" in message and "chest_xray/train/NORMAL" in message
    assert not dest.exists()


def _kermany_zip() -> bytes:
    return _zip_bytes({
        "chest_xray/train/NORMAL/IM-0115-0001.jpeg": b"n1",
        "chest_xray/test/PNEUMONIA/person1_virus_6.jpeg": b"p1",
        "chest_xray/chest_xray/train/NORMAL/IM-0115-0001.jpeg": b"n1",
        "chest_xray/train/NORMAL/.DS_Store": b"junk",
        "__MACOSX/chest_xray/._train": b"junk",
        "chest_xray/__MACOSX/._x": b"junk",
    })


def test_kermany_from_local_zip(tmp_path: Path) -> None:
    archive = tmp_path / "archive.zip"
    archive.write_bytes(_kermany_zip())
    dest = tmp_path / "Chest_XRAY"
    assert download_kermany(dest, zip_path=archive, progress=False) == dest
    assert (dest / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg").read_bytes() == b"n1"
    assert (dest / "chest_xray" / "chest_xray" / "train" / "NORMAL").is_dir()
    assert not list(dest.rglob("__MACOSX"))
    before = _snapshot(dest)
    download_kermany(dest, zip_path=archive, progress=False)
    assert _snapshot(dest) == before


def test_kermany_wrong_or_missing_zip(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        download_kermany(tmp_path / "Chest_XRAY", zip_path=tmp_path / "missing.zip", progress=False)
    other = tmp_path / "other.zip"
    other.write_bytes(_zip_bytes({"something/else.txt": b"x"}))
    with pytest.raises(DataError, match="chest_xray/train/NORMAL"):
        download_kermany(tmp_path / "Chest_XRAY", zip_path=other, progress=False)


def test_kermany_through_kaggle_api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_kaggle_credentials(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    monkeypatch.setattr(download, "_kaggle_installed", lambda: True)
    calls: list[str] = []

    class FakeKaggleApi:
        def authenticate(self) -> None:
            pass

        def dataset_download_files(self, dataset: str, path: str, unzip: bool, quiet: bool) -> None:
            calls.append(dataset)
            Path(path, "chest-xray-pneumonia.zip").write_bytes(_kermany_zip())

    module = types.ModuleType("kaggle.api.kaggle_api_extended")
    module.KaggleApi = FakeKaggleApi  # type: ignore[attr-defined]
    for name in ("kaggle", "kaggle.api"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", module)

    dest = tmp_path / "Chest_XRAY"
    download_kermany(dest, progress=False)
    download_kermany(dest, progress=False)
    assert calls == ["paultimothymooney/chest-xray-pneumonia"]
    assert (dest / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg").is_file()
    assert (dest / ".download" / "chest-xray-pneumonia.zip").is_file()


# Reproducible ieee8023 downloads: a pinned commit, a verified archive, a record beside the data


def test_ieee8023_url_pins_a_commit_by_default() -> None:
    pinned = f"https://github.com/ieee8023/covid-chestxray-dataset/archive/{IEEE8023_COMMIT}.zip"
    assert ieee8023_url() == DEFAULT_IEEE8023_URL == pinned
    assert ieee8023_url("latest").endswith("/archive/refs/heads/master.zip")
    assert ieee8023_url("A" * 40).endswith("/archive/" + "a" * 40 + ".zip")
    for bad in ("master", "6a42423", "x" * 40, ""):
        with pytest.raises(DataError, match="full 40-character commit SHA") as info:
            ieee8023_url(bad)
        assert "'latest'" in str(info.value) and IEEE8023_COMMIT in str(info.value)


def _serve_at(monkeypatch: pytest.MonkeyPatch, site: Site, body: bytes) -> None:
    """Point the GitHub archive URL of every ref at the local test server (the only network stand-in)."""
    site.files["/archive.zip"] = body
    monkeypatch.setattr(download, "ieee8023_url", lambda ref=IEEE8023_COMMIT: f"{site.base}/archive.zip")


def test_ieee8023_hash_recorded_first_then_verified(monkeypatch: pytest.MonkeyPatch, site: Site,
                                                    tmp_path: Path) -> None:
    first = _ieee_zip(comment=IEEE8023_COMMIT.encode())
    _serve_at(monkeypatch, site, first)
    dest = tmp_path / "Covid_XRAY"
    download_ieee8023(dest, progress=False)
    record = read_download_record(dest)
    assert record is not None
    assert (record["ref"], record["commit"]) == (IEEE8023_COMMIT, IEEE8023_COMMIT)
    assert record["archive_sha256"] == hashlib.sha256(first).hexdigest()
    assert record["archive_sha256_origin"] == "recorded by the first download"

    # The cache is gone and the server now sends other bytes for the same commit: refused, nothing touched.
    for cached in (dest / ".download").iterdir():
        cached.unlink()
    site.files["/archive.zip"] = _ieee_zip(comment=IEEE8023_COMMIT.encode())
    before = _snapshot(dest)
    with pytest.raises(DataError) as info:
        download_ieee8023(dest, progress=False)
    message = str(info.value)
    new_hash = hashlib.sha256(site.files["/archive.zip"]).hexdigest()
    assert record["archive_sha256"] in message and new_hash in message
    assert f"delete {dest / 'download.json'}" in message
    assert _snapshot(dest) == before
    assert not list((dest / ".download").iterdir())

    # The user accepts the new archive by deleting the record (ours, so it may go): recorded afresh.
    (dest / "download.json").unlink()
    download_ieee8023(dest, progress=False)
    assert read_download_record(dest)["archive_sha256"] == new_hash


def test_ieee8023_given_or_pinned_hash_mismatch(monkeypatch: pytest.MonkeyPatch, site: Site, tmp_path: Path) -> None:
    _serve_at(monkeypatch, site, _ieee_zip())
    actual = hashlib.sha256(site.files["/archive.zip"]).hexdigest()
    dest = tmp_path / "Covid_XRAY"
    with pytest.raises(DataError, match=f"expected {'0' * 64} \\(given") as info:
        download_ieee8023(dest, sha256="0" * 64, progress=False)
    assert actual in str(info.value) and f"--ieee8023-sha256 {actual}" in str(info.value)
    assert not (dest / "metadata.csv").exists()
    monkeypatch.setitem(download.IEEE8023_ARCHIVE_SHA256, IEEE8023_COMMIT, "1" * 64)
    with pytest.raises(DataError, match="expected 1{64} \\(pinned in covidxray\\)"):
        download_ieee8023(dest, progress=False)
    monkeypatch.setitem(download.IEEE8023_ARCHIVE_SHA256, IEEE8023_COMMIT, actual)
    download_ieee8023(dest, progress=False)
    assert read_download_record(dest)["archive_sha256_origin"] == "pinned in covidxray"
    with pytest.raises(DataError, match="64 hex digits"):
        download_ieee8023(dest, sha256="abc", progress=False)


def test_ieee8023_latest_records_the_commit_and_may_move(monkeypatch: pytest.MonkeyPatch, site: Site,
                                                         tmp_path: Path) -> None:
    _serve_at(monkeypatch, site, _ieee_zip(comment=b"b" * 40))
    dest = tmp_path / "Covid_XRAY"
    download_ieee8023(dest, ref="latest", progress=False)
    assert (read_download_record(dest)["ref"], read_download_record(dest)["commit"]) == ("latest", "b" * 40)
    for cached in (dest / ".download").iterdir():
        cached.unlink()
    site.files["/archive.zip"] = _ieee_zip(comment=b"c" * 40)  # master moved on
    download_ieee8023(dest, ref="latest", progress=False)
    assert read_download_record(dest)["commit"] == "c" * 40


def test_ieee8023_refuses_a_user_download_json(site: Site, tmp_path: Path) -> None:
    site.files["/master.zip"] = _ieee_zip()
    dest = tmp_path / "Covid_XRAY"
    dest.mkdir()
    (dest / "download.json").write_text('{"mine": true}')
    with pytest.raises(DataError, match=r"did not write or that changed since \(download.json\)"):
        download_ieee8023(dest, url=site.base + "/master.zip", progress=False)
    assert site.requests == []
    assert (dest / "download.json").read_text() == '{"mine": true}'


def test_read_download_record_errors(tmp_path: Path) -> None:
    assert read_download_record(tmp_path) is None
    (tmp_path / "download.json").write_text("{not json")
    with pytest.raises(DataError, match="download.json: cannot read the download record"):
        read_download_record(tmp_path)
    (tmp_path / "download.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="not a JSON object"):
        read_download_record(tmp_path)


def test_dataset_summary_names_the_downloaded_source(site: Site, tmp_path: Path, synthetic_sources) -> None:
    """download.json beside the ieee8023 data is not an image to the build, and its summary.json carries it."""
    src = Path(synthetic_sources.covid_xray)
    entries = {f"covid-chestxray-dataset-{IEEE8023_COMMIT}/{p.relative_to(src).as_posix()}": p.read_bytes()
               for p in sorted(src.rglob("*")) if p.is_file()}
    site.files["/archive.zip"] = _zip_bytes(entries, IEEE8023_COMMIT.encode())
    covid = download_ieee8023(tmp_path / "Covid_XRAY", url=site.base + "/archive.zip", progress=False)
    out = tmp_path / "dataset"
    summary = build_dataset(out, chest_xray=synthetic_sources.chest_xray, covid_xray=covid, progress=False)
    assert summary["sources"]["ieee8023"]["download"] == read_download_record(covid)
    assert dataset_summary(out)["sources"]["ieee8023"]["download"]["commit"] == IEEE8023_COMMIT
    assert "download.json" not in (out / "rejected.csv").read_text()


# Kermany through kagglehub (the current Kaggle client); the fake module stands in for the network client only


def _kermany_folder(root: Path) -> Path:
    """What kagglehub leaves in its cache for the dataset: the archive, already unpacked."""
    root.mkdir(parents=True)
    archive = root.with_suffix(".zip")
    archive.write_bytes(_kermany_zip())
    extract_archive(archive, root)
    archive.unlink()
    (root / RECORD_NAME).unlink()  # kagglehub's cache has no covidxray record
    return root


def _fake_kagglehub(monkeypatch: pytest.MonkeyPatch, dataset_download) -> None:
    module = types.ModuleType("kagglehub")
    module.dataset_download = dataset_download  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kagglehub", module)


def test_kermany_through_kagglehub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_kaggle_credentials(monkeypatch, tmp_path / "home")
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
    monkeypatch.setattr(download, "_kaggle_installed", lambda: True)  # kagglehub comes first all the same
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", None)
    cache = _kermany_folder(tmp_path / "kagglehub-cache" / "versions" / "2")
    calls: list[str] = []

    def dataset_download(handle: str) -> str:
        calls.append(handle)
        return str(cache)

    _fake_kagglehub(monkeypatch, dataset_download)
    dest = tmp_path / "Chest_XRAY"
    dest.mkdir()
    (dest / "README.md").write_text("placeholder")
    assert download_kermany(dest, progress=False) == dest
    assert (dest / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg").read_bytes() == b"n1"
    assert (dest / "chest_xray" / "test" / "PNEUMONIA" / "person1_virus_6.jpeg").read_bytes() == b"p1"
    assert not list(dest.rglob("__MACOSX"))
    assert (dest / "README.md").read_text() == "placeholder"
    before = _snapshot(dest)
    download_kermany(dest, progress=False)
    assert _snapshot(dest) == before
    assert calls == ["paultimothymooney/chest-xray-pneumonia"] * 2
    assert (cache / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg").is_file()  # kagglehub's cache kept

    (dest / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg").write_bytes(b"edited by the user")
    (cache / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg").write_bytes(b"a new version")
    with pytest.raises(DataError, match="did not write or that changed since"):
        download_kermany(dest, progress=False)
    assert (dest / "chest_xray" / "train" / "NORMAL" / "IM-0115-0001.jpeg").read_bytes() == b"edited by the user"


def test_kermany_kagglehub_failure_gives_manual_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _no_kaggle_credentials(monkeypatch, tmp_path / "home")

    def dataset_download(handle: str) -> str:
        raise ConnectionError("no route to www.kaggle.com")

    _fake_kagglehub(monkeypatch, dataset_download)
    dest = tmp_path / "Chest_XRAY"
    with pytest.raises(DataError, match="kagglehub download of paultimothymooney/chest-xray-pneumonia failed "
                                        r"\(ConnectionError: no route") as info:
        download_kermany(dest, progress=False)
    assert kermany_manual_steps(dest) in str(info.value)
    assert not dest.exists()


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_extract_from_a_folder_refuses_links_outside(tmp_path: Path) -> None:
    source = tmp_path / "unpacked"
    (source / "sub").mkdir(parents=True)
    (source / "ok.txt").write_text("ok")
    os.symlink("../../outside.txt", source / "sub" / "link")
    with pytest.raises(DataError, match="symbolic link"):
        extract_archive(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()
