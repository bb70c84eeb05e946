"""The command line's robustness: help renders, every numeric flag is range-checked before any work (and so is
each config in the library), OS errors and running out of memory end in one line with a fix, and no message
prints a literal ``{name}`` placeholder."""

from __future__ import annotations

import argparse
import ast
import errno
import io
import os
import re
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest
from conftest import REPO, VERBS, run_main, tmpfs, write_image

from covidxray.app.cli import build_parser, failure_line, main, os_error_line
from covidxray.data.build import BuildConfig, build_dataset
from covidxray.errors import DataError, ModelError

# --- help --------------------------------------------------------------------------------------------------------


def test_top_level_help_renders(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: covidxray")
    assert "95 % bootstrap" in out
    assert all(verb in out for verb in VERBS)


@pytest.mark.parametrize("verb", VERBS)
def test_verb_help_shows_the_ranges(verb, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([verb, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: covidxray {verb}")
    if verb in ("data", "train", "evaluate", "probe"):
        assert "[0, 4294967295]" in " ".join(out.split())  # the seed's range, whatever the wrapping


def test_console_script_help():
    script = shutil.which("covidxray", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the covidxray console script is not installed beside this Python")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([script, "--help"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage: covidxray" in out.stdout and "Traceback" not in out.stderr


def test_every_numeric_option_is_range_checked():
    parser = build_parser()
    verbs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    for verb, sub in verbs.items():
        for action in sub._actions:
            assert action.type not in (int, float), f"covidxray {verb} {action.option_strings}: unchecked number"


# --- placeholders ------------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_]\w*)[^{}]*\}(?!\})")


def _plain_parts(segment: str) -> list[str]:
    """The values of the plain (not f-) string literals in a string expression's source, e.g. the second part of
    ``f"{a}" " and {b}"``, which the AST merges into one f-string."""
    tokens = tokenize.generate_tokens(io.StringIO(f"({segment})").readline)
    return [ast.literal_eval(t.string) for t in tokens
            if t.type == tokenize.STRING and "f" not in re.match(r"[A-Za-z]*", t.string).group().lower()]


def _segment(lines: list[bytes], node: ast.expr) -> str:
    """The source text of ``node`` (``ast.get_source_segment`` without re-splitting the file on every call)."""
    first, last = node.lineno - 1, node.end_lineno - 1
    if first == last:
        return lines[first][node.col_offset:node.end_col_offset].decode()
    middle = lines[first + 1:last]
    return b"".join([lines[first][node.col_offset:], *middle, lines[last][:node.end_col_offset]]).decode()


def _missing_f_prefix(path: Path) -> list[str]:
    """Plain string literals inside a function that name one of its local variables as ``{name}`` (so a message
    prints the braces instead of the value); docstrings and ``.format`` templates are fine."""
    source = path.read_text(encoding="utf-8")
    lines = [line.encode() for line in source.splitlines(keepends=True)]
    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for func in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)):
        args = func.args
        local = {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg] if a}
        local |= {n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for node in ast.walk(func):
            is_str = isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant) and isinstance(node.value, str))
            parent = parents.get(node)
            if not is_str or isinstance(parent, ast.Expr | ast.JoinedStr | ast.FormattedValue) or (
                    isinstance(parent, ast.Attribute) and parent.attr in ("format", "format_map")):
                continue  # docstrings, pieces of an f-string (seen whole), templates
            for part in _plain_parts(_segment(lines, node)):
                names = set(_PLACEHOLDER.findall(part)) & local
                if names:
                    found.append(f"{path.name}:{node.lineno}: {sorted(names)} in {part[:60]!r}")
    return found


def test_no_message_lacks_its_f_prefix():
    problems = [p for path in sorted((REPO / "covidxray").rglob("*.py")) for p in _missing_f_prefix(path)]
    assert problems == []


def test_the_placeholder_scan_finds_a_missing_f_prefix(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('def f(path, out):\n'
                   '    """Docstring naming {path}."""\n'
                   '    ok = "{out}".format(out=out) + f"{path}" + "{{path}}" + "{unknown}"\n'
                   '    return f"{path}: no manifest; " "build it: --out {out}" + "--out {out}"\n')
    assert [p.split(": ", 1)[1] for p in _missing_f_prefix(bad)] == ["['out'] in 'build it: --out {out}'",
                                                                     "['out'] in '--out {out}'"]


def test_missing_manifest_message_names_the_folder(tmp_path):
    from covidxray.data.manifest import read_manifest

    with pytest.raises(DataError) as info:
        read_manifest(tmp_path / "ds")
    assert "{" not in str(info.value) and str(info.value).count(str(tmp_path / "ds")) == 3


# --- numeric arguments -------------------------------------------------------------------------------------------

BAD_ARGS = [
    ("data", ["--test-fraction", "-0.1"], "argument --test-fraction", "[0, 1)"),
    ("data", ["--test-fraction", "1.5"], "argument --test-fraction", "[0, 1)"),
    ("data", ["--test-fraction", "nan"], "argument --test-fraction", "[0, 1)"),
    ("data", ["--val-fraction", "1"], "argument --val-fraction", "[0, 1)"),
    ("data", ["--seed", "-1"], "argument --seed", "[0, 4294967295]"),
    ("data", ["--seed", str(2**32)], "argument --seed", "[0, 4294967295]"),
    ("data", ["--seed", "1.5"], "argument --seed", "not an integer"),
    ("data", ["--near-dup-bits", "64"], "argument --near-dup-bits", "[0, 24]"),
    ("data", ["--near-dup-bits", "-1"], "argument --near-dup-bits", "[0, 24]"),
    ("data", ["--nih-min-age", "-1"], "argument --nih-min-age", "[0, 150]"),
    ("data", ["--nih-max-age", "inf"], "argument --nih-max-age", "[0, 150]"),
    ("data", ["--nih-min-age", "40", "--nih-max-age", "30"], "--nih-min-age", "above nih_max_age (--nih-max-age)"),
    ("data", ["--max-pixels", "100"], "argument --max-pixels", "in [1024, 178956970]"),
    ("data", ["--cap", "normal=0"], "argument --cap", "N an integer >= 1"),
    ("data", ["--cap", "covid=x"], "argument --cap", "LABEL=N"),
    ("data", ["--cap", "dogs=3"], "argument --cap", "'dogs=3'"),
    ("data", ["--synthetic", "syn", "--test-fraction", "1.5"], "argument --test-fraction", "[0, 1)"),
    ("data", ["--synthetic", "syn", "--nih-min-age", "40", "--nih-max-age", "30"], "--nih-max-age", "40.0"),
    ("train", ["--epochs", "0"], "argument --epochs", ">= 1"),
    ("train", ["--batch-size", "0"], "argument --batch-size", ">= 1"),
    ("train", ["--image-size", "31"], "argument --image-size", ">= 32"),
    ("train", ["--lr", "0"], "argument --lr", "(0, 1]"),
    ("train", ["--lr=-1e-3"], "argument --lr", "(0, 1]"),
    ("train", ["--seed", "-1"], "argument --seed", "[0, 4294967295]"),
    ("train", ["--patience", "-1"], "argument --patience", ">= 0"),
    ("train", ["--finetune-epochs", "-1"], "argument --finetune-epochs", ">= 0"),
    ("train", ["--feature-views", "0"], "argument --feature-views", ">= 1"),
    ("train", ["--startup-timeout", "0"], "argument --startup-timeout", "(0, 86400]"),
    ("evaluate", ["--model", "run", "--threshold", "1.5"], "argument --threshold", "[0, 1]"),
    ("evaluate", ["--model", "run", "--threshold", "-0.1"], "argument --threshold", "[0, 1]"),
    ("evaluate", ["--model", "run", "--n-boot", "5"], "argument --n-boot", "0 or an integer >= 20"),
    ("evaluate", ["--model", "run", "--n-boot", "-1"], "argument --n-boot", "0 or an integer >= 20"),
    ("evaluate", ["--model", "run", "--seed", "-1"], "argument --seed", "[0, 4294967295]"),
    ("cam", ["--model", "run", "--limit", "0"], "argument --limit", ">= 1"),
    ("probe", ["--image-size", "16"], "argument --image-size", ">= 32"),
    ("probe", ["--epochs", "0"], "argument --epochs", ">= 1"),
    ("probe", ["--seed", "-1"], "argument --seed", "[0, 4294967295]"),
    ("reproduce", ["--epochs", "0"], "argument --epochs", ">= 1"),
    ("reproduce", ["--image-size", "8"], "argument --image-size", ">= 32"),
    ("reproduce", ["--seeds", "0"], "argument --seeds", ">= 1"),
    ("reproduce", ["--n-boot", "1"], "argument --n-boot", "0 or an integer >= 20"),
    ("reproduce", ["--cap", "normal=0"], "argument --cap", "N an integer >= 1"),
    ("reproduce", ["--models", "scratch,foo"], "--models", "unknown model 'foo'"),
    ("reproduce", ["--models", ","], "--models", "is empty"),
    ("demo", ["--epochs", "0"], "argument --epochs", ">= 1"),
    ("demo", ["--image-size", "16"], "argument --image-size", ">= 32"),
]


@pytest.mark.parametrize(("verb", "bad", "flag", "fragment"), BAD_ARGS,
                         ids=[f"{v}{''.join(a)}" for v, a, _, _ in BAD_ARGS])
def test_bad_numbers_exit_2_naming_the_flag_before_any_work(verb, bad, flag, fragment, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.chdir(tmp_path)
    assert run_main([verb, *bad]) == 2
    err = capsys.readouterr().err
    assert flag in err and fragment in err, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_values_on_the_edges_are_accepted():
    parser = build_parser()
    args = parser.parse_args(["data", "--test-fraction", "0", "--val-fraction", "0.999", "--seed", str(2**32 - 1),
                              "--near-dup-bits", "0", "--nih-min-age", "0", "--nih-max-age", "150",
                              "--max-pixels", "1024", "--cap", "normal=1"])
    assert (args.test_fraction, args.seed, args.cap) == (0.0, 2**32 - 1, [("normal", 1)])
    args = parser.parse_args(["evaluate", "--model", "m", "--threshold", "1", "--n-boot", "0"])
    assert (args.threshold, args.n_boot) == (1.0, 0)
    args = parser.parse_args(["train", "--lr", "1", "--image-size", "32", "--patience", "0"])
    assert (args.lr, args.image_size, args.patience) == (1.0, 32, 0)


# --- the library's configs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"test_fraction": 1.5}, "test_fraction (--test-fraction) is 1.5; it must be a number in [0, 1)"),
    ({"val_fraction": -0.1}, "val_fraction (--val-fraction)"),
    ({"seed": -1}, "seed (--seed) is -1"),
    ({"seed": 0.5}, "seed (--seed) is 0.5; it must be an integer"),
    ({"near_duplicate_bits": 64}, "near_duplicate_bits (--near-dup-bits) is 64; it must be an integer in [0, 24]"),
    ({"caps": {"normal": 0}}, "caps['normal'] (--cap) is 0"),
    ({"caps": {"dogs": 3}}, "unknown label 'dogs'"),
    ({"nih_min_age": -5.0}, "nih_min_age (--nih-min-age)"),
    ({"nih_min_age": 50.0, "nih_max_age": 40.0}, "above nih_max_age"),
    ({"max_pixels": 100}, "max_pixels (--max-pixels) 100 is below 32x32"),
])
def test_build_config_validate(changes, fragment, tmp_path):
    config = BuildConfig(**changes)
    with pytest.raises(DataError) as info:
        config.validate()
    assert fragment in str(info.value)
    with pytest.raises(DataError):
        build_dataset(tmp_path / "ds", chest_xray=tmp_path / "none", config=config, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_configs_are_valid():
    from covidxray.runs.train import TrainConfig
    from covidxray.studies.reproduce import ReproduceConfig

    BuildConfig().validate()
    TrainConfig().validate()
    ReproduceConfig().validate()


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"epochs": 0}, "epochs (--epochs) is 0"),
    ({"batch_size": 0}, "batch_size (--batch-size) is 0"),
    ({"image_size": 16}, "image_size (--image-size) is 16; it must be an integer >= 32"),
    ({"lr": 0.0}, "lr (--lr) is 0.0; it must be a number in (0, 1]"),
    ({"seed": 2**32}, "seed (--seed)"),
    ({"patience": -1}, "patience (--patience)"),
    ({"finetune_epochs": -1}, "finetune_epochs (--finetune-epochs)"),
    ({"feature_views": 0}, "feature_views (--feature-views)"),
    ({"dropout": 1.0}, "dropout is 1.0"),
    ({"zoom": -0.1}, "zoom is -0.1"),
])
def test_train_config_validate(changes, fragment, tmp_path):
    from covidxray.runs.train import TrainConfig, train

    config = TrainConfig(model="scratch", **changes)
    with pytest.raises(ModelError) as info:
        config.validate()
    assert fragment in str(info.value)
    with pytest.raises(ModelError):
        train(config, tmp_path / "data", tmp_path / "run", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"epochs": 0}, "epochs (--epochs) is 0"),
    ({"image_size": 8}, "image_size (--image-size) is 8"),
    ({"seeds": 0}, "seeds (--seeds) is 0"),
    ({"n_boot": 5}, "n_boot (--n-boot) is 5; it must be 0 or an integer >= 20"),
    ({"batch_size": 0}, "batch_size is 0"),
    ({"caps": {"covid": 0}}, "caps['covid'] (--cap)"),
    ({"models": ()}, "models (--models) is empty"),
    ({"models": ("resnet",)}, "unknown model 'resnet'"),
])
def test_reproduce_config_validate(changes, fragment, tmp_path):
    from covidxray.studies.reproduce import ReproduceConfig, reproduce, reproduce_designs

    config = ReproduceConfig(**changes)
    with pytest.raises(ModelError) as info:
        config.validate()
    assert fragment in str(info.value)
    with pytest.raises(ModelError):
        reproduce(config, tmp_path / "out", data=tmp_path / "data", progress=False)
    with pytest.raises(ModelError):
        reproduce_designs(config, tmp_path / "both", progress=False)
    assert list(tmp_path.iterdir()) == []


