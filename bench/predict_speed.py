"""Throughput of ``covidxray predict``, end to end: images per second for an untrained model of each architecture.

    python -m bench.predict_speed                      # 200 PNGs of 224 px, batch 32, scratch-gap and vgg16
    python -m bench.predict_speed --n 64 --models scratch-gap

Writes ``--n`` synthetic 8-bit grayscale PNGs into a temporary folder, saves each model (built with
``covidxray.training.models.build_model``, ``weights="none"``: the speed does not depend on the weights) as a ``.keras``
file, and times :func:`covidxray.app.predict.predict` on the folder: model loading, the check of every file
(``covidxray.data.labeled_sets.decodable``), decoding, resizing, inference and writing predictions.csv. Each model runs
``--repeats`` times; the first run includes tracing the model. Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

from covidxray.app.predict import predict
from covidxray.training.models import build_model


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> list[Path]:
    """``n`` grayscale PNGs of ``size`` px: noise with a bright disc in half of them."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = rng.normal(100, 25, (size, size))
        if i % 2:
            cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 8) ** 2] = 220
        path = folder / f"img_{i:04d}.png"
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def measure(name: str, images: Path, work: Path, *, size: int, batch_size: int, repeats: int,
            cam: str | None) -> dict:
    """Seconds and images/s of each ``predict`` run of one freshly built, saved model."""
    model_file = work / name / f"{name}.keras"
    model_file.parent.mkdir(parents=True, exist_ok=True)
    build_model(name, image_size=size, weights="none").save(model_file)
    runs = []
    for i in range(repeats):
        started = time.perf_counter()
        result = predict(model_file, [images], work / name / f"out-{i}", cam=cam, batch_size=batch_size)
        seconds = time.perf_counter() - started
        runs.append({"seconds": round(seconds, 2), "images_per_s": round(result["predicted"] / seconds, 1),
                     "predicted": result["predicted"], "skipped": result["skipped"]})
    return {"model": name, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    """Run the measurement and print one Markdown row per model and run."""
    parser = argparse.ArgumentParser(prog="python -m bench.predict_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of images (default: 200)")
    parser.add_argument("--image-size", type=int, default=224, help="image and model size in px (default: 224)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--models", default="scratch-gap,vgg16", help="comma-separated covidxray model names")
    parser.add_argument("--repeats", type=int, default=2, help="runs per model; the first includes tracing")
    parser.add_argument("--cam", default=None, help="also draw heatmaps with this method (auto, cam, gradcam, ...)")
    args = parser.parse_args(argv)
    devices = ", ".join(d.name for d in tf.config.list_logical_devices())
    print(f"{args.n} PNGs of {args.image_size} px, batch {args.batch_size}, cam {args.cam}; devices: {devices}; "
          f"{os.cpu_count()} CPUs visible")
    print("| model | run | seconds | images/s |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="covidxray-predict-speed-") as tmp:
        work = Path(tmp)
        write_images(work / "images", args.n, args.image_size)
        for name in (m.strip() for m in args.models.split(",") if m.strip()):
            result = measure(name, work / "images", work, size=args.image_size, batch_size=args.batch_size,
                             repeats=args.repeats, cam=args.cam)
            for i, run in enumerate(result["runs"], start=1):
                print(f"| {name} | {i}{' (cold)' if i == 1 else ''} | {run['seconds']} | {run['images_per_s']} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
