"""DICOM in every reader: real files written with pydicom go through check_image, open_grayscale, the generic
source, the dataset build and evaluation/heatmaps; what cannot be decoded is skipped with the reason."""

from __future__ import annotations

import io
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    JPEG2000,
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from covidxray.data.build import build_dataset
from covidxray.data.images import (
    DICOM_DECODERS,
    DICOM_SCALING,
    IMAGE_EXTENSIONS,
    check_image,
    dicom_tags,
    open_grayscale,
)
from covidxray.data.manifest import read_manifest
from covidxray.data.sources import parse_age, read_generic
from covidxray.errors import ImageError

SIZE = (40, 48)
"""Rows, columns of the test images."""
BRIGHT = (slice(8, 20), slice(8, 24))
"""The region that is bright in the raw pixel values (top left)."""


def pattern(bits: int, seed: int = 0, frames: int = 1) -> np.ndarray:
    """Raw pixels using most of ``bits``: a noisy background at 20-40 % of the range and a bright region at
    80-95 % in :data:`BRIGHT` (frame ``i`` > 0 has it moved to the bottom right)."""
    rng = np.random.default_rng(seed)
    top = 2**bits - 1
    out = []
    for i in range(frames):
        arr = rng.uniform(0.2, 0.4, SIZE) * top
        region = BRIGHT if i == 0 else (slice(24, 36), slice(28, 44))
        arr[region] = rng.uniform(0.8, 0.95, arr[region].shape) * top
        out.append(np.rint(arr))
    stack = np.stack(out).astype(np.uint8 if bits <= 8 else np.uint16)
    return stack if frames > 1 else stack[0]


def write_dicom(path: Path, pixels: np.ndarray | None, *, bits: int = 16, photometric: str = "MONOCHROME2",
                syntax: UID = ExplicitVRLittleEndian, raw: bytes | None = None, signed: bool = False,
                **tags) -> Path:
    """Write a DICOM file with pydicom: ``pixels`` (2-D, or 3-D for frames; None for no pixel data), or ``raw``
    bytes as (encapsulated) pixel data of a compressed ``syntax``; ``tags`` are set as attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixels is not None or raw is not None:
        shape = pixels.shape if pixels is not None else SIZE
        ds.Rows, ds.Columns = shape[-2:]
        if len(shape) == 3:
            ds.NumberOfFrames = shape[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = 8 if bits <= 8 else 16
        ds.BitsStored = bits
        ds.HighBit = bits - 1
        ds.PixelRepresentation = int(signed)
        if raw is not None:
            ds.PixelData = encapsulate([raw])
            ds["PixelData"].VR = "OB"
        else:
            ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def decoded(path: Path) -> np.ndarray:
    """The normalised PNG check_image makes of ``path``, as an array (and checked to be 8-bit grayscale)."""
    info = check_image(path)
    assert info.format == "DICOM" and info.normalized_png is not None
    with Image.open(io.BytesIO(info.normalized_png)) as png:
        assert png.format == "PNG" and png.mode == "L" and png.size == (info.width, info.height)
        return np.asarray(png)


def test_extensions():
    assert {".dcm", ".dicom"} <= IMAGE_EXTENSIONS


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_bit_depths_and_monochrome1_inverted(tmp_path, bits, photometric):
    path = write_dicom(tmp_path / "x.dcm", pattern(bits), bits=bits, photometric=photometric)
    info = check_image(path)
    assert (info.format, info.mode, info.width, info.height) == ("DICOM", f"{photometric} {bits}-bit", 48, 40)
    gray = decoded(path)
    bright = gray[BRIGHT].mean()
    rest = np.delete(gray, np.s_[8:20], axis=0).mean()
    if photometric == "MONOCHROME2":
        assert bright > 200 and rest < 80, "bright raw values stay bright"
    else:
        assert bright < 55 and rest > 175, "MONOCHROME1: high raw values are dark"
    shifted = (pattern(bits) >> (bits - 8)).astype(np.uint8)
    expected = shifted if photometric == "MONOCHROME2" else 255 - shifted
    assert np.array_equal(gray, expected), "without a window, the stored bit depth sets the scale, not the data"
    assert info.dicom_scaling == "bits_stored"


def test_rescale_then_window(tmp_path):
    """The window is in modality units: raw 1250 * 2 - 1000 = 1500 is the window's centre (mid gray)."""
    raw = np.full(SIZE, 1000, dtype=np.uint16)
    raw[:, 16:32] = 1250
    raw[:, 32:] = 1500
    path = write_dicom(tmp_path / "ct.dcm", raw, bits=12, RescaleSlope=2, RescaleIntercept=-1000,
                       WindowCenter=1500, WindowWidth=200)
    gray = decoded(path)
    assert (gray[:, :16] == 0).all() and (gray[:, 32:] == 255).all()
    assert 120 <= gray[:, 16:32].mean() <= 135
    without = write_dicom(tmp_path / "raw.dcm", raw, bits=12, WindowCenter=1500, WindowWidth=200)
    assert (decoded(without)[:, 16:32] == 0).all(), "without the rescale, raw 1250 is below the window"


