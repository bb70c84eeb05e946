"""Where an X-ray is not anatomy: padding and flat regions, burnt-in markers, and the outside of the body.

Masks are estimated from the grayscale image alone (the model input the heatmap belongs to), with simple,
documented rules; they are estimates for auditing heatmaps, not a segmentation to diagnose with. Intensities are
measured relative to the image's own range ``R`` (99.5th minus 0.5th percentile), so the rules hold for 8-bit and
rescaled images alike. ``s = min(H, W)`` is the short side.

* :func:`flat_mask` (padding, letterbox bands, blank air): pixels whose local standard deviation over a
  ``w x w`` window (``w = max(3, s / 32)``, odd) is at most ``0.01 R``, in 8-connected components that touch the
  image edge and cover at least 0.5 % of the image, and are either dark (median at most the 1st percentile plus
  ``0.15 R``: black padding, blank air) or a band across the image (a full row or column: white margins); bright
  flat areas that are no band are saturated anatomy (heart, abdomen) and stay out. Each component then grows (up
  to ``w / 2`` px) over pixels within ``0.03 R`` of its median, which restores the edge the window blurred.
* :func:`marker_mask` (burnt-in letters, "R"/"L" lead markers, text, clips, electrodes): components that stand
  out from their surroundings by at least ``0.25 R`` (white top-hat for bright ones, black top-hat for dark
  ones, square structuring element of side ``0.15 s``). The pixels above that contrast are cut at steep steps
  (Sobel step above ``0.0625 R`` per px) into seeds, each grown over pixels above half the contrast whose
  intensity is within ``0.25 R`` of the seed's median (a marker touching a bone is judged apart from it, a bone
  whole). A grown component is a marker when it is small (area at least 3 px and 0.02 % of the image, at most
  1.5 % of the image; bounding box at most ``0.12 s`` on each side), clear of its surroundings (mean intensity
  above the 90th percentile of a 2-px ring around it by a quarter of its contrast: a bone edge that juts out of
  a bright region is not a marker) and sharp-edged (steepest Sobel step on its outline at least 0.15 of its
  contrast per px). Holes are filled (the inside of an "R" counts).
* :func:`body_mask` (the body, as a region that holds the lungs): pixels that are neither padding, nor
  markers, nor dark air connected to the image edge or the padding (intensity at most the 1st percentile of the
  non-padding pixels plus ``0.12 R``); of those the largest 8-connected component, closed with a ``w x w``
  square, holes filled (so dark lungs enclosed by the body stay in), markers taken out again. This is a body
  estimate, not a lung segmentation: the abdomen, neck and arms count as body.
* :func:`lung_mask` (the lung fields, an estimate from intensity; no trained segmentation model): the body
  smoothed over a ``w x w`` window, its pixels at or below Otsu's threshold of the body's smoothed intensities
  (air-filled lung is the darkest part of the body), opened with a ``w x w`` square; of the 8-connected
  components the two largest that each cover at least 2 % of the image, closed with a ``w x w`` square and holes
  filled (vessels and opacities inside a lung stay lung). The mediastinum, heart, diaphragm, abdomen, neck and
  shoulders are outside it; so is a lung so white (dense consolidation) that it is brighter than the soft tissue.

Checked on numpy-built images with planted padding, markers and body (tests/explain/test_image_regions.py: IoU > 0.8)
and by eye on real test-split X-rays at 64 and 224 px, where it also flags some rib and clavicle crossings as
markers (a few pixels each) and misses markers that overlap bright anatomy.

:func:`region_masks` returns all four plus ``outside_body`` (= not body; it contains padding and markers) and
``outside_lungs`` (= not lungs: everything above plus the body outside the lung fields), and
:func:`mass_shares` the share of a heatmap's mass in each mask beside the mask's share of the image area.
:func:`measured_regions` are the masks the heatmap checks weigh: padding and markers each with a rim of
``max(2, 0.05 s)`` px around them, because heatmaps are coarse (a CAM has 1/8 of the input's resolution or less)
and a blob on the edge of a pasted-in figure or on a 4-px marker spreads to both sides of it; and the outside of
the body and of the lung fields as they are.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from covidxray.metrics import format_share

REGIONS: tuple[str, ...] = ("padding", "markers", "outside_body", "outside_lungs")
"""The off-anatomy regions measured for each image, in report order."""
REGION_NAMES: dict[str, str] = {
    "padding": "padding and flat regions",
    "markers": "burnt-in markers",
    "outside_body": "outside the body",
    "outside_lungs": "outside the lung fields",
}
"""How the reports name each region of :data:`REGIONS`."""
REGION_EXPLANATIONS: dict[str, str] = {
    "padding": "flat bands and blank areas touching the image edge (black letterbox padding, blank air, white "
               "margins of a pasted-in figure), with a rim of 5 % of the short side",
    "markers": "small sharp-edged marks burnt into the film (lead R/L markers, text, clips, electrodes), with the "
               "same rim",
    "outside_body": "everything that is not the estimated body: the air around the patient, padding and markers",
    "outside_lungs": "everything that is not the estimated lung fields: heart, mediastinum, diaphragm, abdomen, "
                     "neck and shoulders, plus all of the above (an estimate from intensity, not a trained "
                     "segmentation)",
}
"""One line per region of :data:`REGIONS` saying what it holds, printed wherever a warning can name it."""
FLAT_STD = 0.01
"""Local standard deviation, as a fraction of the image's range, at or below which a pixel is flat."""
FLAT_VALUE_TOL = 0.03
"""A flat component grows over pixels within this fraction of the range of its median intensity."""
FLAT_DARK = 0.15
"""A flat component darker than the 1st percentile plus this fraction of the range is padding or air."""
FLAT_MIN_AREA = 0.005
"""Flat components smaller than this fraction of the image are ignored."""
MARKER_CONTRAST = 0.25
"""Least top-hat contrast of a marker, as a fraction of the image's range."""
MARKER_EDGE = 0.15
"""Least steepest outline step of a marker, per pixel, as a fraction of its contrast."""
MARKER_ISOLATION = 0.25
"""A marker's mean intensity exceeds the 90th percentile of a 2-px ring around it by this fraction of its contrast."""
MARKER_MAX_AREA = 0.015
"""Largest marker area, as a fraction of the image."""
MARKER_MAX_SIDE = 0.12
"""Largest marker bounding-box side, as a fraction of the image's short side."""
MARKER_SE = 0.15
"""Side of the top-hat's square structuring element, as a fraction of the short side."""
RIM = 0.05
"""Rim around padding and markers counted with them by :func:`measured_regions`, as a fraction of the short side."""
AIR_LEVEL = 0.12
"""Dark air beside the body: at most the 1st percentile of the non-padding pixels plus this fraction of the range."""
LUNG_MIN_AREA = 0.02
"""A dark component of the body is a lung when it covers at least this fraction of the image (at most two kept)."""
_EIGHT = np.ones((3, 3), bool)


