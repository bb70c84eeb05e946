"""Which images may be shown: licence normalisation on the real metadata, the manifest's licence columns, the
thumbnail grid's selection and its attribution table."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from covidxray.data.build import build_dataset
from covidxray.data.licences import (
    IEEE8023_REPO,
    KERMANY_URL,
    attribution_markdown,
    attribution_table,
    image_terms,
    may_show,
    normalise_licence,
    showable,
)
from covidxray.data.manifest import read_manifest
from covidxray.data.sources import read_presplit
from covidxray.evaluation.figures import plot_sample_grid, sample_grid_picks
from tests.conftest import write_image

LICENCES = ["CC BY-NC-SA", "CC BY 3.0", "", "CC BY-NC-ND 4.0", "Apache 2.0", "cc-by-nc-sa 4.0",
            "listed as authorized for everyone", "CC BY-SA", " ", "CC BY-NC-SA 4.0"]
"""One COVID patient per licence: the spellings of the real metadata files, plus a lower-case, hyphenated one."""
SHOWN = {"CC BY 3.0", "Apache 2.0", "CC BY-SA"}


@pytest.mark.parametrize(("raw", "canonical", "shown"), [
    ("CC BY-NC-SA", "CC BY-NC-SA", False),
    (" cc-by-nc-sa-4.0 ", "CC BY-NC-SA 4.0", False),
    ("CC BY-NC-SA 4.0 International", "CC BY-NC-SA 4.0", False),
    ("CC BY-SA-NC", "CC BY-NC-SA", False),
    ("Creative Commons Attribution-NonCommercial 4.0", "CC BY-NC 4.0", False),
    ("CC BY-NC-ND", "CC BY-NC-ND", False),
    ("CC BY-ND 4.0", "CC BY-ND 4.0", False),
    ("CC BY 4", "CC BY 4.0", True),
    ("CC  BY   3.0", "CC BY 3.0", True),
    ("Creative Commons Attribution 4.0 International", "CC BY 4.0", True),
    ("CC-BY-SA", "CC BY-SA", True),
    ("CC0 1.0", "CC0 1.0", True),
    ("cc-0", "CC0", True),
    ("Apache-2.0", "Apache 2.0", True),
    ("Apache License, Version 2.0", "Apache 2.0", True),
    ("public domain", "Public domain", True),
    ("", "", False),
    ("   ", "", False),
    (None, "", False),
    ("listed as  authorized for everyone", "listed as authorized for everyone", False),
    ("CC BY-NC-SA maybe", "CC BY-NC-SA maybe", False),
])
def test_licence_spellings_are_normalised_and_judged_by_the_allow_list(raw, canonical, shown) -> None:
    assert normalise_licence(raw) == canonical
    assert may_show(normalise_licence(raw)) is shown


def test_the_real_metadata_licence_strings(shared_data: Path) -> None:
    """Every licence string of both ieee8023 metadata files (read raw with pandas: spaces, case and versions as
    given) normalises to a known name, and only CC BY (any version), CC BY-SA and Apache 2.0 may be shown."""
    raw: set[str] = set()
    for name in ("metadata-early.csv", "metadata-latest.csv"):
        df = pd.read_csv(shared_data / "ieee8023-metadata" / name, dtype=str, keep_default_na=False)
        raw |= set(df["license"])
    assert " " in raw and "" in raw and "CC BY-NC-SA 4.0" in raw  # the variants the files really hold
    canonical = {normalise_licence(v) for v in raw}
    assert canonical == {"", "CC BY-NC-SA", "CC BY-NC-SA 4.0", "CC BY-NC-ND", "CC BY-NC-ND 4.0", "CC BY",
                         "CC BY 3.0", "CC BY 4.0", "CC BY-SA", "Apache 2.0", "listed as authorized for everyone"}
    assert {c for c in canonical if may_show(c)} == {"CC BY", "CC BY 3.0", "CC BY 4.0", "CC BY-SA", "Apache 2.0"}


def test_seed_dataset_maps_to_its_sources_and_licences(shared_data: Path) -> None:
    """The 2020 folder: MANIFEST.csv's split/label/filename name each file; COVID files are ieee8023 rows (by file
    name, in the early metadata) with that row's licence and link; normals are Kermany files (CC BY 4.0)."""
    meta = shared_data / "ieee8023-metadata" / "metadata-early.csv"
    scan = read_presplit(shared_data / "seed-dataset", metadata=meta)
    listed = pd.read_csv(shared_data / "seed-dataset" / "MANIFEST.csv")
    assert sorted(i.rel_path for i in scan.images) == sorted(listed["split"] + "/" + listed["label"] + "/"
                                                            + listed["filename"])
    rows = pd.read_csv(meta, dtype=str, keep_default_na=False).set_index("filename")
    terms = {}
    for image in scan.images:
        if image.label == "covid":
            assert image.source == "ieee8023" and image.license == rows.loc[image.path.name, "license"]
            assert image.source_url == rows.loc[image.path.name, "url"]
        else:
            assert image.source == "kermany"
        terms[image.rel_path] = image_terms({"source": image.source, "license": image.license,
                                             "source_url": image.source_url, "orig_path": image.rel_path})
    covid = [t for p, t in terms.items() if "/Covid/" in p]
    normal = [t for p, t in terms.items() if "/Normal/" in p]
    assert len(covid) == 140 and len(normal) == 200
    # No COVID image of the 2020 folder has a licence of the allow-list (blank, NC-SA, NC-ND or "listed as
    # authorized for everyone"): none may be shown. Every Kermany normal may.
    assert not any(t.showable for t in covid)
    assert all(t.showable and t.licence == "CC BY 4.0" and t.link == KERMANY_URL for t in normal)


