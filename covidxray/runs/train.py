"""Training: fit on the ``train`` split, select and early-stop on ``val``, never look at ``test``.

Every run, on one device, several GPUs or several machines (``distribute``, see covidxray.training.distribute),
trains with
the one loop of covidxray.training.loop.

A run folder holds everything needed to judge and reproduce a model:

- ``model.keras``: the best model on val (by ``config.monitor``), preprocessing included;
- ``config.json``: the exact (resolved) TrainConfig; ``versions.json``: software and devices;
- ``history.csv`` / ``history.json``: one row per epoch; ``timing.json``: seconds per epoch and in total;
- ``threshold.json``: the decision threshold chosen on val (:func:`covidxray.metrics.choose_threshold`) and
  the val metrics at it;
- ``val_predictions.csv``: the best model's val probabilities; ``summary.json``: what ``train`` returns;
- ``model.json`` / ``model_card.md``: the model card (covidxray.runs.card): input contract, threshold, data
  warnings, metrics;
- ``checkpoint/``: the last epoch's model (optimizer included) and ``state.json`` (epoch, history, best score),
  so ``train(..., resume=True)`` continues an interrupted run or extends a finished one with more epochs.

A resumed run restores the weights and the optimizer state; its shuffling and augmentation streams restart,
seeded by ``seed + epoch``, so it is reproducible but not bit-identical to an uninterrupted run.

VGG16 with everything before ``block5_conv3`` (or a later layer) frozen and no fine-tuning stage trains on
cached activations of the frozen part (``cached_features``, see covidxray.training.feature_cache): the frozen part
runs once
per validation image and ``feature_views`` times per training image instead of once per image per epoch, and
only the tail (``block5_conv3`` and the head) is fitted. ``model.keras`` is still the full model taking images.
For such a run ``checkpoint/epoch_*.keras`` holds the tail (its weights and optimizer state) and
``state.json`` says ``"cached": true``; resuming rebuilds the frozen part from the weights spec, recomputes the
cache (same seed, same views) and continues with the batches an uninterrupted run would have seen (order and
view draws are seeded by (``seed``, epoch)); only the dropout draws restart, so it too is reproducible but not
bit-identical.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import importlib.util
import math
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import tensorflow as tf

from covidxray import LABELS
from covidxray.data.manifest import MANIFEST_NAME, dataset_provenance, dataset_summary, read_manifest, split_frame
from covidxray.errors import CovidXrayError, DataError, ModelError
from covidxray.metrics import THRESHOLD_METHODS, choose_threshold
from covidxray.outputs import JUPYTER_KERNEL_COMMAND, OutputDir, artifact, claim_output, command_line, fingerprint
from covidxray.progress import bar_wanted
from covidxray.runs.card import drop_model_card, write_model_card
from covidxray.runs.load import CHECKPOINT_DIR, MODEL_FILE, load_run, predict_dataframe, read_run_json, versions
from covidxray.training.backbones import VGG16_CONV_LAYERS, check_weights_available, load_vgg16_backbone_weights
from covidxray.training.compute_dtype import PRECISIONS, PrecisionChoice, choose_precision, dtype_policy
from covidxray.training.distribute import (
    DEFAULT_STARTUP_TIMEOUT,
    DISTRIBUTES,
    DistributeChoice,
    choose_distribution,
    make_strategy,
)
from covidxray.training.feature_cache import (
    FeatureBatches,
    FeatureStore,
    can_cache,
    extract_features,
    frozen_part,
    predict_cached,
    tail_part,
)
from covidxray.training.loop import CustomLoop, share_from_chief, sync_variables
from covidxray.training.models import MODEL_NAMES, build_model, compile_model, set_trainable_from
from covidxray.training.pipeline import IMAGE_READ_ERRORS, AugmentConfig, make_dataset, raise_unreadable

STATE_FILE = "state.json"
TENSORBOARD_DIR = "tensorboard"
"""Where ``train(..., tensorboard=True)`` has Keras write TensorBoard logs, inside the run folder."""
VAL_SUMMARY: tuple[str, ...] = ("n", "n_pos", "roc_auc", "accuracy", "recall", "specificity")
"""The val metrics (at the chosen threshold) repeated in ``summary.json``; all of threshold.json has them."""
MONITORS: dict[str, str] = {"val_loss": "min", "val_auc": "max", "val_accuracy": "max"}
RESUMABLE_CHANGES: tuple[str, ...] = ("epochs", "finetune_epochs", "distribute", "startup_timeout")
"""Config fields a resumed run may change (to train longer, or on other hardware); any other difference is an
error."""


class RunFolderTaken(ModelError):
    """The output folder holds a run this training cannot continue (other settings, another dataset): the fix is
    to move that folder aside or train into another one, not to change the new settings."""


@dataclass
class TrainConfig:
    """Everything that defines a training run; saved verbatim as ``config.json``.

    ``weights=None`` means "imagenet" for vgg16 and "none" for the scratch models. ``patience`` epochs without
    improvement of ``monitor`` on val stop a stage (0 disables early stopping). ``finetune_epochs`` > 0 adds a
    second vgg16 stage that restarts from the best model, unfreezes from ``finetune_from`` and trains at
    ``finetune_lr``. ``cache`` is "memory", None/"none", or a folder for on-disk tf.data caches (one per split,
    named after its files and the image size). ``batch_size`` is the global batch (split across GPUs).
    ``deterministic`` enables TensorFlow op determinism (same seed, same machine -> same metrics).
    ``precision`` is the compute precision asked for: float32 (the default), bfloat16, float16 (GPU only: float32
    on a CPU) or auto (float16 on a GPU, bfloat16 on a CPU with bf16 instructions, else float32); see
    covidxray.training.compute_dtype. What was used and why is ``summary.json``'s ``precision``. An older config's
    ``mixed_precision`` is read as ``precision`` float16 (true) or float32 (false).

    ``cached_features`` trains the vgg16 tail on cached activations of the frozen backbone when the first
    trainable layer is ``block5_conv3`` or later and ``finetune_epochs`` is 0 (False: the plain end-to-end path;
    same model, several times slower). ``feature_views`` is how many views of each training image are cached:
    1 caches the image itself only, so augmentation does not apply to that path; each further view is one
    random augmentation (and one more frozen-backbone pass per training image); with ``augment`` off only the
    image itself is cached. ``jit_compile``: XLA for the training step and the feature extraction; None means on
    a GPU without op determinism, off on a CPU-only machine (where XLA does not pay); never for a training step
    split over several replicas.

    ``distribute`` is where training runs (see covidxray.training.distribute): auto (multi-worker when ``TF_CONFIG`` is
    set, mirrored over several GPUs, else one device), one, mirrored or multi-worker. What was used and why is
    ``summary.json``'s ``distribute``. Every strategy trains with the same loop (covidxray.training.loop).
    ``startup_timeout``: seconds a multi-worker run waits for its other machines before it stops with a
    ClusterError naming those not reached (ignored by the other strategies).
    """

    model: str = "vgg16"
    weights: str | None = None
    image_size: int = 224
    batch_size: int = 32
    epochs: int = 20
    lr: float = 1e-4
    seed: int = 0
    dropout: float = 0.5
    trainable_from: str | None = "block5_conv3"
    augment: bool = True
    width_shift: float = 0.2
    height_shift: float = 0.1
    shear: float = 0.2
    zoom: float = 0.1
    horizontal_flip: bool = True
    patience: int = 5
    monitor: str = "val_loss"
    finetune_epochs: int = 0
    finetune_lr: float = 1e-5
    finetune_from: str = "block4_conv1"
    cache: str | None = "memory"
    deterministic: bool = True
    precision: str = "float32"
    threshold_method: str = "youden"
    cached_features: bool = True
    feature_views: int = 1
    jit_compile: bool | None = None
    distribute: str = "auto"
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT

    def resolved(self) -> TrainConfig:
        """A copy with defaults that depend on the model filled in, checked for consistency."""
        weights = self.weights if self.weights is not None else ("imagenet" if self.model == "vgg16" else "none")
        cfg = replace(self, weights=weights, cache=None if self.cache in (None, "", "none") else self.cache)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Raise ModelError on values that cannot work, naming each setting, its ``covidxray train`` flag and range."""
        from covidxray import limits

        problems = []
        if self.model not in MODEL_NAMES:
            problems.append(f"model must be one of {list(MODEL_NAMES)}")
        if self.monitor not in MONITORS:
            problems.append(f"monitor must be one of {list(MONITORS)}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision (--precision) must be one of {list(PRECISIONS)}")
        if self.distribute not in DISTRIBUTES:
            problems.append(f"distribute (--distribute) must be one of {list(DISTRIBUTES)}")
        if self.threshold_method not in THRESHOLD_METHODS:
            problems.append(f"threshold_method must be one of {list(THRESHOLD_METHODS)}")
        checks = [
            ("epochs", self.epochs, limits.POSITIVE_INT, "--epochs"),
            ("batch_size", self.batch_size, limits.POSITIVE_INT, "--batch-size"),
            ("image_size", self.image_size, limits.IMAGE_SIZE, "--image-size"),
            ("lr", self.lr, limits.LEARNING_RATE, "--lr"),
            ("seed", self.seed, limits.SEED, "--seed"),
            ("patience", self.patience, limits.NON_NEGATIVE_INT, "--patience"),
            ("finetune_epochs", self.finetune_epochs, limits.NON_NEGATIVE_INT, "--finetune-epochs"),
            ("finetune_lr", self.finetune_lr, limits.LEARNING_RATE, None),
            ("feature_views", self.feature_views, limits.POSITIVE_INT, "--feature-views"),
            ("startup_timeout", self.startup_timeout, limits.STARTUP_TIMEOUT, "--startup-timeout"),
            ("dropout", self.dropout, limits.FRACTION, None),
            *((name, getattr(self, name), limits.FRACTION, None) for name in ("width_shift", "height_shift", "zoom")),
            ("shear", self.shear, limits.Range(0.0, 90.0, hi_open=True), None),
        ]
        problems += [p for name, value, valid, flag in checks if (p := limits.out_of_range(name, value, valid, flag))]
        if self.finetune_epochs and self.model != "vgg16":
            problems.append("finetune_epochs (unfreezing more of VGG16) applies to the vgg16 model only")
        if self.finetune_epochs and self.finetune_from not in VGG16_CONV_LAYERS:
            problems.append(f"finetune_from must be a VGG16 conv layer ({VGG16_CONV_LAYERS[0]} ... "
                            f"{VGG16_CONV_LAYERS[-1]})")
        if problems:
            raise ModelError("bad training config: " + "; ".join(problems) + ".", usage=True)

    def augment_config(self) -> AugmentConfig | None:
        """The augmentation this config asks for (None when ``augment`` is off)."""
        if not self.augment:
            return None
        return AugmentConfig(width_shift=self.width_shift, height_shift=self.height_shift, shear=self.shear,
                             zoom=self.zoom, horizontal_flip=self.horizontal_flip)

    def to_dict(self) -> dict:
        """Plain dict of all fields."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Inverse of ``to_dict``; unknown keys are an error (a typo would otherwise be ignored silently).

        A config of an older version with ``mixed_precision`` (and no ``precision``) reads as precision float16
        (true: float16 on a GPU, float32 elsewhere, as it then behaved) or float32 (false).
        """
        data = dict(data)
        if "mixed_precision" in data:
            mixed = data.pop("mixed_precision")
            data.setdefault("precision", "float16" if mixed else "float32")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"unknown training config field(s) {unknown}; known: {sorted(known)}.")
        return cls(**data)


