"""Compute precision: the choice per machine, bfloat16 training and prediction on a CPU, heatmaps and features."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from covidxray.data.manifest import read_manifest, split_frame
from covidxray.errors import ModelError
from covidxray.explain.maps import heatmaps
from covidxray.runs.load import load_run, predict_dataframe, predict_proba
from covidxray.runs.train import TrainConfig, train
from covidxray.training.compute_dtype import (
    FLOAT32_LAYERS,
    choose_precision,
    cpu_has_bf16,
    cpu_model,
    dtype_policy,
    has_gpu,
    model_policies,
    read_cpuinfo,
    with_precision,
)
from covidxray.training.feature_cache import extract_features, frozen_part
from covidxray.training.models import build_model
from covidxray.training.pipeline import load_images

SIZE = 32
EPYC = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n"
        "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n\n")
SAPPHIRE = "model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: avx512f amx_bf16 amx_tile amx_int8\n"
SKYLAKE = "model name\t: Intel(R) Xeon(R) Gold 6148\nflags\t\t: sse4_2 avx2 avx512f avx512bw avx512_vnni\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes sha2\nCPU implementer\t: 0x41\n"
cpu_only = pytest.mark.skipif(has_gpu(), reason="checks what a CPU-only machine does")


@pytest.mark.parametrize(("cpuinfo", "bf16"), [(EPYC, True), (SAPPHIRE, True), (SKYLAKE, False), (ARM, False),
                                               ("", False)])
def test_the_flag_reader_reads_cpuinfo_text(cpuinfo: str, bf16: bool) -> None:
    assert cpu_has_bf16(cpuinfo) is bf16
    assert "avx512_bf16" not in cpu_model(EPYC) and cpu_model(EPYC) == "AMD EPYC 9R14" and cpu_model(ARM) is None


def test_auto_picks_bfloat16_when_the_flags_say_so_and_float32_otherwise() -> None:
    bf16 = choose_precision("auto", gpu=False, cpuinfo=EPYC)
    assert (bf16.used, bf16.policy) == ("bfloat16", "mixed_bfloat16") and "avx512_bf16" in bf16.reason
    assert choose_precision("auto", gpu=False, cpuinfo=SAPPHIRE).used == "bfloat16"
    plain = choose_precision("auto", gpu=False, cpuinfo=SKYLAKE)
    assert plain.used == "float32" and "none of avx512_bf16/amx_bf16" in plain.reason
    assert choose_precision("auto", gpu=False, cpuinfo=ARM).used == "float32"
    assert choose_precision("auto", gpu=True, cpuinfo=EPYC).used == "float16"
    assert choose_precision("float32", gpu=True, cpuinfo=EPYC).to_dict() == {
        "requested": "float32", "used": "float32", "reason": "as requested"}


def test_float16_on_a_cpu_falls_back_to_float32_and_says_why() -> None:
    choice = choose_precision("float16", gpu=False, cpuinfo=EPYC)
    assert choice.used == "float32" and "needs a GPU" in choice.reason
    assert choose_precision("float16", gpu=True, cpuinfo=SKYLAKE).used == "float16"
    emulated = choose_precision("bfloat16", gpu=False, cpuinfo=SKYLAKE)
    assert emulated.used == "bfloat16" and "emulated" in emulated.reason


def test_this_machine_is_read_from_proc_cpuinfo() -> None:
    text = read_cpuinfo()
    if sys.platform.startswith("linux"):
        assert text is not None
        assert choose_precision("auto").used == ("float16" if has_gpu() else
                                                 "bfloat16" if cpu_has_bf16(text) else "float32")
    else:
        assert text is None and choose_precision("auto", gpu=False).used == "float32"


def test_unknown_precisions_are_refused() -> None:
    with pytest.raises(ModelError, match=r"precision \(--precision\) must be one of"):
        TrainConfig(precision="bf16").validate()
    with pytest.raises(ModelError, match="precision 'half' is unknown"):
        choose_precision("half")
    proc = subprocess.run([sys.executable, "-m", "covidxray", "evaluate", "--model", "x", "--precision", "half"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "invalid choice: 'half'" in proc.stderr


def test_an_older_config_with_mixed_precision_still_reads() -> None:
    old = {k: v for k, v in TrainConfig().to_dict().items() if k != "precision"}
    assert TrainConfig.from_dict({**old, "mixed_precision": True}).precision == "float16"
    assert TrainConfig.from_dict({**old, "mixed_precision": False}).precision == "float32"
    assert TrainConfig.from_dict(TrainConfig(precision="auto").to_dict()).precision == "auto"


def test_under_a_mixed_policy_the_head_and_the_output_stay_float32() -> None:
    for name in ("scratch", "scratch-gap", "vgg16"):
        with dtype_policy("mixed_bfloat16"):
            model = build_model(name, image_size=SIZE, weights="none")
        assert model_policies(model) == {"mixed_bfloat16"}
        assert all(model.get_layer(n).compute_dtype == "float32" for n in FLOAT32_LAYERS)
        assert model.outputs[0].dtype == "float32" and all(w.dtype == "float32" for w in model.weights)
        back = with_precision(model, "float32")
        assert model_policies(back) == {"float32"} and with_precision(back, "float32") is back


@pytest.fixture(scope="module")
def bf16_run(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A scratch CNN trained for 3 epochs at 32 px with precision="bfloat16" (on the CPU here)."""
    out = tmp_path_factory.mktemp("runs") / "bf16"
    cfg = TrainConfig(model="scratch", weights="none", image_size=SIZE, batch_size=16, epochs=3, lr=1e-3,
                      patience=0, precision="bfloat16")
    return out, train(cfg, tiny_dataset, out, progress=False)


