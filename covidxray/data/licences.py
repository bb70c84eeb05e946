"""Which images we may show, under which terms: licences and attribution links from the sources' metadata.

The repository's code is MIT and may be used commercially, so a figure it commits or renders may show an image
only when the image's licence allows redistribution with attribution. The rule is an explicit allow-list
(:data:`SHOWABLE_LICENCES`): CC0, CC BY, CC BY-SA, Apache 2.0, public domain, MIT (the synthetic images this
package draws), and the NIH ChestX-ray14 terms (no restrictions; citation asked). Anything else is not shown:
CC BY-NC, CC BY-NC-SA, CC BY-NC-ND, CC BY-ND, and an unstated or unrecognised licence.

Where the terms come from, per image (a manifest row, see :data:`covidxray.data.manifest.MANIFEST_COLUMNS`):

* ieee8023 (covid-chestxray-dataset): the ``license`` column of its ``metadata.csv``, one licence per image, copied
  into the manifest's ``license`` column by the build; the link is the row's ``url`` (else its ``doi``), else the
  repository. A blank licence means none was stated: not shown.
* Kermany et al. (pediatric normals): CC BY 4.0 for the whole data set, linked to its Mendeley Data page.
* NIH ChestX-ray14: the NIH Clinical Center's terms, linked to its download page.
* The embedded synthetic data: drawn by this package, MIT (the build writes :data:`SYNTHETIC_LICENCE`).
* Any other source (a user's own folder or list) carries no licence information: they are the user's images,
  shown on their own machine as the user decides (the table says so).

Licence strings are normalised first (:func:`normalise_licence`): ``CC BY-NC-SA``, ``cc-by-nc-sa 4.0`` and
``CC BY-NC-SA 4.0 International`` name one family, ``Apache-2.0`` is ``Apache 2.0``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

IEEE8023_REPO = "https://github.com/ieee8023/covid-chestxray-dataset"
KERMANY_URL = "https://data.mendeley.com/datasets/rscbjbr9sj/2"
NIH_URL = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
NIH_TERMS = "NIH ChestX-ray14 terms (no restrictions on use; cite Wang et al., CVPR 2017)"
SYNTHETIC_LICENCE = "MIT"
"""The licence the build writes for every image of the embedded synthetic data (drawn by this package)."""
SYNTHETIC_LINK = "drawn by covidxray.data.synthetic (no patient)"
"""The ``source_url`` the build writes for the synthetic images: there is no page to attribute."""
OWN_IMAGES = "not stated (not a public source of this package: the user's own images)"

SHOWABLE_LICENCES: frozenset[str] = frozenset(
    {"CC0", "CC BY", "CC BY-SA", "Apache 2.0", "Public domain", "MIT", NIH_TERMS}
)
"""Licence families (see :func:`licence_family`) that permit redistribution with attribution, commercial use
included. The explicit allow-list: a licence not named here is not shown."""

SOURCE_TERMS: dict[str, tuple[str, str]] = {
    "kermany": ("CC BY 4.0", KERMANY_URL),
    "nih": (NIH_TERMS, NIH_URL),
    "synthetic": (SYNTHETIC_LICENCE, SYNTHETIC_LINK),
}
"""Sources whose terms hold for the whole data set: source -> (licence, attribution link)."""

PER_IMAGE_SOURCES: dict[str, str] = {"ieee8023": IEEE8023_REPO}
"""Sources whose metadata names a licence per image: source -> the link used when a row names none. A blank
licence of such a source is an unstated licence (not shown)."""

_CC_PARTS = {"BY": "BY", "ATTRIBUTION": "BY", "NC": "NC", "NONCOMMERCIAL": "NC", "ND": "ND", "NODERIVS": "ND",
             "NODERIVATIVES": "ND", "SA": "SA", "SHAREALIKE": "SA"}
_CC_ORDER = ("BY", "NC", "ND", "SA")
_VERSION = re.compile(r"^(\d+)(?:\.(\d+))?$")
_CC_NOISE = {"CC", "CREATIVE", "COMMONS", "LICENSE", "LICENCE", "INTERNATIONAL", "UNPORTED", "GENERIC", "V"}


def _version(token: str) -> str | None:
    """``"4"`` -> ``"4.0"``, ``"3.0"`` -> ``"3.0"``; None when ``token`` is not a version number."""
    match = _VERSION.match(token.lstrip("Vv"))
    if match is None:
        return None
    return f"{match.group(1)}.{match.group(2) or '0'}"


def normalise_licence(text: object) -> str:
    """The canonical spelling of a licence string from a source's metadata; ``""`` when none is stated.

    ``"CC BY-NC-SA"``, ``" cc-by-nc-sa "`` -> ``"CC BY-NC-SA"``; ``"CC BY-NC-SA 4.0 International"``,
    ``"CC-BY-NC-SA-4.0"`` -> ``"CC BY-NC-SA 4.0"``; ``"CC BY 3"`` -> ``"CC BY 3.0"``; ``"CC0 1.0"``,
    ``"cc-zero"`` -> ``"CC0"`` (+ version); ``"Apache-2.0"``, ``"Apache License, Version 2.0"`` ->
    ``"Apache 2.0"``; ``"public domain"`` -> ``"Public domain"``. Any other text comes back with its spaces
    collapsed (``"listed as authorized for everyone"``): it is no licence of the allow-list.
    """
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return ""
    collapsed = " ".join(str(text).split())
    if not collapsed:
        return ""
    upper = collapsed.upper()
    tokens = [t for t in re.split(r"[\s,_/()-]+", upper) if t]
    if upper.startswith("APACHE"):
        versions = [v for t in tokens[1:] if (v := _version(t))]
        return "Apache " + (versions[0] if versions else "2.0")
    if upper.replace("-", " ") in ("PUBLIC DOMAIN", "PD") or upper.startswith("PUBLIC DOMAIN"):
        return "Public domain"
    if upper == "MIT" or upper.startswith("MIT LICEN"):
        return "MIT"
    if tokens and tokens[0] in ("CC0", "CCZERO") or tokens[:2] in (["CC", "0"], ["CC", "ZERO"]):
        rest = tokens[1:] if tokens[0] in ("CC0", "CCZERO") else tokens[2:]
        versions = [v for t in rest if (v := _version(t))]
        return "CC0" + (f" {versions[0]}" if versions else "")
    if tokens and tokens[0] in ("CC", "CREATIVE"):
        parts: set[str] = set()
        version = None
        for token in tokens:
            if token in _CC_PARTS:
                parts.add(_CC_PARTS[token])
            elif (v := _version(token)) is not None and version is None:
                version = v
            elif token not in _CC_NOISE:
                return collapsed  # a word we do not know: not a licence we can read
        if "BY" in parts:
            name = "CC " + "-".join(p for p in _CC_ORDER if p in parts)
            return name + (f" {version}" if version else "")
    return collapsed


def licence_family(licence: str) -> str:
    """A normalised licence without its version: ``"CC BY-NC-SA 4.0"`` -> ``"CC BY-NC-SA"``, ``"Apache 2.0"`` and
    ``NIH_TERMS`` unchanged (their name is the family)."""
    if licence.startswith("CC"):
        return re.sub(r" \d+\.\d+$", "", licence)
    return licence


def may_show(licence: str) -> bool:
    """True when the (normalised) licence is on the allow-list :data:`SHOWABLE_LICENCES`."""
    return licence_family(licence) in SHOWABLE_LICENCES


@dataclass(frozen=True)
class ImageTerms:
    """What we know about the right to show one image."""

    image: str
    """The file name as its source calls it."""
    source: str
    licence: str
    """Normalised (see :func:`normalise_licence`); ``"not stated"`` where the source names none."""
    link: str
    """Where to attribute it: the page or paper the image comes from, else its data set's page."""
    showable: bool


