"""Synthetic chest X-ray sources: a small procedural stand-in for the real data, in the real folder layouts.

The package uses it as its embedded default (demo, tests, notebooks) when no real data is present, so that
every stage runs end to end without a download. Images are cheap numpy drawings of a radiograph: a thorax,
two dark lung fields, spine, heart and ribs, blurred and noisy; COVID-19 images add patchy bilateral
"ground glass" opacities in the lower, peripheral lung fields, so the classes are learnable by a tiny CNN.
They are not medical data and say nothing about real radiographs.

Two writers reproduce the real sources' layouts, names, formats and metadata schema:

* ``make_synthetic_sources``: Kermany/Kaggle ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}`` and
  ieee8023 ``metadata.csv`` + ``images/`` + ``volumes/`` (with the rows a default selection must drop:
  lateral views, CT, other findings);
* ``make_synthetic_presplit``: the 2020 project's pre-split ``{train,test}/{Covid,Normal}`` folder;
* ``make_synthetic_nih``: NIH ChestX-ray14 ``Data_Entry_2017.csv`` + ``images/`` (adults and children, normal
  and abnormal films, several follow-ups per patient);
* ``make_synthetic_labeled``: a generic ``labels.csv`` set with both classes from one source, balanced, or with
  planted differences (format, size, age) that a model could read instead of the disease.

Everything is deterministic given ``seed``: the same call writes byte-identical files.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from covidxray.outputs import claim_output, staged_output
from covidxray.paths import CHEST_XRAY_DIR, COVID_XRAY_DIR

MARKER_NAME = ".synthetic"
"""A file in every folder these writers own; they overwrite only folders that hold it (or nothing)."""
_MARKER_TEXT = "Written by covidxray.data.synthetic: procedural images, not patient data. Safe to delete.\n"

EARLY_COLUMNS: tuple[str, ...] = (
    "patientid", "offset", "sex", "age", "finding", "survival", "intubated", "intubation_present",
    "went_icu", "in_icu", "needed_supplemental_O2", "extubated", "temperature", "pO2_saturation",
    "leukocyte_count", "neutrophil_count", "lymphocyte_count", "view", "modality", "date", "location",
    "folder", "filename", "doi", "url", "license", "clinical_notes", "other_notes",
)
"""ieee8023 metadata.csv columns as of spring 2020; the file adds an empty, unnamed last column."""
LATEST_COLUMNS: tuple[str, ...] = (*EARLY_COLUMNS[:5], "RT_PCR_positive", *EARLY_COLUMNS[5:])
"""ieee8023 metadata.csv columns of the final release (hierarchical findings, RT_PCR_positive)."""
SCHEMAS: dict[str, tuple[str, ...]] = {"latest": LATEST_COLUMNS, "early": EARLY_COLUMNS}

COVID_FINDING: dict[str, str] = {"latest": "Pneumonia/Viral/COVID-19", "early": "COVID-19"}
OTHER_FINDINGS: dict[str, tuple[str, ...]] = {
    "latest": ("Pneumonia/Viral/SARS", "Pneumonia/Bacterial/Streptococcus", "No Finding", "todo"),
    "early": ("SARS", "Streptococcus", "No Finding", "ARDS"),
}
"""Findings of rows a COVID-vs-normal selection drops; "No Finding" ones look normal, the rest opaque."""
FRONTAL_VIEWS: tuple[str, ...] = ("PA", "AP", "AP Supine")
KERMANY_SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_KINDS: tuple[str, ...] = ("jpeg_rgb", "jpeg_gray", "png_rgb", "png_rgba")
"""Formats of the ieee8023 images, as in the real source: mostly RGB JPEG, some grayscale, some PNG."""

_LOCATIONS = ("Wuhan, China", "Milan, Italy", "Madrid, Spain", "Toronto, Canada", "Seoul, South Korea",
              "Tehran, Iran", "New York, USA", "")
_LICENSES = ("CC BY-NC-SA 4.0", "CC BY 4.0", "Apache 2.0", "")
_DATES = ("January {d}, 2020", "February {d}, 2020", "March {d}, 2020", "April {d}, 2020", "2020")
_NOTES = {
    True: ("Synthetic case. Patchy bilateral ground-glass opacities, predominantly in the lower zones.",
           'Synthetic case. Peripheral consolidation, "worse" than on the previous film.',
           "Synthetic case. Multifocal opacities in both lungs, left > right."),
    False: ("Synthetic case. Clear lungs, no focal consolidation.", "Synthetic case. No acute findings."),
}


@dataclass(frozen=True)
class SyntheticSources:
    """Where ``make_synthetic_sources`` wrote the two source layouts."""

    chest_xray: Path
    """The folder to pass as --chest-xray (contains chest_xray/...)."""
    covid_xray: Path
    """The folder to pass as --covid-xray (contains metadata.csv, images/)."""


@dataclass(frozen=True)
class _Anatomy:
    """One patient's body geometry, in image coordinates (x in [-1, 1] left to right, y in [0, 1] down)."""

    cx: float
    cy: float
    body_w: float
    lung_w: float
    lung_h: float
    lung_top: float
    lung_gap: float
    heart_w: float
    heart_shift: float
    rib_step: float
    rib_phase: float
    body_level: float
    lung_level: float
    spine_level: float


