"""Off-anatomy masks (padding, markers, body) on numpy-built X-ray-like images with planted regions, and the
shortcut warning they feed."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from covidxray.explain.checks import OFF_ANATOMY_WARNING, off_anatomy, off_anatomy_shares
from covidxray.explain.regions import body_mask, flat_mask, marker_mask, mass_shares, region_masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def padded_chest(size: int = 64, pad: int = 12, seed: int = 0,
                 marker_at: tuple[int, int] | None = (18, 6)) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A chest-like blob (textured body, two dark lungs) on noisy dark air, black bands above and below (a
    figure pasted into padding) and an "R"-like bright block marker; returns the image and the planted masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(float)
    img = 25 + rng.normal(0, 4, (size, size))
    c = size / 2
    body = ((yy - c) / (0.36 * size)) ** 2 + ((xx - c) / (0.40 * size)) ** 2 <= 1
    lungs = ((yy - c + 2) / (0.22 * size)) ** 2 + ((np.abs(xx - c) - 0.17 * size) / (0.11 * size)) ** 2 <= 1
    img[body] = 150 + rng.normal(0, 6, body.sum()) + 20 * np.sin(yy[body] / 3)
    img[lungs & body] = 70 + rng.normal(0, 6, (lungs & body).sum())
    padding = np.zeros((size, size), bool)
    padding[:pad] = padding[size - pad:] = True
    img[padding] = 0
    marker = np.zeros((size, size), bool)
    if marker_at is not None:
        r, k = marker_at
        marker[r:r + 5, k:k + 4] = True
        img[marker] = 245
        img[r + 1, k + 1:k + 3] = img[r + 3, k + 1] = 25  # holes, like the inside of an "R"
    return np.clip(img, 0, 255), {"padding": padding, "markers": marker, "body": body & ~padding,
                                  "lungs": lungs & body & ~padding}


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("size", [64, 128])
def test_masks_match_the_planted_regions(seed: int, size: int) -> None:
    img, truth = padded_chest(size, pad=size // 5, seed=seed, marker_at=(size * 18 // 64, size * 6 // 64))
    masks = region_masks(img)
    for region in ("padding", "markers", "body", "lungs"):
        assert iou(masks[region], truth[region]) > 0.8, (region, iou(masks[region], truth[region]))
    assert np.array_equal(masks["outside_body"], ~masks["body"])
    assert np.array_equal(masks["outside_lungs"], ~masks["lungs"]) and not (masks["lungs"] & ~masks["body"]).any()
    assert not (masks["body"] & (masks["padding"] | masks["markers"])).any()


def test_text_in_the_padding_and_rgb_input() -> None:
    img, truth = padded_chest(marker_at=(3, 40))
    masks = region_masks(np.repeat(img[..., None], 3, axis=-1))
    assert iou(masks["markers"], truth["markers"]) > 0.8 and iou(masks["padding"], truth["padding"]) > 0.8


def test_no_padding_no_markers_on_a_full_frame_image() -> None:
    img, _ = padded_chest(pad=0, marker_at=None)
    assert flat_mask(img).sum() == 0 and marker_mask(img).sum() == 0
    assert body_mask(img).mean() > 0.3


def test_smooth_blobs_bones_and_saturated_anatomy_are_no_markers_or_padding() -> None:
    img, _ = padded_chest(pad=0, marker_at=None)
    yy, xx = np.mgrid[:64, :64]
    blob = 120 * np.exp(-((yy - 30) ** 2 + (xx - 40) ** 2) / (2 * 3.0 ** 2))  # a soft opacity
    bone = img.copy()
    bone[20:50, 30:33] = 250  # long and thin: a bone, not a marker
    assert marker_mask(np.clip(img + blob, 0, 255)).sum() == 0
    assert marker_mask(bone).sum() == 0
    saturated = img.copy()
    saturated[44:, 20:44] = 255  # a burnt-out abdomen touching the lower edge, no band across the image
    assert flat_mask(saturated)[44:, 20:44].sum() == 0
    band = img.copy()
    band[:8] = 255  # a white margin across the image is padding
    assert iou(flat_mask(band), np.arange(64)[:, None] < 8 + np.zeros((1, 64), bool)) > 0.8


def test_mass_shares_on_padding_and_on_the_body() -> None:
    img, truth = padded_chest()
    masks = region_masks(img)
    on_pad = mass_shares(truth["padding"].astype(float), masks)
    on_body = mass_shares(truth["body"].astype(float) * np.random.default_rng(0).uniform(0.5, 1, (64, 64)), masks)
    on_marker = mass_shares(truth["markers"].astype(float), masks)
    assert on_pad["padding_share"] > 0.95 and on_pad["outside_body_share"] > 0.95
    assert on_body["padding_share"] < 0.05 and on_body["markers_share"] < 0.05 and on_body["outside_body_share"] < 0.05
    assert on_marker["markers_share"] > 0.95
    assert on_pad["padding_area"] == pytest.approx(truth["padding"].mean(), abs=0.02)
    assert np.isnan(mass_shares(np.zeros((64, 64)), masks)["padding_share"])
    with pytest.raises(ValueError, match="shape"):
        mass_shares(np.zeros((8, 8)), masks)


def test_off_anatomy_warning_fires_on_padding_and_markers_only() -> None:
    images, truths = zip(*(padded_chest(seed=s) for s in range(4)), strict=True)
    x = np.repeat(np.stack(images)[..., None], 3, axis=-1)
    df = pd.DataFrame({"label": ["covid", "covid", "normal", "normal"], "source": ["a", "b", "a", "b"]})
    rng = np.random.default_rng(1)
    body = np.stack([t["body"] * rng.uniform(0.5, 1.0, (64, 64)) for t in truths])
    clean = off_anatomy(x, body, df)
    assert clean["warning"] is None and "bootstrap" in clean["rule"]
    on_pad = body.copy()
    on_pad[:2] = np.stack([t["padding"] * 1.0 for t in truths[:2]])  # covid maps on the padding
    padded = off_anatomy(x, on_pad, df)
    assert padded["warning"].startswith(OFF_ANATOMY_WARNING)
    assert "padding and flat regions (" in padded["warning"] and "label=covid" in padded["warning"]
    assert "label=normal" not in padded["warning"] and "burnt-in markers" not in padded["warning"]
    covid = padded["per_class"]["covid"]["padding"]
    assert covid["mass_share"] > 0.95 and covid["fired"] and covid["n_images_over_margin"] == 2
    on_marker = body.copy()
    on_marker[2:] = np.stack([t["markers"] * 1.0 for t in truths[2:]])
    marked = off_anatomy(x, on_marker, df)
    assert "burnt-in markers (" in marked["warning"] and "label=normal" in marked["warning"]
    assert marked["per_class"]["normal"]["over"][0] == "markers"
    shares = off_anatomy_shares(x, on_marker)
    assert list(shares["empty"]) == [False] * 4 and len(shares) == 4
    empty = off_anatomy(x, np.zeros((4, 64, 64)), df)
    assert empty["warning"] is None and empty["overall"]["padding"]["mass_share"] is None


def test_outside_lungs_fires_on_maps_below_the_lungs_not_on_maps_in_them() -> None:
    """A map on the body outside the lung fields (as on an abdomen) warns; the same mass on the lungs does not."""
    images, truths = zip(*(padded_chest(seed=s, pad=0, marker_at=None) for s in range(4)), strict=True)
    x = np.repeat(np.stack(images)[..., None], 3, axis=-1)
    df = pd.DataFrame({"label": ["covid"] * 4})
    on_lungs = off_anatomy(x, np.stack([t["lungs"] * 1.0 for t in truths]), df)
    assert on_lungs["warning"] is None
    assert on_lungs["overall"]["outside_lungs"]["mass_share"] < 0.1
    below = np.stack([(t["body"] & ~t["lungs"]) * 1.0 for t in truths])
    below[:, :40] = 0.0  # the body under the lungs only
    result = off_anatomy(x, below, df)
    assert "outside the lung fields (" in result["warning"] and "label=covid" in result["warning"]
    assert "outside the body (" not in result["warning"]
    assert result["overall"]["outside_lungs"]["mass_share"] > 0.9
    assert result["overall"]["outside_body"]["mass_share"] < 0.1


def test_one_map_in_four_on_a_large_padding_is_counted_but_does_not_fire() -> None:
    """A figure pasted into padding that covers half the image, one map in four on it: the mean excess of the
    group stays under the margin, so the rule does not fire; the image is counted and listed under its name."""
    images, truths = zip(*(padded_chest(seed=s, pad=p) for s, p in ((0, 20), (1, 0), (2, 0), (3, 0))), strict=True)
    x = np.repeat(np.stack(images)[..., None], 3, axis=-1)
    body = np.stack([t["body"] * 1.0 for t in truths])
    maps = body.copy()
    pad, inner = truths[0]["padding"], truths[0]["body"]
    maps[0] = 0.9 * pad / pad.sum() + 0.1 * inner / inner.sum()
    df = pd.DataFrame({"label": ["covid"] * 4, "path": [f"covid/pasted-{i}.png" for i in range(4)]})
    result = off_anatomy(x, maps, df)
    stats = result["per_class"]["covid"]["padding"]
    assert not stats["fired"] and stats["n_images_over_margin"] == 1 and result["warning"] is None
    first = result["per_image"]["padding"][0]
    assert first["image"] == "pasted-0" and first["mass"] > 0.8
