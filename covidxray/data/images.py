"""Decode and check one source image: the single place where raw files from the public sources are read.

Every image is decoded once here. Files that cannot be used raise :class:`ImageError` with the reason, so the
dataset build can skip and list them instead of crashing. Plain 8-bit JPEG/PNG files (L, RGB, RGBA, LA or P
mode, upright) are kept byte for byte; all others (16-bit, CMYK,
EXIF-rotated, other formats) are normalised to an 8-bit grayscale PNG.

DICOM files (a ``DICM`` marker after the 128-byte preamble, or a ``.dcm``/``.dicom`` name) are decoded with
pydicom through the display pipeline a viewer applies: modality LUT (rescale slope/intercept), VOI LUT or window,
MONOCHROME1 inverted; the first frame of a multi-frame file is used. Without a VOI LUT or window the stored bit depth
sets the scale (never the data's own range), so a DICOM file of a PNG's pixels reads as that PNG; the rule applied is
:attr:`CheckedImage.dicom_scaling` (see :data:`DICOM_SCALING`). They always become normalised PNGs, so TensorFlow and
every later stage read a PNG.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from covidxray.errors import ImageError

if TYPE_CHECKING:
    from pydicom import Dataset
    from pydicom.uid import UID

DICOM_EXTENSIONS: frozenset[str] = frozenset({".dcm", ".dicom"})
_DICOM_MARKER = slice(128, 132)
"""Where a DICOM file (after its 128-byte preamble) says ``DICM``."""
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", *DICOM_EXTENSIONS})
"""Extensions the source readers pick up; anything else is ignored."""
JUNK_NAMES: frozenset[str] = frozenset({".ds_store", "thumbs.db", "desktop.ini"})
DEFAULT_MAX_PIXELS = 50_000_000
"""Larger images are refused before decoding (the largest real source image is about 17.5 MP)."""
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
"""The largest image Pillow opens at all (its decompression-bomb error); ``max_pixels`` cannot go beyond it."""
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
    dicom_scaling: str = ""
    """How a DICOM file's values became 8-bit gray levels (a key of :data:`DICOM_SCALING`); "" for other files."""


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
    data = _read_bytes(path)
    sha = hashlib.sha256(data).hexdigest()
    with warnings.catch_warnings():
        # Pillow warns about odd metadata (corrupt EXIF, oversized tags) and carries on: the image itself is
        # judged below, so the warnings only flood the build's output. Pillow's decompression-bomb warning is
        # ignored too: ``max_pixels`` is checked on the header before any pixel is decoded.
        warnings.simplefilter("ignore")
        img, fmt, mode, scaling = _decode_file(path, data, max_pixels)
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
        dicom_scaling=scaling,
    )


