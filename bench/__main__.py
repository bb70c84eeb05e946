"""``python -m bench [--quick] [--out DIR]``: run the benchmark and write results.json and results.md.

``python -m bench --precision [--quick] [--out DIR]``: the float32 / bfloat16 benchmark instead (bench/precision.py,
precision_results.json and .md).

``python -m bench --scaling [--quick] [--out DIR] [--precisions float32,bfloat16] [--scale-n N] [--fractions ...]``:
the scaling curve alone, in float32 and bfloat16 (bench/scaling.py, scaling_results.json and .md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _parser() -> argparse.ArgumentParser:
    from bench.run import SHARED_DATA, Options

    d = Options()
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="CI smoke run: 64 px, 2 epochs (< 3 minutes)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for results.json and results.md (default: bench/ for the full run on "
                   "the 2020 images; runs/bench-quick/ for --quick, changed settings or synthetic data)")
    p.add_argument("--data", type=Path, default=SHARED_DATA,
                   help="folder holding seed-dataset/ and ieee8023-metadata/ (synthetic data when absent)")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--weights", default=d.weights, help="VGG16 backbone weights spec for both pipelines")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate of ours (the original used 1e-3)")
    p.add_argument("--views", type=int, default=d.feature_views, help="ours: cached views per training image")
    p.add_argument("--extra-views", type=int, default=None,
                   help=f"full mode: also run ours with this many views (default {d.extra_views}; 0: skip)")
    p.add_argument("--mixed-precision", action="store_true", help="ours: float16 compute (GPU only)")
    p.add_argument("--precision", action="store_true",
                   help="run the float32 vs bfloat16 benchmark instead (see bench/precision.py; its own options)")
    p.add_argument("--scaling", action="store_true",
                   help="run only the scaling curve, float32 and bfloat16 (see bench/scaling.py; its own options)")
    p.add_argument("--jit-compile", choices=("auto", "on", "off"), default="auto",
                   help="ours: XLA (auto: on a GPU without op determinism, off on CPU)")
    p.add_argument("--workdir", type=Path, default=None, help="keep the work files here (default: a temp folder)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--scale-child", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--precision" in argv:
        from bench.precision import main as precision_main

        return precision_main([a for a in argv if a != "--precision"])
    if "--scaling" in argv:
        from bench.scaling import main as scaling_main

        return scaling_main([a for a in argv if a != "--scaling"])
    args = _parser().parse_args(argv)
    if args.scale_child:
        from bench.scaling import child
        from covidxray.outputs import write_json

        result = child(json.loads(args.scale_child))
        write_json(result, args.out)
        return 0
    from bench.run import Options, run_all

    overrides: dict = {"data": args.data, "weights": args.weights, "feature_views": args.views, "seed": args.seed,
                       "lr": args.lr,
                       "workdir": args.workdir,
                       "precision": "float16" if args.mixed_precision else "float32",
                       "jit_compile": {"auto": None, "on": True, "off": False}[args.jit_compile]}
    if args.out is not None:
        overrides["out"] = args.out
    for key in ("image_size", "epochs"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    if args.extra_views is not None:
        overrides["extra_views"] = args.extra_views or None
    opts = Options.quick_mode(**overrides) if args.quick else Options(**overrides)
    results = run_all(opts)
    missed = [name for name, t in results["targets"].items() if not t["met"]]
    print(f"targets met: {len(results['targets']) - len(missed)}/{len(results['targets'])}"
          + (f" (missed: {', '.join(missed)})" if missed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