def test_window_output_range_sets_the_8_bit_scale(tmp_path):
    """A window wider than the data keeps the data's place in it: not stretched to 0-255."""
    raw = np.full(SIZE, 1000, dtype=np.uint16)
    raw[BRIGHT] = 1100
    gray = decoded(write_dicom(tmp_path / "w.dcm", raw, bits=12, WindowCenter=2048, WindowWidth=4096))
    assert gray.min() >= 60 and gray.max() <= 72 and gray.max() > gray.min()
    signed = write_dicom(tmp_path / "s.dcm", (raw.astype(np.int16) - 2048), bits=12, signed=True,
                         RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=-2022, WindowWidth=50)
    assert decoded(signed)[BRIGHT].mean() == 255 and decoded(signed)[30:, :].mean() == 0


def chest_png(folder: Path) -> tuple[Path, np.ndarray]:
    """A synthetic chest image written as an 8-bit PNG (its gray levels kept off 0 and 255, so a stretch to the
    data's range would show), and the pixels every reader reads from it."""
    from covidxray.data.synthetic import chest_image

    gray = np.rint(chest_image(np.random.default_rng(7), covid=True, size=(72, 64)) * 0.75 + 16).astype(np.uint8)
    path = folder / "chest.png"
    Image.fromarray(gray).save(path, format="PNG")
    pixels = np.asarray(open_grayscale(path))
    assert pixels.min() > 0 and pixels.max() < 255 and pixels.max() - pixels.min() > 100
    return path, pixels


def identity_lut(bits: int, depth: int) -> Sequence:
    """A LUT Sequence (VOI or Modality) whose LUT maps each of the 2**bits stored values to itself, its entries
    ``depth``-bit."""
    item = Dataset()
    item.add_new("LUTDescriptor", "US", [2**bits, 0, depth])
    item.add_new("LUTData", "US", list(range(2**bits)))
    return Sequence([item])


PNG_AS_DICOM: dict[str, tuple[int, dict, str]] = {
    # name: (stored bits, write_dicom keywords, the scaling rule the decoder must report)
    "8-bit": (8, {}, "bits_stored"),
    "12-bit": (12, {}, "bits_stored"),
    "16-bit": (16, {}, "bits_stored"),
    "16-bit signed": (16, {"signed": True}, "bits_stored"),
    "8-bit MONOCHROME1": (8, {"photometric": "MONOCHROME1"}, "bits_stored"),
    "12-bit rescaled": (12, {"RescaleSlope": 2, "RescaleIntercept": -1024}, "rescale+bits_stored"),
    "16-bit signed rescaled": (16, {"signed": True, "RescaleSlope": 0.5, "RescaleIntercept": 100},
                               "rescale+bits_stored"),
    "8-bit full window": (8, {"WindowCenter": 128, "WindowWidth": 256}, "window"),
    "12-bit full window": (12, {"WindowCenter": 2048, "WindowWidth": 4096}, "window"),
    "16-bit full window": (16, {"WindowCenter": 32768, "WindowWidth": 65536}, "window"),
    "12-bit rescaled full window": (12, {"RescaleSlope": 2, "RescaleIntercept": -1024, "WindowCenter": 3071.5,
                                         "WindowWidth": 8191}, "window"),
    "8-bit identity VOI LUT": (8, {"VOILUTSequence": "identity"}, "voi_lut"),
    "12-bit identity VOI LUT": (12, {"VOILUTSequence": "identity"}, "voi_lut"),
    "12-bit identity Modality LUT": (12, {"ModalityLUTSequence": "identity"}, "modality_lut+bits_stored"),
}
"""A PNG's pixels written as DICOM: ``png * 2**(bits-8)`` stored (shifted into the signed range, or inverted for
MONOCHROME1), with and without rescale, a window covering the whole range, an identity VOI or Modality LUT."""


