"""The README's results tables are generated from the committed results files, and a test notices when they differ."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

from covidxray.errors import DataError
from covidxray.studies.readme_tables import (
    FILES,
    check_readme,
    load_results,
    main,
    markdown,
    readme_sections,
    sections,
    seed_table,
    speed_table,
    update_text,
)

RESULTS = REPO / "results"


def test_readme_tables_agree_with_the_results_files():
    assert check_readme(REPO / "README.md", RESULTS) == [], (
        "README results sections differ from results/: run `python -m covidxray.studies.readme_tables`")


def test_results_files_hold_five_seeds_per_cnn_and_no_machine_path():
    results = load_results(RESULTS)
    for table in ("table1", "table2", "table3"):
        cnn_rows = [row for row in results[table]["rows"] if "per_seed" in row]
        assert {row["model"] for row in cnn_rows} == {"scratch", "vgg16"}
        assert all(len(row["per_seed"]) >= 5 for row in cnn_rows)
        assert all(row["ci"]["accuracy"] for row in cnn_rows), "seed 0 carries its bootstrap interval"
    for file in FILES.values():
        text = (RESULTS / file).read_text(encoding="utf-8")
        assert "/work/" not in text and "/tmp/" not in text and "/home/" not in text, file


def _copy_results(tmp_path: Path) -> Path:
    """A copy of every file the README's generated sections are made of, laid out as in the repository."""
    out = tmp_path / "results"
    shutil.copytree(RESULTS, out)
    (tmp_path / "bench").mkdir()
    for name in ("results.json", "precision_results.json", "scaling_results.json"):
        if name == "scaling_results.json" and not (REPO / "bench" / name).is_file():
            continue  # not run yet: the scaling section then says what to run
        shutil.copy(REPO / "bench" / name, tmp_path / "bench" / name)
    (tmp_path / "Class_Activation_Images").mkdir()
    for path in (REPO / "Class_Activation_Images").glob("*__checks.json"):
        shutil.copy(path, tmp_path / "Class_Activation_Images" / path.name)
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    return out


def test_a_changed_per_seed_number_makes_the_check_fail(tmp_path):
    results = _copy_results(tmp_path)
    path = results / FILES["table2"]
    data = json.loads(path.read_text(encoding="utf-8"))
    row = next(r for r in data["rows"] if r["model"] == "scratch")
    row["per_seed"][3]["accuracy"] = 0.5
    path.write_text(json.dumps(data), encoding="utf-8")
    readme = tmp_path / "README.md"
    assert set(check_readme(readme, results)) == {"table2", "per-seed"}
    assert main(["--check", "--readme", str(readme), "--results", str(results)]) == 1
    assert main(["--readme", str(readme), "--results", str(results)]) == 0
    assert check_readme(readme, results) == []
    assert main(["--check", "--readme", str(readme), "--results", str(results)]) == 0


def test_mean_and_std_are_those_of_the_per_seed_rows():
    result = copy.deepcopy(load_results(RESULTS)["table1"])
    row = next(r for r in result["rows"] if r["model"] == "vgg16")
    values = [0.9, 0.8, 1.0, 0.85, 0.95]
    for run, value in zip(row["per_seed"], values, strict=True):
        run["accuracy"] = value
    table = seed_table(result)
    line = next(ln for ln in table.splitlines() if ln.startswith("| VGG16"))
    expected = f"{np.mean(values) * 100:.1f} ± {np.std(values, ddof=1) * 100:.1f} %"
    assert line.split(" | ")[3] == expected == "90.0 ± 7.9 %"


def test_a_changed_benchmark_or_heatmap_number_makes_the_check_fail(tmp_path):
    _copy_results(tmp_path)
    readme = tmp_path / "README.md"
    assert check_readme(readme) == []
    bench = tmp_path / "bench" / "results.json"
    data = json.loads(bench.read_text(encoding="utf-8"))
    data["scratch"]["ours"]["epoch_seconds_median"] += 1.0
    bench.write_text(json.dumps(data), encoding="utf-8")
    checks = next((tmp_path / "Class_Activation_Images").glob("*__checks.json"))
    data = json.loads(checks.read_text(encoding="utf-8"))
    data["off_anatomy"]["overall"]["padding"]["mass_share"] = 0.99
    checks.write_text(json.dumps(data), encoding="utf-8")
    assert set(check_readme(readme)) == {"speed", "heatmaps"}


def test_the_deterministic_baseline_says_so_and_has_no_spread():
    line = next(ln for ln in sections(load_results(RESULTS))["table1"].splitlines() if ln.startswith("| baseline"))
    assert "no seed (deterministic)" in line and "±" not in line