def _rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator per (seed, stream, index...), so no image depends on the others' draws."""
    return np.random.default_rng([int(seed), *(int(k) for k in keys)])


def _anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw a plausible body: sizes and grey levels vary per patient, not per class."""
    return _Anatomy(
        cx=float(rng.uniform(-0.14, 0.14)),
        cy=float(rng.uniform(-0.09, 0.09)),
        body_w=float(rng.uniform(0.72, 0.95)),
        lung_w=float(rng.uniform(0.27, 0.33)),
        lung_h=float(rng.uniform(0.27, 0.32)),
        lung_top=float(rng.uniform(0.13, 0.19)),
        lung_gap=float(rng.uniform(0.05, 0.09)),
        heart_w=float(rng.uniform(0.2, 0.27)),
        heart_shift=float(rng.uniform(0.04, 0.12)),
        rib_step=float(rng.uniform(0.065, 0.085)),
        rib_phase=float(rng.uniform(0.0, 1.0)),
        body_level=float(rng.uniform(0.5, 0.6)),
        lung_level=float(rng.uniform(0.13, 0.22)),
        spine_level=float(rng.uniform(0.72, 0.82)),
    )


def _follow_up(a: _Anatomy, rng: np.random.Generator) -> _Anatomy:
    """The same patient on another film: a slightly different position."""
    return dataclasses.replace(a, cx=a.cx + float(rng.uniform(-0.03, 0.03)),
                               cy=a.cy + float(rng.uniform(-0.02, 0.02)))


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) between 160 and 320 px, not all square."""
    h = int(rng.integers(170, 321))
    w = int(np.clip(round(h * rng.uniform(0.8, 1.25)), 160, 320))
    return h, w


def _grid(h: int, w: int, a: _Anatomy) -> tuple[np.ndarray, np.ndarray]:
    """Column (1, W) x and row (H, 1) y coordinates, centred on the patient."""
    y = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None] - a.cy
    x = ((np.arange(w, dtype=np.float32) + 0.5) / w * 2.0 - 1.0)[None, :] - a.cx
    return x, y


def _ellipse(dx: Any, dy: Any, ax: Any, ay: Any, edge: float = 0.12) -> np.ndarray:
    """A filled ellipse with a soft rim, 1 inside and 0 outside."""
    r = (dx / ax) ** 2 + (dy / ay) ** 2
    return np.clip((1.0 - r) / edge, 0.0, 1.0).astype(np.float32)