def _read_bytes(path: Path) -> bytes:
    """The file's bytes; an ImageError naming the OS error when it cannot be read."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ImageError(path, f"cannot be read ({exc.strerror or exc})") from exc


def _decode_file(path: Path, data: bytes, max_pixels: int) -> tuple[Image.Image, str, str, str]:
    """Decode ``data`` as DICOM when :func:`is_dicom`, else with Pillow: the image, its format, its mode and the
    DICOM scaling rule ("" for other files). A ``.dcm`` file without the ``DICM`` marker that pydicom cannot decode
    is tried with Pillow (a PNG named ``.dcm`` is a PNG), as Pillow reads any format whatever the extension says."""
    if not is_dicom(path, data):
        return *_decode(path, data, max_pixels), ""
    if data[_DICOM_MARKER] == b"DICM":
        return _decode_dicom(path, data, max_pixels)
    try:
        return _decode_dicom(path, data, max_pixels)
    except ImageError as dicom_error:
        try:
            return *_decode(path, data, max_pixels), ""
        except ImageError:
            raise ImageError(path, f"{dicom_error.reason}; the file has no 'DICM' marker: not a DICOM file (or a "
                                   "damaged one), nor an image Pillow can read") from dicom_error


def _decode(path: Path, data: bytes, max_pixels: int) -> tuple[Image.Image, str, str]:
    """Open and fully decode ``data``; the size limit is checked before the pixels are decoded."""
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageError(path, "not an image Pillow can read (wrong extension or corrupt header)") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"too large to decode safely ({exc}); no setting reads images over "
                               f"{PILLOW_MAX_PIXELS} pixels: downscale the file") from exc
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

    The package's one image reader: plots, thumbnails, probes, the baseline and the models' input pipeline
    (:func:`covidxray.training.pipeline.decode_gray`) all read pixels through it. 16-bit and float images
    are rescaled by their range, transparent ones composited over black. ``max_side`` returns a copy at most
    that many pixels on its longer side (JPEG files are decoded at a reduced scale first, which is faster).
    Raises :class:`ImageError` naming the file when it cannot be read.
    """
    path = Path(path)
    if _is_dicom_file(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = _decode_file(path, _read_bytes(path), DEFAULT_MAX_PIXELS)[0]
            gray = to_grayscale_uint8(_upright(path, img)[0])
        if max_side is not None:
            gray.thumbnail((max_side, max_side))
        return gray
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


def image_header(path: str | Path) -> tuple[int, int, str, str]:
    """Width, height, format and Pillow mode of an image file, from its header (the pixels are not decoded)."""
    try:
        with Image.open(path) as img:
            return img.size[0], img.size[1], img.format or "unknown", img.mode
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(path, f"cannot be read ({exc}); rebuild the dataset with `covidxray data`") from exc


DICOM_TAGS: dict[str, str] = {"patient_id": "PatientID", "view": "ViewPosition", "age": "PatientAge",
                              "sex": "PatientSex"}
"""What :func:`dicom_tags` reads: the CSV column of a generic source each DICOM attribute stands for."""
DICOM_SCALING: dict[str, str] = {
    "voi_lut": "the file's VOI LUT; its output range to 0-255",
    "window": "the file's window (Window Center/Width, in rescaled units where the file rescales); the window's "
              "output range to 0-255",
    "bits_stored": "no VOI LUT or window: the stored range, 0 to 2**BitsStored - 1 (signed: -2**(BitsStored-1) to "
                   "2**(BitsStored-1) - 1), to 0-255; each gray level takes 2**(BitsStored-8) stored values, so an "
                   "8-bit file's values are kept as they are",
    "rescale+bits_stored": "as bits_stored, through the file's rescale slope/intercept: the range it maps the stored "
                           "range to",
    "modality_lut+bits_stored": "as bits_stored, through the file's Modality LUT: the range of its output over the "
                                "stored range",
    "data_range": "float pixel data (no stored bit depth): the data's own range to 0-255",
    "color": "RGB, YBR or palette colour: each channel's bit depth to 0-255, then Pillow's gray levels",
}
"""How a DICOM file's values become 8-bit gray levels: :attr:`CheckedImage.dicom_scaling` (and the manifest's
``dicom_scaling`` column) names the rule applied. A MONOCHROME1 file is inverted after any of them."""
_LIBJPEG = ("pylibjpeg pylibjpeg-libjpeg", "python-gdcm")
_OPENJPEG = ("pylibjpeg pylibjpeg-openjpeg", "python-gdcm")
DICOM_DECODERS: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.4.50": ("Pillow", *_LIBJPEG),  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": _LIBJPEG,  # JPEG Extended (Process 2 and 4): pydicom's Pillow plugin reads 8-bit only
    "1.2.840.10008.1.2.4.57": _LIBJPEG,  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": _LIBJPEG,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": (*_LIBJPEG, "pyjpegls"),  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": (*_LIBJPEG, "pyjpegls"),  # JPEG-LS Near Lossless
    "1.2.840.10008.1.2.4.90": (*_OPENJPEG, "Pillow"),  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": (*_OPENJPEG, "Pillow"),  # JPEG 2000
    "1.2.840.10008.1.2.4.201": ("pylibjpeg pylibjpeg-openjpeg",),  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": ("pylibjpeg pylibjpeg-openjpeg",),  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": ("pylibjpeg pylibjpeg-openjpeg",),  # HTJ2K
    "1.2.840.10008.1.2.5": ("pydicom (built in)", "pylibjpeg pylibjpeg-rle"),  # RLE Lossless
}
"""Compressed DICOM transfer syntaxes and the pip packages that decode each (any one choice suffices); the
``dicom`` extra (``pip install "covidxray[dicom]"``) installs the pylibjpeg ones. A file no installed decoder
reads is refused naming them."""
_PILLOW_8_BIT_ONLY = "1.2.840.10008.1.2.4.51"
"""pydicom's Pillow plugin refuses JPEG Extended files of more than 8 bits: Pillow is no decoder for those."""
_COLOR = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "PALETTE COLOR"})
"""Colour photometric interpretations (pydicom returns YBR as RGB); MONOCHROME1/2 are the grayscale ones."""


