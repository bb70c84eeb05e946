"""Fuzz tests: random bytes and random valid-but-odd files through the image loader and the metadata reader.

Only the documented errors may come out: :class:`ImageError` from ``check_image`` and :class:`DataError` from
``read_metadata``; anything else (a Pillow, numpy or pandas exception) is a bug.
"""

from __future__ import annotations

import io
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from covidxray.data.images import CheckedImage, check_image
from covidxray.data.sources.ieee8023 import REQUIRED_COLUMNS, read_metadata
from covidxray.errors import DataError, ImageError

FUZZ = settings(max_examples=int(os.environ.get("COVIDXRAY_FUZZ_EXAMPLES", "150")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
"""150 examples per test by default; COVIDXRAY_FUZZ_EXAMPLES=5000 for a long run."""

_HEADERS = (b"", b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
"""Real magic numbers, so random tails get past format detection into the decoders."""


def _write(data: bytes, suffix: str) -> Path:
    fd, name = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return Path(name)


def _check(data: bytes, suffix: str = ".jpeg", **kwargs) -> CheckedImage | None:
    path = _write(data, suffix)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return check_image(path, **kwargs)
    except ImageError as exc:
        assert exc.path == str(path) and exc.reason
        return None
    finally:
        path.unlink()


@FUZZ
@given(head=st.sampled_from(_HEADERS), tail=st.binary(max_size=2048))
def test_random_bytes_give_image_error_only(head, tail):
    _check(head + tail)


_MUTABLE = {}


def _valid(fmt: str, mode: str) -> bytes:
    """A small valid image, cached per (format, mode) to keep the mutation test fast."""
    key = (fmt, mode)
    if key not in _MUTABLE:
        rng = np.random.default_rng(0)
        img = Image.fromarray((rng.random((48, 40)) * 255).astype(np.uint8), mode="L").convert(mode)
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        _MUTABLE[key] = buf.getvalue()
    return _MUTABLE[key]


@FUZZ
@given(kind=st.sampled_from([("JPEG", "L"), ("JPEG", "RGB"), ("PNG", "L"), ("PNG", "RGBA"), ("PNG", "P"),
                             ("GIF", "P"), ("BMP", "RGB"), ("TIFF", "L"), ("WEBP", "RGB")]),
       data=st.data())
def test_mutated_valid_files_give_image_error_only(kind, data):
    raw = bytearray(_valid(*kind))
    cut = data.draw(st.integers(0, len(raw)), label="cut")
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=8),
                      label="flips")
    for pos, value in flips:
        raw[pos] = value
    _check(bytes(raw[:cut] if data.draw(st.booleans(), label="truncate") else raw))


_SAVE_MODES = {
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
    "JPEG": ("L", "RGB", "CMYK"),
    "TIFF": ("1", "L", "LA", "RGB", "RGBA", "CMYK", "I;16", "I", "F"),
    "BMP": ("1", "L", "P", "RGB"),
    "GIF": ("L", "P"),
    "WEBP": ("RGB", "RGBA"),
}


@st.composite
def odd_images(draw) -> tuple[bytes, str, tuple[int, int]]:
    """A valid image file of a random format, mode, size, content and EXIF orientation."""
    fmt = draw(st.sampled_from(sorted(_SAVE_MODES)))
    mode = draw(st.sampled_from(_SAVE_MODES[fmt]))
    w, h = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    kind = draw(st.sampled_from(["noise", "constant", "gradient", "extremes"]))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    if kind == "noise":
        arr = rng.random((h, w))
    elif kind == "constant":
        arr = np.full((h, w), rng.random())
    elif kind == "gradient":
        arr = np.tile(np.linspace(0.0, 1.0, w), (h, 1))
    else:
        arr = rng.integers(0, 2, size=(h, w)).astype(np.float64)
    if mode in ("I;16", "I"):
        img = Image.fromarray((arr * draw(st.sampled_from([1, 4095, 65535]))).astype(np.uint16))
        img = img if mode == "I;16" else img.convert("I")
    elif mode == "F":
        values = (arr * draw(st.sampled_from([1.0, 1e6, -3.5]))).astype(np.float32)
        if draw(st.booleans()):
            values.flat[rng.integers(0, values.size, size=3)] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        img = Image.fromarray(values)
    else:
        img = Image.fromarray((arr * 255).astype(np.uint8), mode="L").convert(mode)
    save: dict = {}
    if fmt in ("JPEG", "PNG", "TIFF", "WEBP") and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 9))
        save["exif"] = exif
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue(), fmt, (w, h)


@FUZZ
@given(case=odd_images(), min_side=st.sampled_from([1, 8, 32]))
def test_valid_odd_images_decode_or_give_image_error(case, min_side):
    data, fmt, (w, h) = case
    info = _check(data, "." + fmt.lower(), min_side=min_side)
    if info is None:
        return
    assert {info.width, info.height} == {w, h}, "size after EXIF orientation is the original size, maybe turned"
    assert min(info.width, info.height) >= min_side
    assert len(info.dhash) == 32
    if info.normalized_png is not None:
        with Image.open(io.BytesIO(info.normalized_png)) as norm:
            assert norm.mode == "L" and norm.size == (info.width, info.height)


_COLUMNS = (*REQUIRED_COLUMNS, "sex", "age", "modality", "folder", "notes", "")
_CELL = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)


@st.composite
def metadata_texts(draw) -> bytes:
    """A CSV-like file: a random subset of the real columns, random cells, quoting, encodings and line ends."""
    columns = draw(st.lists(st.sampled_from(_COLUMNS), max_size=len(_COLUMNS)))
    rows = draw(st.lists(st.lists(_CELL, min_size=len(columns), max_size=len(columns) + 2), max_size=6))
    sep = draw(st.sampled_from([",", ";", "\t"]))
    end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    quote = draw(st.booleans())

    def line(cells: list[str]) -> str:
        return sep.join('"' + c.replace('"', '""') + '"' if quote else c for c in cells)

    text = end.join([line(list(columns))] + [line(r) for r in rows])
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "cp1252", "utf-16"]))
    return text.encode(encoding, errors="replace")


def _read(data: bytes) -> None:
    path = _write(data, ".csv")
    try:
        df = read_metadata(path)
    except DataError as exc:
        assert str(path) in str(exc)
        return
    finally:
        path.unlink()
    assert set(REQUIRED_COLUMNS) <= set(df.columns)


@FUZZ
@given(data=st.binary(max_size=2048))
def test_metadata_reader_random_bytes(data):
    _read(data)


@FUZZ
@given(data=metadata_texts())
def test_metadata_reader_random_tables(data):
    _read(data)


@pytest.mark.parametrize("data", [
    b"",
    b"\x00\x00\x00",
    b'patientid,finding,view,filename\n"1,COVID-19,PA,a.jpeg\n',
    "patientid,finding,view,filename\n1,COVID-19,PA,\u00e9.jpeg\n".encode("utf-16"),
])
def test_metadata_reader_known_odd_inputs(data):
    _read(data)