def test_update_touches_only_marked_sections_and_names_a_missing_marker():
    text = ("intro 1.0\n<!-- results:a -->\nold\n<!-- /results:a -->\nmiddle\n"
            "<!-- results:b -->\nsame\n<!-- /results:b -->\n")
    new, changed = update_text(text, {"a": "new\n", "b": "same\n"})
    assert changed == ["a"]
    assert new == text.replace("old\n", "new\n")
    with pytest.raises(DataError, match=r"markers missing for \['c'\]"):
        update_text(text, {"c": "x\n"})


def test_missing_results_file_is_named_with_the_fix(tmp_path):
    results = _copy_results(tmp_path)
    (results / FILES["cross"]).unlink()
    with pytest.raises(DataError, match=r"table3-cross-design.json: not found; run `python -m bench.seeds`"):
        load_results(results)
    said = markdown(["table1"], results)
    assert said.startswith("*The results tables cannot be shown:") and "table3-cross-design.json: not found" in said
    with pytest.raises(DataError, match="not found"):
        markdown(["table1"], results, missing="raise")
    with pytest.raises(DataError, match="no results section"):
        markdown(["table9"], RESULTS)


def test_the_speed_section_leaves_the_scaling_curve_to_its_own_section(tmp_path):
    _copy_results(tmp_path)
    bench = json.loads((REPO / "bench" / "results.json").read_text(encoding="utf-8"))
    assert "| share |" not in speed_table(bench) and "Scaling" not in speed_table(bench)
    assert "scaling" in readme_sections(tmp_path) and "scaling" not in sections(load_results(tmp_path / "results"))
    (tmp_path / "bench" / "scaling_results.json").unlink(missing_ok=True)
    assert readme_sections(tmp_path)["scaling"].startswith("*No scaling results yet")


def _damage(path: Path, change) -> None:
    """Apply ``change`` to the JSON object in ``path`` (or write its text when ``change`` is a string)."""
    if isinstance(change, str):
        path.write_text(change, encoding="utf-8")
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def _first_cell(data: dict) -> dict:
    """The first cell (model, trained on, tested on) of a cross-design matrix."""
    by_design = next(iter(data["matrix"].values()))
    return next(iter(next(iter(by_design.values())).values()))


def _drop_config(data: dict) -> None:
    del data["config"]


DAMAGES = {
    "corrupt JSON": ("table1", '{"rows": [', r"table1-2020-split\.json: cannot read the results file \(Expecting"),
    "accuracy 1.5": ("table2", lambda d: d["rows"][0]["metrics"].update(accuracy=1.5),
                     r"table2-patient-split\.json: rows\[0\]\.metrics\.accuracy is 1\.5; it must be a number in "
                     r"\[0, 1\]"),
    "per-seed F1 a string": ("table1", lambda d: next(r for r in d["rows"] if "per_seed" in r)["per_seed"][1]
                             .update(f1="0.9"), r"per_seed\[1\]\.f1 is '0\.9'; it must be a number in \[0, 1\]"),
    "empty rows": ("table3", lambda d: d.update(rows=[]),
                   r"table3-adult-normals\.json: field 'rows' is empty; a results table needs at least one model row"),
    "missing key": ("table1", _drop_config, r"table1-2020-split\.json: field 'config' is missing"),
    "cross-design cell": ("cross", lambda d: _first_cell(d).update(roc_auc=-0.2),
                          r"table3-cross-design\.json: matrix\..*\.roc_auc is -0\.2"),
    "timing key": ("timing", lambda d: d.pop("wall_s"), r"timing\.json: field 'wall_s' is missing"),
}


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_results_file_is_named_with_its_field_and_the_readme_is_left_alone(
        tmp_path: Path, case: str) -> None:
    """Before: a traceback (corrupt JSON, a missing key), or a README showing "150.0 %" or an empty table."""
    name, change, expected = DAMAGES[case]
    results = _copy_results(tmp_path)
    readme = tmp_path / "README.md"
    _damage(results / FILES[name], change)
    before = hashlib.sha256(readme.read_bytes()).hexdigest()
    proc = subprocess.run([sys.executable, "-m", "covidxray.studies.readme_tables", "--readme", str(readme)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(expected, lines[0]), lines[0]
    assert "git checkout -- " in lines[0] and "python -m bench.seeds" in lines[0]
    assert hashlib.sha256(readme.read_bytes()).hexdigest() == before
