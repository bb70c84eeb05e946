"""Class activation heatmaps: where in the X-ray the model finds evidence for covid, and overlays to look at.

Three methods, all for the covid class (positive = evidence for covid) and all returned as (B, H, W) maps
at the input resolution, normalised to [0, 1] per image (an all-zero map stays zero), or with
``normalise=False`` on their raw scale (ReLU only):

* CAM (Zhou et al. 2016): exact for models whose head is features -> GlobalAveragePooling2D -> Dense "logit";
  the map is sum_k w_k A_k + b, whose spatial mean is the logit itself.
* Grad-CAM (Selvaraju et al. 2017): any model; channel weights are the spatially averaged logit gradients.
* Grad-CAM++ (Chattopadhay et al. 2018): Grad-CAM with pixel-wise weights of the positive gradients.

Scale of the figures: a per-image maximum paints a full-red blob on an image the model calls normal with
p(covid) = 0.00, so :func:`render_cams` draws maps on one scale per model and image set instead: the raw maps
divided by :func:`model_scale` (the 99th percentile of all raw map values of the set), clipped to [0, 1]
(:func:`scale_maps`); the colour bar label (:func:`scale_label`) names the scale and its value. A colour on one
overlay therefore means the same evidence as on another overlay of the same model and set.

Sanity checks of the maps (randomisation test, border attention, off-anatomy mass) live in
:mod:`covidxray.explain.checks`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from covidxray import LABELS
from covidxray.data.images import IMAGE_EXTENSIONS
from covidxray.data.manifest import check_frame
from covidxray.errors import ModelError
from covidxray.evaluation.figures import save_figure
from covidxray.outputs import SYNTHETIC
from covidxray.progress import progress_bar

METHODS: tuple[str, ...] = ("auto", "cam", "gradcam", "gradcam++")
"""Heatmap methods accepted by :func:`heatmaps`; "auto" = CAM when the model allows it, else Grad-CAM."""
LOGIT_LAYER = "logit"
OUTCOMES: tuple[str, str, str, str] = ("TP", "TN", "FP", "FN")
"""Rows of the summary grid: covid found, normal found, normal called covid, covid missed."""
OUTCOME_TITLES: dict[str, str] = {
    "TP": "TP: covid, predicted covid",
    "TN": "TN: normal, predicted normal",
    "FP": "FP: normal, predicted covid",
    "FN": "FN: covid, predicted normal",
}
_CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
_INFERENCE_IDENTITY = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.GaussianDropout,
    keras.layers.GaussianNoise,
    keras.layers.AlphaDropout,
)
_CMAP = "jet"


# ------------------------------------------------------------ model graph


def _output_of(layer: keras.layers.Layer) -> object | None:
    """The layer's single symbolic output, or None (shared layers and input-less layers have none)."""
    try:
        return layer.output
    except (AttributeError, ValueError, RuntimeError):
        return None


def _input_of(layer: keras.layers.Layer) -> object | None:
    """The layer's single symbolic input, or None."""
    try:
        inp = layer.input
    except (AttributeError, ValueError, RuntimeError):
        return None
    return inp if not isinstance(inp, (list, tuple, dict)) else None


def _producer(model: keras.Model, tensor: object) -> keras.layers.Layer | None:
    """The layer of ``model`` whose output is ``tensor``."""
    for layer in model.layers:
        if _output_of(layer) is tensor:
            return layer
    return None


def _is_4d(layer: keras.layers.Layer) -> bool:
    out = _output_of(layer)
    return out is not None and len(out.shape) == 4


LAYER_FIX = "name a layer with a 4-D output as layer=NAME (`covidxray cam --layer NAME`)"
"""How a caller that can choose the target layer fixes a model without one it finds itself."""