def png_as_dicom(path: Path, png: np.ndarray, name: str) -> Path:
    """Write :data:`PNG_AS_DICOM` ``name`` of the PNG's pixels ``png`` to ``path``."""
    bits, keywords, _ = PNG_AS_DICOM[name]
    keywords = dict(keywords)
    stored = png.astype(np.int64) * 2 ** (bits - 8)
    if keywords.get("photometric") == "MONOCHROME1":
        stored = 2**bits - 1 - stored
    if keywords.get("signed"):
        stored = (stored - 2 ** (bits - 1)).astype(np.int8 if bits == 8 else np.int16)
    else:
        stored = stored.astype(np.uint8 if bits == 8 else np.uint16)
    if keywords.get("VOILUTSequence") == "identity":
        keywords["VOILUTSequence"] = identity_lut(bits, bits)
    if keywords.get("ModalityLUTSequence") == "identity":
        keywords["ModalityLUTSequence"] = identity_lut(bits, 16)
    return write_dicom(path, stored, bits=bits, **keywords)


@pytest.mark.parametrize("name", list(PNG_AS_DICOM))
def test_a_dicom_of_a_png_reads_as_that_png(tmp_path, name):
    """DICOM means what the PNG means: the PNG's pixels stored at any bit depth, rescaled or not, windowed over
    the whole range or through an identity VOI LUT, decode to the PNG's pixels, and the rule is recorded."""
    png_path, png = chest_png(tmp_path)
    path = png_as_dicom(tmp_path / "chest.dcm", png, name)
    info = check_image(path)
    assert info.dicom_scaling == PNG_AS_DICOM[name][2] and info.dicom_scaling in DICOM_SCALING
    assert np.array_equal(decoded(path), png), f"{name}: largest difference " \
        f"{np.abs(decoded(path).astype(int) - png).max()} gray levels"
    assert np.array_equal(np.asarray(open_grayscale(path)), png)
    assert check_image(png_path).dicom_scaling == ""


def test_a_model_gives_a_png_and_its_dicoms_one_p_covid(tiny_run, tmp_path):
    """A trained model's p(covid) for every DICOM variant of a PNG is the PNG's (within 1e-3)."""
    import covidxray

    png_path, png = chest_png(tmp_path)
    files = [png_path] + [png_as_dicom(tmp_path / f"v{i}.dcm", png, name) for i, name in enumerate(PNG_AS_DICOM)]
    table = covidxray.load_run(tiny_run).predict(files)
    assert len(table) == len(files) and (table["skipped"].fillna("") == "").all()
    p_covid = dict(zip(table["path"].map(lambda f: Path(f).name), table["p_covid"], strict=True))
    gaps = {name: abs(p_covid[f"v{i}.dcm"] - p_covid["chest.png"]) for i, name in enumerate(PNG_AS_DICOM)}
    assert max(gaps.values()) <= 1e-3, gaps


def test_multi_frame_uses_the_first_frame(tmp_path):
    frames = pattern(16, frames=3)
    gray = decoded(write_dicom(tmp_path / "multi.dcm", frames))
    assert gray.shape == SIZE
    assert gray[BRIGHT].mean() > 200 and gray[24:36, 28:44].mean() < 120


def test_open_grayscale_reads_dicom_as_check_image_does(tmp_path):
    path = write_dicom(tmp_path / "x.dcm", pattern(12), bits=12, photometric="MONOCHROME1")
    gray = open_grayscale(path)
    assert gray.mode == "L" and np.array_equal(np.asarray(gray), decoded(path))
    assert max(open_grayscale(path, max_side=16).size) == 16


