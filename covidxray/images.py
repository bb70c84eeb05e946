"""Decode and check one source image: the single place where raw files from the public sources are read.

Every image is decoded once here. Files that cannot be used raise :class:`ImageError` with the reason, so the
dataset build can skip and list them instead of crashing. Files TensorFlow decodes exactly as they are
(8-bit JPEG/PNG in L, RGB, RGBA, LA or P mode, upright) are kept byte for byte; all others (16-bit, CMYK,
EXIF-rotated, other formats) are normalised to an 8-bit grayscale PNG.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from covidxray.errors import ImageError

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"})
"""Extensions the source readers pick up; anything else is ignored."""
JUNK_NAMES: frozenset[str] = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
DEFAULT_MAX_PIXELS = 50_000_000
"""Larger images are refused before decoding (the largest real source image is about 17.5 MP)."""
DEFAULT_MIN_SIDE = 32
"""Smaller images carry no usable anatomy (a 1x1 file is refused)."""
MAX_FILE_BYTES = 200 * 1024 * 1024

_KEEP_FORMATS = {"JPEG", "PNG"}
_KEEP_MODES = {"L", "RGB", "RGBA", "LA", "P"}


@dataclass(frozen=True)
class CheckedImage:
    """What the dataset build needs to know about one decoded source image."""

    sha256: str
    """Of the source file's bytes."""
    format: str
    mode: str
    width: int
    height: int
    """Size after EXIF orientation."""
    dhash: bytes
    """256-bit difference hash of the grayscale image, for near-duplicate detection."""
    normalized_png: bytes | None
    """Re-encoded 8-bit grayscale PNG when the file cannot be used as is; None when the bytes are kept."""


def is_junk(path: Path) -> bool:
    """True for OS and archive litter: ``__MACOSX/`` entries, ``._*`` resource forks, ``.DS_Store``, ``Thumbs.db``,
    hidden files and anything in a hidden folder (``path`` relative to the folder walked)."""
    if any(part == "__MACOSX" or (part.startswith(".") and part not in (".", "..")) for part in path.parts):
        return True
    return path.name.lower() in JUNK_NAMES


def skip_reason(path: Path, rel: Path | None = None) -> str | None:
    """Why a file found while walking a source folder is not a candidate image; None when it is one.

    ``rel`` is the path relative to the folder walked (litter is recognised by its parts). Source readers
    record the reason next to the file, so nothing is dropped without a line in ``rejected.csv``. Call it on
    entries that are not folders; a symlink loop or a link to nothing is reported, not followed.
    """
    rel = Path(path.name) if rel is None else rel
    if is_junk(rel):
        return "OS or archive litter (__MACOSX, ._*, .DS_Store, Thumbs.db, hidden file), ignored"
    if path.is_symlink() and not path.exists():
        return "broken symbolic link or symlink loop"
    if not path.is_file():
        return "not a regular file"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return f"not an image file extension ({path.suffix or 'none'})"
    return None


def to_grayscale_uint8(img: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit grayscale, rescaling 16-bit and float data by their range."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        finite = np.isfinite(arr)
        lo, hi = (float(arr[finite].min()), float(arr[finite].max())) if finite.any() else (0.0, 0.0)
        scaled = np.zeros_like(arr) if hi <= lo else (np.where(finite, arr, lo) - lo) * (255.0 / (hi - lo))
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (0, 0, 0, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("L")


def difference_hash(gray: Image.Image, hash_size: int = 16) -> bytes:
    """A ``hash_size``**2-bit difference hash (dHash): robust to rescaling and recompression."""
    small = np.asarray(gray.resize((hash_size + 1, hash_size), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).flatten()
    return np.packbits(bits).tobytes()


def check_image(
    path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = DEFAULT_MIN_SIDE
) -> CheckedImage:
    """Decode ``path`` once, check it and describe it; raise :class:`ImageError` with the reason when unusable."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(path, f"cannot be read ({exc.strerror or exc})") from exc
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    if size > MAX_FILE_BYTES:
        raise ImageError(path, f"file of {size} bytes is over the {MAX_FILE_BYTES}-byte limit")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ImageError(path, f"cannot be read ({exc.strerror or exc})") from exc
    sha = hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        # Pillow warns about odd metadata (corrupt EXIF, oversized tags) and carries on: the image itself is
        # judged below, so the warnings only flood the build's output. A decompression bomb becomes an error.
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img, fmt, mode = _decode(path, data, max_pixels)
        upright, orientation = _upright(path, img)
    width, height = upright.size
    if min(width, height) < min_side:
        raise ImageError(path, f"{width}x{height} pixels is smaller than {min_side} px on a side")
    gray = to_grayscale_uint8(upright)
    if np.asarray(gray).max() == np.asarray(gray).min():
        raise ImageError(path, "blank image (every pixel has the same value)")
    keep = fmt in _KEEP_FORMATS and mode in _KEEP_MODES and orientation in (None, 1)
    normalized = None
    if not keep:
        buf = io.BytesIO()
        gray.save(buf, format="PNG", optimize=False)
        normalized = buf.getvalue()
    return CheckedImage(
        sha256=sha,
        format=fmt,
        mode=mode,
        width=width,
        height=height,
        dhash=difference_hash(gray),
        normalized_png=normalized,
    )


def _decode(path: Path, data: bytes, max_pixels: int) -> tuple[Image.Image, str, str]:
    """Open and fully decode ``data``; the size limit is checked before the pixels are decoded."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not an image Pillow can read (wrong extension or corrupt header)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"too large to decode safely ({exc}); raise --max-pixels") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(path, f"corrupt header ({exc})") from exc
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(path, f"{width}x{height} pixels is over the limit of {max_pixels}; raise --max-pixels")
    fmt, mode = img.format or "unknown", img.mode
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageError(path, f"truncated or corrupt image data ({exc})") from exc
    return img, fmt, mode


def _upright(path: Path, img: Image.Image) -> tuple[Image.Image, int | None]:
    """The image turned as its EXIF orientation says, and that orientation (1 or None: already upright)."""
    try:
        orientation = img.getexif().get(0x0112, 1)
        upright = ImageOps.exif_transpose(img) if orientation not in (None, 1) else img
    except (OSError, SyntaxError, ValueError, EOFError, KeyError, TypeError) as exc:
        raise ImageError(path, f"corrupt EXIF metadata ({exc})") from exc
    return upright, orientation


def open_grayscale(path: str | Path, *, max_side: int | None = None) -> Image.Image:
    """An image upright (EXIF orientation applied) as 8-bit grayscale ("L"), converted as the dataset build does.

    The one reader for plots, thumbnails and probes (training decodes through tf.data). 16-bit and float images
    are rescaled by their range, transparent ones composited over black. ``max_side`` returns a copy at most
    that many pixels on its longer side (JPEG files are decoded at a reduced scale first, which is faster).
    Raises :class:`ImageError` naming the file when it cannot be read.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            if max_side is not None:
                img.draft("L", (max_side, max_side))
            gray = to_grayscale_uint8(ImageOps.exif_transpose(img))
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageError(path, f"cannot be read as an image ({exc}); remove or replace the file, or rebuild the "
                               "dataset with `covidxray data`") from exc
    if max_side is not None:
        gray.thumbnail((max_side, max_side))
    return gray