def _lowfreq(rng: np.random.Generator, h: int, w: int, cells: int = 7) -> np.ndarray:
    """Smooth random texture in [0, 1]: a coarse random grid, upsampled bicubically."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    up = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip(up, 0.0, 1.0)


def _blobs(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, centres: Iterable[tuple[float, float]],
           ) -> np.ndarray:
    """A sum of random elliptic Gaussian blobs at ``centres`` (separable, so cheap)."""
    out = np.zeros((y.shape[0], x.shape[1]), dtype=np.float32)
    for bx, by in centres:
        sx = rng.uniform(0.06, 0.13)
        sy = sx * rng.uniform(0.45, 0.7)
        amp = rng.uniform(0.6, 1.0)
        out += amp * np.exp(-0.5 * ((y - by) / sy) ** 2) * np.exp(-0.5 * ((x - bx) / sx) ** 2)
    return out


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Exposure jitter, a possible side marker, blur and noise; returns uint8."""
    h, w = img.shape
    if rng.random() < 0.5:  # a bright lead marker in an upper corner, in both classes
        r0, mh, mw = int(0.04 * h), max(3, int(0.05 * h)), max(3, int(0.04 * w))
        c0 = int(0.05 * w) if rng.random() < 0.5 else w - int(0.05 * w) - mw
        img[r0:r0 + mh, c0:c0 + mw] = 0.92
    img = (img - 0.4) * rng.uniform(0.88, 1.12) + 0.4 + rng.uniform(-0.04, 0.04)
    u8 = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    radius = float(rng.uniform(0.6, 1.4)) * min(h, w) / 160.0
    blurred = np.asarray(Image.fromarray(u8).filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    noisy = blurred + rng.normal(0.0, rng.uniform(2.5, 6.0), size=(h, w)).astype(np.float32)
    return np.clip(noisy + 0.5, 0, 255).astype(np.uint8)


def _render(rng: np.random.Generator, a: _Anatomy, *, covid: bool, size: tuple[int, int]) -> np.ndarray:
    """A frontal (PA/AP) chest radiograph of patient ``a``; ``covid`` adds lower, peripheral opacities."""
    h, w = size
    x, y = _grid(h, w, a)
    ax = np.abs(x)
    body = np.maximum(_ellipse(x, y - 0.6, a.body_w, 0.58), _ellipse(x, y - 0.2, a.body_w * 1.08, 0.12))
    body = np.maximum(body, ((ax < 0.15) & (y < 0.25)).astype(np.float32))
    t = np.clip((y - a.lung_top) / (2 * a.lung_h), 0.0, 1.0)
    half_w = a.lung_w * (0.6 + 0.4 * np.sqrt(t))  # narrow apex, broad base
    lung_cx, lung_cy = a.lung_gap + a.lung_w, a.lung_top + a.lung_h
    lungs = _ellipse(ax - lung_cx, y - lung_cy, half_w, a.lung_h)
    heart = _ellipse(x - a.heart_shift, y - (lung_cy + 0.6 * a.lung_h), a.heart_w, 0.16)
    spine = np.clip((0.075 - ax) / 0.02, 0.0, 1.0) * body
    field = lungs * (1.0 - heart) * (1.0 - spine)
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * ((y - 0.35 * x**2) / a.rib_step + a.rib_phase))) ** 6
    texture = _lowfreq(rng, h, w, cells=9)

    bg = 0.04
    img = bg + (a.body_level - bg) * body
    img = img * (1.0 - field) + a.lung_level * field
    img += (0.1 * ribs + 0.05 * (texture - 0.5)) * field + 0.06 * heart * body
    img = np.maximum(img, a.spine_level * spine)
    img += 0.08 * (_lowfreq(rng, h, w, cells=5) - 0.5) * body  # soft tissue and positioning, per film
    if covid:
        centres = []
        for side in (-1.0, 1.0):  # bilateral
            for _ in range(int(rng.integers(2, 5))):
                v = rng.uniform(0.45, 0.95)  # fraction down the lung: lower zones
                u = rng.uniform(-0.2, 0.9)  # fraction outward from the lung's axis: periphery
                centres.append((side * (lung_cx + u * a.lung_w * 0.8), a.lung_top + v * 2 * a.lung_h))
        patchy = 0.55 + 0.45 * _lowfreq(rng, h, w, cells=8)
        opacity = np.clip(_blobs(rng, x, y, centres), 0.0, 1.2) * patchy
        img += rng.uniform(0.35, 0.55) * opacity * lungs * (1.0 - 0.5 * heart)
    return _finish(rng, img.astype(np.float32))


def _render_lateral(rng: np.random.Generator, a: _Anatomy, *, covid: bool,
                    size: tuple[int, int]) -> np.ndarray:
    """A lateral (L) view: one lung field, spine at the back, heart in front."""
    h, w = size
    x, y = _grid(h, w, a)
    body = _ellipse(x, y - 0.58, a.body_w * 0.95, 0.58)
    lung_cy = a.lung_top + a.lung_h
    lung = _ellipse(x + 0.05, y - lung_cy, 0.5, a.lung_h * 1.05)
    heart = _ellipse(x + 0.32, y - (lung_cy + 0.5 * a.lung_h), 0.26, 0.17)
    spine = np.clip((0.07 - np.abs(x - 0.55)) / 0.02, 0.0, 1.0) * body
    field = lung * (1.0 - heart) * (1.0 - spine)
    img = 0.04 + (a.body_level - 0.04) * body
    img = img * (1.0 - field) + (a.lung_level + 0.05) * field + 0.06 * heart * body
    img = np.maximum(img, a.spine_level * spine)
    if covid:
        centres = [(float(rng.uniform(-0.1, 0.4)), a.lung_top + float(rng.uniform(0.9, 1.8)) * a.lung_h)
                   for _ in range(int(rng.integers(2, 5)))]
        img += rng.uniform(0.3, 0.5) * np.clip(_blobs(rng, x, y, centres), 0.0, 1.2) * lung
    return _finish(rng, img.astype(np.float32))