def test_content_decides_not_the_name(tmp_path):
    """A DICOM file named .png is read as DICOM (its DICM marker), a PNG named .dcm as a PNG; a .dcm file that is
    neither is refused with a reason."""
    dicom_png = write_dicom(tmp_path / "scan.png", pattern(16))
    assert check_image(dicom_png).format == "DICOM"
    assert np.array_equal(np.asarray(open_grayscale(dicom_png)), decoded(dicom_png))
    png = tmp_path / "photo.dcm"
    Image.fromarray(pattern(8)).save(png, format="PNG")
    assert (check_image(png).format, check_image(png).normalized_png) == ("PNG", None)
    assert np.array_equal(np.asarray(open_grayscale(png)), pattern(8))
    text = tmp_path / "notes.dcm"
    text.write_text("not an image at all " * 20)
    with pytest.raises(ImageError, match=r"notes\.dcm: .*no 'DICM' marker: not a DICOM file"):
        check_image(text)
    with pytest.raises(ImageError, match=r"notes\.dcm: .*no 'DICM' marker"):
        open_grayscale(text)


def test_headerless_dicom_file(tmp_path):
    """An old-style .dcm without preamble, marker or file meta (implicit VR): the transfer syntax is inferred."""
    from pydicom import dcmread

    full = write_dicom(tmp_path / "full.dcm", pattern(12), bits=12, PatientID="old-1")
    ds = dcmread(full)
    del ds.file_meta
    ds.preamble = None
    dcmwrite(tmp_path / "old.dcm", ds, implicit_vr=True, little_endian=True)
    assert (tmp_path / "old.dcm").read_bytes()[128:132] != b"DICM"
    assert np.array_equal(decoded(tmp_path / "old.dcm"), decoded(full))
    assert dicom_tags(tmp_path / "old.dcm") == {"patient_id": "old-1"}


@pytest.mark.parametrize("case, reason", [
    ("truncated pixel data", "cannot decode the DICOM pixel data (Explicit VR Little Endian): the file is truncated"),
    ("truncated header", "DICOM"),
    ("no pixel data", "DICOM file without pixel data"),
    ("JPEG Baseline, garbage data", "cannot decode"),
    ("JPEG-LS without a decoder", "cannot decode"),
    ("8 bytes", "DICOM"),
    ("blank", "blank image"),
    ("tiny", "smaller than"),
    ("color model CMYK", "Photometric Interpretation 'CMYK'"),
    ("window width 0", "invalid DICOM window"),
])
def test_undecodable_dicom_is_refused_with_the_reason(tmp_path, case, reason):
    path = tmp_path / "bad.dcm"
    if case.startswith("truncated"):
        data = write_dicom(path, pattern(16)).read_bytes()
        path.write_bytes(data[: len(data) - 1000] if case == "truncated pixel data" else data[:200])
    elif case == "no pixel data":
        write_dicom(path, None, PatientID="p1")
    elif case.startswith("JPEG"):
        syntax = JPEGBaseline8Bit if case.startswith("JPEG Baseline") else JPEGLSNearLossless
        write_dicom(path, None, bits=8, syntax=syntax, raw=b"\xff\xd8\xff\xe0 not really a JPEG stream " * 4)
    elif case == "8 bytes":
        path.write_bytes(b"\x00" * 8)
    elif case == "blank":
        write_dicom(path, np.full(SIZE, 7, dtype=np.uint16))
    elif case == "tiny":
        write_dicom(path, pattern(16)[:4, :4])
    elif case == "color model CMYK":
        write_dicom(path, pattern(16), photometric="CMYK")
    else:
        write_dicom(path, pattern(16), WindowCenter=100, WindowWidth=0)
    with pytest.raises(ImageError) as err:
        check_image(path)
    assert err.value.path == str(path) and reason in err.value.reason, err.value.reason
    assert "\n" not in err.value.reason


def only_plugins(monkeypatch, syntax: UID, *labels: str) -> None:
    """Make pydicom's decoder for ``syntax`` see only the plugins ``labels`` as installed (for this test)."""
    from pydicom.pixels import get_decoder

    decoder = get_decoder(syntax)
    monkeypatch.setattr(decoder, "_available", {k: v for k, v in decoder._available.items() if k in labels})