# ---------------------------------------------------------------------------------------------- small helpers


def dataset_record(data_dir: str | Path) -> dict:
    """Which dataset a run trains on: its folder, the fingerprint of its manifest and its size."""
    manifest = Path(data_dir) / MANIFEST_NAME
    if not manifest.is_file():
        raise DataError(f"{manifest}: not found; build the dataset first (`covidxray data --out {data_dir}`).")
    design = (dataset_summary(data_dir).get("design") or {}).get("name")
    return {"path": Path(data_dir).as_posix(), "fingerprint": fingerprint(manifest), "design": design}


def run_dataset(run_dir: str | Path) -> dict | None:
    """The dataset a run folder records it was trained on (see :func:`dataset_record`), None if it records none."""
    path = Path(run_dir) / "provenance.json"
    if not path.is_file():
        return None
    return (read_run_json(path).get("dataset") or None)


def check_trained_on(run_dir: str | Path, data_dir: str | Path) -> None:
    """Refuse a run that was not trained on ``data_dir`` (its manifest fingerprint differs or is unrecorded)."""
    _check_same_dataset(Path(run_dir), run_dataset(run_dir), dataset_record(data_dir))


def _check_same_dataset(out_dir: Path, recorded: dict | None, current: dict) -> None:
    """Refuse to resume or reuse a run trained on another dataset (or on one it cannot name)."""
    if recorded and recorded.get("fingerprint") == current["fingerprint"]:
        return
    was = (f"{recorded.get('path')} (manifest fingerprint {recorded.get('fingerprint')})" if recorded
           else "a dataset it does not record")
    raise RunFolderTaken(f"{out_dir}: this run was trained on {was}, not on {current['path']} (manifest fingerprint "
                     f"{current['fingerprint']}); it cannot be resumed or reused. Start fresh with another --out, "
                     "or delete the run folder.")


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[covidxray.runs.train] {message}", file=sys.stderr, flush=True)




