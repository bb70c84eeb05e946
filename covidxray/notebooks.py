"""Execute the project's notebooks with parameters (papermill), for the tests and for the rendered copies.

``python -m covidxray.notebooks --shared ../shared/data`` re-renders the committed notebooks from the real
runs on ``../shared/data``: the 2020 images, laid out again as the two public sources and split by patient.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

NOTEBOOKS: tuple[str, ...] = (
    "Create_Data.ipynb",
    "Train_Scratch_CNN.ipynb",
    "Train_VGG16.ipynb",
    "Class_Activation_Maps.ipynb",
)
"""In pipeline order: each one uses what the previous ones wrote."""


_TF_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|[IWE]\d{4} \d\d:\d\d:\d\d|"
                       r"To enable the following instructions|WARNING:tensorflow:.*retracing)")


def strip_tf_noise(path: str | Path) -> None:
    """Drop TensorFlow's C++ start-up log lines (oneDNN, CUDA probing, graph attribute notices) from the
    notebook's stderr outputs: TensorFlow 2.21 writes them whatever TF_CPP_MIN_LOG_LEVEL says, and they carry
    no information about the run. Every other output is kept as it is."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                lines = [ln for ln in out["text"].splitlines(keepends=True) if not _TF_NOISE.match(ln)]
                if not "".join(lines).strip():
                    continue
                out["text"] = "".join(lines)
            kept.append(out)
        cell["outputs"] = kept
    nbformat.write(nb, str(path))


def run_notebook(
    notebook: str | Path,
    output: str | Path,
    *,
    parameters: dict[str, Any] | None = None,
    cwd: str | Path | None = None,
    timeout: int | None = None,
) -> Path:
    """Execute ``notebook`` top to bottom with ``parameters`` injected after its ``parameters`` cell."""
    import papermill

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("MPLBACKEND", "Agg")
    papermill.execute_notebook(str(notebook), str(output), parameters=parameters or {}, kernel_name="python3",
                               cwd=None if cwd is None else str(cwd), progress_bar=False,
                               execution_timeout=timeout)
    strip_tf_noise(output)
    return Path(output)


def shared_parameters(shared: str) -> dict[str, dict[str, Any]]:
    """The parameters of the rendered run: the 2020 images split by patient, NIH adult normals for the second
    design, hed VGG16 weights."""
    seed = f"{shared}/seed-dataset"
    meta = f"{shared}/ieee8023-metadata/metadata-early.csv"
    return {
        "Create_Data.ipynb": {"SOURCES": "seed", "SEED_DATASET": seed, "SEED_METADATA": meta, "VIEWS": ["PA"],
                              "NIH": f"{shared}/nih14-sample"},
        "Train_Scratch_CNN.ipynb": {},
        "Train_VGG16.ipynb": {"WEIGHTS": "hed"},
        "Class_Activation_Maps.ipynb": {"LIMIT": 8},
    }


def main(argv: list[str] | None = None) -> int:
    """Render every notebook in place with the parameters of the real run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default="../shared/data", help="the folder with seed-dataset/ etc.")
    parser.add_argument("--only", nargs="*", default=None, help="notebook file names (default: all, in order)")
    args = parser.parse_args(argv)
    params = shared_parameters(args.shared)
    for name in args.only or NOTEBOOKS:
        print(f"executing {name}", flush=True)
        run_notebook(name, name, parameters=params[name])
    return 0


if __name__ == "__main__":
    sys.exit(main())