@pytest.mark.parametrize("syntax, bits, kept, packages", [
    (JPEGLSNearLossless, 8, (), "pylibjpeg pylibjpeg-libjpeg; python-gdcm; pyjpegls"),
    (JPEGExtended12Bit, 12, ("pillow",), "pylibjpeg pylibjpeg-libjpeg; python-gdcm"),
    (JPEG2000, 16, (), "pylibjpeg pylibjpeg-openjpeg; python-gdcm; Pillow"),
])
def test_missing_decoder_names_the_packages(tmp_path, monkeypatch, syntax, bits, kept, packages):
    """Without a decoder, the file is refused naming the packages that read it (not as corrupt): JPEG Extended
    of 12 bits too, which pydicom's Pillow plugin cannot read."""
    only_plugins(monkeypatch, syntax, *kept)
    path = write_dicom(tmp_path / "c.dcm", None, bits=bits, syntax=syntax, raw=b"\xff\xd8" * 20)
    with pytest.raises(ImageError) as err:
        check_image(path)
    assert err.value.reason == (f"cannot decode: the pixel data is compressed as {syntax.name} and no decoder for "
                                f'it is installed; pip install "covidxray[dicom]", or one of: {packages}')


def test_missing_12_bit_jpeg_decoder_on_a_real_file(monkeypatch):
    """pydicom's 12-bit JPEG Extended sample with only Pillow installed: the packages are named."""
    from pydicom.data import get_testdata_file

    only_plugins(monkeypatch, JPEGExtended12Bit, "pillow")
    with pytest.raises(ImageError, match=r"JPEG Extended .* no decoder for it is installed; pip install "
                                         r"\"covidxray\[dicom\]\", or one of: pylibjpeg pylibjpeg-libjpeg"):
        check_image(get_testdata_file("JPGExtended.dcm"))


def test_every_compressed_syntax_is_in_the_decoder_table():
    from pydicom.pixels.decoders.base import _PIXEL_DATA_DECODERS

    compressed = {str(uid) for uid in _PIXEL_DATA_DECODERS if UID(uid).is_compressed}
    assert compressed == set(DICOM_DECODERS), "one table names the decoder packages of every compressed syntax"


def test_compressed_files_decode_with_the_dicom_extra():
    """With the `dicom` extra (pylibjpeg) installed, pydicom's lossless JPEG-LS and JPEG 2000 copies of an MR
    decode to the uncompressed file's pixels, and the 12-bit JPEG Extended sample decodes."""
    from pydicom.data import get_testdata_file
    from pydicom.pixels import get_decoder

    for syntax in (JPEGLSLossless, JPEG2000Lossless, JPEGExtended12Bit):
        assert "pylibjpeg" in get_decoder(syntax).available_plugins, 'pip install "covidxray[dicom]"'
    plain = decoded(Path(get_testdata_file("MR_small.dcm")))
    for name in ("MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"):
        assert np.array_equal(decoded(Path(get_testdata_file(name))), plain), name
    info = check_image(get_testdata_file("JPGExtended.dcm"))
    assert (info.mode, info.width, info.height) == ("MONOCHROME2 12-bit", 256, 1024)


def test_pydicom_sample_files():
    """pydicom's own sample files: a CT with rescale, an MR, an RLE-compressed MR and an RGB JPEG decode."""
    from pydicom.data import get_testdata_file

    for name, mode in [("CT_small.dcm", "MONOCHROME2 16-bit"), ("MR_small_RLE.dcm", "MONOCHROME2 16-bit"),
                       ("SC_rgb_jpeg.dcm", "RGB 8-bit"), ("examples_overlay.dcm", "MONOCHROME2 12-bit")]:
        info = check_image(get_testdata_file(name))
        assert (info.format, info.mode) == ("DICOM", mode) and info.normalized_png is not None
    with pytest.raises(ImageError, match="without pixel data"):
        check_image(get_testdata_file("rtplan.dcm"))


@pytest.mark.parametrize("text, years", [("045Y", 45.0), ("006M", 0.5), ("010D", 10 / 365.25),
                                         ("002W", 14 / 365.25), ("", math.nan)])
def test_dicom_ages(text, years):
    got = parse_age(text)
    assert got == pytest.approx(years) or (math.isnan(years) and math.isnan(got))