def find_target_layer(model: keras.Model, name: str | None = None, *, fix: str = LAYER_FIX) -> str:
    """Name of the layer to explain: ``name`` if given (checked), else the last 2-D conv with a 4-D output.

    Without one (no Conv2D at the top level of the model: none at all, or only inside a nested Sequential or
    sub-model) a ModelError says so, lists the top-level layers with a 4-D output and ends with ``fix``, the
    caller's way out (see :data:`LAYER_FIX`).
    """
    if name is not None:
        try:
            layer = model.get_layer(name)
        except ValueError as exc:
            candidates = [lay.name for lay in model.layers if _is_4d(lay)]
            raise ModelError(
                f"model {model.name!r} has no layer {name!r}; its 4-D layers are {candidates}."
            ) from exc
        if not _is_4d(layer):
            raise ModelError(
                f"layer {name!r} of model {model.name!r} has no 4-D (B, H, W, C) output to explain."
            )
        return name
    for layer in reversed(model.layers):
        if isinstance(layer, _CONV_TYPES) and _is_4d(layer):
            return layer.name
    nested = [lay.name for lay in model.layers if isinstance(lay, keras.Model)]
    where = (f"its conv layers, if any, are inside the nested model(s) {nested}, which are not searched"
             if nested else "it has no conv layer to explain")
    candidates = [lay.name for lay in model.layers if _is_4d(lay) and not isinstance(lay, keras.layers.InputLayer)]
    shown = f"its top-level layers with a 4-D output are {candidates}" if candidates else \
        "no top-level layer has a 4-D output"
    raise ModelError(f"model {model.name!r} has no top-level Conv2D layer with a 4-D output ({where}; {shown}); "
                     f"{fix}.")


def _logit_layer(model: keras.Model) -> keras.layers.Layer | None:
    try:
        return model.get_layer(LOGIT_LAYER)
    except ValueError:
        return None


def gap_feature_layer(model: keras.Model) -> str | None:
    """Name of the layer feeding a features -> GAP -> (Dropout) -> Dense "logit" head; None: CAM not exact."""
    logit = _logit_layer(model)
    if not isinstance(logit, keras.layers.Dense) or logit.units != 1:
        return None
    if keras.activations.serialize(logit.activation) not in ("linear", None):
        return None
    layer = _producer(model, _input_of(logit))
    while isinstance(layer, _INFERENCE_IDENTITY):
        layer = _producer(model, _input_of(layer))
    if not isinstance(layer, keras.layers.GlobalAveragePooling2D) or getattr(layer, "keepdims", False):
        return None
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return None
    feature = _producer(model, _input_of(layer))
    return feature.name if feature is not None and _is_4d(feature) else None


def resolve_method(model: keras.Model, method: str = "auto", layer: str | None = None, *,
                   fix: str = LAYER_FIX) -> tuple[str, str]:
    """The concrete (method, layer) that :func:`heatmaps` uses: "auto" picks CAM for a GAP->logit head.
    ``fix`` ends the error for a model without a layer to explain (see :func:`find_target_layer`)."""
    if method not in METHODS:
        raise ValueError(f"unknown heatmap method {method!r}; use one of {list(METHODS)}.")
    feature = gap_feature_layer(model)
    if method == "auto":
        if feature is not None and layer in (None, feature):
            return "cam", feature
        return "gradcam", find_target_layer(model, layer, fix=fix)
    if method == "cam":
        _check_cam(model, feature, layer)
        return "cam", feature
    return method, find_target_layer(model, layer, fix=fix)