# ---------------------------------------------------------------------------------------------- training


@dataclass
class _State:
    """What ``checkpoint/state.json`` keeps between sessions."""

    config: dict
    weights: dict
    epoch: int = 0
    stage: int = 1
    stage1_end: int | None = None
    best: float | None = None
    best_epoch: int | None = None
    wait: int = 0
    stopped_early: bool = False
    checkpoint: str | None = None
    sessions: int = 0
    cached: bool = False
    history: list[dict] = field(default_factory=list)
    dataset: dict | None = None
    """The dataset trained on (see :func:`dataset_record`); a resume on another dataset is refused."""


class _RunCallback(keras.callbacks.Callback):
    """Per epoch: log a history row, save the best model on val, early-stop, write the checkpoint.

    ``export`` is the model saved as ``model.keras`` when it differs from the one being fitted (the full model
    around a tail trained on cached activations).
    """

    def __init__(self, run: _Run, stage: int, export: keras.Model | None = None) -> None:
        super().__init__()
        self.run = run
        self.stage = stage
        self.export = export
        self.started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        run, state, cfg = self.run, self.run.state, self.run.cfg
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {"epoch": epoch + 1, "stage": self.stage, "lr": lr}
        row.update({k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"})
        row["seconds"] = time.perf_counter() - self.started
        state.history.append(row)
        state.epoch = epoch + 1
        value = row.get(cfg.monitor, float("nan"))
        better = (value < state.best if MONITORS[cfg.monitor] == "min" else value > state.best) \
            if state.best is not None else True
        if math.isfinite(value) and better:
            run.out.put(MODEL_FILE, (self.export or self.model).save)
            state.best, state.best_epoch, state.wait = value, epoch + 1, 0
        else:
            state.wait += 1
            if cfg.patience and state.wait >= cfg.patience:
                state.stopped_early = True
                self.model.stop_training = True
        run.save_checkpoint(self.model)


class _Run:
    """One training session on a run folder."""

    def __init__(self, cfg: TrainConfig, data_dir: Path, out: OutputDir, progress: bool,
                 tensorboard: bool = False) -> None:
        self.cfg, self.data_dir, self.out, self.progress = cfg, data_dir, out, progress
        self.tensorboard = tensorboard
        self.out_dir = out.path
        self.ckpt_dir = self.out_dir / CHECKPOINT_DIR
        self.state: _State | None = None
        self.feature_stats: dict | None = None
        self.val_store: FeatureStore | None = None

    def save_checkpoint(self, model: keras.Model) -> None:
        name = f"epoch_{self.state.epoch:04d}.keras"
        self.out.put(f"{CHECKPOINT_DIR}/{name}", model.save)
        self.state.checkpoint = name
        self.out.write_json(f"{CHECKPOINT_DIR}/{STATE_FILE}", asdict(self.state), sort_keys=False)
        for old in self.out.files():
            if old.startswith(f"{CHECKPOINT_DIR}/epoch_") and old != f"{CHECKPOINT_DIR}/{name}":
                self.out.remove(old)
        self.write_history()

    def write_history(self) -> None:
        self.out.write_json("history.json", self.state.history, sort_keys=False)
        self.out.write_csv("history.csv", pd.DataFrame(self.state.history))


def _cache_for(cfg: TrainConfig, df: pd.DataFrame, split: str) -> str | None:
    """"memory"/None as given; for a cache folder, a file prefix keyed by the split's files and the image size."""
    if cfg.cache in (None, "memory"):
        return cfg.cache
    key = hashlib.sha1("\n".join(df["filepath"]).encode())
    if "sha256" in df.columns:
        key.update("\n".join(map(str, df["sha256"])).encode())
    return str(Path(cfg.cache) / f"{split}-{cfg.image_size}px-{key.hexdigest()[:12]}")


def _load_state(run: _Run, cfg: TrainConfig, resume: bool) -> _State | None:
    """The saved state of a resumable run, after checking that the new config only extends it."""
    state_path = run.ckpt_dir / STATE_FILE
    if not state_path.is_file():
        if (run.out_dir / MODEL_FILE).exists():
            raise ModelError(f"{run.out_dir}: holds a finished run without a checkpoint; choose a new output folder.")
        if resume:
            _say(run.progress, f"nothing to resume in {run.out_dir}; starting a new run")
        return None
    if not resume:
        raise ModelError(f"{run.out_dir}: already holds a run (checkpoint in {run.ckpt_dir}); pass resume=True "
                         "(--resume) to continue or extend it, or choose a new output folder.")
    saved = read_run_json(state_path)
    state = _State(**saved)
    old = TrainConfig.from_dict(state.config)
    diffs = [f.name for f in fields(TrainConfig)
             if f.name not in RESUMABLE_CHANGES and getattr(old, f.name) != getattr(cfg, f.name)]
    if diffs:
        raise RunFolderTaken(_taken_message(run.out_dir, state_path, old, cfg, diffs))
    if state.stage == 2 and cfg.epochs != old.epochs:
        raise ModelError(f"{run.out_dir}: the fine-tuning stage has begun, so `epochs` (stage 1) can no longer "
                         f"change (was {old.epochs}); extend `finetune_epochs` instead.")
    if not (run.ckpt_dir / str(state.checkpoint)).is_file():
        raise ModelError(f"{run.ckpt_dir / str(state.checkpoint)}: checkpoint model missing; cannot resume, "
                         "start a new run.")
    return state


def _taken_message(out_dir: Path, state_path: Path, old: TrainConfig, new: TrainConfig, diffs: list[str]) -> str:
    """Why ``out_dir`` cannot take this training: what the run in it is (who wrote it, when it last trained, the
    settings that differ, from its record and checkpoint), and that the fix is to move that folder or train into
    another one; changing the new settings would only be right to continue that very run."""
    command = " ".join((artifact(out_dir) or {}).get("command") or [])
    who = ("in a Jupyter notebook" if command == JUPYTER_KERNEL_COMMAND else f"by `{command}`" if command
           else "by an unrecorded command")
    when = dt.datetime.fromtimestamp(state_path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    settings = ", ".join(f"{name}={getattr(old, name)!r} (this training: {getattr(new, name)!r})" for name in diffs)
    return (f"{out_dir}: cannot resume with a different config; changed: {diffs}. This folder holds another run, "
            f"trained {who} (last epoch saved {when}), with {settings}; a run continues only with its own settings "
            f"(only {list(RESUMABLE_CHANGES)} may change, to train longer). To train these settings, move or rename "
            f"{out_dir.as_posix()}/ (it is kept as it is) or train into another folder (--out); to continue that "
            "run instead, train it with its own settings.")


def _remaining(state: _State | None, cfg: TrainConfig) -> bool:
    """Whether any epoch is left to train under ``cfg``."""
    if state is None:
        return True
    if state.stage == 1:
        if not state.stopped_early and state.epoch < cfg.epochs:
            return True
        return cfg.finetune_epochs > 0
    return not state.stopped_early and state.epoch < (state.stage1_end or 0) + cfg.finetune_epochs


def _precision(cfg: TrainConfig) -> PrecisionChoice:
    """The precision ``cfg.precision`` gets on this machine."""
    return choose_precision(cfg.precision, gpu=bool(tf.config.list_physical_devices("GPU")))


@contextlib.contextmanager
def _data_errors(run: _Run, paths: list[str]) -> Iterator[None]:
    """Turn TensorFlow's errors about the images (unreadable, missing) and a locked on-disk cache into DataErrors
    naming the file or folder and the fix."""
    try:
        yield
    except IMAGE_READ_ERRORS as exc:
        raise_unreadable(paths, exc)
    except tf.errors.AlreadyExistsError as exc:
        raise DataError(f"the on-disk image cache in {run.cfg.cache} is locked ({exc.message.splitlines()[0]}). "
                        "Another run may be filling it; if none is, delete its *.lockfile files (or the cache "
                        "folder) and retry, or use cache='memory'.") from exc


def _adopt_tensorboard(run: _Run) -> None:
    """Record the files TensorBoard wrote itself in the run folder, so a resume or rerun does not refuse them."""
    board = run.out_dir / TENSORBOARD_DIR
    if run.tensorboard and board.is_dir():
        for path in sorted(p for p in board.rglob("*") if p.is_file() and not p.is_symlink()):
            run.out.adopt(path.relative_to(run.out_dir).as_posix())


def _distribute(strategy: tf.distribute.Strategy, ds: tf.data.Dataset) -> tf.data.Dataset:
    """Shard by data across replicas when there are several (``AutoShardPolicy.DATA``).

    Every dataset here is one source, not a set of files: the image paths shuffled with the run's seed, decoded
    and cached (in memory or in one cache file) and augmented per global batch, or the cached VGG16 features
    batched by a generator. FILE sharding (each worker reads its own files) would need at least one input file
    per worker and would change which images meet in a batch. With DATA, every worker runs the same pipeline,
    so every global batch is the one a single process would see, and keeps its part of it: the replicas of a
    step together train on exactly that batch. The price, decoding (and augmenting) every image on every
    worker, is paid once per worker for the cache and is small next to a training step.
    """
    if strategy.num_replicas_in_sync <= 1:
        return ds
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def _feature_data(run: _Run, model: keras.Model, train_df: pd.DataFrame, val_df: pd.DataFrame, paths: list[str],
                  stores: list[FeatureStore], strategy: tf.distribute.Strategy
                  ) -> tuple[tf.data.Dataset, tf.data.Dataset, keras.callbacks.Callback]:
    """Cache the frozen part's activations for train (``feature_views`` views) and val; their datasets and the
    callback that tells the training batches the epoch.

    The caches go to ``cfg.cache`` when that is a folder, to memory otherwise (or, past the memory limit, to a
    temporary file in the checkpoint folder); they are appended to ``stores`` for the caller to release.
    """
    cfg, state = run.cfg, run.state
    augment = cfg.augment_config()
    views = cfg.feature_views if augment is not None and not augment.is_identity else 1
    on_disk = cfg.cache not in (None, "memory")
    directory = Path(cfg.cache) if on_disk else run.out.scratch()
    jit = _jit(cfg)
    frozen = frozen_part(model, cfg.trainable_from)
    _say(run.progress, f"caching the frozen backbone's activations: {len(train_df)} train images x {views} "
                       f"view(s), {len(val_df)} val images")
    stats = {}
    try:
        # train: float16 (the bulk); val: float32, so val metrics, selection and threshold match the full model
        for split, df, n_views, dtype in (("train", train_df, views, np.float16), ("val", val_df, 1, np.float32)):
            store, info = extract_features(frozen, df, image_size=cfg.image_size, views=n_views, augment=augment,
                                           seed=cfg.seed, batch_size=cfg.batch_size, directory=directory,
                                           on_disk=on_disk, name=f"features-{split}", jit_compile=jit, dtype=dtype)
            stores.append(store)
            stats[split] = {**info.to_dict(), "views": n_views, "bytes": store.nbytes, "on_disk": store.on_disk}
    except IMAGE_READ_ERRORS as exc:
        raise_unreadable(paths, exc)
    run.feature_stats = stats
    train_store, val_store = stores[-2], stores[-1]
    run.val_store = val_store
    batches = FeatureBatches(train_store, train_df["y"].to_numpy(), batch_size=cfg.batch_size, training=True,
                             seed=cfg.seed, first_epoch=state.epoch)
    val_ds = FeatureBatches(val_store, val_df["y"].to_numpy(), batch_size=cfg.batch_size, training=False).dataset()
    return _distribute(strategy, batches.dataset()), _distribute(strategy, val_ds), batches.callback()


def train(config: TrainConfig, data_dir: str | Path, out_dir: str | Path, *, progress: bool = True,
          resume: bool = False, tensorboard: bool = False) -> dict:
    """Train ``config`` on ``data_dir``'s manifest, writing the run folder ``out_dir``; returns the summary.

    Uses the ``train`` split for fitting and ``val`` for early stopping, checkpoint selection and the decision
    threshold; the ``test`` split is dropped on reading and never decoded. On the cached-features path the
    frozen backbone runs once per val image: selection, ``val_predictions.csv`` and the threshold use its
    cached float32 activations with the best model's tail. ``resume=True`` continues from
    ``out_dir/checkpoint`` (a finished run is returned unchanged unless the config asks for more epochs).
    ``tensorboard=True`` adds Keras' TensorBoard logs in ``out_dir/tensorboard``. VGG16 weights that cannot be
    had (ImageNet offline, hed not installed, a missing file) fail here, before any work.
    """
    cfg = config.resolved()
    if cfg.model == "vgg16":
        check_weights_available(str(cfg.weights))
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ModelError('--tensorboard: the tensorboard package, which writes the logs, is not installed: pip '
                         'install "covidxray[tensorboard]" (or leave --tensorboard out).')
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    dataset = dataset_record(data_dir)
    dist = choose_distribution(cfg.distribute)
    # first: multi-worker must set up before TensorFlow runs anything
    strategy = make_strategy(dist, startup_timeout=cfg.startup_timeout)
    if not dist.chief:
        return _train_worker(cfg, data_dir, out_dir, dataset, resume, progress, strategy, dist)
    link = _ChiefLink(strategy, dist)
    try:
        with claim_output(out_dir, "train", sources=[data_dir], data=dataset_provenance(data_dir)) as out:
            run = _Run(cfg, data_dir, out, progress, tensorboard)
            try:
                return _train(run, cfg, dataset, resume, strategy, dist, link)
            except BaseException:
                if run.state is None or not run.state.checkpoint:
                    out.discard()
                raise
    except Exception as exc:
        link.fail(exc)
        raise


def _train_worker(cfg: TrainConfig, data_dir: Path, out_dir: Path, dataset: dict, resume: bool, progress: bool,
                  strategy: tf.distribute.Strategy, dist: DistributeChoice) -> dict:
    """A worker other than the chief: it takes part in every step, writes into a private temporary run folder
    (removed at the end) and never touches ``out_dir``; returns the chief's summary with its own ``distribute``."""
    _say(progress, f"worker {dist.worker_index} of {dist.workers}: the chief writes the run folder; "
                   f"{out_dir} stays untouched")
    link = _ChiefLink(strategy, dist)
    with tempfile.TemporaryDirectory(prefix="covidxray-worker-") as tmp, \
            claim_output(Path(tmp) / "run", "train", sources=[data_dir]) as out:
        summary = _train(_Run(cfg, data_dir, out, progress), cfg, dataset, resume, strategy, dist, link)
    return {**summary, "distribute": dist.to_dict()}


class _ChiefLink:
    """The two points where the other workers of a multi-worker run wait for the chief alone: its start (the
    run's state, or that it is finished) and its end (the summary). Between them every worker runs the same
    steps, so an error there happens on all of them; an error of the chief before its start or during its
    finish is handed to the others instead, so that they stop too rather than wait for it."""

    def __init__(self, strategy: tf.distribute.Strategy, dist: DistributeChoice) -> None:
        self.strategy, self.dist = strategy, dist
        self.waiting: str | None = "start"
        """What the other workers wait for now: "start", "end", or None (nothing: they run the same steps)."""

    def share(self, payload: dict | None) -> dict:
        """The chief's ``payload`` on every worker (see covidxray.training.loop.share_from_chief); an error of the
        chief raises on the others."""
        got = share_from_chief(self.strategy, self.dist.workers, payload if self.dist.chief else None)
        self.waiting = None
        if "error" in got:
            raise ModelError(f"the chief (worker 0) of this multi-worker run failed: {got['error']}")
        return got

    def finishing(self) -> None:
        """The chief now writes the run's last files while the others wait for the summary."""
        self.waiting = "end"

    def fail(self, exc: BaseException) -> None:
        """On the chief: tell the waiting workers (if any wait) that it failed with ``exc``."""
        if self.dist.chief and self.dist.workers > 1 and self.waiting is not None:
            self.waiting = None
            share_from_chief(self.strategy, self.dist.workers, {"error": str(exc)})


def _session_state(run: _Run, cfg: TrainConfig, dataset: dict, resume: bool) -> tuple[_State | None, dict | None]:
    """The saved state to continue (None for a new run), and the run's summary when it is finished already and
    ``cfg`` asks for nothing more (then there is nothing to train)."""
    state = _load_state(run, cfg, resume)
    if state is not None:
        _check_same_dataset(run.out_dir, state.dataset, dataset)
    if state is not None and not _remaining(state, cfg) and (run.out_dir / "summary.json").is_file():
        how = " (stopped early)" if state.stopped_early else ""
        _say(run.progress, f"{run.out_dir}: finished at epoch {state.epoch}{how}; nothing left to train")
        return state, read_run_json(run.out_dir / "summary.json")
    return state, None


def _start_session(run: _Run, dataset: dict, state: _State | None, dist: DistributeChoice
                   ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Read the train and val splits (refusing a one-class train split), write the run's config, versions and
    provenance, and seed this session; returns (train rows, val rows, their file paths)."""
    cfg, data_dir = run.cfg, run.data_dir
    df = read_manifest(data_dir)
    df = df[df["split"] != "test"].reset_index(drop=True)
    train_df, val_df = split_frame(df, "train"), split_frame(df, "val")
    if train_df["y"].nunique() < 2:
        only = "covid" if int(train_df["y"].iloc[0]) == 1 else "normal"
        raise DataError(f"{data_dir / 'manifest.csv'}: the train split holds only {only} images (one class); a model "
                        "cannot learn from it. Rebuild the dataset with images of both classes (`covidxray data`).")
    assert set(train_df["split"]) == {"train"} and set(val_df["split"]) == {"val"}, "test data must not be used"
    paths = list(train_df["filepath"]) + list(val_df["filepath"])

    run.out.write_json("config.json", cfg.to_dict(), sort_keys=False)
    run.out.write_json("versions.json", versions())
    run.out.write_json("provenance.json", {"dataset": dataset, "command": command_line()})

    keras.utils.set_random_seed(cfg.seed + (state.epoch if state else 0))
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    if dist.used != "one":
        _say(run.progress, f"distribute: {dist.used} ({dist.reason}); worker {dist.worker_index} of "
                           f"{dist.workers}")
    return train_df, val_df, paths


def _image_datasets(cfg: TrainConfig, train_df: pd.DataFrame, val_df: pd.DataFrame, seed: int,
                    strategy: tf.distribute.Strategy) -> list[tf.data.Dataset]:
    """The train (shuffled and augmented with ``seed``: the config's plus the epoch the session starts at) and
    val image datasets of global batches, with the auto-shard policy of :func:`_distribute`."""
    train_ds = make_dataset(train_df, image_size=cfg.image_size, batch_size=cfg.batch_size, training=True,
                            augment=cfg.augment_config(), seed=seed,
                            cache=_cache_for(cfg, train_df, "train"))
    val_ds = make_dataset(val_df, image_size=cfg.image_size, batch_size=cfg.batch_size, training=False,
                          cache=_cache_for(cfg, val_df, "val"))
    return [_distribute(strategy, train_ds), _distribute(strategy, val_ds)]


def _train(run: _Run, cfg: TrainConfig, dataset: dict, resume: bool, strategy: tf.distribute.Strategy,
           dist: DistributeChoice, link: _ChiefLink) -> dict:
    """Train with covidxray.training.loop into ``run.out``: a new run, or the continuation of its checkpoint.

    Every strategy runs this: one device, mirrored, and every worker of a multi-worker run (the chief into the run
    folder, the others into their private folders). Only the chief reads the run folder: it decides how the
    session starts (new, resumed, or finished already) and hands its state, and the weights and optimizer state
    of its checkpoint, to the other workers, which build the same model.
    """
    t_start = time.perf_counter()
    start = None
    if dist.chief:
        state, finished = _session_state(run, cfg, dataset, resume)
        start = {"finished": finished, "state": None if state is None else asdict(state)}
    start = link.share(start)
    if start["finished"] is not None:
        return start["finished"]
    state = _State(**start["state"]) if start["state"] is not None else None
    train_df, val_df, paths = _start_session(run, dataset, state, dist)
    precision = _precision(cfg)
    _say(run.progress, f"precision: {precision.used} ({precision.reason})")
    resumed_from = state.epoch if state is not None else None
    if state is None:
        state = _State(config=cfg.to_dict(), weights={}, dataset=dataset)
    else:
        _say(run.progress, f"resuming {run.out_dir if dist.chief else 'the run'} after epoch {state.epoch}")
    state.config = cfg.to_dict()
    state.sessions += 1
    run.state = state
    source = run.ckpt_dir / str(state.checkpoint) if resumed_from is not None else None
    image_datasets: list[tf.data.Dataset] = []

    def image_data() -> list[tf.data.Dataset]:
        """The image datasets, made on first use (the cached path needs none) and shared by both stages."""
        if not image_datasets:
            image_datasets.extend(_image_datasets(cfg, train_df, val_df, cfg.seed + (resumed_from or 0), strategy))
        return image_datasets

    stores: list[FeatureStore] = []
    try:
        with dtype_policy(precision.policy):
            model = None
            if state.stage == 1:
                model, trained = _stage_model(run, strategy, dist, link, source, optimizer=True)
                if not state.stopped_early and state.epoch < cfg.epochs:
                    if state.cached:
                        train_ds, val_ds, epochs = _feature_data(run, model, train_df, val_df, paths, stores,
                                                                 strategy)
                        _fit(run, strategy, trained, [train_ds, val_ds], cfg.epochs, paths, export=model,
                             callbacks=[epochs])
                    else:
                        _fit(run, strategy, model, image_data(), cfg.epochs, paths)
                if cfg.finetune_epochs > 0:
                    state.stage, state.stage1_end, state.cached = 2, state.epoch, False
                    state.wait, state.stopped_early = 0, False
                    model, _ = _stage_model(run, strategy, dist, link, run.out_dir / MODEL_FILE, optimizer=False)
                    run.save_checkpoint(model)
            if state.stage == 2:
                end = (state.stage1_end or 0) + cfg.finetune_epochs
                if model is None:
                    model, _ = _stage_model(run, strategy, dist, link, source, optimizer=True)
                if not state.stopped_early and state.epoch < end:
                    _fit(run, strategy, model, image_data(), end, paths)
        summary = None
        if dist.chief:
            link.finishing()
            summary = _finish(run, train_df, val_df, precision, strategy, dist, resumed_from,
                              time.perf_counter() - t_start)
    finally:
        for store in stores:
            store.close()
    return link.share({"summary": summary})["summary"]


def _stage_model(run: _Run, strategy: tf.distribute.Strategy, dist: DistributeChoice, link: _ChiefLink,
                 source: Path | None, *, optimizer: bool) -> tuple[keras.Model, keras.Model]:
    """The full model of the current stage and the compiled model it trains, built the same way on every worker
    under ``strategy``: the full model itself, or (stage 1 on cached VGG16 features) its tail, sharing its layers.

    A new run (no ``source``) decides here whether stage 1 trains on cached features and records the backbone
    weights it loaded. With ``source`` (a saved model: the checkpoint, or the best model when stage 2 begins),
    the trained model gets its weights (and with ``optimizer`` its optimizer state) as the chief reads them, on
    every worker; a cached run's frozen backbone is loaded from ``cfg.weights`` again (its checkpoint holds the
    tail only).
    """
    cfg, state = run.cfg, run.state
    values, shapes = None, None
    if dist.chief and source is not None:
        try:
            values = _saved_values(source, optimizer)
            shapes = [list(np.shape(v)) for v in values]
        except (CovidXrayError, OSError, ValueError) as exc:
            shapes = {"error": f"{source}: cannot be read ({exc}); start a new run with another --out."}
    with strategy.scope():
        model = build_model(cfg.model, image_size=cfg.image_size, weights="none", trainable_from=cfg.trainable_from,
                            dropout=cfg.dropout, seed=cfg.seed)
        if state.stage == 1 and (source is None or state.cached):
            weights = (load_vgg16_backbone_weights(model, cfg.weights) if cfg.model == "vgg16"
                       else {"spec": cfg.weights, "path": None, "layers": 0})
            if source is None:
                state.weights = weights
                state.cached = bool(cfg.cached_features and cfg.model == "vgg16" and not cfg.finetune_epochs
                                    and can_cache(model, cfg.trainable_from))
        trained = tail_part(model, cfg.trainable_from) if state.cached else model
        if state.stage == 2:
            set_trainable_from(model, cfg.finetune_from)
        compile_model(trained, cfg.lr if state.stage == 1 else cfg.finetune_lr, jit_compile=False)
        trained.optimizer.build(trained.trainable_variables)
    if source is not None:
        variables = [*trained.weights, *(trained.optimizer.variables if optimizer else [])]
        shared = link.share({"shapes": shapes} if dist.chief else None)["shapes"]
        if isinstance(shared, dict):
            raise ModelError(shared["error"])
        if shared != [list(v.shape) for v in variables]:
            raise ModelError(f"{source if dist.chief else 'the chief checkpoint'}: its weights do not fit the "
                             f"{cfg.model} model of this config; start a new run with another --out.")
        sync_variables(strategy, dist.workers, variables, values)
    return model, trained


def _saved_values(path: Path, optimizer: bool) -> list[np.ndarray]:
    """The weights of the model saved at ``path`` and, with ``optimizer``, its optimizer's variables, in the
    order a model built from its config (and compiled) holds them."""
    saved = keras.models.load_model(path, compile=optimizer)
    variables = [*saved.weights, *(saved.optimizer.variables if optimizer else [])]
    return [keras.ops.convert_to_numpy(v) for v in variables]


def _jit(cfg: TrainConfig) -> bool:
    """Whether XLA compiles the training step and the feature extraction: ``cfg.jit_compile`` when set, else on a
    GPU without op determinism (on a CPU-only machine XLA does not pay)."""
    if cfg.jit_compile is not None:
        return bool(cfg.jit_compile)
    return bool(tf.config.list_physical_devices("GPU")) and not cfg.deterministic


def _fit(run: _Run, strategy: tf.distribute.Strategy, model: keras.Model, datasets: list[tf.data.Dataset],
         end: int, paths: list[str], export: keras.Model | None = None,
         callbacks: Sequence[keras.callbacks.Callback] = ()) -> None:
    """Epochs ``run.state.epoch + 1`` ... ``end`` of the current stage with covidxray.training.loop, one history row
    (and checkpoint) each; ``export`` is the model saved as ``model.keras`` when it is not ``model`` itself."""
    stage = run.state.stage
    _say(run.progress, f"stage {stage}: epochs {run.state.epoch + 1}..{end}")
    board = [keras.callbacks.TensorBoard(str(run.out_dir / TENSORBOARD_DIR))] if run.tensorboard else []
    loop = CustomLoop(strategy, model, jit_compile=_jit(run.cfg) and strategy.num_replicas_in_sync == 1)
    try:
        with _data_errors(run, paths):
            loop.fit(*datasets, initial_epoch=run.state.epoch, epochs=end,
                     callbacks=[*callbacks, *board, _RunCallback(run, stage, export)],
                     report=lambda line: _say(run.progress, line), progress_bar=bar_wanted(enabled=run.progress))
    finally:
        _adopt_tensorboard(run)


def _finish(run: _Run, train_df: pd.DataFrame, val_df: pd.DataFrame, precision: PrecisionChoice,
            strategy: tf.distribute.Strategy, dist: DistributeChoice, resumed_from: int | None,
            session_seconds: float) -> dict:
    """Evaluate the best model on val (at the training precision), choose the threshold, and write the remaining
    run files."""
    cfg, state, out_dir = run.cfg, run.state, run.out_dir
    n_train, n_train_covid = len(train_df), int(train_df["y"].sum())
    if not (out_dir / MODEL_FILE).is_file():
        raise ModelError(f"{out_dir}: no epoch gave a finite {cfg.monitor}; lower the learning rate (lr={cfg.lr}).")
    drop_model_card(run.out)
    best, _ = load_run(out_dir, precision=precision.used)
    if state.cached and run.val_store is not None:
        # The frozen part's val activations are cached (float32): only the best model's tail runs again.
        prob = predict_cached(tail_part(best, cfg.trainable_from), run.val_store, cfg.batch_size)
    else:
        prob = predict_dataframe(best, val_df, cfg.image_size, cfg.batch_size)
    threshold = choose_threshold(val_df["y"].to_numpy(), prob, cfg.threshold_method)
    preds = pd.DataFrame({
        "path": val_df["path"] if "path" in val_df.columns else val_df["filepath"],
        "label": [LABELS[int(v)] for v in val_df["y"]],
        "y": val_df["y"].astype(int),
        "patient_id": val_df["patient_id"] if "patient_id" in val_df.columns else "",
        "prob": prob,
        "pred": (prob >= threshold["threshold"]).astype(int),
    })
    run.out.write_csv("val_predictions.csv", preds)
    run.out.write_json("threshold.json", threshold)
    run.write_history()
    epoch_seconds = [float(r["seconds"]) for r in state.history]
    timing = {
        "epoch_seconds": epoch_seconds,
        "mean_epoch_seconds": float(np.mean(epoch_seconds)) if epoch_seconds else None,
        "train_seconds": float(np.sum(epoch_seconds)),
        "session_seconds": session_seconds,
        "sessions": state.sessions,
    }
    if run.feature_stats is not None:
        timing["features"] = run.feature_stats
        timing["feature_seconds"] = float(sum(v["seconds"] for v in run.feature_stats.values()))
    run.out.write_json("timing.json", timing)
    summary = {
        "run_dir": str(out_dir),
        "model_path": str(out_dir / MODEL_FILE),
        "model": cfg.model,
        "weights": state.weights,
        "image_size": cfg.image_size,
        "epochs_run": state.epoch,
        "best_epoch": state.best_epoch,
        "monitor": cfg.monitor,
        "best_value": state.best,
        "stopped_early": state.stopped_early,
        "resumed_from_epoch": resumed_from,
        "n_train": n_train,
        "n_train_covid": n_train_covid,
        "threshold": threshold["threshold"],
        "val": {k: threshold[k] for k in VAL_SUMMARY},
        "precision": precision.to_dict(),
        "mixed_precision": precision.mixed,
        "replicas": strategy.num_replicas_in_sync,
        "distribute": dist.to_dict(),
        "deterministic": cfg.deterministic,
        "train_seconds": timing["train_seconds"],
        "dataset": state.dataset,
    }
    run.out.write_json("summary.json", summary, sort_keys=False)
    write_model_card(run.out)
    return summary