def _ct_volume(rng: np.random.Generator, *, covid: bool, n: int = 64, depth: int = 6) -> np.ndarray:
    """A small axial CT stack (n, n, depth), uint8: body, two dark lungs, spine, heart, peripheral GGO."""
    c = (np.arange(n, dtype=np.float32) + 0.5) / n * 2.0 - 1.0
    x, y = c[None, :], c[:, None]
    vol = np.zeros((n, n, depth), dtype=np.uint8)
    for k in range(depth):
        s = 0.7 + 0.3 * np.sin(np.pi * (k + 0.5) / depth)
        body = _ellipse(x, y, 0.9, 0.65)
        lungs = _ellipse(np.abs(x) - 0.42, y + 0.05, 0.33 * s, 0.45 * s)
        spine = _ellipse(x, y - 0.5, 0.12, 0.12)
        heart = _ellipse(x - 0.1, y + 0.1, 0.25, 0.25) * (k >= depth // 2)
        img = 0.45 * body * (1.0 - lungs) + 0.05 * lungs
        img = np.maximum(img, np.maximum(0.9 * spine, 0.5 * heart))
        if covid:
            centres = [(float(rng.choice([-1.0, 1.0]) * rng.uniform(0.55, 0.7)),
                        float(rng.uniform(-0.3, 0.3))) for _ in range(int(rng.integers(1, 4)))]
            img += 0.3 * np.clip(_blobs(rng, x, y, centres), 0.0, 1.0) * lungs
        img += rng.normal(0.0, 0.02, size=img.shape)
        vol[:, :, k] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8).T
    return vol


def _nifti_gz(vol: np.ndarray) -> bytes:
    """A minimal gzipped NIfTI-1 file (uint8, x fastest), byte-stable: gzip mtime 0, no file name."""
    hdr = bytearray(352)
    struct.pack_into("<i", hdr, 0, 348)
    hdr[38] = ord("r")
    struct.pack_into("<8h", hdr, 40, 3, *vol.shape, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 2, 8)  # datatype DT_UINT8, bitpix
    struct.pack_into("<8f", hdr, 76, 1.0, 0.7, 0.7, 5.0, 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<ff", hdr, 108, 352.0, 1.0)  # vox_offset, scl_slope
    hdr[123] = 10  # xyzt_units: mm, s
    hdr[148:148 + 19] = b"covidxray synthetic"
    hdr[344:348] = b"n+1\0"
    return gzip.compress(bytes(hdr) + vol.tobytes(order="F"), compresslevel=6, mtime=0)


def chest_image(rng: np.random.Generator, *, covid: bool, size: tuple[int, int]) -> np.ndarray:
    """One uint8 grayscale (H, W) chest-like image, ``size`` = (height, width); ``covid`` adds opacities."""
    h, w = (int(v) for v in size)
    if h < 16 or w < 16:
        raise ValueError(f"size {size}: both sides must be at least 16 px")
    return _render(rng, _anatomy(rng), covid=covid, size=(h, w))


def _save(path: Path, gray: np.ndarray, kind: str, rng: np.random.Generator | None = None) -> None:
    """Write ``gray`` as one of ``IMAGE_KINDS`` or ``png_gray``; RGB ones get a faint tint, like journal figures."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "jpeg_gray":
        Image.fromarray(gray).save(path, format="JPEG", quality=90)
        return
    if kind == "png_gray":
        Image.fromarray(gray).save(path, format="PNG")
        return
    tint = rng.uniform(0.94, 1.0, size=3) if rng is not None else np.ones(3)
    rgb = np.clip(gray[..., None].astype(np.float32) * tint + 0.5, 0, 255).astype(np.uint8)
    if kind == "jpeg_rgb":
        Image.fromarray(rgb).save(path, format="JPEG", quality=90)
    elif kind == "png_rgb":
        Image.fromarray(rgb).save(path, format="PNG")
    elif kind == "png_rgba":
        alpha = np.full(gray.shape + (1,), 255, dtype=np.uint8)
        Image.fromarray(np.concatenate([rgb, alpha], axis=-1)).save(path, format="PNG")
    else:
        raise ValueError(f"unknown image kind {kind!r}")


def _kinds(rng: np.random.Generator, n: int) -> list[str]:
    """``n`` image kinds in the real mix (about 60 % RGB JPEG), each kind present once n >= 4, shuffled."""
    n_rgba = max(1, n // 10)
    n_png, n_gray = max(1, n // 8), max(1, n // 7)
    kinds = ["png_rgba"] * n_rgba + ["png_rgb"] * n_png + ["jpeg_gray"] * n_gray
    kinds = (kinds + ["jpeg_rgb"] * max(0, n - len(kinds)))[:n]
    if n >= 4 and "jpeg_rgb" not in kinds:
        kinds[-1] = "jpeg_rgb"
    return [kinds[i] for i in rng.permutation(n)]


def _ext(rng: np.random.Generator, kind: str) -> str:
    """A file extension for ``kind``, mixing .jpeg and .jpg like the real source."""
    if kind.startswith("png"):
        return ".png"
    return ".jpeg" if rng.random() < 0.6 else ".jpg"


@contextlib.contextmanager
def _written(folder: Path) -> Iterator[Path]:
    """A staging folder for ``folder``'s new content (claimed through covidxray.outputs: a folder holding files
    this package did not write is refused, a rerun replaces only what an earlier run wrote), marked synthetic."""
    with staged_output(folder, "synthetic", flag="root") as stage:
        (stage / MARKER_NAME).write_text(_MARKER_TEXT, encoding="utf-8")
        yield stage


def is_synthetic(folder: str | Path) -> bool:
    """True when ``folder`` was written by this module (it holds the marker file)."""
    return (Path(folder) / MARKER_NAME).is_file()


def _split_counts(n: int, test_fraction: float, val_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) group counts: at least one test group from 2 on, one val group from 3 on."""
    n_test = max(1, round(n * test_fraction)) if n >= 2 else 0
    n_val = max(1, round(n * val_fraction)) if n >= 3 and val_fraction > 0 else 0
    return n - n_test - n_val, n_val, n_test