def is_dicom(path: Path, head: bytes) -> bool:
    """True when the file is to be read as DICOM: ``head`` (its first bytes) has the ``DICM`` marker after the
    128-byte preamble, or the name ends in ``.dcm``/``.dicom`` (old files without a preamble)."""
    return head[_DICOM_MARKER] == b"DICM" or path.suffix.lower() in DICOM_EXTENSIONS


def _is_dicom_file(path: Path) -> bool:
    """:func:`is_dicom` on the file's first bytes; False when it cannot be opened (the caller's reader says why)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_DICOM_MARKER.stop)
    except OSError:
        return False
    return is_dicom(path, head)


def dicom_tags(path: str | Path) -> dict[str, str]:
    """The patient id, view, age and sex a DICOM file's header records, as text keyed as in :data:`DICOM_TAGS`
    (``{"age": "045Y", ...}``; absent or empty attributes are left out).

    Only the header is read. Empty for files that are not DICOM and for headers that cannot be parsed: the
    image itself is judged (and refused with the reason) by :func:`check_image`.
    """
    path = Path(path)
    if not _is_dicom_file(path):
        return {}
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with path.open("rb") as handle:
                ds = pydicom.dcmread(handle, stop_before_pixels=True, specific_tags=list(DICOM_TAGS.values()),
                                     force=True)
            found = {key: str(ds.get(keyword, "") or "").strip() for key, keyword in DICOM_TAGS.items()}
    except Exception:  # pydicom raises many types on malformed headers; check_image reports them
        return {}
    return {key: value for key, value in found.items() if value}


def _decode_dicom(path: Path, data: bytes, max_pixels: int) -> tuple[Image.Image, str, str, str]:
    """The first frame of a DICOM file as 8-bit grayscale, its format ("DICOM"), mode (e.g.
    ``"MONOCHROME2 16-bit"``) and scaling rule (a key of :data:`DICOM_SCALING`); an ImageError saying why when it
    cannot be decoded."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=data[_DICOM_MARKER] != b"DICM")
        except Exception as exc:  # pydicom raises many types on malformed files
            raise ImageError(path, f"not a readable DICOM file: corrupt or truncated header ({_one_line(exc)})"
                             ) from exc
        try:
            return _dicom_image(path, ds, max_pixels)
        except ImageError:
            raise
        except Exception as exc:  # pydicom parses values lazily and raises many types on bad ones
            raise ImageError(path, f"corrupt DICOM file ({_one_line(exc)})") from exc


def _dicom_image(path: Path, ds: Dataset, max_pixels: int) -> tuple[Image.Image, str, str, str]:
    """Decode the first frame of a read DICOM dataset (see :func:`_decode_dicom`)."""
    from pydicom.pixels import apply_color_lut, pixel_array

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageError(path, "DICOM file without pixel data (a report or other non-image object, or a file cut "
                               "short); not an image")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows * columns > max_pixels:
        raise ImageError(path, f"{columns}x{rows} pixels is over the limit of {max_pixels}; raise --max-pixels")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2") and photometric not in _COLOR:
        found = f"Photometric Interpretation {photometric!r}" if photometric else "no Photometric Interpretation"
        raise ImageError(path, f"DICOM file with {found}; supported are MONOCHROME1, MONOCHROME2, RGB, YBR and "
                               "PALETTE COLOR")
    syntax = _transfer_syntax(path, ds)
    try:
        arr = pixel_array(ds, index=0)
    except Exception as exc:  # each decoder plugin raises its own types
        raise ImageError(path, f"cannot decode the DICOM pixel data ({syntax.name}): the file is truncated or "
                               f"corrupt ({_one_line(exc)})") from exc
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    mode = f"{photometric} {bits}-bit"
    if photometric in _COLOR:
        rgb = apply_color_lut(arr, ds) if photometric == "PALETTE COLOR" else arr
        depth = 8 * rgb.dtype.itemsize if photometric == "PALETTE COLOR" else bits
        scaled = np.asarray(rgb, dtype=np.float64) * (255.0 / (2**depth - 1))
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="RGB").convert("L")
        return image, "DICOM", mode, "color"
    gray, scaling = _dicom_display(path, arr, ds, bits)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray, mode="L"), "DICOM", mode, scaling


