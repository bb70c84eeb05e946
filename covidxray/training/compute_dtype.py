"""Compute precision: float32, or Keras' mixed bfloat16 / float16 policies, chosen per machine or on request.

``choose_precision`` turns a request (``auto``, ``float32``, ``bfloat16``, ``float16``) into the precision used
and the reason, recorded in a run's ``summary.json`` as ``"precision": {"requested", "used", "reason"}``:

- ``auto``: ``float16`` (Keras ``mixed_float16``) on a GPU; ``bfloat16`` (``mixed_bfloat16``) on a CPU whose
  ``/proc/cpuinfo`` flags include ``avx512_bf16`` or ``amx_bf16`` (Linux only: other systems cannot be asked
  here, so they get float32); ``float32`` otherwise.
- ``float32`` and ``bfloat16`` are honoured as asked (bfloat16 on a CPU without bf16 instructions works, but is
  emulated and slower; the reason says so).
- ``float16`` needs a GPU: on a CPU-only machine it falls back to float32 with the reason recorded (TensorFlow has
  no fast float16 path on CPUs; this is also what the old ``mixed_precision=True`` did).

Under a mixed policy Keras keeps every variable in float32 and computes in the 16-bit type; covidxray's heads
(the ``logit`` Dense and the ``prob`` sigmoid) are float32 layers, so the output and the loss are float32.

A model saved under a mixed policy stores the policy of each layer, so plain ``keras.models.load_model`` gives it
back computing in the 16-bit type (its output is still float32). :func:`with_precision` re-creates a model under
another policy with the same weights; ``covidxray.runs.load.load_run`` uses it to hand out float32 models unless
asked for another precision.
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from covidxray.errors import ModelError

if TYPE_CHECKING:
    import keras

PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")
"""What may be requested (``--precision``)."""
POLICIES: dict[str, str] = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}
"""The Keras dtype policy of each precision that can be used."""
BF16_FLAGS: tuple[str, ...] = ("avx512_bf16", "amx_bf16")
"""``/proc/cpuinfo`` flags that mean the CPU has bfloat16 arithmetic (AVX-512 BF16, AMX-BF16)."""
FLOAT32_LAYERS: frozenset[str] = frozenset({"logit", "prob"})
"""Layers kept in float32 under every policy: the head, so the probability and the loss are float32."""
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class PrecisionChoice:
    """What was asked for, what is used, and why."""

    requested: str
    used: str
    reason: str

    @property
    def policy(self) -> str:
        """The Keras dtype policy name of ``used``."""
        return POLICIES[self.used]

    @property
    def mixed(self) -> bool:
        """True when the compute dtype is 16-bit."""
        return self.used != "float32"

    def to_dict(self) -> dict:
        """``{"requested", "used", "reason"}`` for the run files."""
        return asdict(self)


def check_precision(requested: str) -> str:
    """``requested`` when it is one of PRECISIONS; a ModelError naming the choices otherwise."""
    if requested not in PRECISIONS:
        raise ModelError(f"precision {requested!r} is unknown; use one of {list(PRECISIONS)} (--precision).",
                         usage=True)
    return requested


def cpu_flags(cpuinfo: str) -> set[str]:
    """The CPU feature flags listed in the text of ``/proc/cpuinfo`` (x86 ``flags``, Arm ``Features`` lines)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def cpu_has_bf16(cpuinfo: str) -> bool:
    """Whether the ``/proc/cpuinfo`` text reports bfloat16 instructions (one of BF16_FLAGS)."""
    return bool(cpu_flags(cpuinfo) & set(BF16_FLAGS))


def read_cpuinfo() -> str | None:
    """The text of ``/proc/cpuinfo`` on Linux; None elsewhere or when it cannot be read."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return CPUINFO.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def cpu_model(cpuinfo: str | None) -> str | None:
    """The first ``model name`` line of ``/proc/cpuinfo`` (None when there is none)."""
    for line in (cpuinfo or "").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "model name":
            return value.strip()
    return None


def has_gpu() -> bool:
    """Whether TensorFlow sees a GPU."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def choose_precision(requested: str = "auto", *, gpu: bool | None = None, cpuinfo: str | None = None
                     ) -> PrecisionChoice:
    """The precision to use for ``requested`` on this machine, with the reason (see the module docstring).

    ``gpu`` and ``cpuinfo`` describe the machine (default: asked from TensorFlow and read from /proc/cpuinfo);
    pass them to decide for another machine.
    """
    check_precision(requested)
    gpu = has_gpu() if gpu is None else gpu
    info = read_cpuinfo() if cpuinfo is None else cpuinfo
    bf16 = info is not None and cpu_has_bf16(info)
    if info is None:
        cpu = "the CPU's flags cannot be read on this system (no /proc/cpuinfo)"
    elif bf16:
        cpu = f"the CPU reports {'/'.join(sorted(cpu_flags(info) & set(BF16_FLAGS)))}"
    else:
        cpu = f"the CPU reports none of {'/'.join(BF16_FLAGS)}"
    if requested == "auto":
        if gpu:
            return PrecisionChoice(requested, "float16", "auto: a GPU is present (mixed_float16)")
        if bf16:
            return PrecisionChoice(requested, "bfloat16", f"auto: no GPU; {cpu} (mixed_bfloat16)")
        return PrecisionChoice(requested, "float32", f"auto: no GPU and {cpu}")
    if requested == "float16" and not gpu:
        return PrecisionChoice(requested, "float32", "float16 needs a GPU (CPUs have no fast float16 arithmetic); "
                                                     "fell back to float32")
    if requested == "bfloat16" and not gpu and not bf16:
        return PrecisionChoice(requested, "bfloat16", f"as requested; {cpu}: bfloat16 is emulated (slower than "
                                                      "float32)")
    return PrecisionChoice(requested, requested, "as requested")


@contextlib.contextmanager
def dtype_policy(policy: str) -> Iterator[None]:
    """Keras' global dtype policy set to ``policy`` for the block (models built in it use it), restored after."""
    import keras

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def model_policies(model: keras.Model) -> set[str]:
    """The dtype policy names of the model's layers, head (FLOAT32_LAYERS) and input layers left out."""
    import keras

    return {layer.dtype_policy.name for layer in model.layers
            if layer.name not in FLOAT32_LAYERS and not isinstance(layer, keras.layers.InputLayer)}


_CONVERTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def with_precision(model: keras.Model, precision: str | None) -> keras.Model:
    """``model`` computing in ``precision`` ("float32", "bfloat16", "float16", "auto"; None: as it is).

    The same model when it already does; else a copy under that policy with the same (float32) weights, the
    head (FLOAT32_LAYERS) kept float32. Copies are cached per model and precision. Only for functional or
    sequential models of built-in layers (every covidxray model).
    """
    import keras

    if precision is None:
        return model
    policy = choose_precision(precision).policy
    if model_policies(model) <= {policy}:
        return model
    cache = _CONVERTED.setdefault(model, {})
    if policy not in cache:
        def clone(layer: keras.layers.Layer) -> keras.layers.Layer:
            config = layer.get_config()
            if layer.name not in FLOAT32_LAYERS and "dtype" in config:
                config["dtype"] = policy
            return layer.__class__.from_config(config)

        try:
            copy = keras.models.clone_model(model, clone_function=clone)
        except (ValueError, TypeError) as exc:
            raise ModelError(f"model {model.name!r} cannot be re-created under the {policy} policy ({exc}); use "
                             "precision='float32' or the precision it was trained in.") from exc
        copy.set_weights(model.get_weights())
        cache[policy] = copy
    return cache[policy]
