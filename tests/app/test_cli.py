"""The command line: every verb answers --help, unbuilt stages say so, user errors are one clear line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO, VERBS, run_main

from covidxray.app.cli import main


def test_every_verb_is_documented():
    """The parser's verbs (the one list) each appear in the README with an example."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert [verb for verb in VERBS if f"covidxray {verb}" not in readme] == []


def test_probe_on_a_missing_dataset_is_one_line(tmp_path, capsys):
    assert main(["probe", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "none" in err and "Traceback" not in err


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "covidxray", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("covidxray ")


def test_data_from_synthetic_sources_is_idempotent(tmp_path, capsys):
    args = ["data", "--synthetic", str(tmp_path / "src"), "--out", str(tmp_path / "ds"), "--quiet"]
    assert main(args) == 0
    first = (tmp_path / "ds" / "manifest.csv").read_bytes()
    assert "leakage: 0 patients" in capsys.readouterr().out
    assert main(args) == 0
    assert (tmp_path / "ds" / "manifest.csv").read_bytes() == first


def test_data_without_sources_explains_the_ways_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["data"]) == 1
    err = capsys.readouterr().err
    assert "covidxray download" in err and "--synthetic" in err
    assert "Traceback" not in err


def test_bad_cap_and_bad_presplit_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "--presplit", str(tmp_path), "--out", str(tmp_path / "o"), "--cap", "dogs=3"])
    assert exit_info.value.code == 2
    assert "argument --cap: 'dogs=3'" in capsys.readouterr().err
    assert main(["data", "--presplit", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "--presplit" in (err := capsys.readouterr().err) and "no such file or folder" in err
    (tmp_path / "a-file").write_text("not a folder")
    assert main(["data", "--presplit", str(tmp_path / "a-file"), "--out", str(tmp_path / "o")]) == 1
    assert "not a folder" in capsys.readouterr().err


def test_train_and_evaluate_commands(tmp_path, tiny_dataset, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", "scratch", "--data", str(tiny_dataset), "--out", str(run), "--epochs", "1",
                 "--image-size", "32", "--batch-size", "16", "--quiet"]) == 0
    assert (run / "model.keras").is_file()
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run), "--data", str(tiny_dataset), "--n-boot", "50"]) == 0
    assert "| scratch |" in capsys.readouterr().out
    assert (run / "eval-test" / "metrics.json").is_file()


def test_evaluate_with_a_missing_model_is_one_line(tmp_path, tiny_dataset, capsys):
    assert main(["evaluate", "--model", str(tmp_path / "nope"), "--data", str(tiny_dataset)]) == 1
    err = capsys.readouterr().err
    assert "nope" in err and "Traceback" not in err


def test_data_with_nih_and_the_adult_normals_design(tmp_path, synthetic_sources, capsys):
    from covidxray.data.manifest import read_manifest
    from covidxray.data.synthetic import make_synthetic_nih

    nih = make_synthetic_nih(tmp_path / "nih", n_patients=30)
    out = tmp_path / "ds"
    assert main(["data", "--chest-xray", str(synthetic_sources.chest_xray), "--covid-xray",
                 str(synthetic_sources.covid_xray), "--nih", str(nih), "--design", "adult-normals",
                 "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "adult-normals" in printed
    df = read_manifest(out)
    assert set(df.loc[df["label"] == "normal", "source"]) == {"nih"}
    assert "kermany" not in set(df["source"])


@pytest.mark.parametrize("argv", [
    ["predict", "--model", "{tmp}/no-run", "{tmp}", "--out", "{tmp}/out"],
    ["predict", "--model", "{run}", "{tmp}/no-scans", "--out", "{tmp}/out"],
    ["evaluate", "--model", "{tmp}/no-run", "--data", "{tmp}"],
    ["cam", "--model", "{run}", "--data", "{tmp}/no-data", "--out", "{tmp}/out"],
    ["data", "--presplit", "{tmp}/no-folder", "--out", "{tmp}/out"],
])
def test_a_missing_input_is_named_before_any_work(argv, tmp_path, tiny_run):
    """Checked before TensorFlow loads (a model load takes seconds): one line naming the flag and the path."""
    argv = [a.format(tmp=tmp_path, run=tiny_run) for a in argv]
    code = ("import sys\nfrom covidxray.app.cli import main\ncode = main(sys.argv[1:])\n"
            "print('tensorflow' in sys.modules, file=sys.stderr)\nsys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines[-1] == "False", proc.stderr
    assert "no such file or folder; nothing was done" in lines[-2] and "no-" in lines[-2], lines
    assert not (tmp_path / "out").exists()


# --- exit statuses: 2 the command line is wrong, 1 the work failed ---------------------------------------------------


@pytest.mark.parametrize(("kind", "argv"), [
    ("argparse: an unknown flag", ["data", "--no-such-flag"]),
    ("argparse: a bad value", ["data", "--seed", "-1"]),
    ("argparse: flags that exclude each other", ["data", "--quiet", "--verbose"]),
    ("settings in conflict", ["data", "--synthetic", "{tmp}/src", "--nih-min-age", "40", "--nih-max-age", "30",
                              "--out", "{tmp}/ds"]),
    ("sources in conflict", ["data", "--presplit", "{tmp}/given", "--chest-xray", "{tmp}/given", "--out",
                             "{tmp}/ds"]),
    ("a missing companion flag", ["data", "--chest-xray", "{tmp}/given", "--out", "{tmp}/ds"]),
    ("a training setting for another model", ["train", "--model", "scratch", "--finetune-epochs", "1",
                                              "--data", "{tmp}/given", "--out", "{tmp}/run"]),
])
def test_a_usage_error_exits_2(kind, argv, tmp_path, capsys):
    (tmp_path / "given").mkdir()
    assert run_main([a.format(tmp=tmp_path) for a in argv]) == 2, kind
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert not (tmp_path / "ds").exists() and not (tmp_path / "run").exists()


def test_a_failure_of_the_work_exits_1(tmp_path, capsys):
    """A missing file, an empty folder and a refused --out: the command line was right, the work failed."""
    assert run_main(["evaluate", "--model", str(tmp_path / "missing.keras"), "--data", str(tmp_path)]) == 1
    assert "missing.keras: no such file or folder" in capsys.readouterr().err
    for split in ("train", "test"):
        for cls in ("Covid", "Normal"):
            (tmp_path / "empty" / split / cls).mkdir(parents=True)
    assert run_main(["data", "--presplit", str(tmp_path / "empty"), "--out", str(tmp_path / "ds"), "--quiet"]) == 1
    assert "no images found" in capsys.readouterr().err
    refused = tmp_path / "mine"
    refused.mkdir()
    (refused / "notes.txt").write_text("the user's")
    assert run_main(["data", "--synthetic", str(tmp_path / "src"), "--out", str(refused), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "notes.txt" in err and "Traceback" not in err
    assert sorted(p.name for p in refused.iterdir()) == ["notes.txt"]


def test_the_exit_statuses_and_jsonl_are_documented(capsys):
    assert run_main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 success; 1 the work failed" in out and "2 a usage error" in out
    assert "--format jsonl" in out
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "**Exit status:**" in readme and "`--format jsonl`" in readme