def as_gray(image: object) -> np.ndarray:
    """``image`` ((H, W), (H, W, 1) or (H, W, 3)) as a float64 (H, W) array; channels are averaged."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[-1] in (1, 3, 4):
        img = img[..., :3].mean(axis=-1)
    if img.ndim != 2 or min(img.shape) < 4:
        raise ValueError(f"image must be (H, W) or (H, W, C) with sides >= 4, got shape {np.shape(image)}.")
    return np.nan_to_num(img)


def intensity_range(gray: np.ndarray) -> float:
    """The image's range R: 99.5th minus 0.5th percentile (1.0 for a constant image, so rules stay defined)."""
    lo, hi = np.percentile(gray, [0.5, 99.5])
    return float(hi - lo) if hi > lo else 1.0


def _window(shape: tuple[int, int]) -> int:
    w = max(3, int(round(min(shape) / 32)))
    return w if w % 2 else w + 1


def local_std(gray: np.ndarray, size: int) -> np.ndarray:
    """Standard deviation over a ``size x size`` window around each pixel (edges reflected)."""
    mean = ndimage.uniform_filter(gray, size, mode="reflect")
    mean_sq = ndimage.uniform_filter(gray * gray, size, mode="reflect")
    return np.sqrt(np.maximum(mean_sq - mean * mean, 0.0))


def _touches_edge(labels: np.ndarray) -> set[int]:
    edge = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    return set(np.unique(edge[edge > 0]).tolist())


