"""Image checks: every odd or broken file either decodes to a usable image or raises ImageError with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import write_image
from PIL import Image

from covidxray.data.images import check_image, is_junk, open_grayscale
from covidxray.errors import ImageError


@pytest.mark.parametrize("mode, fmt, ext, kept", [
    ("L", "JPEG", ".jpeg", True),
    ("RGB", "JPEG", ".jpg", True),
    ("RGBA", "PNG", ".png", True),
    ("P", "PNG", ".png", True),
    ("I;16", "PNG", ".png", False),
    ("CMYK", "JPEG", ".jpeg", False),
    ("L", "BMP", ".bmp", False),
])
def test_modes_and_formats(tmp_path, mode, fmt, ext, kept):
    path = write_image(tmp_path / f"x{ext}", mode=mode, fmt=fmt)
    info = check_image(path)
    assert (info.format, info.mode) == (fmt, mode)
    assert (info.normalized_png is None) == kept
    assert (info.width, info.height) == (96, 80)
    if not kept:
        norm = Image.open(io.BytesIO(info.normalized_png))
        assert norm.mode == "L" and norm.size == (96, 80)
        assert np.asarray(norm).std() > 10, "16-bit data is rescaled, not crushed to black"


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray((np.random.default_rng(0).random((40, 100)) * 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees
    path = tmp_path / "rot.jpeg"
    img.save(path, exif=exif)
    info = check_image(path)
    assert (info.width, info.height) == (40, 100)
    assert info.normalized_png is not None
    gray = open_grayscale(path)
    assert gray.mode == "L" and np.asarray(gray).shape == (100, 40)
    small = open_grayscale(path, max_side=25)
    assert small.mode == "L" and max(small.size) <= 25 and small.size[1] > small.size[0]


@pytest.mark.parametrize("make, reason", [
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_text("this is not an image"), "not an image"),
    (lambda p: p.write_bytes(write_image(p.with_suffix(".src.jpeg"), size=(200, 200)).read_bytes()[:400]),
     "truncated"),
    (lambda p: write_image(p, size=(1, 1)), "smaller than"),
    (lambda p: Image.new("L", (64, 64), 7).save(p, format="JPEG"), "blank image"),
])
def test_bad_files_are_refused_with_a_reason(tmp_path, make, reason):
    path = tmp_path / "bad.jpeg"
    make(path)
    with pytest.raises(ImageError, match=reason) as info:
        check_image(path)
    assert info.value.path == str(path)


@pytest.mark.parametrize("make", [
    lambda p: p.write_bytes(b""),
    lambda p: p.write_text("this is not an image"),
    lambda p: p.write_bytes(write_image(p.with_suffix(".src.png"), size=(300, 300)).read_bytes()[:500]),
    lambda p: None,  # no file at all
])
def test_open_grayscale_names_the_unreadable_file(tmp_path, make):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageError, match=r"bad\.png: cannot be read as an image .*covidxray data") as info:
        open_grayscale(path)
    assert info.value.path == str(path)


def test_truncated_png(tmp_path):
    src = write_image(tmp_path / "ok.png", size=(300, 300))
    bad = tmp_path / "bad.png"
    bad.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        check_image(bad)


def test_oversized_image_is_refused_before_decoding(tmp_path):
    path = write_image(tmp_path / "big.png", size=(400, 300))
    with pytest.raises(ImageError, match="over the limit"):
        check_image(path, max_pixels=100_000)


def test_junk_names():
    from pathlib import Path

    assert is_junk(Path("__MACOSX/chest_xray/x.jpeg"))
    assert is_junk(Path("a/._x.jpeg"))
    assert is_junk(Path("a/.DS_Store"))
    assert is_junk(Path("a/Thumbs.db"))
    assert not is_junk(Path("a/IM-0001-0001.jpeg"))


def test_difference_hash_is_stable_under_recompression(tmp_path):
    a = write_image(tmp_path / "a.png", size=(256, 256))
    Image.open(a).convert("L").resize((200, 200)).save(tmp_path / "b.jpeg", quality=80)
    ha, hb = check_image(a).dhash, check_image(tmp_path / "b.jpeg").dhash
    distance = sum(bin(x ^ y).count("1") for x, y in zip(ha, hb, strict=True))
    assert len(ha) == 32 and distance <= 40
