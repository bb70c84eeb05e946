"""Measuring tools: epoch timer, peak resident memory per phase, matmul peak, latency, throughput."""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """Current resident set size of this process (0 where /proc is missing)."""
    kib = _status_kib("VmRSS")
    if kib is None:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return kib * 1024


class PeakMemory:
    """Peak resident memory of this process while the ``with`` block runs.

    Linux resets the kernel's high-water mark (VmHWM) through ``/proc/self/clear_refs``, so each phase of one
    process gets its own peak; where that is impossible a 20 ms sampling thread stands in (it can miss short
    spikes). ``start_bytes`` is the resident size when the block began, so ``peak_bytes - start_bytes`` is what
    the phase added on top of what the process already held.
    """

    def __init__(self) -> None:
        self.start_bytes = 0
        self.peak_bytes = 0
        self.method = "vmhwm"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self.start_bytes = rss_bytes()
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            self.method = "sampled"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_bytes())
            self._stop.wait(0.02)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        else:
            self.peak_bytes = (_status_kib("VmHWM") or 0) * 1024
        self.peak_bytes = max(self.peak_bytes, self.start_bytes, rss_bytes())

    def to_dict(self) -> dict:
        """Peak and start in MiB, and how the peak was taken."""
        return {"peak_rss_mb": self.peak_bytes / 2**20, "start_rss_mb": self.start_bytes / 2**20,
                "added_rss_mb": (self.peak_bytes - self.start_bytes) / 2**20, "method": self.method}


class EpochTimer(keras.callbacks.Callback):
    """Wall seconds of each epoch, training and validation included (what Keras' progress line shows)."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._t0 = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._t0)


def steady_epoch(seconds: list[float]) -> float:
    """Median epoch time over epochs 2..N (the first one pays for tracing and cache filling); N=1: that one."""
    rest = seconds[1:] or seconds
    return float(statistics.median(rest)) if rest else float("nan")


def matmul_gflops(n: int = 4096, repeats: int = 4) -> float:
    """Best float32 GFLOP/s of an n x n matmul (2 n^3 FLOPs) through one compiled call: the machine's peak."""
    rng = np.random.default_rng(0)
    a = tf.constant(rng.standard_normal((n, n), dtype=np.float32))
    b = tf.constant(rng.standard_normal((n, n), dtype=np.float32))
    fn = tf.function(lambda x, y: tf.reduce_sum(tf.matmul(x, y)))
    fn(a, b).numpy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(a, b).numpy()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best / 1e9


def best_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Fastest of ``repeats`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median of ``repeats`` timed calls after ``warmup`` untimed ones (latency: robust to a busy machine)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(statistics.median(times))


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where unknown): how busy the machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
