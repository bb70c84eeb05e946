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

Every strategy trains with the one loop of :mod:`covidxray.training.loop` (Keras 3's ``model.fit`` fails under
multi-worker training, keras-team/keras#20585).

Multi-worker start-up is bounded (``startup_timeout``, ``--startup-timeout``, default 120 s). TensorFlow's own start
waits for every other task for ever, inside a native call that holds Python's lock, so neither a timeout nor a
signal handler can run during it. :func:`wait_for_peers` therefore runs first, in plain Python: each process listens
on its own TF_CONFIG port and exchanges a short greeting with every other task (the same cluster, the expected task
index); only when every pair has met does each process close that port and let TensorFlow take it. A task that does
not answer within the timeout ends the start with a ClusterError naming its ``host:port`` and the fix; SIGINT and
SIGTERM are handled while waiting. TensorFlow's start installs its own SIGTERM handler (its preemption notifier, which
swallows the signal); :func:`make_strategy` puts back the handlers the process had.

MultiWorkerMirroredStrategy configures TensorFlow's collective ops, which must happen before TensorFlow runs
anything in the process: ``covidxray train`` creates it before reading any data; calling
:func:`covidxray.runs.train.train` with ``multi-worker`` after other TensorFlow work in the same process is refused
with a ModelError.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from covidxray import limits
from covidxray.errors import ClusterError, ModelError
from covidxray.outputs import json_text

if TYPE_CHECKING:
    import tensorflow as tf

DISTRIBUTES: tuple[str, ...] = ("auto", "one", "mirrored", "multi-worker")
"""What may be requested (``--distribute``)."""
TF_CONFIG_VAR = "TF_CONFIG"
WORKER_TYPES: tuple[str, ...] = ("chief", "worker")
DEFAULT_STARTUP_TIMEOUT = 120.0
"""Seconds a multi-worker start waits for the other tasks (``--startup-timeout``)."""
_GREETING = "covidxray-multi-worker/1"
"""First word of the start-up greeting: what a task's port answers while it waits for the others."""
_RETRY_S = 0.2
"""Pause between two rounds of greetings to the tasks not met yet."""
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
        raise ModelError(f"distribute {requested!r} is unknown; use one of {list(DISTRIBUTES)} (--distribute).",
                         usage=True)
    return requested


@dataclass(frozen=True)
class Cluster:
    """The tasks of a multi-worker run, in TensorFlow's replica order (the chief first, then the workers)."""

    addresses: tuple[str, ...]
    """``host:port`` of each task."""
    names: tuple[str, ...]
    """Each task as TF_CONFIG names it (``worker 1``, ``chief 0``)."""
    me: int
    """This process's place in ``addresses``."""

    @property
    def others(self) -> list[int]:
        """The places of the other tasks."""
        return [i for i in range(len(self.addresses)) if i != self.me]

    def fingerprint(self) -> str:
        """A short hash of the cluster, the same on every machine whose TF_CONFIG names the same cluster."""
        return hashlib.sha256(json_text([self.addresses, self.names]).encode()).hexdigest()[:16]

    def describe(self, i: int) -> str:
        """``host:port (worker 1)`` of task ``i``."""
        return f"{self.addresses[i]} ({self.names[i]})"


def _tf_config_error(what: str) -> ModelError:
    """The error for a TF_CONFIG that ``what`` (says what is wrong), with a correct example."""
    return ModelError(f"the {TF_CONFIG_VAR} environment variable {what}. Set it on each machine to e.g. {_EXAMPLE}, "
                      "or unset it and train with --distribute one or mirrored.")


def _address_problem(address: object) -> str | None:
    """What is wrong with one cluster address (``"host:port"``, port 1 ... 65535), or None."""
    if not isinstance(address, str):
        return f"{address!r}, which is not a \"host:port\" string"
    host, colon, port = address.rpartition(":")
    if not colon or not host:
        return f'"{address}", which is not "host:port"'
    if not port.isdecimal() or int(port) not in limits.PORT:
        return f'"{address}", whose port {port!r} is not {limits.PORT}'
    return None