def test_dicom_tags(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", pattern(16), PatientID="P7 ", ViewPosition="PA", PatientAge="045Y",
                       PatientSex="F", PatientName="Doe^Jane")
    assert dicom_tags(path) == {"patient_id": "P7", "view": "PA", "age": "045Y", "sex": "F"}
    assert dicom_tags(write_dicom(tmp_path / "b.dcm", pattern(16), PatientID="")) == {}
    (tmp_path / "c.png").write_bytes(b"\x89PNG")
    assert dicom_tags(tmp_path / "c.png") == {} and dicom_tags(tmp_path / "missing.dcm") == {}


def dicom_folder(root: Path, *, per_class: int = 6, seed: int = 0) -> Path:
    """normal/ and covid/ folders of 16-bit DICOM files: patients of one or two images, with header metadata
    (one file per class without any), plus a DICOM file without pixel data."""
    for c, label in enumerate(("normal", "covid")):
        for i in range(per_class):
            tags = ({} if i == 0 else
                    {"PatientID": f"{label}-{i // 2}", "ViewPosition": "AP" if c else "PA",
                     "PatientAge": f"{30 + i:03d}Y" if i % 3 else "006M", "PatientSex": "MF"[i % 2]})
            write_dicom(root / label / f"{label}{i}.dcm", pattern(16, seed=seed + 100 * c + i),
                        photometric="MONOCHROME1" if i % 2 else "MONOCHROME2", **tags)
    write_dicom(root / "covid" / "report.dcm", None, PatientID="covid-9")
    return root


def test_generic_folder_and_csv_read_dicom_metadata(tmp_path):
    data = dicom_folder(tmp_path / "site")
    scan = read_generic(data)
    got = {i.rel_path: i for i in scan.images}
    n4 = got["normal/normal4.dcm"]
    assert (n4.patient_id, n4.view, n4.age, n4.sex) == ("site:normal-2", "PA", 34.0, "M")
    assert got["normal/normal5.dcm"].patient_id == n4.patient_id, "two files of one patient"
    assert got["covid/covid3.dcm"].age == pytest.approx(0.5)
    n0 = got["normal/normal0.dcm"]
    assert (n0.patient_id, n0.view, n0.sex) == ("site:normal/normal0.dcm", "", "") and math.isnan(n0.age)
    assert scan.stats["site/ without patient_id"] == 2
    table = data / "list.csv"
    table.write_text("path,label,patient_id,age,sex,view\n"
                     "normal/normal4.dcm,normal,given,,F,\n"
                     "normal/normal3.dcm,normal,,52,,LL\n"
                     "normal/normal0.dcm,normal,,,,\n")
    scan = read_generic(table)
    rows = {i.rel_path: i for i in scan.images}
    assert (rows["normal/normal4.dcm"].patient_id, rows["normal/normal4.dcm"].sex,
            rows["normal/normal4.dcm"].age) == ("list:given", "F", 34.0), "the CSV wins; the header fills blanks"
    assert (rows["normal/normal3.dcm"].patient_id, rows["normal/normal3.dcm"].age,
            rows["normal/normal3.dcm"].view) == ("list:normal-1", 52.0, "LL")
    assert scan.stats["list.csv without patient_id"] == 1


def test_build_from_dicom_folder(tmp_path):
    data = dicom_folder(tmp_path / "site", per_class=10)
    summary = build_dataset(tmp_path / "ds", extra=[data], design="all", progress=False)
    df = read_manifest(tmp_path / "ds")
    assert len(df) == 20 and set(df["format"]) == {"DICOM"} and set(df["dicom_scaling"]) == {"bits_stored"}
    assert set(df["mode"]) == {"MONOCHROME1 16-bit", "MONOCHROME2 16-bit"}
    assert all(p.endswith(".png") for p in df["path"])
    for rel in df["path"]:
        with Image.open(tmp_path / "ds" / rel) as png:
            assert (png.format, png.mode, png.size) == ("PNG", "L", (48, 40))
    row = df[df["orig_path"] == "covid/covid4.dcm"].iloc[0]
    assert (row["patient_id"], row["view"], row["sex"], row["age"]) == ("site:covid-2", "AP", "M", 34)
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    assert df["patient_id"].nunique() == 2 * (1 + 5)
    rejected = pd.read_csv(tmp_path / "ds" / "rejected.csv")
    assert rejected.to_dict("records") == [{"source": "site", "item": "covid/report.dcm",
                                            "reason": rejected["reason"][0]}]
    assert "without pixel data" in rejected["reason"][0]
    assert summary["per"]["format"] and all("/DICOM" in k for k in summary["per"]["format"])


