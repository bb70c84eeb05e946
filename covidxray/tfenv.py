"""TensorFlow's start-up noise, silenced at the source for the command line, the notebooks and the benchmark.

TensorFlow 2.21 writes C++ log lines while it is imported (absl's pre-init warning, the oneDNN notice, the CUDA
stub and CPU feature notices) whatever ``TF_CPP_MIN_LOG_LEVEL`` says, an ERROR line for ``cuInit`` on machines
without a GPU, and a graph attribute notice (``use_unbounded_threadpool``) on the first tf.data pass. None of
them is about the run, and on the command line they drown its own messages.

:func:`quiet_tensorflow` (called by the command line, the notebooks' first cell and the benchmark, never by ``import
covidxray``: a library leaves its host process as it found it) sets ``TF_CPP_MIN_LOG_LEVEL`` to 2 unless the user
set it, and arranges that when TensorFlow is first imported, file descriptor 2 goes through a small filter process
that drops exactly the lines :data:`NOISE` matches and passes every other byte on at once: real errors, tracebacks
and progress bars still print, also when the process crashes (the filter drains the pipe after its writer died).
``oneDNN`` stays on: ``TF_ENABLE_ONEDNN_OPTS`` changes numerics and is left alone, and so is
``CUDA_VISIBLE_DEVICES``. ``quiet_tensorflow(verbose=True)`` before TensorFlow's import keeps all of it.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib.abc
import importlib.machinery
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

_LOG = r"[IWE]\d{4} [\d:.]+\s+\d+ "
"""The head of an absl log line: severity, date, time, thread id."""
NOISE: tuple[str, ...] = (
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$",
    _LOG + r"port\.cc:\d+\] oneDNN custom operations are on\.",
    _LOG + r"cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine",
    _LOG + r"cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized",
    r"To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\.$",
    _LOG + r"node_def_util\.cc:\d+\] NodeDef mentions attribute use_unbounded_threadpool ",
    _LOG + r"util\.cc:\d+\] oneDNN supports DT_HALF only on platforms with AVX-512\.",
)
"""Lines dropped from stderr: TensorFlow's import notices and graph attribute notices, none about the run."""
NO_GPU_NOISE: tuple[str, ...] = (_LOG + r"cuda_platform\.cc:\d+\] failed call to cuInit: ",)
"""Also dropped on a machine without an NVIDIA device (no /dev/nvidia0, no nvidia-smi): CUDA probing failing
there is expected. Where a GPU is present the line is a real error and is kept."""

_FILTER = r"""
import os, re, sys
noise = re.compile(sys.argv[1].encode())
head = re.compile(rb"WARNING: All|To enable|[IWE]\d{4} ")
def may_be_noise(part):
    return bool(head.match(part)) or any(p.startswith(part) for p in (b"WARNING: All", b"To enable")) \
        or re.fullmatch(rb"[IWE]\d{0,4}", part) is not None
pending = b""
while True:
    try:
        chunk = os.read(0, 65536)
    except InterruptedError:
        continue
    if not chunk:
        break
    *lines, pending = (pending + chunk).split(b"\n")
    out = b"".join(line + b"\n" for line in lines if not noise.match(line))
    if pending and not may_be_noise(pending):
        out, pending = out + pending, b""
    while out:
        out = out[os.write(1, out):]
if pending and not noise.match(pending):
    os.write(1, pending)
"""
"""The filter process: stdin is the pipe fd 2 writes to, stdout the original stderr. A partial line that cannot
start a noise line (a progress bar's carriage-return update) is passed on at once, not held until a newline."""

_settings: dict[str, Any] = {"verbose": False, "user_level": os.environ.get("TF_CPP_MIN_LOG_LEVEL")}


def has_nvidia_device() -> bool:
    """Whether this machine shows an NVIDIA GPU (a /dev/nvidia0 device node or an ``nvidia-smi`` on PATH)."""
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def noise_pattern() -> str:
    """The regular expression of the stderr lines :func:`quiet_tensorflow` drops on this machine."""
    return "|".join(f"(?:{p})" for p in (*NOISE, *(() if has_nvidia_device() else NO_GPU_NOISE)))


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds ``tensorflow`` once, for a loader that starts the stderr filter before running its import."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "tensorflow":
            return None
        _remove_hook()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and not _settings["verbose"]:
            spec.loader = _FilteringLoader(spec.loader)
        return spec


class _FilteringLoader(importlib.abc.Loader):
    """Wraps TensorFlow's own loader: stderr filter first, then the real import."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        filter_stderr()
        self.inner.exec_module(module)


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _QuietImport)]


def filter_stderr(pattern: str | None = None) -> bool:
    """Route file descriptor 2 through a filter process that drops the lines matching ``pattern`` (default:
    :func:`noise_pattern`) for the rest of the process; False (nothing done) where that is not possible."""
    if os.name != "posix" or _settings.get("filter") is not None:
        return False
    try:
        saved = os.dup(2)
    except OSError:
        return False
    read_end, write_end = os.pipe()
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _FILTER, pattern or noise_pattern()],
                                stdin=read_end, stdout=saved, stderr=saved, close_fds=True,
                                start_new_session=True)
    except OSError:
        for fd in (saved, read_end, write_end):
            os.close(fd)
        return False
    os.close(read_end)
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.dup2(write_end, 2)
    os.close(write_end)
    _settings["filter"] = (saved, proc)
    atexit.register(_stop_filter)
    return True


def stderr_behind_filter() -> int | None:
    """The descriptor the filter passes fd 2 on to (the process's own stderr, a terminal or a log), or None when
    fd 2 is not filtered. Whether a progress bar is drawn depends on it (covidxray.progress), not on the pipe."""
    saved, _ = _settings.get("filter") or (None, None)
    return saved


def _stop_filter() -> None:
    """Give fd 2 back and let the filter pass on what is left (at exit)."""
    saved, proc = _settings.pop("filter", (None, None))
    if proc is None:
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def quiet_tensorflow(*, verbose: bool = False) -> None:
    """Silence TensorFlow's start-up noise (see the module docstring); ``verbose=True`` keeps TensorFlow's logs.

    Call it before TensorFlow is imported (the package does on import; the command line again with its
    ``--verbose``). After the import it only still sets the logging of the Python side.
    """
    _settings["verbose"] = verbose
    user_level = _settings["user_level"]
    if verbose or user_level == "0":
        _remove_hook()
        if user_level is None:
            os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        return
    if user_level is None:
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())


def traced(fn: Callable[..., Any], spec: Any, *, jit_compile: bool = False) -> Callable[..., Any]:
    """``tf.function(fn, input_signature=[spec])``, counted on its own by TensorFlow's retracing detector.

    That detector keys on the code object, so a fresh ``tf.function`` of the same lambda per model (one trace
    each, as meant) reads as one function retraced again and again and logs "triggered tf.function retracing"
    after five models. Wrapped in a partial, each function is counted by itself.
    """
    import tensorflow as tf

    return tf.function(functools.partial(fn), input_signature=[spec], jit_compile=jit_compile)
