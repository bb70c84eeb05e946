"""Loading models: safe-mode refusals, corrupt files and the input/output contract, on real saved .keras files."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import write_image

from covidxray.app.cli import main
from covidxray.errors import ModelError
from covidxray.outputs import file_sha256
from covidxray.runs.load import check_model_contract, load_run, predict_proba
from covidxray.training.models import MODEL_NAMES, build_model

SIZE = 32


def _save(model: keras.Model, folder: Path) -> Path:
    """``folder/model.keras``, as a run folder holds it."""
    folder.mkdir(parents=True)
    model.save(folder / "model.keras")
    return folder


def _pooled(shape: tuple) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    inputs = keras.Input(shape)
    return inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(2, 3)(inputs))


def _with_head(head: Callable[[keras.KerasTensor], keras.KerasTensor]) -> keras.Model:
    inputs, x = _pooled((SIZE, SIZE, 3))
    return keras.Model(inputs, head(x))


def test_a_lambda_layer_is_refused_as_code_not_as_corruption(tmp_path: Path) -> None:
    inputs, x = _pooled((SIZE, SIZE, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0)(x)
    run = _save(keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x)), tmp_path / "lambda run")
    with pytest.raises(ModelError) as info:
        load_run(run)
    message = str(info.value)
    assert re.search(r"lambda run.model\.keras: the model holds Python code \(a Lambda layer\)", message)
    assert "safe mode" in message and "does not run code" in message and "without Lambda layers" in message
    assert "corrupt" not in message


def _double(t: keras.KerasTensor) -> keras.KerasTensor:
    return t * 2.0


def test_a_lambda_layer_naming_a_function_is_refused_as_code_in_one_line(tmp_path: Path) -> None:
    """A Lambda over a named function stores the function's name, not bytecode: Keras fails with a multi-line
    "could not be deserialized" dump, which used to be reported as a truncated or corrupt file."""
    inputs, x = _pooled((SIZE, SIZE, 3))
    x = keras.layers.Lambda(_double, name="doubler")(x)
    run = _save(keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x)), tmp_path / "named")
    with pytest.raises(ModelError) as info:
        load_run(run)
    message = str(info.value)
    assert re.search(r"named.model\.keras: the model holds Python code \(a Lambda layer\) in layer 'doubler'; "
                     r"covidxray loads models in Keras safe mode and does not run code from model files", message)
    assert "corrupt" not in message and "\n" not in message


@pytest.mark.parametrize("damage", ["truncated", "random bytes"])
def test_a_damaged_file_is_called_corrupt(tmp_path: Path, damage: str) -> None:
    good = _save(_with_head(lambda x: keras.layers.Dense(1, activation="sigmoid")(x)), tmp_path / "good")
    data = (good / "model.keras").read_bytes()
    bad = tmp_path / "bad"
    bad.mkdir()
    blob = data[: len(data) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(len(data))
    (bad / "model.keras").write_bytes(blob)
    with pytest.raises(ModelError, match=r"bad.model\.keras: cannot load the model .*truncated or corrupt: retrain"):
        load_run(bad)


WRONG_OUTPUTS: dict[str, Callable[[keras.KerasTensor], keras.KerasTensor]] = {
    "softmax-10": lambda x: keras.layers.Dense(10, activation="softmax")(x),
    "sigmoid-2": lambda x: keras.layers.Dense(2, activation="sigmoid")(x),
    "linear-1": lambda x: keras.layers.Dense(1)(x),
}


@pytest.mark.parametrize("kind", list(WRONG_OUTPUTS))
def test_an_output_other_than_one_sigmoid_unit_is_refused(tmp_path: Path, kind: str) -> None:
    run = _save(_with_head(WRONG_OUTPUTS[kind]), tmp_path / kind)
    found = {"softmax-10": r"\(None, 10\) from a softmax", "sigmoid-2": r"\(None, 2\) from a sigmoid",
             "linear-1": r"\(None, 1\) from a linear"}[kind]
    with pytest.raises(ModelError, match=rf"{kind}.model\.keras: the model outputs shape {found} .*not one sigmoid "
                                         r"unit of shape \(None, 1\).*covidxray train"):
        load_run(run)


@pytest.mark.parametrize(("kind", "shape", "why"), [
    ("variable size", (None, None, 3), "fixed numbers"),
    ("grayscale", (SIZE, SIZE, 1), r"1 channel\(s\) where 3 \(RGB\)"),
    ("not square", (SIZE, 2 * SIZE, 3), "must be equal"),
])
def test_an_input_other_than_fixed_square_rgb_is_refused(tmp_path: Path, kind: str, shape: tuple, why: str) -> None:
    inputs, x = _pooled(shape)
    run = _save(keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x)), tmp_path / kind)
    with pytest.raises(ModelError, match=rf"{kind}.model\.keras: the model takes inputs of shape .* not square RGB "
                                         rf"images .*{why}.*covidxray train"):
        load_run(run)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_the_package_models_fit_the_contract(tmp_path: Path, name: str) -> None:
    model = build_model(name, image_size=SIZE, weights="none")
    loaded, meta = load_run(_save(model, tmp_path / name))
    assert meta["image_size"] == SIZE and meta["threshold"] == 0.5 and meta["config"] == {}
    x = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    assert np.allclose(predict_proba(loaded, x), predict_proba(model, x), atol=1e-6)


def test_a_mixed_precision_model_fits_the_contract(tmp_path: Path) -> None:
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = build_model("scratch-gap", image_size=SIZE, weights="none")
    finally:
        keras.config.set_dtype_policy(before)
    assert model.layers[-1].dtype_policy.name == "float32" and model.get_layer("last_conv").compute_dtype == "float16"
    _, meta = load_run(_save(model, tmp_path / "mixed"))
    assert meta["image_size"] == SIZE


FITTING: dict[str, Callable[[], keras.Model]] = {
    "Dense(1, sigmoid)": lambda: _with_head(lambda x: keras.layers.Dense(1, activation="sigmoid")(x)),
    "keras.ops.sigmoid": lambda: _with_head(lambda x: keras.ops.sigmoid(keras.layers.Dense(1)(x))),
    "Sequential": lambda: keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Flatten(),
                                            keras.layers.Dense(1, activation="sigmoid")]),
    "nested": lambda: _nested(),
}


def _nested() -> keras.Model:
    inner = _with_head(lambda x: keras.layers.Dense(1, activation="sigmoid")(x))
    inputs = keras.Input((SIZE, SIZE, 3))
    return keras.Model(inputs, inner(inputs))


@pytest.mark.parametrize("kind", list(FITTING))
def test_other_models_that_fit_the_contract_are_accepted(kind: str) -> None:
    assert check_model_contract(FITTING[kind](), kind) == SIZE


# ---------------------------------------------------------------------------------------------- run files


def _run_folder(folder: Path, *, card: dict | None = None, threshold: object = None,
                config: dict | None = None) -> Path:
    """A run folder with a real tiny model, and a model.json (``card`` merged into a valid card), threshold.json
    and config.json when given."""
    run = _save(_with_head(lambda x: keras.layers.Dense(1, activation="sigmoid")(x)), folder)
    if card is not None:
        full = {"format": 1, "model": {"sha256": file_sha256(run / "model.keras")}, "intended_use": "tests",
                "input": {"image_size": SIZE}, "output": {"activation": "sigmoid"}, "decision": {"threshold": 0.4}}
        for key, value in card.items():
            full[key] = {**full.get(key, {}), **value}
        (run / "model.json").write_text(json.dumps(full), encoding="utf-8")
    if threshold is not None:
        (run / "threshold.json").write_text(json.dumps({"threshold": threshold}), encoding="utf-8")
    if config is not None:
        (run / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return run


BAD_THRESHOLDS = {"1.5": (1.5, "1.5"), "-0.1": (-0.1, "-0.1"), "NaN": (float("nan"), "nan"),
                  "a string": ("0.3", "'0.3'"), "null": (None, "None"), "true": (True, "True")}


@pytest.mark.parametrize("case", list(BAD_THRESHOLDS))
def test_a_card_threshold_outside_0_1_is_refused(tmp_path: Path, case: str) -> None:
    value, shown = BAD_THRESHOLDS[case]
    run = _run_folder(tmp_path / "run", card={"decision": {"threshold": value}})
    with pytest.raises(ModelError, match=rf"run.model\.json: decision\.threshold is {re.escape(shown)}; it must be "
                                         r"a number in \[0, 1\]; .*delete model\.json"):
        load_run(run)


@pytest.mark.parametrize("case", ["1.5", "NaN", "a string"])
def test_a_threshold_json_threshold_outside_0_1_is_refused(tmp_path: Path, case: str) -> None:
    value, shown = BAD_THRESHOLDS[case]
    run = _run_folder(tmp_path / "run", threshold=value)
    with pytest.raises(ModelError, match=rf"run.threshold\.json: threshold is {re.escape(shown)}; it must be a "
                                         r"number in \[0, 1\]; .*retrain the run"):
        load_run(run)


def test_valid_run_files_are_read(tmp_path: Path) -> None:
    run = _run_folder(tmp_path / "run", card={}, threshold=0.7, config={"image_size": SIZE})
    _, meta = load_run(run)
    assert meta["threshold"] == 0.4 and meta["threshold_source"] == "model.json" and meta["image_size"] == SIZE
    (run / "model.json").unlink()
    _, meta = load_run(run)
    assert meta["threshold"] == 0.7 and meta["threshold_source"] == "threshold.json"


def test_run_files_disagreeing_with_the_model_file_are_refused(tmp_path: Path) -> None:
    run = _run_folder(tmp_path / "size", card={"input": {"image_size": 64}})
    with pytest.raises(ModelError, match=r"size.model\.json: input\.image_size is 64 px, but .*model\.keras takes "
                                         rf"{SIZE} px"):
        load_run(run)
    run = _run_folder(tmp_path / "config", config={"image_size": 224})
    with pytest.raises(ModelError, match=r"config.config\.json: image_size is 224 px, but .*model\.keras takes "
                                         rf"{SIZE} px"):
        load_run(run)
    run = _run_folder(tmp_path / "hash", card={"model": {"sha256": "0" * 64}})
    with pytest.raises(ModelError, match=r"hash.model\.json: describes another model file \(model\.sha256 is "
                                         r"000000000000\.\.\., model\.keras has"):
        load_run(run)
    run = _run_folder(tmp_path / "nohash", card={"model": {"sha256": 5}})
    with pytest.raises(ModelError, match=r"nohash.model\.json: no field 'model\.sha256'"):
        load_run(run)


def test_predict_refuses_a_card_threshold_of_1_5_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Before: a threshold of 1.5 silently called every image normal."""
    run = _run_folder(tmp_path / "run", card={"decision": {"threshold": 1.5}})
    image = write_image(tmp_path / "x.png", size=(64, 64))
    assert main(["predict", "--quiet", "--model", str(run), str(image), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.json: decision.threshold is 1.5; it must be a number in [0, 1]" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- Keras versions


def _unknown_keyword(model_path: Path) -> None:
    """Rewrite a saved .keras file as a newer Keras would: every initializer's config gains a keyword this Keras
    does not know (as Keras 3.15 added ``input_axes``, which 3.12 refuses)."""
    import zipfile

    with zipfile.ZipFile(model_path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(entries["config.json"])
    stack: list[object] = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class_name") in ("HeNormal", "GlorotUniform", "VarianceScaling"):
                node.setdefault("config", {})["future_axes"] = None
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    entries["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(model_path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def test_a_model_saved_by_a_newer_keras_names_the_version_needed(tmp_path: Path) -> None:
    """Before: "the file is truncated or corrupt" for a model this Keras is too old to read."""
    run = _run_folder(tmp_path / "run", card={"model": {"keras": "9.1.0"}})
    _unknown_keyword(run / "model.keras")
    (run / "model.json").write_text(json.dumps({**json.loads((run / "model.json").read_text()),
                                                "model": {"sha256": file_sha256(run / "model.keras"),
                                                          "keras": "9.1.0"}}), encoding="utf-8")
    with pytest.raises(ModelError, match=rf"run.model\.keras: saved with Keras 9\.1\.0; this install has Keras "
                                         rf"{re.escape(keras.__version__)}, .*future_axes.*: pip install "
                                         r"'keras>=9\.1\.0'$") as info:
        load_run(run)
    assert "\n" not in str(info.value) and "corrupt" not in str(info.value)
    # the same file claiming this Keras (or an older one) is damaged, not too new
    card = json.loads((run / "model.json").read_text())
    card["model"]["keras"] = keras.__version__
    (run / "model.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelError, match=r"truncated or corrupt"):
        load_run(run)


def _keras_floor() -> tuple[int, ...]:
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())["project"]
    [spec] = [r for r in project["dependencies"] if re.match(r"keras\b", r)]
    return tuple(int(p) for p in re.search(r">=\s*([\d.]+)", spec).group(1).split("."))


def _minor(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.match(r"\d+\.\d+", version).group(0).split("."))


def test_the_keras_floor_loads_what_this_install_and_every_committed_card_saved() -> None:
    """Keras reads models saved by its own minor version and older ones, not newer (3.12 cannot read 3.15's
    ``input_axes``): the floor must be at least the minor of every Keras that saved a committed model card, and of
    the Keras installed here (what the default install saves with)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    floor = _keras_floor()
    assert floor <= _minor(keras.__version__), "this install does not satisfy pyproject's keras range"
    assert floor >= _minor(keras.__version__), (f"keras>={'.'.join(map(str, floor))} lets an install resolve a "
                                                f"Keras older than {keras.__version__}, which saved this install's "
                                                "models")
    listed = subprocess.run(["git", "ls-files", "*model.json", "*versions.json"], cwd=root, capture_output=True,
                            text=True, check=False)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    for name in listed.stdout.split():
        data = json.loads((root / name).read_text(encoding="utf-8"))
        version = (data.get("model") or {}).get("keras") if name.endswith("model.json") else data.get("keras")
        if isinstance(version, str):
            assert floor >= _minor(version), f"{name}: saved with Keras {version}, above the pyproject floor"