@pytest.fixture(scope="module")
def model_run(tmp_path_factory) -> Path:
    """An untrained scratch-gap model at 32 px: loading and predicting is all these tests need."""
    from covidxray.training.models import build_model

    run = tmp_path_factory.mktemp("model") / "run"
    run.mkdir()
    build_model("scratch-gap", image_size=32, seed=0).save(run / "model.keras")
    return run


def test_evaluate_and_cam_on_a_dicom_folder(tmp_path, model_run):
    from covidxray.evaluation.evaluate import SKIPPED_FILE, evaluate_model
    from covidxray.explain.render import render_model_cams

    data = dicom_folder(tmp_path / "ext", per_class=3)
    truncated = data / "normal" / "cut.dcm"
    truncated.write_bytes((data / "normal" / "normal1.dcm").read_bytes()[:-500])
    result = evaluate_model(model_run, data, out_dir=tmp_path / "eval", n_boot=20)
    assert result["metrics"]["n"] == 6
    preds = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert len(preds) == 6
    skipped = pd.read_csv(tmp_path / "eval" / SKIPPED_FILE)
    reasons = dict(zip(skipped["file"].map(lambda f: Path(f).name), skipped["reason"], strict=True))
    assert set(reasons) == {"cut.dcm", "report.dcm"}
    assert "truncated" in reasons["cut.dcm"] and "without pixel data" in reasons["report.dcm"]
    cams = render_model_cams(model_run, data, out_dir=tmp_path / "cam", name="m")
    assert cams["images"] == 6 and len(cams["skipped"]) == 2
    assert len(list((tmp_path / "cam").glob("m__*__true-*.png"))) == 6


FUZZ = settings(max_examples=int(os.environ.get("COVIDXRAY_FUZZ_EXAMPLES", "150")) // 3, deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_VALID: dict[str, bytes] = {}


@FUZZ
@given(kind=st.sampled_from(["16-bit window", "8-bit multi-frame", "JPEG Baseline"]), data=st.data())
def test_mutated_dicom_gives_image_error_only(kind, data):
    """Truncated or bit-flipped DICOM files: decoded, or refused with an ImageError; nothing else escapes."""
    if kind not in _VALID:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "v.dcm"
            if kind == "16-bit window":
                write_dicom(path, pattern(16), RescaleSlope=2, RescaleIntercept=-10, WindowCenter=30000,
                            WindowWidth=20000, PatientAge="045Y")
            elif kind == "8-bit multi-frame":
                write_dicom(path, pattern(8, frames=2), bits=8, photometric="MONOCHROME1")
            else:
                buf = io.BytesIO()
                Image.fromarray(pattern(8)).save(buf, format="JPEG")
                write_dicom(path, None, bits=8, syntax=JPEGBaseline8Bit, raw=buf.getvalue())
            _VALID[kind] = path.read_bytes()
    raw = bytearray(_VALID[kind])
    for pos, value in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)),
                                         max_size=6), label="flips"):
        raw[pos] = value
    cut = data.draw(st.integers(0, len(raw)), label="cut") if data.draw(st.booleans(), label="cut?") else len(raw)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.dcm"
        path.write_bytes(bytes(raw[:cut]))
        try:
            info = check_image(path)
        except ImageError as exc:
            assert exc.path == str(path) and exc.reason and "\n" not in exc.reason
            return
        assert info.format == "DICOM" and info.normalized_png is not None
        dicom_tags(path)


def test_predict_reads_dicom_as_every_reader_does(tmp_path, model_run):
    from covidxray.app.predict import predict

    folder = tmp_path / "scans"
    for i, (bits, photometric) in enumerate([(16, "MONOCHROME2"), (12, "MONOCHROME1"), (8, "MONOCHROME2")]):
        write_dicom(folder / f"scan{i}.dcm", pattern(bits, seed=i), bits=bits, photometric=photometric)
    (folder / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    table = predict(model_run, [folder], tmp_path / "out")["predictions"]
    read = table[table["skipped"].fillna("") == ""]
    assert len(read) == 3 and read["p_covid"].between(0, 1).all()
    assert table.loc[table["path"].str.endswith("broken.dcm"), "skipped"].iloc[0]