def _text(row: Mapping[str, Any], key: str) -> str:
    value = row.get(key, "")
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return str(value).strip()


def metadata_link(url: str, doi: str) -> str:
    """The attribution link of an ieee8023 metadata row: its ``url``, else its ``doi`` as a doi.org link, else
    ``""`` (the caller falls back to the repository)."""
    url, doi = (url or "").strip(), (doi or "").strip()
    if url:
        return url
    if doi:
        return doi if doi.lower().startswith("http") else f"https://doi.org/{doi}"
    return ""


def image_terms(row: Mapping[str, Any]) -> ImageTerms:
    """The terms of one image, from its manifest row (columns ``source``, ``license``, ``source_url`` and
    ``orig_path`` or ``path`` or ``filepath``; a row of an older manifest without the licence columns works too)."""
    name = Path((_text(row, "orig_path") or _text(row, "path") or _text(row, "filepath")).replace("\\", "/")).name
    source = _text(row, "source")
    stated = normalise_licence(_text(row, "license"))
    link = _text(row, "source_url")
    if source in SOURCE_TERMS:
        licence, default_link = SOURCE_TERMS[source]
        licence = stated or licence
        return ImageTerms(name, source, licence, link or default_link, may_show(licence))
    if source in PER_IMAGE_SOURCES:
        return ImageTerms(name, source, stated or "not stated", link or PER_IMAGE_SOURCES[source],
                          bool(stated) and may_show(stated))
    if stated:
        return ImageTerms(name, source, stated, link, may_show(stated))
    return ImageTerms(name, source, OWN_IMAGES, link, True)


