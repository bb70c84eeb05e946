"""Where a bench writes its results: the committed files only from a full run with the committed settings.

``bench/results.*``, ``bench/precision_results.*``, ``bench/scaling_results.*`` and ``results/`` are committed and
the README's tables are generated from them. A quick or otherwise partial run (``--quick``, fewer epochs, smaller
images, a subset, or the synthetic fallback where the committed figures are from the 2020 images) writes into
``runs/bench-quick/`` (git-ignored) instead, or into ``--out`` when given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "bench"
"""Folder of the committed benchmark results."""
QUICK_OUT = REPO / "runs" / "bench-quick"
"""Default folder of quick and partial runs (git-ignored)."""


def changed_settings(opts: Any, names: Sequence[str], default: Any | None = None) -> list[str]:
    """Why the run ``opts`` (a dataclass, or an argparse namespace with ``default`` the parser's defaults) is not
    the committed full run: ``--quick``, or each field of ``names`` whose value differs from ``default`` (the
    dataclass's defaults when None), as ``name=value``."""
    if getattr(opts, "quick", False):
        return ["--quick"]
    default = type(opts)() if default is None else default
    known = {f.name for f in fields(opts)} if is_dataclass(opts) else set(vars(opts))
    return [f"{name}={getattr(opts, name)!r}" for name in names
            if name in known and getattr(opts, name) != getattr(default, name)]


def results_folder(out: Path | None, partial: Sequence[str], committed: Path = COMMITTED) -> Path:
    """``out`` when given; else ``committed`` for a full run (``partial`` empty), or :data:`QUICK_OUT` (with
    ``committed``'s name below it when that is not ``bench/``) for a partial one, which a line says."""
    if out is not None:
        return Path(out)
    if not partial:
        return committed
    folder = QUICK_OUT if committed == COMMITTED else QUICK_OUT / committed.name
    print(f"[bench] partial run ({', '.join(partial)}): results go to {_shown(folder)}/, not over the committed "
          f"files in {_shown(committed)}/ (--out DIR to choose)", flush=True)
    return folder


def _shown(path: Path) -> str:
    """``path`` relative to the repository when inside it."""
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)
