"""Where training runs: one device, several GPUs of one machine, or several machines (``--distribute``).

:func:`choose_distribution` turns the request into what is used and why, recorded in a run's ``summary.json``
as ``"distribute"`` (like ``"precision"``); :func:`make_strategy` creates the TensorFlow strategy:

- ``auto``: ``multi-worker`` when the ``TF_CONFIG`` environment variable is set, ``mirrored`` when several GPUs
  are visible, else ``one``;
- ``one``: TensorFlow's default strategy (one device);
- ``mirrored``: ``tf.distribute.MirroredStrategy`` over every visible GPU (over the logical CPU devices where
  there is no GPU: one, unless the program split the CPU into several);
- ``multi-worker``: ``tf.distribute.MultiWorkerMirroredStrategy`` over the machines ``TF_CONFIG`` names
  (``{"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}``; the same
  cluster on every machine, each with its own task index). Worker 0 (or the task of type ``chief`` when the
  cluster has one) is the chief: it alone writes the run folder.

Every strategy trains with the one loop of :mod:`covidxray.train_loop` (Keras 3's ``model.fit`` fails under
multi-worker training, keras-team/keras#20585).

MultiWorkerMirroredStrategy configures TensorFlow's collective ops, which must happen before TensorFlow runs
anything in the process: ``covidxray train`` creates it before reading any data; calling
:func:`covidxray.train.train` with ``multi-worker`` after other TensorFlow work in the same process is refused
with a ModelError.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from covidxray.errors import ModelError

if TYPE_CHECKING:
    import tensorflow as tf

DISTRIBUTES: tuple[str, ...] = ("auto", "one", "mirrored", "multi-worker")
"""What may be requested (``--distribute``)."""
TF_CONFIG_VAR = "TF_CONFIG"
WORKER_TYPES: tuple[str, ...] = ("chief", "worker")
_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}} '
            "(the same cluster on every machine; index 0 on the first, 1 on the second)")


@dataclass(frozen=True)
class DistributeChoice:
    """What was asked for, what is used and why; for multi-worker, the cluster size and this worker's place.

    ``worker_index`` counts the chief (if any) first, then the workers, as TensorFlow numbers the replicas;
    worker 0 is the chief.
    """

    requested: str
    used: str
    reason: str
    workers: int = 1
    worker_index: int = 0

    @property
    def chief(self) -> bool:
        """Whether this process writes the run folder (the only worker, or worker 0 of a cluster)."""
        return self.worker_index == 0

    def to_dict(self) -> dict:
        """``{"requested", "used", "reason", "workers", "worker_index", "chief"}`` for summary.json."""
        return {**asdict(self), "chief": self.chief}


def check_distribute(requested: str) -> str:
    """``requested`` when it is one of DISTRIBUTES; a ModelError naming the choices otherwise."""
    if requested not in DISTRIBUTES:
        raise ModelError(f"distribute {requested!r} is unknown; use one of {list(DISTRIBUTES)} (--distribute).")
    return requested


def parse_tf_config(text: str) -> tuple[int, int]:
    """(number of workers, this worker's index) from the text of ``TF_CONFIG``; a ModelError naming the variable,
    what is wrong and a correct example otherwise. Only ``chief`` and ``worker`` tasks take part (no ``ps`` or
    ``evaluator``: MultiWorkerMirroredStrategy has none)."""

    def bad(what: str) -> ModelError:
        return ModelError(f"the {TF_CONFIG_VAR} environment variable {what}. Set it on each machine to e.g. "
                          f"{_EXAMPLE}, or unset it and train with --distribute one or mirrored.")

    try:
        config = json.loads(text)
    except ValueError as exc:
        raise bad(f"is not valid JSON ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("cluster"), dict) \
            or not isinstance(config.get("task"), dict):
        raise bad('needs a "cluster" object and a "task" object')
    cluster, task = config["cluster"], config["task"]
    others = sorted(set(cluster) - set(WORKER_TYPES))
    if others:
        raise bad(f"names task types {others}; multi-worker training uses only {list(WORKER_TYPES)}")
    for kind, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses or not all(
                isinstance(a, str) and a.rpartition(":")[2].isdigit() and a.rpartition(":")[0] for a in addresses):
            raise bad(f'has cluster "{kind}": {addresses!r}; it must be a non-empty list of "host:port" strings')
    if len(cluster.get("chief", [])) > 1:
        raise bad("names more than one chief")
    if "worker" not in cluster and "chief" not in cluster:
        raise bad('names no "worker" in its cluster')
    kind, index = task.get("type"), task.get("index", 0)
    if kind not in cluster:
        raise bad(f'has task type {kind!r}, which its cluster does not list (it lists {sorted(cluster)})')
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[kind]):
        raise bad(f'has task index {index!r}; the cluster lists {len(cluster[kind])} "{kind}" task(s), '
                  f"so it must be 0 ... {len(cluster[kind]) - 1}")
    chiefs = len(cluster.get("chief", []))
    return chiefs + len(cluster.get("worker", [])), index if kind == "chief" else chiefs + index


def choose_distribution(requested: str = "auto", *, environ: Mapping[str, str] | None = None,
                        gpus: int | None = None) -> DistributeChoice:
    """What ``requested`` (one of DISTRIBUTES) means here, and why (see the module docstring).

    ``environ`` defaults to ``os.environ`` (``TF_CONFIG``); ``gpus`` to the number of GPUs TensorFlow sees (asked
    only when needed; asking does not start TensorFlow's runtime).
    """
    check_distribute(requested)
    environ = os.environ if environ is None else environ
    tf_config = environ.get(TF_CONFIG_VAR, "").strip()
    workers, index = 1, 0
    if requested == "multi-worker" and not tf_config:
        raise ModelError(f"--distribute multi-worker needs the {TF_CONFIG_VAR} environment variable, which is not "
                         f"set. Set it on each machine to e.g. {_EXAMPLE} and run the same command on every "
                         "machine, or train with --distribute one or mirrored.")
    if requested in ("multi-worker", "auto") and tf_config:
        workers, index = parse_tf_config(tf_config)
        used = "multi-worker"
        reason = (f"asked for; {TF_CONFIG_VAR} names {workers} worker(s)" if requested == "multi-worker"
                  else f"{TF_CONFIG_VAR} is set and names {workers} worker(s)")
    elif requested == "one":
        used, reason = "one", "asked for"
    elif requested == "mirrored":
        used, reason = "mirrored", "asked for"
    else:
        n = _gpu_count() if gpus is None else gpus
        if n > 1:
            used, reason = "mirrored", f"{n} GPUs are visible and {TF_CONFIG_VAR} is not set"
        else:
            used, reason = "one", f"{'one GPU' if n == 1 else 'no GPU'} is visible and {TF_CONFIG_VAR} is not set"
    return DistributeChoice(requested=requested, used=used, reason=reason, workers=workers, worker_index=index)


def _gpu_count() -> int:
    """How many GPUs TensorFlow sees."""
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


_MADE: dict[str, tf.distribute.Strategy] = {}
"""The process's MultiWorkerMirroredStrategy once made: collective ops are set up once per process, so later
trainings in the same process (several models of one workflow) share it."""


def make_strategy(choice: DistributeChoice) -> tf.distribute.Strategy:
    """The TensorFlow strategy of ``choice``; for multi-worker this waits until every worker has started.

    For multi-worker, call it before TensorFlow runs anything else in the process (see the module docstring).
    """
    import tensorflow as tf

    if choice.used == "one":
        return tf.distribute.get_strategy()
    if choice.used == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    if "multi-worker" not in _MADE:
        try:
            _MADE["multi-worker"] = tf.distribute.MultiWorkerMirroredStrategy()
        except (RuntimeError, ValueError) as exc:
            raise ModelError(f"multi-worker training must set up TensorFlow's collective ops before TensorFlow "
                             f"runs anything else in the process ({exc}); start it as `covidxray train "
                             "--distribute multi-worker` (or call covidxray.train.train first thing in a fresh "
                             "process).") from exc
    return _MADE["multi-worker"]
