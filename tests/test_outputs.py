"""covidxray.outputs: ownership records, claims, staged swaps, nested outputs, kills at every step of a swap."""

from __future__ import annotations

import json
import os
import sys

import pytest

from covidxray import outputs
from covidxray.errors import DataError
from covidxray.outputs import (
    PENDING_NAME,
    RECORD_NAME,
    SCRATCH_PREFIX,
    claim_output,
    foreign_entries,
    staged_output,
)


def files_of(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and SCRATCH_PREFIX not in str(p.relative_to(folder)) and p.name not in (RECORD_NAME,
                                                                                                   PENDING_NAME)}


def build(folder, content: dict[str, bytes], prefix: str | None = None, verb: str = "data") -> None:
    with staged_output(folder, verb, prefix=prefix) as stage:
        for rel, data in content.items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            (stage / rel).write_bytes(data)


def test_put_records_and_a_rerun_replaces_only_its_own(tmp_path):
    out = tmp_path / "out"
    with claim_output(out, "evaluate") as o:
        o.write_text("a.txt", "one")
        o.write_json("sub/b.json", {"x": 1.5})
    record = json.loads((out / RECORD_NAME).read_text())
    assert set(record["files"]) == {"a.txt", "sub/b.json"}
    assert record["verb"] == "evaluate" and record["kind"] == "evaluation"
    with claim_output(out, "evaluate") as o:
        o.write_text("a.txt", "two")
        o.remove("sub/b.json")
    assert (out / "a.txt").read_text() == "two" and not (out / "sub" / "b.json").exists()
    (out / "a.txt").write_text("edited by the user")
    with pytest.raises(DataError, match=r"\(a.txt\)"), claim_output(out, "evaluate"):
        pass
    assert (out / "a.txt").read_text() == "edited by the user"


def test_a_kept_readme_is_never_touched_and_other_files_are_refused(tmp_path):
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "README.md").write_text("placeholder")
    build(out, {"manifest.csv": b"m", "train/a.png": b"a"})
    build(out, {"manifest.csv": b"m2", "val/b.png": b"b"})
    assert files_of(out) == {"README.md": b"placeholder", "manifest.csv": b"m2", "val/b.png": b"b"}
    (out / "train").mkdir()
    (out / "train" / "mine.png").write_bytes(b"user")
    with pytest.raises(DataError, match="train/mine.png"):
        build(out, {"manifest.csv": b"m3"})
    assert (out / "manifest.csv").read_bytes() == b"m2"


def test_a_record_name_that_is_a_link_or_garbage_is_foreign(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere.json").write_text("{}")
    (out / RECORD_NAME).symlink_to(tmp_path / "elsewhere.json")
    assert foreign_entries(out) == [RECORD_NAME]
    (out / RECORD_NAME).unlink()
    (out / RECORD_NAME).write_text("not json")
    assert foreign_entries(out) == [RECORD_NAME]


def test_prefix_replaces_one_models_files_only(tmp_path):
    out = tmp_path / "cams"
    build(out, {"a__1.png": b"1", "a__2.png": b"2"}, prefix="a__", verb="cam")
    build(out, {"b__1.png": b"x"}, prefix="b__", verb="cam")
    build(out, {"a__3.png": b"3"}, prefix="a__", verb="cam")
    assert files_of(out) == {"a__3.png": b"3", "b__1.png": b"x"}
    assert foreign_entries(out) == []


def test_nested_outputs_survive_the_parent_writing_afterwards(tmp_path):
    """A child claimed while the parent's claim is open stays named in the parent's record."""
    root = tmp_path / "root"
    with claim_output(root, "reproduce") as parent:
        build(root / "child", {"x.txt": b"x"})
        with claim_output(root / "runs", "reproduce"):
            pass
        build(root / "runs" / "r1", {"m.keras": b"m"})
        parent.write_text("results.md", "table")
    assert foreign_entries(root) == []
    with claim_output(root, "reproduce") as parent:
        parent.write_text("results.md", "table again")
    (root / "runs" / "r1" / "notes.txt").write_text("user")
    assert foreign_entries(root) == ["runs/r1/notes.txt"]


def test_sources_around_the_output_are_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for out in (src, src / "inner", tmp_path):
        with pytest.raises(DataError, match="source"), claim_output(out, "evaluate", sources=[src]):
            pass


def test_a_failure_removes_what_the_claim_created(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError), claim_output(out, "evaluate") as o:
        o.scratch()
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kill_at", range(1, 9))
def test_a_swap_killed_at_any_rename_is_recovered_by_the_next_run(tmp_path, monkeypatch, kill_at):
    """A kill (no clean-up runs) after any number of renames of a swap: the next claim finds nothing foreign,
    removes the leftovers, and the next build gives exactly its own output."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("kept")
    build(out, {"manifest.csv": b"old", "train/a.png": b"a", "test/b.png": b"b"})
    real_replace = os.replace
    calls = {"n": 0}

    class Killed(BaseException):
        pass

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    monkeypatch.setattr(outputs.OutputDir, "_abandon", lambda self: None)
    with pytest.raises(Killed):
        build(out, {"manifest.csv": b"new", "train/c.png": b"c", "val/d.png": b"d"})
    monkeypatch.setattr(outputs.os, "replace", real_replace)
    assert foreign_entries(out) == []
    build(out, {"manifest.csv": b"third", "val/e.png": b"e"})
    assert files_of(out) == {"README.md": b"kept", "manifest.csv": b"third", "val/e.png": b"e"}
    assert not [p for p in out.iterdir() if p.name.startswith(SCRATCH_PREFIX) or p.name == PENDING_NAME]


def test_command_line_names_a_jupyter_kernel_without_its_connection_file(monkeypatch):
    from covidxray.outputs import JUPYTER_KERNEL_COMMAND, command_line

    monkeypatch.setattr(sys, "argv", ["/venv/lib/ipykernel_launcher.py", "-f", "/tmp/tmpabc.json"])
    assert command_line() == [JUPYTER_KERNEL_COMMAND]
    monkeypatch.setattr(sys, "argv", ["/venv/bin/covidxray", "cam", "--out", "x"])
    assert command_line() == ["covidxray", "cam", "--out", "x"]


def test_one_csv_writer_for_frames_and_rows():
    """A DataFrame and the same rows as mappings give the same bytes, with "\\n" line endings on every platform."""
    import pandas as pd

    from covidxray.outputs import csv_text

    rows = [{"path": "train/covid/a.png", "label": "covid", "age": 41}, {"path": "b,c.png", "label": "normal",
                                                                          "age": ""}]
    text = csv_text(rows, ["path", "label", "age"])
    assert text == 'path,label,age\ntrain/covid/a.png,covid,41\n"b,c.png",normal,\n'
    assert csv_text(pd.DataFrame(rows)) == text and "\r" not in text
    with pytest.raises(ValueError, match="columns"):
        csv_text(rows)