def _normal_names(rng: np.random.Generator, n: int) -> list[str]:
    """Distinct Kermany normal patient stems: ``IM-0115`` or ``NORMAL2-IM-1427`` (unique numbers)."""
    numbers = rng.choice(np.arange(1, max(1500, 2 * n + 100)), size=n, replace=False)
    return [("NORMAL2-IM-" if rng.random() < 0.4 else "IM-") + f"{int(k):04d}" for k in numbers]


def _write_kermany(folder: Path, n_patients: int, seed: int) -> None:
    """Kermany/Kaggle layout: normal patients (1-2 films each, one split per patient) and a few pneumonia."""
    rng = _rng(seed, 1, 0)
    stems = _normal_names(rng, n_patients)
    n_imgs = rng.choice([1, 2], size=n_patients, p=[0.75, 0.25])
    n_train, n_val, _ = _split_counts(n_patients, 0.2, 0.07)
    order = rng.permutation(n_patients)
    splits = ["train"] * n_patients
    for rank, i in enumerate(order):
        splits[i] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    base = folder / "chest_xray"
    for split in KERMANY_SPLITS:  # all six class folders exist, even when a split gets no patient
        for cls in ("NORMAL", "PNEUMONIA"):
            (base / split / cls).mkdir(parents=True, exist_ok=True)
    for i, stem in enumerate(stems):
        prng = _rng(seed, 1, 1, i)
        anatomy = _anatomy(prng)
        size = _size(prng)
        for k in range(int(n_imgs[i])):
            irng = _rng(seed, 1, 2, i, k)
            a = anatomy if k == 0 else _follow_up(anatomy, irng)
            img = _render(irng, a, covid=False, size=size)
            _save(base / splits[i] / "NORMAL" / f"{stem}-{k + 1:04d}.jpeg", img, "jpeg_gray")
    person = 0
    for s, split in enumerate(KERMANY_SPLITS):
        for j in range(2):
            person += 1 + int(rng.integers(0, 40))
            irng = _rng(seed, 2, s, j)
            kind = "bacteria" if j % 2 == 0 else "virus"
            img = _render(irng, _anatomy(irng), covid=True, size=_size(irng))
            name = f"person{person}_{kind}_{s * 10 + j + 1}.jpeg"
            _save(base / split / "PNEUMONIA" / name, img, "jpeg_gray")


def _maybe(rng: np.random.Generator, value: object, p_blank: float = 0.5) -> str:
    """``value`` as text, or blank with probability ``p_blank`` (the real metadata is sparse)."""
    return "" if rng.random() < p_blank else str(value)


def _yn(rng: np.random.Generator, p_blank: float = 0.5) -> str:
    """A Y/N clinical flag, often blank."""
    return _maybe(rng, "Y" if rng.random() < 0.5 else "N", p_blank)


