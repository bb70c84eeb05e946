"""The package's layout is the pipeline: stage folders in order, no stage importing a later one, and importing the
package (or its command line) leaves the host process as it was and does not load TensorFlow."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "covidxray"
STAGES = ("data", "training", "runs", "evaluation", "explain", "studies", "app")
"""The stage folders, in pipeline order: a module may import its own stage, earlier stages and the shared modules."""
SHARED = {"__init__", "__main__", "errors", "outputs", "metrics", "paths", "limits", "progress", "tfenv"}
"""The top-level modules, shared by every stage (``__main__`` is the command line's entry point)."""


def stage_of(module: str) -> int:
    """0 for a shared top-level module, else 1 + the stage's place in :data:`STAGES`."""
    parts = module.split(".")
    return STAGES.index(parts[1]) + 1 if len(parts) > 1 and parts[1] in STAGES else 0


def imports(path: Path) -> list[tuple[str, int]]:
    """Every covidxray module ``path`` imports (at the top or inside a function), with the line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "covidxray":
            found.append((node.module, node.lineno))
            if node.module == "covidxray":  # `from covidxray import data` names a stage folder
                found += [(f"covidxray.{a.name}", node.lineno) for a in node.names if a.name in STAGES]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "covidxray"]
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def test_the_top_level_holds_the_stage_folders_and_the_shared_modules_only():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert folders == set(STAGES), sorted(folders ^ set(STAGES))
    assert modules == SHARED, sorted(modules ^ SHARED)
    for stage in STAGES:
        assert ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text())), stage


def test_no_stage_imports_a_later_one():
    against = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        if module in ("covidxray.__main__", "covidxray"):
            continue  # entry points: `python -m covidxray` runs the command line; covidxray.open etc. are the API
        for target, line in imports(path):
            if stage_of(target) > stage_of(module):
                against.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not against, "a stage imports a later one (move the shared piece down):\n" + "\n".join(against)


def test_the_check_sees_an_import_against_the_order(tmp_path):
    """The rule above is not vacuous: an import of a later stage inside a function is found."""
    module = tmp_path / "late.py"
    module.write_text("def f():\n    from covidxray.app.cli import main\n    return main\n")
    assert [stage_of(t) for t, _ in imports(module)] == [STAGES.index("app") + 1]
    assert stage_of("covidxray.data.build") < stage_of("covidxray.app.cli") and stage_of("covidxray.outputs") == 0


_PROBE = """
import os, sys
env, meta, fd2 = dict(os.environ), list(sys.meta_path), os.fstat(2)
import covidxray, covidxray.app.cli
changed = [k for k in set(env) | set(os.environ) if env.get(k) != os.environ.get(k)]
print(repr({"tensorflow": "tensorflow" in sys.modules, "env": changed, "meta_path": sys.meta_path != meta,
            "stderr": (os.fstat(2).st_ino, os.fstat(2).st_dev) != (fd2.st_ino, fd2.st_dev)}))
"""


def test_importing_the_package_changes_nothing_in_the_process_and_loads_no_tensorflow():
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == repr({"tensorflow": False, "env": [], "meta_path": False, "stderr": False})


def test_the_test_folders_mirror_the_stage_folders():
    """tests/<stage>/ holds the tests of covidxray/<stage>/; cross-stage tests stay at the top of tests/."""
    folders = {p.name for p in (REPO / "tests").iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert folders <= set(STAGES), sorted(folders - set(STAGES))
    assert len(folders) >= 6