def showable_mask(df: pd.DataFrame) -> np.ndarray:
    """One bool per row of an image table (a manifest or :func:`covidxray.data.labeled_sets.load_labeled`):
    True where the image may be shown (see :func:`image_terms`)."""
    return np.array([image_terms(row).showable for row in df.to_dict(orient="records")], dtype=bool)


def showable(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``df`` whose images may be shown, in order, with their original index."""
    return df[showable_mask(df)]


ATTRIBUTION_COLUMNS = ["image", "source", "licence", "link"]


def attribution_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per image of ``df`` (the images a figure shows): image, source, licence, link."""
    rows = [image_terms(row) for row in df.to_dict(orient="records")]
    return pd.DataFrame([[t.image, t.source, t.licence, t.link] for t in rows], columns=ATTRIBUTION_COLUMNS)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def attribution_markdown(df: pd.DataFrame, title: str = "Images shown") -> str:
    """:func:`attribution_table` of ``df`` as Markdown, under a heading ``title``, with the rule it follows."""
    table = attribution_table(df)
    lines = [f"## {title}", "",
             "Each image shown, its source, its licence and where to attribute it. Only images whose licence permits "
             "redistribution with attribution are shown (CC0, CC BY, CC BY-SA, Apache 2.0, public domain, MIT, the "
             "NIH ChestX-ray14 terms); non-commercial, no-derivatives and unstated licences are left out.", ""]
    if table.empty:
        return "\n".join([*lines, "No image is shown.", ""])
    lines += ["| " + " | ".join(ATTRIBUTION_COLUMNS) + " |", "|" + "---|" * len(ATTRIBUTION_COLUMNS)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


ATTRIBUTION_SUFFIX = "__ATTRIBUTION.md"


def attribution_filename(figure: str) -> str:
    """The attribution file beside a figure's files: ``scratch-gap__ATTRIBUTION.md``."""
    return f"{figure}{ATTRIBUTION_SUFFIX}"


def folder_attribution(folder: str | Path) -> str:
    """Every attribution table written into ``folder`` (``*__ATTRIBUTION.md``, by name), as one Markdown text:
    what a notebook displays under the figures of that folder; ``""`` when there is none."""
    files = sorted(Path(folder).glob(f"*{ATTRIBUTION_SUFFIX}"))
    return "\n".join(f.read_text(encoding="utf-8") for f in files)
