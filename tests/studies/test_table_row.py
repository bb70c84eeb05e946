"""One row of README table 2 from the 2020 folder: ``covidxray reproduce --seed-dataset DIR --metadata CSV``."""

from __future__ import annotations

import copy
from pathlib import Path

import pandas as pd
import pytest

from covidxray.errors import DataError
from covidxray.studies.readme_tables import FILES, RESULTS_DIR, read_results_file
from covidxray.studies.table_row import AGREEMENT_RULE, agreement, agreement_text, spread
from tests.conftest import REPO, run_main


@pytest.fixture()
def table2() -> dict:
    return read_results_file(REPO / RESULTS_DIR / FILES["table2"])


def test_table2s_own_seed_0_row_agrees_and_a_moved_metric_does_not(table2: dict) -> None:
    """The committed seed-0 row lies inside the committed spread; moving one metric past it is caught."""
    records = agreement(table2, table2)
    assert len(records) == 3 * 6 and all(r["agrees"] for r in records)
    scratch = next(r for r in table2["rows"] if r["model"] == "scratch")
    low, high = spread(scratch, "accuracy")
    accuracies = [s["accuracy"] for s in scratch["per_seed"]]
    assert low <= min(accuracies) and high >= max(accuracies) and high - low > 0
    moved = copy.deepcopy(table2)
    next(r for r in moved["rows"] if r["model"] == "scratch")["metrics"]["accuracy"] = high + 0.01
    base = next(r for r in moved["rows"] if r["model"].startswith("baseline"))
    base["metrics"]["recall"] += 0.002  # the baseline has no seed: 0.2 % off is off
    text, agreed = agreement_text(moved, table2, "results/table2-patient-split.json")
    assert not agreed
    assert "DIFFERS from table 2: 2 of 18 metrics outside its spread (baseline: logistic regression recall, " \
           "scratch CNN accuracy)" in text
    text, agreed = agreement_text(table2, table2, "x")
    assert agreed and "AGREES" in text and "Settings differ" not in text


@pytest.mark.slow  # full suite only: keeps the quick gate under 3 minutes
def test_one_command_reproduces_one_row_of_table_2(presplit: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    """The documented command, on the small pre-split fixture with tiny settings: it lays the folder out as the two
    sources, trains both CNNs and the baseline, prints the row, the agreement rule and a verdict."""
    monkeypatch.chdir(REPO)  # the committed results/ are read from the repository root, as the README says
    covid = sorted(p.name for p in presplit.glob("*/Covid/*"))
    meta = tmp_path / "metadata.csv"
    pd.DataFrame({"patientid": range(len(covid)), "finding": "COVID-19", "view": "PA", "modality": "X-ray",
                  "filename": covid, "license": ""}).to_csv(meta, index=False)
    out = tmp_path / "row"
    code = run_main(["reproduce", "--seed-dataset", str(presplit), "--metadata", str(meta), "--out", str(out),
                     "--weights", "none", "--epochs", "1", "--image-size", "32", "--n-boot", "0", "--quiet"])
    printed = capsys.readouterr().out
    agreed = "Verdict: the row AGREES" in printed
    assert code == (0 if agreed else 1), "the exit status follows the verdict"
    for model in ("baseline: logistic regression", "scratch", "vgg16"):
        assert f"| {model} |" in printed
    assert f"Agreement with README table 2 (results/table2-patient-split.json): {AGREEMENT_RULE}" in printed
    assert "Verdict: the row " in printed and "Settings differ from table 2's run" in printed
    assert "image_size: 32 here, 224 in table 2" in printed
    assert (tmp_path / "row-sources" / "Covid_XRAY" / "metadata.csv").is_file()
    summary = pd.read_csv(out / "dataset" / "manifest.csv")
    assert set(summary["source"]) == {"kermany", "ieee8023"} and len(summary) == 22  # every image, split anew
    with pytest.raises(DataError, match="--seed-dataset needs --metadata"):
        from covidxray.studies.reproduce import ReproduceConfig
        from covidxray.studies.table_row import table2_row

        table2_row(ReproduceConfig(), tmp_path / "x", presplit, None)


def test_seed_dataset_with_another_source_flag_is_a_usage_error(presplit: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "m.csv").write_text("patientid,finding,view,modality,filename\n")
    code = run_main(["reproduce", "--seed-dataset", str(presplit), "--metadata", str(tmp_path / "m.csv"),
                     "--presplit", str(presplit), "--out", str(tmp_path / "row")])
    assert code == 2 and "drop --presplit" in capsys.readouterr().err
    assert not (tmp_path / "row").exists()