# --- OS errors and memory ----------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line(tmp_path, capsys):
    """A real ENOSPC: the output folder lies on a 256 KiB tmpfs that the build's images overflow."""
    with tmpfs(tmp_path / "small", "256k") as small:
        source = tmp_path / "src"
        for split, n in (("train", 6), ("test", 2)):
            for cls in ("Covid", "Normal"):
                for k in range(n):
                    write_image(source / split / cls / f"{cls}{k}.png", size=(320, 320),
                                seed=100 * k + len(cls) + len(split))
        assert main(["data", "--presplit", str(source), "--out", str(small / "ds"), "--quiet"]) == 1
        err = capsys.readouterr().err
        assert err.startswith("covidxray data: error: ") and err.count("\n") == 1
        assert "(ENOSPC)" in err and "free some space or choose another --out" in err
        assert list(small.iterdir()) == []


def test_a_file_in_place_of_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    assert main(["data", "--synthetic", str(tmp_path / "afile" / "src"), "--out", str(tmp_path / "ds"),
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{tmp_path / 'afile' / 'src'}" in err and "(ENOTDIR)" in err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes through chmod 0o555 folders")
def test_a_read_only_folder_is_one_line(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["data", "--synthetic", str(locked / "src"), "--out", str(tmp_path / "ds"), "--quiet"]) == 1
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "(EACCES)" in err and "choose a writable --out" in err


def test_os_error_lines_name_the_path_the_errno_and_the_fix():
    try:
        os.rmdir("/")
    except OSError as exc:
        busy = exc
    if busy.errno != errno.EBUSY:
        pytest.skip(f"rmdir('/') gave {errno.errorcode.get(busy.errno)} here, not EBUSY")
    assert os_error_line(busy) == (f"/: {os.strerror(errno.EBUSY)} (EBUSY); a mount point or the working directory "
                                   "cannot be replaced: choose a subfolder as --out")
    read_only = OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/dataset")
    assert os_error_line(read_only) == (f"/mnt/ro/dataset: {os.strerror(errno.EROFS)} (EROFS); the file system is "
                                        "read-only: choose a writable --out")
    assert "--covid-xray/--chest-xray" in os_error_line(read_only, "--covid-xray/--chest-xray")


def test_out_of_memory_is_one_line_with_a_hint():
    import numpy as np
    import tensorflow as tf

    try:
        np.empty(2**62, dtype=np.uint8)
    except MemoryError as exc:
        host = exc
    train_args = build_parser().parse_args(["train"])
    line = failure_line(host, train_args)
    assert line is not None and line.startswith("out of memory (") and "--batch-size or --image-size" in line
    gpu = tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[64,512,28,28]")
    assert "smaller --image-size" in failure_line(gpu, build_parser().parse_args(["probe"]))
    assert "free memory" in failure_line(gpu, build_parser().parse_args(["evaluate", "--model", "m"]))
    assert failure_line(ValueError("a bug"), train_args) is None


def test_a_full_disk_under_tensorflow_is_not_called_out_of_memory():
    """TensorFlow reports a real ENOSPC as ResourceExhaustedError, its out-of-memory type."""
    import tensorflow as tf

    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    with pytest.raises(tf.errors.ResourceExhaustedError) as info:
        tf.io.write_file("/dev/full", tf.constant("x" * 100_000))
    line = failure_line(info.value, build_parser().parse_args(["train"]))
    assert line.startswith(f"/dev/full: {os.strerror(errno.ENOSPC)} (ENOSPC); the disk is full"), line
    assert "out of memory" not in line


def test_evaluate_out_of_memory_through_main(tiny_run, tiny_dataset, tmp_path, capsys):
    """A real MemoryError: 10**15 bootstrap resamples cannot be allocated."""
    assert main(["evaluate", "--model", str(tiny_run), "--data", str(tiny_dataset), "--out", str(tmp_path / "ev"),
                 "--n-boot", str(10**15)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("covidxray evaluate: error: out of memory (") and err.count("\n") == 1
    assert not (tmp_path / "ev").exists()


def test_evaluate_without_intervals(tiny_run, tiny_dataset, tmp_path, capsys):
    assert main(["evaluate", "--model", str(tiny_run), "--data", str(tiny_dataset), "--out", str(tmp_path / "ev"),
                 "--n-boot", "0", "--threshold", "1"]) == 0
    assert "| scratch-gap |" in capsys.readouterr().out


def test_ranges_accept_numpy_numbers_and_refuse_the_rest():
    import numpy as np

    from covidxray import limits

    assert np.int64(5) in limits.POSITIVE_INT and np.float32(0.5) in limits.FRACTION
    assert True not in limits.POSITIVE_INT and "5" not in limits.POSITIVE_INT and 2.0 not in limits.POSITIVE_INT
    assert float("inf") not in limits.NON_NEGATIVE_INT and float("nan") not in limits.PROBABILITY
    assert 0 in limits.N_BOOT and 19 not in limits.N_BOOT and 20 in limits.N_BOOT
    assert [str(r) for r in (limits.N_BOOT, limits.FRACTION, limits.LEARNING_RATE, limits.IMAGE_SIZE)] == [
        "0 or an integer >= 20", "a number in [0, 1)", "a number in (0, 1]", "an integer >= 32"]
