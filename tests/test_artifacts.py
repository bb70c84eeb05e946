"""Artifacts, not folders: every output knows its kind, its writer and its data; no verb can destroy another's.

Each case runs the real command line against real artifacts (a built dataset, a trained run, an evaluation,
predictions, heatmaps, probes) and hashes every file under the test's folder before and after: any lost or
changed byte fails. Covered: each verb's ``--out`` pointed at each other kind, nesting inside an artifact,
tampered records (names outside the folder, an unknown format, a record that would widen a deletion), two
writers at once (a real second process), a killed writer's lock, provenance (SYNTHETIC) travelling to every
output a reader looks at, and a verb that amends an artifact keeping its writer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, write_image
from test_careless_user import CASES, run_verb, snapshot, verb_args

from covidxray.outputs import KINDS, LOCK_NOTE, RECORD_NAME, artifact, file_sha256

WRITERS = ("data", "train", "evaluate", "cam", "probe", "predict")
"""The verbs that write an output folder, in pipeline order."""
KIND_OF = {"data": "dataset", "train": "run", "evaluate": "evaluation", "cam": "heatmaps", "probe": "probes",
           "predict": "predictions"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Three loose PNGs for predict."""
    root = tmp_path_factory.mktemp("images")
    for k in range(3):
        write_image(root / f"x{k}.png", seed=70 + k, size=(64, 64))
    return root


def args_for(verb: str, out: Path, presplit: Path, tiny_dataset: Path, tiny_run: Path, images: Path) -> list[str]:
    """The cheapest real invocation of ``verb`` writing into ``out``."""
    if verb == "predict":
        return ["predict", "--model", str(tiny_run), str(images), "--out", str(out), "--quiet"]
    return verb_args(verb, out, presplit, tiny_dataset, tiny_run)


@pytest.fixture(scope="module")
def made(tmp_path_factory, presplit, tiny_dataset, tiny_run, images) -> dict[str, Path]:
    """One real artifact of each kind, each made by its own verb (the run and dataset are copies of the
    session's, records and all)."""
    from covidxray.app.cli import main

    root = tmp_path_factory.mktemp("artifacts")
    out = {"dataset": root / "dataset", "run": root / "run"}
    shutil.copytree(tiny_dataset, out["dataset"], symlinks=True)
    shutil.copytree(tiny_run, out["run"], symlinks=True)
    for verb in ("evaluate", "cam", "probe", "predict"):
        out[KIND_OF[verb]] = root / KIND_OF[verb]
        assert main(args_for(verb, out[KIND_OF[verb]], presplit, out["dataset"], out["run"], images)) == 0
    return out


def test_every_output_records_its_kind_writer_version_and_data(made):
    from covidxray import __version__

    for kind, folder in made.items():
        record = artifact(folder)
        assert record is not None and record["kind"] == kind, folder
        assert record["version"] == __version__ and record["command"], record
        assert record["data"] is not None and record["data"]["synthetic"] is True, (kind, record["data"])


@pytest.mark.parametrize(("verb", "kind"), [(v, k) for v in WRITERS for k in KIND_OF.values() if KIND_OF[v] != k])
def test_a_verb_pointed_at_another_kind_is_refused_before_any_work(verb, kind, made, tmp_path, capsys, presplit,
                                                                   tiny_dataset, tiny_run, images):
    target = tmp_path / kind
    shutil.copytree(made[kind], target, symlinks=True)
    before = snapshot(tmp_path)
    started = time.perf_counter()
    code, err = run_verb(args_for(verb, target, presplit, tiny_dataset, tiny_run, images), capsys)
    CASES.append((f"{verb}: --out {KINDS[kind].article}", snapshot(tmp_path) != before))
    assert code == 1 and err.count("\n") == 1, err
    assert f"is {KINDS[kind].article} (written by `covidxray" in err and "Choose another --out" in err, err
    assert snapshot(tmp_path) == before
    assert time.perf_counter() - started < 5, "the refusal came after work was done"