def parse_cluster(text: str) -> Cluster:
    """The cluster and this task's place from the text of ``TF_CONFIG``; a ModelError naming the variable, what
    is wrong and a correct example otherwise. Only ``chief`` and ``worker`` tasks take part (no ``ps`` or
    ``evaluator``: MultiWorkerMirroredStrategy has none)."""
    bad = _tf_config_error
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise bad(f"is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise bad("is not a JSON object")
    if not isinstance(config.get("cluster"), dict):
        raise bad('has no "cluster" object (the "host:port" of every machine, the same on each)')
    if not isinstance(config.get("task"), dict):
        raise bad('has no "task" object (this machine\'s type and index)')
    cluster, task = config["cluster"], config["task"]
    others = sorted(set(cluster) - set(WORKER_TYPES))
    if others:
        raise bad(f"names task types {others}; multi-worker training uses only {list(WORKER_TYPES)}")
    for kind, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses:
            raise bad(f'has cluster "{kind}": {addresses!r}; it must be a non-empty list of "host:port" strings')
        for address in addresses:
            if (problem := _address_problem(address)) is not None:
                raise bad(f'has cluster "{kind}" address {problem}')
    if len(cluster.get("chief", [])) > 1:
        raise bad("names more than one chief")
    if "worker" not in cluster and "chief" not in cluster:
        raise bad('names no "worker" in its cluster')
    ordered = [(f"{kind} {i}", a) for kind in WORKER_TYPES for i, a in enumerate(cluster.get(kind, []))]
    seen: dict[str, str] = {}
    for name, address in ordered:
        if address in seen:
            raise bad(f'lists "{address}" twice ({seen[address]} and {name}); each task needs its own host:port')
        seen[address] = name
    kind = task.get("type")
    if kind not in cluster:
        raise bad(f"has task type {kind!r}, which its cluster does not list (it lists {sorted(cluster)})")
    if "index" not in task:
        raise bad(f'has no task "index"; add "index": N to "task", N being this machine\'s place in the cluster\'s '
                  f'"{kind}" list (0 ... {len(cluster[kind]) - 1})')
    index = task["index"]
    if isinstance(index, str):
        raise bad(f'has task index "{index}", a string; write it as a number, without quotes '
                  f'("index": {index.strip() if index.strip().isdecimal() else 0})')
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[kind]):
        raise bad(f'has task index {index!r}; the cluster lists {len(cluster[kind])} "{kind}" task(s), '
                  f"so it must be 0 ... {len(cluster[kind]) - 1} (this machine's place in that list)")
    me = ordered.index((f"{kind} {index}", cluster[kind][index]))
    return Cluster(addresses=tuple(a for _, a in ordered), names=tuple(n for n, _ in ordered), me=me)


def parse_tf_config(text: str) -> tuple[int, int]:
    """(number of workers, this worker's index) from the text of ``TF_CONFIG`` (see :func:`parse_cluster`)."""
    cluster = parse_cluster(text)
    return len(cluster.addresses), cluster.me


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
                         "machine, or train with --distribute one or mirrored.", usage=True)
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


def _read_line(sock: socket.socket, limit: int = 256) -> str:
    """One line (at most ``limit`` bytes) from ``sock``, without its newline; what came when the peer closed."""
    data = b""
    while b"\n" not in data and len(data) < limit:
        chunk = sock.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0].decode("ascii", "replace")


def _greeting(cluster: Cluster) -> bytes:
    """What this task says to the others: the greeting word, the cluster's fingerprint and its own place."""
    return f"{_GREETING} {cluster.fingerprint()} {cluster.me}\n".encode()


def _heard(line: str, cluster: Cluster) -> int | None:
    """The place of the task that sent ``line``, when it is a greeting of this cluster; None otherwise."""
    words = line.split()
    if len(words) == 3 and words[0] == _GREETING and words[1] == cluster.fingerprint() and words[2].isdecimal():
        place = int(words[2])
        return place if place in cluster.others else None
    return None


def _listen(cluster: Cluster) -> socket.socket:
    """A socket listening on this task's own port on every interface, as TensorFlow's server will; a
    ClusterError when the port is taken."""
    port = int(cluster.addresses[cluster.me].rpartition(":")[2])
    try:
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", port))
    except OSError as exc:
        raise ClusterError(f"multi-worker start-up: this task's port {port} ({cluster.describe(cluster.me)} in "
                           f"{TF_CONFIG_VAR}) cannot be opened ({exc.strerror or exc}); stop the process that uses "
                           f"it, or give this task a free port in the {TF_CONFIG_VAR} cluster of every "
                           "machine.") from None


def _answer(listener: socket.socket, cluster: Cluster, met: set[int], lock: threading.Lock,
            stop: threading.Event) -> None:
    """Answer the other tasks' greetings on ``listener`` until ``stop``; record in ``met`` the tasks heard."""
    listener.settimeout(_RETRY_S)
    while not stop.is_set():
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError:
            return
        with conn:
            try:
                conn.settimeout(2.0)
                place = _heard(_read_line(conn), cluster)
                conn.sendall(_greeting(cluster))
                if place is not None:
                    with lock:
                        met.add(place)
                conn.recv(1)  # the caller closes first, so this port is left without a connection in TIME_WAIT
            except OSError:
                continue


def _greet(cluster: Cluster, place: int, timeout: float) -> str | None:
    """Greet task ``place``: None when it answers as that task of this cluster, else why not (for the error)."""
    host, _, port = cluster.addresses[place].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.sendall(_greeting(cluster))
            line = _read_line(sock)
    except socket.gaierror:
        return f"the host name {host!r} does not resolve"
    except ConnectionRefusedError:
        return "connection refused: nothing listens on that port"
    except TimeoutError:
        return "no answer (the connection timed out: a wrong host, a firewall or a machine that is down)"
    except OSError as exc:
        return exc.strerror or str(exc)
    words = line.split()
    if not words or words[0] != _GREETING:
        return "something listens there, but not `covidxray train` starting this run"
    if len(words) != 3 or words[1] != cluster.fingerprint():
        return f"a `covidxray train` started with another {TF_CONFIG_VAR} cluster answers"
    if words[2] != str(place):
        return f"it answers as task {words[2]}, not {place}: two machines have the same task index"
    return None