def flat_mask(image: object) -> np.ndarray:
    """Padding and flat regions: near-constant pixels connected to the image edge (rule in the module doc)."""
    gray = as_gray(image)
    rng = intensity_range(gray)
    w = _window(gray.shape)
    flat = local_std(gray, w) <= FLAT_STD * rng
    labels, _ = ndimage.label(flat, structure=_EIGHT)
    out = np.zeros(gray.shape, bool)
    min_area = FLAT_MIN_AREA * gray.size
    dark_level = np.percentile(gray, 1) + FLAT_DARK * rng
    for lab in sorted(_touches_edge(labels)):
        comp = labels == lab
        if comp.sum() < min_area:
            continue
        level = np.median(gray[comp])
        if level > dark_level and not (comp.all(axis=0).any() or comp.all(axis=1).any()):
            continue  # bright and not a band across the image: saturated anatomy, not padding
        close = np.abs(gray - level) <= FLAT_VALUE_TOL * rng
        grown = ndimage.binary_dilation(comp, _EIGHT, iterations=w // 2 + 1, mask=close)
        out |= grown | comp
    return out


def _marker_candidates(gray: np.ndarray, tophat: np.ndarray, rng: float) -> np.ndarray:
    """Markers among the pixels of ``tophat >= contrast`` (see the module doc). ``gray`` is the image for
    bright markers and its negative for dark ones."""
    strong = tophat >= MARKER_CONTRAST * rng
    keep = np.zeros(gray.shape, bool)
    if not strong.any():
        return keep
    weak = tophat >= 0.5 * MARKER_CONTRAST * rng
    step = np.hypot(ndimage.sobel(gray, axis=1), ndimage.sobel(gray, axis=0)) / 8.0
    covered = np.zeros(gray.shape, bool)
    core = strong & (step < 0.25 * MARKER_CONTRAST * rng)  # cut at steep steps: a marker touching a bone
    for pixels in (core, None):  # then what the cores did not reach: markers too thin to have a core
        seeds, n = ndimage.label(strong & ~covered if pixels is None else pixels, structure=_EIGHT)
        for lab in range(1, n + 1):
            seed = seeds == lab
            similar = weak & (np.abs(gray - np.median(gray[seed])) <= MARKER_CONTRAST * rng)
            full = ndimage.binary_propagation(seed, _EIGHT, mask=similar | seed)
            covered |= full
            if _is_marker(gray, tophat, step, full):
                keep |= full
    return keep


def _is_marker(gray: np.ndarray, tophat: np.ndarray, step: np.ndarray, full: np.ndarray) -> bool:
    """Small in both directions, clear of its surroundings and sharp-edged (module doc)."""
    rows, cols = np.nonzero(full)
    if max(np.ptp(rows), np.ptp(cols)) + 1 > MARKER_MAX_SIDE * min(gray.shape):
        return False
    if not max(3.0, 0.0002 * gray.size) <= full.sum() <= MARKER_MAX_AREA * gray.size:
        return False
    contrast = float(tophat[full].max())
    ring = ndimage.binary_dilation(full, _EIGHT, iterations=2) & ~full
    if gray[full].mean() - np.percentile(gray[ring], 90) < MARKER_ISOLATION * contrast:
        return False
    outline = ndimage.binary_dilation(full, _EIGHT) & ~ndimage.binary_erosion(full, _EIGHT)
    return bool(step[outline].max() >= MARKER_EDGE * contrast)


def marker_mask(image: object) -> np.ndarray:
    """Burnt-in text and markers: small, high-contrast, sharp-edged components (rule in the module doc)."""
    gray = as_gray(image)
    rng = intensity_range(gray)
    se = max(3, int(round(MARKER_SE * min(gray.shape))))
    bright = gray - ndimage.grey_opening(gray, size=(se, se), mode="reflect")
    dark = ndimage.grey_closing(gray, size=(se, se), mode="reflect") - gray
    found = _marker_candidates(gray, bright, rng) | _marker_candidates(-gray, dark, rng)
    return ndimage.binary_fill_holes(found)


def body_mask(image: object, *, padding: np.ndarray | None = None, markers: np.ndarray | None = None) -> np.ndarray:
    """An estimate of the body (lungs included): not padding, markers or edge-connected air (module doc).

    ``padding`` and ``markers`` are :func:`flat_mask` and :func:`marker_mask` of the image when already computed.
    """
    gray = as_gray(image)
    pad = flat_mask(gray) if padding is None else np.asarray(padding, bool)
    mk = marker_mask(gray) if markers is None else np.asarray(markers, bool)
    rest = ~pad & ~mk
    if not rest.any():
        return np.zeros(gray.shape, bool)
    rng = intensity_range(gray)
    dark = rest & (gray <= np.percentile(gray[rest], 1) + AIR_LEVEL * rng)
    labels, _ = ndimage.label(dark, structure=_EIGHT)
    near_pad = ndimage.binary_dilation(pad, _EIGHT) if pad.any() else pad
    touching = _touches_edge(labels) | set(np.unique(labels[near_pad & (labels > 0)]).tolist())
    air = np.isin(labels, sorted(touching)) if touching else np.zeros(gray.shape, bool)
    candidate = rest & ~air
    labels, n = ndimage.label(candidate, structure=_EIGHT)
    if n == 0:
        return candidate
    sizes = ndimage.sum_labels(candidate, labels, index=np.arange(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    w = _window(gray.shape)
    body = ndimage.binary_closing(body, np.ones((w, w), bool), border_value=0) | body
    body = ndimage.binary_fill_holes(body)
    return body & ~pad & ~mk


def otsu_level(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of ``values``: the level that maximises the between-class variance of the two sides."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0 or values.max() <= values.min():
        return float(values.max()) if values.size else 0.0
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight = np.cumsum(hist)
    mean = np.cumsum(hist * centers)
    total, grand = weight[-1], mean[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (grand * weight - total * mean) ** 2 / (weight * (total - weight))
    return float(centers[int(np.nanargmax(np.nan_to_num(between[:-1], nan=-1.0)))])


def lung_mask(image: object, *, body: np.ndarray | None = None) -> np.ndarray:
    """An estimate of the lung fields: the dark, air-filled part of the body (rule in the module doc).

    ``body`` is :func:`body_mask` of the image when already computed. Empty when no dark component of the body
    is large enough (then every heatmap's mass counts as outside the lungs; the check says so per image).
    """
    gray = as_gray(image)
    body = body_mask(gray) if body is None else np.asarray(body, bool)
    if body.sum() < LUNG_MIN_AREA * body.size:
        return np.zeros(gray.shape, bool)
    w = _window(gray.shape)
    smooth = ndimage.uniform_filter(gray, w, mode="reflect")
    dark = body & (smooth <= otsu_level(smooth[body]))
    dark = ndimage.binary_opening(dark, np.ones((w, w), bool))
    labels, n = ndimage.label(dark, structure=_EIGHT)
    if n == 0:
        return dark
    sizes = ndimage.sum_labels(dark, labels, index=np.arange(1, n + 1))
    keep = [i + 1 for i in np.argsort(-sizes)[:2] if sizes[i] >= LUNG_MIN_AREA * gray.size]
    lungs = np.isin(labels, keep)
    lungs = ndimage.binary_closing(lungs, np.ones((w, w), bool), border_value=0) | lungs
    return ndimage.binary_fill_holes(lungs) & body


def region_masks(image: object) -> dict[str, np.ndarray]:
    """Boolean (H, W) masks "padding", "markers", "body", "outside_body" (= ~body), "lungs" and "outside_lungs"
    (= ~lungs) of one image."""
    gray = as_gray(image)
    pad = flat_mask(gray)
    mk = marker_mask(gray) & ~pad
    body = body_mask(gray, padding=pad, markers=mk)
    lungs = lung_mask(gray, body=body)
    return {"padding": pad, "markers": mk, "body": body, "outside_body": ~body, "lungs": lungs,
            "outside_lungs": ~lungs}


def measured_regions(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The regions of :data:`REGIONS` as the heatmap checks weigh them: padding and markers dilated by a rim of
    ``max(2, RIM * s)`` px (module doc), outside of the body as it is."""
    rim = max(2, int(round(RIM * min(masks["padding"].shape))))
    disk = np.hypot(*np.mgrid[-rim:rim + 1, -rim:rim + 1]) <= rim
    out = {}
    for region in ("padding", "markers"):
        mask = masks[region]
        out[region] = ndimage.binary_dilation(mask, disk) if mask.any() else mask.copy()
    out["outside_body"] = masks["outside_body"]
    out["outside_lungs"] = masks["outside_lungs"]
    return out


def mass_shares(heatmap: object, masks: dict[str, np.ndarray]) -> dict[str, float]:
    """Per region: ``<region>_share`` (the heatmap's mass in the mask / its total; NaN for an all-zero map)
    and ``<region>_area`` (the mask's share of the image). Negative heatmap values count as zero."""
    heat = np.maximum(np.nan_to_num(np.asarray(heatmap, dtype=np.float64)), 0.0)
    total = float(heat.sum())
    out: dict[str, float] = {}
    for region, mask in masks.items():
        if mask.shape != heat.shape:
            raise ValueError(f"mask {region!r} has shape {mask.shape}, the heatmap {heat.shape}.")
        out[f"{region}_share"] = float(heat[mask].sum() / total) if total > 0.0 else float("nan")
        out[f"{region}_area"] = float(mask.mean())
    return out

def format_mass_area(stats: dict) -> str:
    """One region's heatmap mass share beside its area share, as every table prints them: "0.73 (0.69)"."""
    return f"{format_share(stats.get('mass_share'))} ({format_share(stats.get('area_share'))})"