@pytest.mark.parametrize("verb", ["data", "predict", "evaluate", "probe"])
def test_an_output_nested_in_a_dataset_is_refused(verb, made, tmp_path, capsys, presplit, tiny_dataset, tiny_run,
                                                  images):
    dataset = tmp_path / "ds"
    shutil.copytree(made["dataset"], dataset, symlinks=True)
    before = snapshot(tmp_path)
    code, err = run_verb(args_for(verb, dataset / "preds", presplit, dataset, tiny_run, images), capsys)
    CASES.append((f"{verb}: --out inside a dataset", snapshot(tmp_path) != before))
    assert code == 1 and "lies inside" in err and "a dataset does not hold" in err, err
    assert snapshot(tmp_path) == before


def test_a_runs_own_evaluation_nests_and_survives_the_cards_refresh(made, tmp_path, capsys, tiny_dataset):
    run = tmp_path / "run"
    shutil.copytree(made["run"], run, symlinks=True)
    record_before = (run / RECORD_NAME).read_bytes()
    code, err = run_verb(["evaluate", "--model", str(run), "--data", str(tiny_dataset), "--split", "test",
                          "--n-boot", "20"], capsys)
    assert code == 0, err
    assert artifact(run / "eval-test")["kind"] == "evaluation"
    assert "eval-test" in artifact(run)["children"]
    # the run's writer is still `covidxray train`: evaluate amended the card only
    record = artifact(run)
    assert record["verb"] == "train" and record["command"] == json.loads(record_before)["command"]
    eval_files = snapshot(run / "eval-test")
    card = (run / "model.json").read_bytes()
    capsys.readouterr()
    from covidxray.app.cli import main

    assert main(["evaluate", "--model", str(run), "--data", str(tiny_dataset), "--split", "test",
                 "--n-boot", "20"]) == 0
    said = capsys.readouterr()
    assert "Model card: unchanged" in said.out + said.err, said
    assert (run / "model.json").read_bytes() == card
    assert set(snapshot(run / "eval-test")) == set(eval_files)


def test_evaluating_an_external_csv_changes_only_the_runs_card(made, tmp_path, capsys, tiny_dataset):
    """An evaluation written outside the run adds itself to the run's card (model.json, model_card.md), and
    changes nothing else there: the record keeps its writer."""
    run = tmp_path / "run"
    shutil.copytree(made["run"], run, symlinks=True)
    csv = tmp_path / "external.csv"
    frame = pd.read_csv(tiny_dataset / "manifest.csv").head(6)
    pd.DataFrame({"path": [str(tiny_dataset / p) for p in frame["path"]], "label": frame["label"]}).to_csv(
        csv, index=False)
    before = snapshot(run)
    code, err = run_verb(["evaluate", "--model", str(run), "--data", str(csv), "--out", str(tmp_path / "ext"),
                          "--n-boot", "20"], capsys)
    assert code == 0, err
    after = snapshot(run)
    card = {"model.json", "model_card.md"}
    assert {k: v for k, v in after.items() if k not in card and k != RECORD_NAME} == \
        {k: v for k, v in before.items() if k not in card and k != RECORD_NAME}
    assert artifact(run)["verb"] == "train"
    assert [e["folder"] for e in json.loads((run / "model.json").read_text())["evaluations"]] == ["../ext"]


# ---------------------------------------------------------------------------------------------- tampered records


def _tamper(folder: Path, **changes) -> None:
    record = json.loads((folder / RECORD_NAME).read_text())
    for key, value in changes.items():
        if callable(value):
            value(record)
        else:
            record[key] = value
    (folder / RECORD_NAME).write_text(json.dumps(record))