def test_a_bfloat16_run_records_its_precision(bf16_run: tuple[Path, dict]) -> None:
    out, summary = bf16_run
    assert summary["precision"]["requested"] == "bfloat16" and summary["precision"]["used"] == "bfloat16"
    assert json.loads((out / "summary.json").read_text())["precision"] == summary["precision"]
    assert json.loads((out / "config.json").read_text())["precision"] == "bfloat16"
    assert json.loads((out / "model.json").read_text())["model"]["precision"]["used"] == "bfloat16"
    assert summary["mixed_precision"] is True


def test_a_bfloat16_model_loads_as_float32_and_predicts_like_bfloat16(bf16_run: tuple[Path, dict],
                                                                       tiny_dataset: Path) -> None:
    out, _ = bf16_run
    saved = keras.models.load_model(out / "model.keras", compile=False)
    assert model_policies(saved) == {"mixed_bfloat16"}, "plain Keras restores the training policy"
    model, meta = load_run(out)
    assert model_policies(model) == {"float32"} and meta["precision"]["used"] == "float32"
    test = split_frame(read_manifest(tiny_dataset), "test")
    p32 = predict_dataframe(model, test, SIZE)
    p16 = predict_dataframe(model, test, SIZE, precision="bfloat16")
    plain = predict_proba(saved, load_images(test["filepath"].tolist(), SIZE))
    assert p32.dtype == p16.dtype == np.float64 and ((p16 >= 0) & (p16 <= 1)).all()
    assert np.std(p32) > 1e-3, "the test needs predictions that vary"
    assert np.corrcoef(p32, p16)[0, 1] > 0.99 and np.abs(p32 - p16).max() < 0.05
    assert np.allclose(plain, p16, atol=1e-6)
    bf16_model, bf16_meta = load_run(out, precision="bfloat16")
    assert model_policies(bf16_model) == {"mixed_bfloat16"} and bf16_meta["precision"]["used"] == "bfloat16"


@cpu_only
def test_float16_training_on_a_cpu_falls_back_and_records_why(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(model="scratch-gap", weights="none", image_size=SIZE, batch_size=16, epochs=1,
                      precision="float16")
    summary = train(cfg, tiny_dataset, tmp_path / "f16", progress=False)
    assert summary["precision"]["used"] == "float32" and "needs a GPU" in summary["precision"]["reason"]
    assert summary["mixed_precision"] is False


@pytest.mark.parametrize("method", ["cam", "gradcam", "gradcam++"])
def test_bfloat16_heatmaps_match_float32_ones(tiny_run: Path, tiny_dataset: Path, method: str) -> None:
    model, _ = load_run(tiny_run)
    test = split_frame(read_manifest(tiny_dataset), "test").iloc[:16]
    images = load_images(test["filepath"].tolist(), int(model.input_shape[1]))
    h32 = heatmaps(model, images, method)
    h16 = heatmaps(model, images, method, precision="bfloat16")
    assert h16.dtype == np.float32 and h16.shape == h32.shape and h32.std() > 0
    assert np.corrcoef(h32.ravel(), h16.ravel())[0, 1] > 0.99


def test_bfloat16_feature_extraction_is_close_to_float32(tmp_path: Path, tiny_dataset: Path) -> None:
    frozen = frozen_part(build_model("vgg16", image_size=SIZE, weights="none"), "block5_conv3")
    df = split_frame(read_manifest(tiny_dataset), "val").iloc[:8]
    stores = [extract_features(frozen, df, image_size=SIZE, dtype=np.float32, precision=p)[0]
              for p in ("float32", "bfloat16")]
    try:
        a, b = (s.read(np.zeros(s.n, np.int64), np.arange(s.n)) for s in stores)
    finally:
        for s in stores:
            s.close()
    assert a.std() > 0 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    assert model_policies(frozen) == {"float32"}, "the given model is left as it was"