def _transfer_syntax(path: Path, ds: Dataset) -> UID:
    """The dataset's transfer syntax, inferred for files without one when uncompressed; an ImageError naming the
    packages to install (:data:`DICOM_DECODERS`) when no installed decoder reads a compressed one."""
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None:
        implicit, little = ds.original_encoding
        syntax = (ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian) if little else ExplicitVRBigEndian
        ds.file_meta.TransferSyntaxUID = syntax
    syntax = UID(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise ImageError(path, f"cannot decode DICOM transfer syntax {syntax.name or syntax!r}: no decoder exists "
                               "for it; convert the file to an uncompressed or JPEG DICOM") from exc
    usable = set(decoder.available_plugins) if syntax.is_encapsulated else {"native"}
    if syntax == _PILLOW_8_BIT_ONLY and int(ds.get("BitsStored") or 8) != 8:
        usable.discard("pillow")
    if not usable:
        options = DICOM_DECODERS.get(str(syntax)) or tuple(decoder.missing_dependencies)
        raise ImageError(path, f"cannot decode: the pixel data is compressed as {syntax.name} and no decoder for "
                               f"it is installed; pip install \"covidxray[dicom]\", or one of: {'; '.join(options)}")
    return syntax


def _dicom_display(path: Path, arr: np.ndarray, ds: Dataset, bits: int) -> tuple[np.ndarray, str]:
    """Monochrome pixels as a viewer shows them, in 8 bits, and the rule applied (a key of :data:`DICOM_SCALING`):
    modality LUT, then the VOI LUT or window scaled by its output range; without either, scaled by the range the
    modality LUT maps the stored bit depth's values to (never by the data's own range)."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(arr, ds)
    try:
        shown = apply_voi_lut(values, ds)
        scaling, low, high, levels = _voi_range(ds, bits) if shown is not values else _stored_range(ds, arr, bits)
    except (ValueError, NotImplementedError) as exc:
        raise ImageError(path, f"invalid DICOM window or VOI LUT ({_one_line(exc)}); fix or remove Window "
                               "Center/Width or the VOI LUT Sequence") from exc
    shown = np.asarray(shown, dtype=np.float64)
    finite = np.isfinite(shown)
    if scaling == "data_range":
        low, high = (float(shown[finite].min()), float(shown[finite].max())) if finite.any() else (0.0, 0.0)
    if not high > low:
        return np.zeros(shown.shape, dtype=np.uint8), scaling
    level = np.rint((np.clip(np.where(finite, shown, low), low, high) - low) * ((levels - 1) / (high - low)))
    return np.minimum(np.floor(level * (256.0 / levels)), 255).astype(np.uint8), scaling


def _stored_range(ds: Dataset, arr: np.ndarray, bits: int) -> tuple[str, float, float, int]:
    """The scaling rule, output range and number of levels without a VOI: the stored range of ``bits`` (signed
    when Pixel Representation says so) through the modality LUT or rescale (see :data:`DICOM_SCALING`)."""
    from pydicom.pixels import apply_modality_lut

    if arr.dtype.kind == "f":
        return "data_range", 0.0, 0.0, 256
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    first, last = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    if ds.get("ModalityLUTSequence"):
        stored = np.arange(first, last + 1, dtype=np.int64) if bits <= 16 else np.array([first, last])
        rule = "modality_lut+bits_stored"
    else:
        stored = np.array([first, last], dtype=np.int64)
        rule = "rescale+bits_stored" if "RescaleSlope" in ds and "RescaleIntercept" in ds else "bits_stored"
    ends = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    return rule, float(ends.min()), float(ends.max()), 2**bits


def _voi_range(ds: Dataset, bits: int) -> tuple[str, float, float, int]:
    """The rule, output range and number of output levels of the VOI transform pydicom's ``apply_voi_lut``
    applies: the VOI LUT's values when the file has a usable one (pydicom prefers it), else the window's output
    for inputs below and above it (pydicom's window output spans as many levels as the stored bit depth)."""
    from pydicom.pixels import apply_voi, apply_windowing

    items = ds.get("VOILUTSequence") or []
    if items and items[0].get("LUTDescriptor") is not None and items[0].get("LUTData") is not None:
        entries, first = int(items[0].LUTDescriptor[0]) or 2**16, int(items[0].LUTDescriptor[1])
        lut = np.asarray(apply_voi(np.arange(first, first + entries, dtype=np.int64), ds), dtype=np.float64)
        low, high = float(lut.min()), float(lut.max())
        return "voi_lut", low, high, int(round(high - low)) + 1
    with np.errstate(over="ignore"):
        ends = np.asarray(apply_windowing(np.array([-np.inf, np.inf]), ds), dtype=np.float64)
    return "window", float(ends.min()), float(ends.max()), 2**bits


def _one_line(exc: BaseException) -> str:
    """An exception's message on one line (pydicom's span several), for skip reasons and CSV cells."""
    return re.sub(r" at 0x[0-9A-Fa-f]+", "", " ".join(str(exc).split())) or type(exc).__name__