TAMPERED = {
    "a child '../victim'": {"children": ["../victim"]},
    "an absolute child": {"children": ["/tmp"]},
    "an empty child": {"children": [""]},
    "a child with a separator": {"children": ["train/covid"]},
    "a file '../victim/keep.txt'": {"files": lambda r: r["files"].update({"../victim/keep.txt": "0" * 64})},
    "an absolute file": {"files": lambda r: r["files"].update({"/etc/hostname": "0" * 64})},
    "an unknown format": {"format": 99},
    "an unknown kind": {"kind": "bitcoin wallet"},
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_record_is_refused_in_one_line(case, made, tmp_path, capsys, presplit):
    dataset = tmp_path / "received"
    shutil.copytree(made["dataset"], dataset, symlinks=True)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("the user's")
    _tamper(dataset, **TAMPERED[case])
    before = snapshot(tmp_path)
    code, err = run_verb(["data", "--presplit", str(presplit), "--out", str(dataset), "--quiet"], capsys)
    CASES.append((f"data: a received dataset whose record has {case}", snapshot(tmp_path) != before))
    assert code == 1 and err.count("\n") == 1, err
    assert str(dataset / RECORD_NAME) in err and "damaged or was edited" in err, err
    assert snapshot(tmp_path) == before


def test_a_record_never_widens_what_a_rebuild_deletes(made, tmp_path, capsys, presplit):
    """A record naming a file (with its true hash) that the dataset build never writes: the rebuild keeps it."""
    dataset = tmp_path / "received"
    shutil.copytree(made["dataset"], dataset, symlinks=True)
    (dataset / "notes.txt").write_text("shipped with the folder")
    _tamper(dataset, files=lambda r: r["files"].update({"notes.txt": file_sha256(dataset / "notes.txt")}))
    code, err = run_verb(["data", "--presplit", str(presplit), "--out", str(dataset), "--quiet"], capsys)
    assert code == 0, err
    assert (dataset / "notes.txt").read_text() == "shipped with the folder"
    CASES.append(("data: a record naming a file the build never writes", False))


# ---------------------------------------------------------------------------------------------- one writer at a time

_HOLD = """
import sys, time
from covidxray.outputs import claim_output
with claim_output(sys.argv[1], "data") as out:
    out.write_text("manifest.csv", "path\\n")
    print("held", flush=True)
    time.sleep(120)
"""


def _holder(folder: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_first(tmp_path, capsys, presplit):
    folder = tmp_path / "dataset"
    proc = _holder(folder)
    try:
        before = snapshot(tmp_path)
        started = time.perf_counter()
        code, err = run_verb(["data", "--presplit", str(presplit), "--out", str(folder), "--quiet"], capsys)
        CASES.append(("data: while another process writes the same --out", snapshot(tmp_path) != before))
        assert code == 1 and f"process {proc.pid}" in err and "is writing this folder now" in err, err
        assert time.perf_counter() - started < 5
        assert snapshot(tmp_path) == before
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the holder died without cleaning up: its lock died with it, and the next writer proceeds
    code, err = run_verb(["data", "--presplit", str(presplit), "--out", str(folder), "--quiet"], capsys)
    assert code == 0, err
    assert not (folder / LOCK_NOTE).exists()
    assert (folder / "manifest.csv").read_text().startswith("path,")


@pytest.mark.parametrize("round_", range(4))
def test_two_builds_at_once_leave_one_whole_dataset(tmp_path, presplit, round_):
    """Two builds race for one new folder: one builds it whole, the other is refused (or runs after it), and the
    loser never removes the folder the winner is writing (it did once: both then failed)."""
    from covidxray.outputs import foreign_entries

    folder = tmp_path / "dataset"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "covidxray", "data", "--presplit", str(presplit), "--out", str(folder), "--quiet"]
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0, results
    if codes[1] != 0:
        assert "is writing this folder now" in "".join(err for _, err in results), results
    assert foreign_entries(folder) == [] and artifact(folder)["kind"] == "dataset"
    assert (folder / "manifest.csv").is_file()
    CASES.append((f"data: two builds into one new folder at once ({round_ + 1})", False))


# ---------------------------------------------------------------------------------------------- provenance


def test_synthetic_provenance_is_shown_where_a_reader_looks(made):
    card = (made["run"] / "model_card.md").read_text()
    assert "SYNTHETIC DATA" in card and json.loads((made["run"] / "model.json").read_text())["synthetic"] is True
    assert "SYNTHETIC DATA" in (made["evaluation"] / "results.md").read_text()
    assert "SYNTHETIC DATA" in (made["probes"] / "probes.md").read_text()
    table = pd.read_csv(made["predictions"] / "predictions.csv")
    assert set(table["model_data"]) == {"SYNTHETIC"}
    assert artifact(made["heatmaps"])["data"]["synthetic"] is True