METHOD_NAMES: dict[str, str] = {"cam": "CAM", "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}
"""How the reports name each concrete method of :func:`resolve_method`."""


def method_reason(model: keras.Model, method: str, layer: str) -> str:
    """Why the concrete ``method`` (from :func:`resolve_method`) explains ``model`` at ``layer``, in one sentence."""
    gap = gap_feature_layer(model) is not None
    if method == "cam":
        return (f"CAM is exact for this model: its head is global average pooling of {layer!r} into the classifier, "
                "so the map's mean is the covid logit itself")
    head = ("asked for, although the model's global-average-pooling head would allow exact CAM" if gap else
            "because the model's head is not global average pooling straight into the classifier, so CAM would "
            "not be exact")
    plus = ", with pixel-wise weights (Grad-CAM++)" if method == "gradcam++" else ""
    return (f"{METHOD_NAMES.get(method, method)}, {head}; Grad-CAM works for any conv model, weighting the "
            f"feature maps of {layer!r} by the covid logit's averaged gradients{plus}")


def _check_cam(model: keras.Model, feature: str | None, layer: str | None) -> None:
    if feature is None:
        raise ModelError(
            "CAM needs a head features -> GlobalAveragePooling2D -> (Dropout) -> Dense "
            f"{LOGIT_LAYER!r} (1 unit, linear); model {model.name!r} has none. Use method='gradcam'."
        )
    if layer is not None and layer != feature:
        raise ModelError(
            f"CAM is exact only for the layer feeding the global average pooling ({feature!r}), "
            f"not {layer!r}; pass layer={feature!r} or layer=None, or use method='gradcam'."
        )


# ------------------------------------------------------------ maps


def as_image_batch(images: object) -> np.ndarray:
    """``images`` as a float32 (B, H, W, C) array of raw pixels."""
    x = np.asarray(images, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be a (B, H, W, C) batch, got shape {x.shape}.")
    return x


def _upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of (B, h, w) maps to (B, H, W)."""
    if maps.shape[1:] == tuple(size):
        return maps.astype(np.float32)
    out = tf.image.resize(maps[..., None].astype(np.float32), size, method="bilinear")
    return out.numpy()[..., 0]


def _finish_maps(maps: np.ndarray, normalise: bool) -> np.ndarray:
    """Per-image normalisation, or only the ReLU (non-finite values to 0)."""
    if normalise:
        return normalise_maps(maps)
    return np.nan_to_num(np.maximum(np.asarray(maps, dtype=np.float32), 0.0), nan=0.0, posinf=0.0)


def model_scale(raw_maps: object, percentile: float = 99.0) -> float:
    """One scale for a model's maps of an image set: the ``percentile`` of all their positive-part values
    (their maximum when that is 0; 1.0 for all-zero maps), so overlays of the set share one colour scale."""
    values = np.maximum(np.nan_to_num(np.asarray(raw_maps, dtype=np.float64), nan=0.0, posinf=0.0), 0.0)
    if values.size == 0 or values.max() <= 0.0:
        return 1.0
    scale = float(np.percentile(values, percentile))
    return scale if scale > 0.0 else float(values.max())


def scale_maps(raw_maps: object, scale: float) -> np.ndarray:
    """Raw maps divided by ``scale`` (see :func:`model_scale`), negative parts to 0, clipped to [0, 1]."""
    if not np.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"scale must be a positive number, got {scale!r}.")
    values = np.nan_to_num(np.asarray(raw_maps, dtype=np.float32), nan=0.0, posinf=0.0)
    return np.clip(np.maximum(values, 0.0) / np.float32(scale), 0.0, 1.0)


PER_IMAGE_LABEL = "evidence for covid (normalised per image: max = 1)"
"""Colour bar label of maps normalised per image (:func:`normalise_maps`)."""


def scale_label(scale: float) -> str:
    """Colour bar label of maps on the per-model scale of :func:`scale_maps`."""
    return f"evidence for covid / {scale:.3g} (99th pct. of this model's maps on this set), clipped at 1"


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """ReLU, then divide each map by its maximum: maps in [0, 1]; a map without positive values stays 0."""
    pos = np.nan_to_num(np.maximum(np.asarray(maps, dtype=np.float32), 0.0), nan=0.0, posinf=0.0)
    peak = pos.max(axis=(1, 2), keepdims=True) if pos.size else pos
    out = np.divide(pos, peak, out=np.zeros_like(pos), where=peak > 1e-12)
    return np.clip(out, 0.0, 1.0)


def class_activation_maps(
    model: keras.Model,
    images: object,
    layer: str | None = "last_conv",
    *,
    batch_size: int = 32,
    normalise: bool = True,
) -> np.ndarray:
    """Exact CAM for covid: sum_k w_k A_k + b from the "logit" weights, upsampled (bilinear), then normalised
    per image (``normalise=False``: ReLU only, the raw logit-contribution scale).

    ``layer`` must be the layer feeding the global average pooling (None = that layer, whatever its name).
    """
    x = as_image_batch(images)
    feature = gap_feature_layer(model)
    _check_cam(model, feature, layer)
    logit = model.get_layer(LOGIT_LAYER)
    weights = logit.get_weights()
    kernel = np.asarray(weights[0], dtype=np.float64)[:, 0]
    bias = float(weights[1][0]) if logit.use_bias else 0.0
    sub = keras.Model(_model_input(model), model.get_layer(feature).output)
    maps = []
    for start in range(0, len(x), batch_size):
        acts = np.asarray(sub(x[start : start + batch_size], training=False), dtype=np.float64)
        raw = acts @ kernel + bias
        maps.append(_finish_maps(_upsample(raw.astype(np.float32), x.shape[1:3]), normalise))
    return np.concatenate(maps) if maps else np.zeros((0, *x.shape[1:3]), np.float32)


def _model_input(model: keras.Model) -> object:
    """The single input tensor (a plain tensor, so sub-models take a plain array, not a one-item list)."""
    return model.inputs[0] if len(model.inputs) == 1 else model.inputs


def _score_output(model: keras.Model) -> object:
    logit = _logit_layer(model)
    return _output_of(logit) if logit is not None else model.outputs[0]


def grad_cam(
    model: keras.Model,
    images: object,
    layer: str | None = None,
    *,
    plus: bool = False,
    batch_size: int = 32,
    normalise: bool = True,
) -> np.ndarray:
    """Grad-CAM (Grad-CAM++ with ``plus``) of the covid "logit" w.r.t. ``layer``, one pass per batch.

    Falls back to the model output (its last unit) when there is no "logit" layer. ReLU, bilinear upsampling
    to the input size, then per-map normalisation to [0, 1] (not with ``normalise=False``).
    """
    x = as_image_batch(images)
    name = find_target_layer(model, layer)
    sub = keras.Model(_model_input(model), [model.get_layer(name).output, _score_output(model)])
    maps = []
    for start in range(0, len(x), batch_size):
        xb = tf.convert_to_tensor(x[start : start + batch_size])
        with tf.GradientTape() as tape:
            tape.watch(xb)
            acts, score = sub(xb, training=False)
            total = tf.reduce_sum(tf.reshape(score, (tf.shape(score)[0], -1))[:, -1])
        grads = tape.gradient(total, acts)
        if grads is None:
            raise ModelError(f"the covid score of model {model.name!r} does not depend on layer {name!r}.")
        a = np.asarray(acts, dtype=np.float64)
        g = np.asarray(grads, dtype=np.float64)
        weights = _gradcam_plus_weights(a, g) if plus else g.mean(axis=(1, 2))
        raw = np.maximum(np.einsum("bhwk,bk->bhw", a, weights), 0.0).astype(np.float32)
        maps.append(_finish_maps(_upsample(raw, x.shape[1:3]), normalise))
    return np.concatenate(maps) if maps else np.zeros((0, *x.shape[1:3]), np.float32)


def _gradcam_plus_weights(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    """Grad-CAM++ channel weights sum_ij alpha_ij relu(g_ij); alpha by the closed form for an exp() score."""
    g2 = grads**2
    denom = 2.0 * g2 + acts.sum(axis=(1, 2), keepdims=True) * grads**3
    alpha = np.divide(g2, denom, out=np.zeros_like(g2), where=denom != 0.0)
    return (alpha * np.maximum(grads, 0.0)).sum(axis=(1, 2))


def heatmaps(
    model: keras.Model,
    images: object,
    method: str = "auto",
    layer: str | None = None,
    *,
    batch_size: int = 32,
    normalise: bool = True,
    precision: str | None = None,
) -> np.ndarray:
    """(B, H, W) covid heatmaps in [0, 1] by ``method`` ("auto": CAM for a GAP->logit head, else Grad-CAM);
    ``normalise=False``: on the method's raw scale (>= 0), for :func:`model_scale`.

    ``precision`` (float32, bfloat16, float16, auto; None: the model's own policy) is the precision of the
    forward and backward passes; activations and gradients are combined in float64 whatever it is (bfloat16
    maps correlate > 0.99 with float32 ones, see tests/training/test_precision.py).
    """
    from covidxray.training.compute_dtype import with_precision

    model = with_precision(model, precision)
    used, name = resolve_method(model, method, layer)
    if used == "cam":
        return class_activation_maps(model, images, layer=name, batch_size=batch_size, normalise=normalise)
    return grad_cam(model, images, name, plus=used == "gradcam++", batch_size=batch_size, normalise=normalise)


# ------------------------------------------------------------ files


def safe_name(text: object, fallback: str = "x", max_len: int = 80) -> str:
    """Filesystem-safe deterministic slug: [A-Za-z0-9._-] only, no "__" (the field separator), bounded."""
    raw = str(text)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", raw)
    slug = re.sub(r"_{2,}", "_", slug)
    slug = re.sub(r"-{2,}", "-", slug).strip("-._")
    if not slug:
        return fallback
    if len(slug) > max_len:
        digest = hashlib.sha1(raw.encode("utf-8")).hexdigest()[:8]
        slug = f"{slug[: max_len - 9].rstrip('-._')}-{digest}"
    return slug


def _image_stem(image_name: object) -> str:
    base = str(image_name).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    root, dot, ext = base.rpartition(".")
    return root if dot and root and f".{ext.lower()}" in IMAGE_EXTENSIONS else base


def cam_filename(model_name: str, image_name: str, truth: str, pred: str, prob: float) -> str:
    """Overlay file name, e.g. ``scratch-gap__IM-0115-0001__true-normal__pred-covid__p0.87.png``."""
    p = float(prob)
    if not np.isfinite(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"prob must be a probability in [0, 1], got {prob!r}.")
    parts = [
        safe_name(model_name, "model", 60),
        safe_name(_image_stem(image_name), "image", 80),
        f"true-{safe_name(truth, 'unknown', 20)}",
        f"pred-{safe_name(pred, 'unknown', 20)}",
        f"p{p:.2f}",
    ]
    return "__".join(parts) + ".png"


HEATMAP_DPI = 100
"""Resolution of the heatmap overlays and grids (the other figures use :data:`covidxray.evaluation.figures.DPI`)."""


# ------------------------------------------------------------ figures


def _gray(image: object) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img.mean(axis=-1)
    if img.ndim != 2:
        raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got shape {np.shape(image)}.")
    return img


def _draw_overlay(ax: object, image: object, heatmap: object, alpha: float) -> object:
    gray = _gray(image)
    heat = np.asarray(heatmap, dtype=np.float32)
    if heat.shape != gray.shape:
        raise ValueError(
            f"heatmap shape {heat.shape} differs from the image's {gray.shape}; upsample it first."
        )
    ax.imshow(gray, cmap="gray", interpolation="nearest")
    return ax.imshow(heat, cmap=_CMAP, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="nearest")


def overlay_figure(
    image: object, heatmap: object, *, title: str, alpha: float = 0.45, label: str = PER_IMAGE_LABEL
) -> Figure:
    """The X-ray in gray at the input resolution, the heatmap over it (colormap, ``alpha``), a colour bar
    whose ``label`` says the heatmap's scale."""
    fig = Figure(figsize=(5.0, 4.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    mappable = _draw_overlay(ax, image, heatmap, alpha)
    ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    bar = fig.colorbar(mappable, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(label, fontsize=7)
    return fig


def _image_names(df: pd.DataFrame) -> list[str]:
    for column in ("path", "filepath", "name"):
        if column in df.columns:
            return [str(v) for v in df[column]]
    return [f"image-{i}" for i in range(len(df))]


def image_keys(df: pd.DataFrame) -> list[str]:
    """Each row's image as the overlay file names write it (the second ``__`` field of :func:`cam_filename`)."""
    return [safe_name(_image_stem(name), "image", 80) for name in _image_names(df)]


def _outcomes(truth: Sequence[str], probs: np.ndarray, threshold: float) -> list[str]:
    positive = LABELS[1]
    table = {(True, True): "TP", (False, False): "TN", (False, True): "FP", (True, False): "FN"}
    return [table[(t == positive, bool(p >= threshold))] for t, p in zip(truth, probs, strict=True)]


def select_examples(
    df: pd.DataFrame, probs: object, threshold: float = 0.5, per_cell: int = 2
) -> dict[str, list[int]]:
    """Row positions per outcome (TP, TN, FP, FN), ``per_cell`` each: most confident first, ties by name."""
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    check_frame(df, ("label",), what="the table of examples", rows=len(p), fix="pass the rows the scores belong to",
                allow_empty=True)
    outcomes = _outcomes([str(v) for v in df["label"]], p, threshold)
    names = _image_names(df)
    confidence = np.where(p >= threshold, p, 1.0 - p)
    chosen: dict[str, list[int]] = {}
    for outcome in OUTCOMES:
        rows = [i for i, o in enumerate(outcomes) if o == outcome]
        rows.sort(key=lambda i: (-confidence[i], names[i], i))
        chosen[outcome] = rows[:per_cell]
    return chosen


def summary_grid(
    images: object,
    maps: object,
    df: pd.DataFrame,
    probs: object,
    threshold: float,
    out_path: str | Path,
    *,
    model_name: str,
    per_cell: int = 2,
    label: str = PER_IMAGE_LABEL,
    model_label: str | None = None,
) -> Path:
    """One PNG per model: rows TP, TN, FP, FN, the ``per_cell`` most confident each, empty cells "none shown";
    the images are the model inputs (stretched to a square); ``label`` names the maps' scale on the colour bar,
    ``model_label`` (a title line) which model and method the maps explain."""
    if per_cell < 1:
        raise ValueError(f"per_cell must be >= 1, got {per_cell}.")
    x = as_image_batch(images)
    heat = np.asarray(maps, dtype=np.float32)
    if heat.shape != x.shape[:3]:
        raise ValueError(f"maps shape {heat.shape} does not match the images' {x.shape[:3]}.")
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    chosen = select_examples(df, p, threshold, per_cell)
    names = _image_names(df)
    fig = Figure(figsize=(2.4 * per_cell + 1.4, 2.5 * len(OUTCOMES) + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(OUTCOMES), per_cell, squeeze=False)
    for r, outcome in enumerate(OUTCOMES):
        for c in range(per_cell):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            if c < len(chosen[outcome]):
                i = chosen[outcome][c]
                _draw_overlay(ax, x[i], heat[i], 0.45)
                ax.set_title(
                    f"{safe_name(_image_stem(names[i]), 'image', 28)}\np(covid)={p[i]:.2f}", fontsize=7
                )
            else:
                ax.text(0.5, 0.5, "none shown", ha="center", va="center", color="0.4", transform=ax.transAxes)
            if c == 0:
                ax.set_ylabel(OUTCOME_TITLES[outcome], fontsize=8)
    about = f"{model_label}\n" if model_label else ""
    fig.suptitle(f"{model_name}: most confident per outcome (threshold {threshold:.2f})\n{about}"
                 "model input (stretched to a square)", fontsize=10 if not model_label else 8)
    bar = fig.colorbar(
        ScalarMappable(Normalize(0.0, 1.0), cmap=_CMAP), ax=axes.ravel().tolist(), fraction=0.03
    )
    bar.set_label(label, fontsize=7)
    return save_figure(fig, out_path, dpi=HEATMAP_DPI)


def render_cams(
    model: keras.Model,
    images: object,
    df: pd.DataFrame,
    out_dir: str | Path,
    *,
    model_name: str,
    threshold: float = 0.5,
    method: str = "auto",
    probs: object | None = None,
    layer: str | None = None,
    batch_size: int = 32,
    grid: bool = True,
    maps: object | None = None,
    label: str | None = None,
    synthetic: bool = False,
    model_label: str | None = None,
    grid_note: str | None = None,
) -> pd.DataFrame:
    """Write one overlay PNG per image (and the summary grid) into ``out_dir``; return one row per file.

    ``grid_note`` is one more title line of the summary grid (e.g. how many sampled images were not drawn, and why).

    ``synthetic`` (the model or the images come from the embedded synthetic set) puts SYNTHETIC DATA in every
    figure's title; ``model_label`` (e.g. the run folder, test accuracy and method, see
    :func:`covidxray.explain.render.model_line`) is a title line of its own, saying which model the maps explain.
    ``df`` is aligned with ``images`` and has a "label" column (and "path" for names); ``probs`` are p(covid),
    predicted here when None. ``maps`` are precomputed heatmaps of the same ``method`` in [0, 1] and ``label``
    names their scale (default: normalised per image); when None they are computed here on one scale for the
    whole set (:func:`model_scale`, :func:`scale_maps`), so colours compare across images.
    Columns: model, image, file, label, pred, prob, outcome, method, layer.
    """
    x = as_image_batch(images)
    if probs is None:
        from covidxray.runs.load import predict_proba

        p = predict_proba(model, x, batch_size=batch_size)
    else:
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
    check_frame(df, ("label",), what="the table of explained images", rows=len(x),
                fix="pass the manifest rows of the images, in order", allow_empty=True)
    if len(p) != len(x):
        raise ValueError(f"{len(p)} probabilities for {len(x)} images.")
    used, name = resolve_method(model, method, layer)
    if maps is None:
        raw = heatmaps(model, x, used, name, batch_size=batch_size, normalise=False)
        scale = model_scale(raw)
        maps, label = scale_maps(raw, scale), label or scale_label(scale)
    label = label or PER_IMAGE_LABEL
    maps = np.asarray(maps, dtype=np.float32)
    if maps.shape != x.shape[:3]:
        raise ValueError(f"maps shape {maps.shape} does not match the images' {x.shape[:3]}.")
    out_dir = Path(out_dir)
    names = _image_names(df)
    shown = f"{SYNTHETIC} DATA · {model_name}" if synthetic else model_name
    truths = [str(v) for v in df["label"]]
    outcomes = _outcomes(truths, p, threshold)
    rows, taken = [], set()
    for i in progress_bar(range(len(x)), desc=f"heatmaps {model_name}", unit="image"):
        pred = LABELS[int(p[i] >= threshold)]
        filename = cam_filename(model_name, names[i], truths[i], pred, p[i])
        copy = 1
        while filename in taken:
            copy += 1
            filename = cam_filename(model_name, f"{_image_stem(names[i])}-{copy}", truths[i], pred, p[i])
        taken.add(filename)
        title = f"{shown} ({METHOD_NAMES.get(used, used)}): true {truths[i]}, predicted {pred}, p(covid) = {p[i]:.2f}"
        if model_label:
            title = f"{model_label}\n{title}"
        save_figure(overlay_figure(x[i], maps[i], title=title, label=label), out_dir / filename, dpi=HEATMAP_DPI)
        rows.append(
            {
                "model": model_name,
                "image": names[i],
                "file": str(out_dir / filename),
                "label": truths[i],
                "pred": pred,
                "prob": float(p[i]),
                "outcome": outcomes[i],
                "method": used,
                "layer": name,
            }
        )
    if grid:
        summary_grid(x, maps, df, p, threshold, out_dir / grid_filename(model_name),
                     model_name=f"{shown} ({METHOD_NAMES.get(used, used)})", label=label,
                     model_label="\n".join(t for t in (model_label, grid_note) if t) or None)
    return pd.DataFrame(
        rows, columns=["model", "image", "file", "label", "pred", "prob", "outcome", "method", "layer"]
    )


def grid_filename(model_name: str) -> str:
    """File name of a model's summary grid, e.g. ``scratch-gap__summary.png``."""
    return f"{safe_name(model_name, 'model', 60)}__summary.png"