def wait_for_peers(cluster: Cluster, timeout: float) -> None:
    """Wait until every other task of ``cluster`` has started too, at most ``timeout`` seconds.

    Each task listens on its own port and greets the others on theirs; a greeting in either direction tells both
    tasks that the other one is up, so a task may go on (and close its port for TensorFlow) once it has met every
    other task, and no task needs its port after that. Plain Python with short waits, so SIGINT and SIGTERM are
    handled meanwhile. A ClusterError, naming each task not met with its ``host:port`` and why, and the fix, when
    the time is up.
    """
    if not cluster.others:
        return
    met: set[int] = set()
    lock, stop = threading.Lock(), threading.Event()
    listener = _listen(cluster)
    answering = threading.Thread(target=_answer, args=(listener, cluster, met, lock, stop), daemon=True,
                                 name="covidxray-startup")
    answering.start()
    why: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while True:
            with lock:
                missing = [i for i in cluster.others if i not in met]
            if not missing:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for place in missing:
                with lock:
                    if place in met:
                        continue
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                reason = _greet(cluster, place, min(2.0, left))
                if reason is None:
                    with lock:
                        met.add(place)
                else:
                    why[place] = reason
            time.sleep(max(0.0, min(_RETRY_S, deadline - time.monotonic())))
    finally:
        stop.set()
        listener.close()
        answering.join(timeout=2 * _RETRY_S)
    with lock:
        missing = [i for i in cluster.others if i not in met]
    if not missing:
        return
    listed = "; ".join(f"{cluster.addresses[i]} ({cluster.names[i]}: {why.get(i, 'no greeting')})" for i in missing)
    raise ClusterError(
        f"multi-worker start-up: no answer within {timeout:g} s (startup_timeout, --startup-timeout) from {listed}. "
        f"Start the same `covidxray train` command there, with the same {TF_CONFIG_VAR} cluster and that task's "
        f"index, check the host:port in {TF_CONFIG_VAR} and any firewall between the machines, or raise "
        "--startup-timeout.")


_MADE: dict[str, tf.distribute.Strategy] = {}
"""The process's MultiWorkerMirroredStrategy once made: collective ops are set up once per process, so later
trainings in the same process (several models of one workflow) share it."""
_NATIVE_START: dict[str, bool] = {}
"""``{"done": False}`` while (or after failing) TensorFlow's own multi-worker start, ``{"done": True}`` after it."""


def native_start_unfinished() -> bool:
    """Whether TensorFlow's multi-worker runtime began its start in this process and did not finish it. Its
    shutdown may then wait for tasks that never come, so a command-line caller exits with ``os._exit`` once its
    message is out."""
    return _NATIVE_START.get("done") is False


def make_strategy(choice: DistributeChoice, *, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
                  environ: Mapping[str, str] | None = None) -> tf.distribute.Strategy:
    """The TensorFlow strategy of ``choice``; for multi-worker this waits (at most ``startup_timeout`` seconds, see
    :func:`wait_for_peers`) until every worker has started, then starts TensorFlow's runtime.

    For multi-worker, call it before TensorFlow runs anything else in the process (see the module docstring).
    ``environ`` (default ``os.environ``) holds ``TF_CONFIG``.
    """
    if (problem := limits.out_of_range("startup_timeout", startup_timeout, limits.STARTUP_TIMEOUT,
                                       "--startup-timeout")) is not None:
        raise ModelError(problem)
    if choice.used == "multi-worker" and "multi-worker" not in _MADE:
        environ = os.environ if environ is None else environ
        cluster = parse_cluster(environ.get(TF_CONFIG_VAR, ""))
        wait_for_peers(cluster, startup_timeout)
        _MADE["multi-worker"] = _start_multi_worker()
    import tensorflow as tf

    if choice.used == "one":
        return tf.distribute.get_strategy()
    if choice.used == "mirrored":
        if tf.config.list_physical_devices("GPU"):
            return tf.distribute.MirroredStrategy()
        return tf.distribute.MirroredStrategy([d.name for d in tf.config.list_logical_devices("CPU")])
    return _MADE["multi-worker"]


def _start_multi_worker() -> tf.distribute.Strategy:
    """TensorFlow's MultiWorkerMirroredStrategy, with the process's SIGINT and SIGTERM handlers as they were."""
    import tensorflow as tf

    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    _NATIVE_START["done"] = False
    try:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    except (RuntimeError, ValueError) as exc:
        _NATIVE_START.clear()
        raise ModelError(f"multi-worker training must set up TensorFlow's collective ops before TensorFlow "
                         f"runs anything else in the process ({exc}); start it as `covidxray train "
                         "--distribute multi-worker` (or call covidxray.runs.train.train first thing in a fresh "
                         "process).") from exc
    except tf.errors.OpError as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ClusterError(f"multi-worker start-up: the other tasks answered, but TensorFlow's start failed "
                           f"({detail}); a task probably stopped meanwhile: start the same command on every "
                           "machine again.") from exc
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
    _NATIVE_START["done"] = True
    return strategy