def _stem(rng: np.random.Generator, pattern: int, pid: int, k: int, offset: str, view: str) -> str:
    """A file name stem in one of the real source's naming styles (UUIDs, case names, figure names)."""
    tag = {"AP Supine": "APS"}.get(view, view)
    if pattern == 0:
        h = "".join(f"{int(b):02X}" for b in rng.integers(0, 256, size=16))
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    if pattern == 1:
        return f"covid-19-pneumonia-{pid}" + (f"-day{offset}" if offset else "") + f"-{tag}"
    if pattern == 2:
        return f"synthetic-{pid:04d}-fig{k + 1}{'abcdefgh'[k % 8]}-{tag}"
    return f"{pid}-{offset or 'x'}-{k}-{tag}"


def _write_ieee8023(folder: Path, n_covid: int, schema: str, seed: int) -> None:
    """ieee8023 layout: metadata.csv (real schema) + images/ + volumes/, with rows a selection must drop."""
    rng = _rng(seed, 3, 0)
    columns = SCHEMAS[schema]
    others = OTHER_FINDINGS[schema]
    n_other = max(4, n_covid // 4)
    patients = [COVID_FINDING[schema]] * n_covid + [others[i % len(others)] for i in range(n_other)]
    n_lateral, n_ct = max(1, n_covid // 6), max(1, n_covid // 10)
    lateral = set(rng.choice(n_covid, size=min(n_lateral, n_covid), replace=False).tolist())
    ct = set(rng.choice(n_covid, size=min(n_ct, n_covid), replace=False).tolist())

    rows: list[dict[str, str]] = []
    specs: list[tuple[str, _Anatomy, bool, int]] = []  # (what, anatomy, opaque, pattern) per row
    pid = 0
    for p in rng.permutation(len(patients)).tolist():
        finding = patients[p]
        is_covid = p < n_covid
        opaque = is_covid or finding not in ("No Finding", "todo")
        opaque = opaque or (finding == "todo" and rng.random() < 0.5)
        pid += 1 + int(rng.integers(0, 3))
        anatomy = _anatomy(_rng(seed, 3, 2, p))
        pattern = int(rng.integers(0, 4))
        n_img = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2])) if is_covid else int(rng.choice([1, 2]))
        offsets = np.cumsum([int(rng.integers(0, 10))] + [int(rng.integers(1, 8)) for _ in range(n_img - 1)])
        blank_offset = n_img == 1 and rng.random() < 0.1
        patient = {
            "patientid": str(pid), "sex": "M" if rng.random() < 0.55 else "F",
            "age": str(int(rng.integers(25, 86))), "finding": finding, "survival": _yn(rng),
            "intubated": _yn(rng), "intubation_present": _yn(rng, 0.7),
            "went_icu": _yn(rng), "in_icu": _yn(rng, 0.7), "needed_supplemental_O2": _yn(rng, 0.7),
            "extubated": _yn(rng, 0.8), "temperature": _maybe(rng, round(float(rng.uniform(36.5, 40.0)), 1)),
            "pO2_saturation": _maybe(rng, int(rng.integers(75, 100))),
            "leukocyte_count": _maybe(rng, round(float(rng.uniform(2.0, 15.0)), 2), 0.7),
            "neutrophil_count": _maybe(rng, round(float(rng.uniform(1.0, 12.0)), 2), 0.7),
            "lymphocyte_count": _maybe(rng, round(float(rng.uniform(0.3, 3.0)), 2), 0.7),
            "location": _LOCATIONS[int(rng.integers(len(_LOCATIONS)))],
            "doi": f"10.5555/synthetic.{pid:04d}" if rng.random() < 0.6 else "",
            "url": f"https://example.org/synthetic-covid-cases/{pid}",
            "license": _LICENSES[int(rng.integers(len(_LICENSES)))],
            "clinical_notes": _maybe(rng, _NOTES[opaque][int(rng.integers(len(_NOTES[opaque])))], 0.3),
            "other_notes": "procedurally generated by covidxray.data.synthetic",
        }
        if schema == "latest":
            pcr = rng.choice(["Y", "Unclear", ""], p=[0.8, 0.1, 0.1]) if is_covid else ""
            patient["RT_PCR_positive"] = str(pcr)
        if finding.endswith("SARS"):
            dates = ["2003", "2004"]
        else:
            dates = [_DATES[int(rng.integers(len(_DATES)))].format(d=int(rng.integers(1, 29)))
                     for _ in offsets]
        for k, off in enumerate(offsets.tolist()):
            offset = "" if blank_offset else str(off)
            view = FRONTAL_VIEWS[int(rng.choice(3, p=[0.5, 0.3, 0.2]))]
            row = {**patient, "offset": offset, "view": view, "modality": "X-ray",
                   "date": dates[k % len(dates)], "folder": "images",
                   "filename": _stem(rng, pattern, pid, k, offset, view)}
            rows.append(row)
            specs.append(("frontal", anatomy if k == 0 else _follow_up(anatomy, rng), opaque, p))
            if k == 0 and p in lateral:
                rows.append({**row, "view": "L", "filename": _stem(rng, pattern, pid, k, offset, "L")})
                specs.append(("lateral", anatomy, opaque, p))
        if p in ct:
            rows.append({**patient, "offset": str(int(offsets[-1])), "view": "Axial", "modality": "CT",
                         "date": dates[-1], "folder": "volumes", "filename": f"synthetic-ct-{pid:04d}"})
            specs.append(("ct", anatomy, opaque, p))

    xray = [i for i, s in enumerate(specs) if s[0] != "ct"]
    kinds = dict(zip(xray, _kinds(rng, len(xray)), strict=True))
    seen: set[str] = set()
    for i, row in enumerate(rows):
        name = row["filename"] + (".nii.gz" if specs[i][0] == "ct" else _ext(rng, kinds[i]))
        while name in seen:
            name = name.replace(".", "-b.", 1)
        seen.add(name)
        row["filename"] = name

    for i, (row, (what, anatomy, opaque, _)) in enumerate(zip(rows, specs, strict=True)):
        irng = _rng(seed, 3, 1, i)
        path = folder / row["folder"] / row["filename"]
        if what == "ct":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_nifti_gz(_ct_volume(irng, covid=opaque)))
            continue
        render = _render if what == "frontal" else _render_lateral
        _save(path, render(irng, anatomy, covid=opaque, size=_size(irng)), kinds[i], irng)

    with (folder / "metadata.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow([*columns, ""])
        for row in rows:
            writer.writerow([row.get(c, "") for c in columns] + [""])


def make_synthetic_sources(root: str | Path, *, n_normal_patients: int = 60, n_covid_patients: int = 40,
                           schema: str = "latest", seed: int = 0) -> SyntheticSources:
    """Write both source layouts under root/Chest_XRAY and root/Covid_XRAY; idempotent.

    A rerun overwrites with identical bytes and removes files a previous run left.

    ``n_normal_patients`` distinct Kermany patients (about a quarter with two films), ``n_covid_patients``
    distinct ieee8023 patients with COVID-19 frontal X-rays (1-3 each), plus rows a default selection must
    drop (lateral views, CT volumes, other findings) and a few Kermany pneumonia films. Folders holding
    other data (no marker file) are never touched: a ``DataError`` says so.
    """
    if schema not in SCHEMAS:
        raise ValueError(f"unknown schema {schema!r}; use one of {sorted(SCHEMAS)}")
    if n_normal_patients < 1 or n_covid_patients < 1:
        raise ValueError("n_normal_patients and n_covid_patients must be at least 1")
    root = Path(root)
    chest, covid = root / CHEST_XRAY_DIR, root / COVID_XRAY_DIR
    children = (CHEST_XRAY_DIR.name, COVID_XRAY_DIR.name)
    with claim_output(root, "synthetic", flag="root", children=children), _written(chest) as chest_stage, \
            _written(covid) as covid_stage:
        _write_kermany(chest_stage, n_normal_patients, seed)
        _write_ieee8023(covid_stage, n_covid_patients, schema, seed)
    return SyntheticSources(chest_xray=chest, covid_xray=covid)


def make_synthetic_presplit(root: str | Path, *, n_per_class: int = 30, test_fraction: float = 0.2,
                            seed: int = 0) -> Path:
    """Write an original-project style pre-split folder root/{train,test}/{Covid,Normal}/; returns root.

    The layout of the 2020 project's Dataset/. Normal images are grayscale JPEGs with Kermany names; Covid
    ones mix formats with ieee8023-like names. ``test_fraction`` of each class goes to test/.
    """
    if n_per_class < 2:
        raise ValueError("n_per_class must be at least 2 (one train and one test image per class)")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction {test_fraction}: must be between 0 and 1")
    root = Path(root)
    with _written(root) as stage:
        n_train = max(1, _split_counts(n_per_class, test_fraction, 0.0)[0])
        rng = _rng(seed, 4, 0)
        normal_stems = _normal_names(rng, n_per_class)
        covid_kinds = _kinds(rng, n_per_class)
        for c, cls in enumerate(("Normal", "Covid")):
            test_idx = set(rng.permutation(n_per_class)[: n_per_class - n_train].tolist())
            for i in range(n_per_class):
                irng = _rng(seed, 4, 1 + c, i)
                img = chest_image(irng, covid=cls == "Covid", size=_size(irng))
                split = "test" if i in test_idx else "train"
                if cls == "Normal":
                    name, kind = f"{normal_stems[i]}-0001.jpeg", "jpeg_gray"
                else:
                    kind = covid_kinds[i]
                    name = _stem(irng, i % 4, 1000 + i, 0, str(i % 9), "PA") + _ext(irng, kind)
                _save(stage / split / cls / name, img, kind, irng)
    return root


NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
              "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
"""The NIH label list's header as written (unquoted column names with commas: a CSV reader sees 11 columns)."""
NIH_FINDINGS: tuple[str, ...] = ("Atelectasis", "Effusion", "Infiltration", "Cardiomegaly|Effusion", "Nodule")
PLANTS: tuple[str, ...] = ("format", "size", "age")
"""Differences ``make_synthetic_labeled`` can plant in the COVID class."""


def make_synthetic_nih(root: str | Path, n_patients: int = 30, seed: int = 0, *, size: int = 128) -> Path:
    """Write an NIH ChestX-ray14 layout under ``root`` (``Data_Entry_2017.csv`` + ``images/*.png``); returns root.

    Patient ``i`` (NIH id ``1000 + 7 i``) has ``1 + i % 3`` films (follow-ups 0, 1, 2); the second film of a
    patient has a finding, all others are 'No Finding'. Every fifth patient (``i % 5 == 4``) is a child
    (3-16 years), the others adults (18-77). Films alternate PA and AP. Images are 8-bit grayscale PNGs of
    ``size`` x ``size`` px, like NIH's 1024 x 1024 ones; idempotent (byte-identical on rerun).
    """
    if n_patients < 1:
        raise ValueError("n_patients must be at least 1")
    root = Path(root)
    with _written(root) as stage:
        lines = [NIH_HEADER]
        for i in range(n_patients):
            pid = 1000 + 7 * i
            age = 3 + i % 14 if i % 5 == 4 else 18 + (i * 13) % 60
            sex = "F" if i % 2 == 0 else "M"
            prng = _rng(seed, 5, i)
            anatomy = _anatomy(prng)
            for k in range(1 + i % 3):
                finding = NIH_FINDINGS[i % len(NIH_FINDINGS)] if k == 1 else "No Finding"
                view = "PA" if (i + k) % 2 == 0 else "AP"
                name = f"{pid:08d}_{k:03d}.png"
                irng = _rng(seed, 5, i, k)
                img = _render(irng, anatomy if k == 0 else _follow_up(anatomy, irng), covid=finding != "No Finding",
                              size=(size, size))
                _save(stage / "images" / name, img, "png_gray")
                lines.append(f"{name},{finding},{k},{pid},{age},{sex},{view},2500,2048,0.143,0.143")
        (stage / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def make_synthetic_labeled(root: str | Path, *, n_per_class: int = 20, seed: int = 0,
                           plant: Iterable[str] = ()) -> Path:
    """Write a generic labeled set, ``root/labels.csv`` + ``root/images/``; returns the CSV's path.

    Both classes come from one source (``synthetic``), with the same ages, sexes, views and image sizes, as
    8-bit grayscale PNGs: a design with nothing to read but the (synthetic) disease. ``plant`` adds
    differences to the COVID class: ``format`` (RGB JPEG instead of grayscale PNG), ``size`` (half the width
    and height), ``age`` (30 years older).
    """
    plant = tuple(plant)
    unknown = sorted(set(plant) - set(PLANTS))
    if unknown:
        raise ValueError(f"unknown plant(s) {unknown}; use any of {list(PLANTS)}")
    if n_per_class < 1:
        raise ValueError("n_per_class must be at least 1")
    root = Path(root)
    with _written(root) as stage:
        rows = []
        for label in ("normal", "covid"):
            covid = label == "covid"
            for i in range(n_per_class):
                h, w = _size(_rng(seed, 6, i))
                age = 25 + (i * 17) % 55
                kind = "png_gray"
                if covid and "size" in plant:
                    h, w = h // 2, w // 2
                if covid and "age" in plant:
                    age += 30
                if covid and "format" in plant:
                    kind = "jpeg_rgb"
                irng = _rng(seed, 6, 1 + covid, i)
                rel = f"images/{label}-{i:03d}" + (".jpeg" if kind.startswith("jpeg") else ".png")
                _save(stage / rel, _render(irng, _anatomy(irng), covid=covid, size=(h, w)), kind, irng)
                rows.append({"path": rel, "label": label, "patient_id": f"{label}-{i:03d}", "source": "synthetic",
                             "age": str(age), "sex": "F" if i % 2 == 0 else "M", "view": "PA" if i % 2 == 0 else "AP"})
        with (stage / "labels.csv").open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    return root / "labels.csv"