def _sources(root: Path) -> tuple[Path, Path]:
    """A Kermany folder (6 normals) and an ieee8023 folder whose 10 COVID patients carry :data:`LICENCES`."""
    chest, covid = root / "chest", root / "covid"
    for k in range(6):
        write_image(chest / "chest_xray" / "train" / "NORMAL" / f"IM-{k + 1:04d}-0001.png", seed=k)
    rows = []
    for k, licence in enumerate(LICENCES):
        name = f"c{k}.png"
        write_image(covid / "images" / name, seed=100 + k)
        rows.append({"patientid": str(k), "finding": "COVID-19", "view": "PA", "modality": "X-ray", "folder": "images",
                     "filename": name, "doi": "10.1000/x" if k == 1 else "",
                     "url": f"https://example.org/{k}" if k % 2 == 0 else "", "license": licence})
    pd.DataFrame(rows).to_csv(covid / "metadata.csv", index=False)
    return chest, covid


@pytest.fixture(scope="module")
def licensed_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("licences")
    chest, covid = _sources(root)
    build_dataset(root / "dataset", chest_xray=chest, covid_xray=covid, progress=False)
    return root / "dataset"


def test_the_build_carries_each_images_licence_and_link(licensed_dataset: Path) -> None:
    df = read_manifest(licensed_dataset)
    covid = df[df["source"] == "ieee8023"].set_index("orig_path")
    for k, licence in enumerate(LICENCES):
        row = covid.loc[f"images/c{k}.png"]
        assert row["license"] == licence.strip()
        link = f"https://example.org/{k}" if k % 2 == 0 else ("https://doi.org/10.1000/x" if k == 1 else "")
        assert row["source_url"] == link
        terms = image_terms(row.to_dict() | {"orig_path": f"images/c{k}.png"})
        assert terms.link == (link or IEEE8023_REPO)
        assert terms.showable is (licence in SHOWN)
    assert (df.loc[df["source"] == "kermany", "license"] == "").all()
    assert set(showable(df)["orig_path"]) == ({f"images/c{k}.png" for k, lic in enumerate(LICENCES) if lic in SHOWN}
                                             | set(df.loc[df["source"] == "kermany", "orig_path"]))


def test_synthetic_images_are_ours_and_shown(tiny_dataset: Path) -> None:
    df = read_manifest(tiny_dataset)
    assert set(df["license"]) == {"MIT"} and showable(df).equals(df)
    assert set(attribution_table(df)["licence"]) == {"MIT"}


def test_the_thumbnail_grid_never_picks_an_image_it_may_not_show(licensed_dataset: Path, tmp_path: Path) -> None:
    df = read_manifest(licensed_dataset)
    for seed in range(5):
        picks = sample_grid_picks(df, n_per_class=6, seed=seed)
        covid = set(picks.loc[picks["label"] == "covid", "orig_path"])
        assert covid == {f"images/c{k}.png" for k, lic in enumerate(LICENCES) if lic in SHOWN}  # all 3, only they
        assert (picks["label"] == "normal").sum() == 6
        table = attribution_table(picks)
        assert list(table["image"]) == [Path(p).name for p in picks["orig_path"]]
        assert not any("NC" in lic or lic == "not stated" for lic in table["licence"])
    markdown = attribution_markdown(picks)
    assert markdown.count("\n| ") == len(picks) + 1  # header + one line per shown image
    plot_sample_grid(df, n_per_class=6, seed=0, path=tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_heatmaps_show_only_images_we_may_show_and_list_them(tiny_run: Path, licensed_dataset: Path,
                                                              tmp_path: Path) -> None:
    """The cam stage draws overlays of the showable images only, writes their attribution table beside them, and
    still runs its checks on every image it picked; the side-by-side figure likewise."""
    from covidxray.data.licences import folder_attribution
    from covidxray.explain.render import render_model_cams, side_by_side

    out = tmp_path / "cams"
    result = render_model_cams(tiny_run, licensed_dataset, split=None, out_dir=out, name="m")
    df = read_manifest(licensed_dataset)
    allowed = showable(df)
    stems = {Path(p).stem for p in df["path"]}
    overlays = [p.name for p in out.glob("m__*__p*.png")]
    shown_stems = {s for s in stems if any(name.startswith(f"m__{s}__") for name in overlays)}
    assert shown_stems == {Path(p).stem for p in allowed["path"]}
    assert result["files"] == len(overlays) == len(allowed) < len(df) == result["images"]
    markdown = (out / "m__ATTRIBUTION.md").read_text(encoding="utf-8")
    listed = [line.split(" | ")[0].removeprefix("| ") for line in markdown.splitlines() if line.startswith("| ")][1:]
    assert sorted(listed) == sorted(Path(p).name for p in allowed["orig_path"])
    for k, licence in enumerate(LICENCES):
        assert (f"| c{k}.png |" in markdown) is (licence in SHOWN)
    assert "NC" not in markdown.split("left out.")[1] and "not stated" not in markdown
    checks = json.loads((out / "m__checks.json").read_text(encoding="utf-8"))
    assert checks["n_images"] == len(df)  # the checks see every image, shown or not

    side_by_side({"m": tiny_run}, licensed_dataset, split=None, n=12, path=out / "side_by_side.png")
    side = (out / "side_by_side__ATTRIBUTION.md").read_text(encoding="utf-8")
    assert not any(f"| c{k}.png |" in side for k, lic in enumerate(LICENCES) if lic not in SHOWN)
    assert folder_attribution(out) == markdown + "\n" + side
