"""covidxray's one training loop, for every ``tf.distribute`` strategy: one device, several GPUs (mirrored) and
several machines (multi-worker). Keras' ``model.fit`` fails under MultiWorkerMirroredStrategy
(keras-team/keras#20585); one loop for all of them means a result does not depend on where it was trained.

It does what ``fit`` does for covidxray's compiled models (covidxray.training.models.compile_model), step for step:

- a training step is ``strategy.run`` of a replica step inside one ``tf.function``: forward pass in training
  mode, per-example loss (the compiled loss without reduction), ``tf.nn.compute_average_loss`` over the GLOBAL
  batch (the images of this step on all replicas together, so the last, smaller batch is averaged right),
  gradients of the optimizer's scaled loss (loss scaling under float16), applied by the compiled Keras optimizer,
  which sums them over the replicas;
- per epoch it logs ``loss``, ``accuracy``, ``auc`` and their ``val_`` versions (the names ``fit`` logs and the
  run folder's history and ``--monitor`` use); the metrics are Keras metrics created under the strategy's
  scope, so reading them sums over every replica of every worker;
- Keras callbacks get ``on_train_begin``, ``on_epoch_begin``/``on_epoch_end`` with those logs and
  ``on_train_end``, and ``model.stop_training`` ends it.

Every worker runs every line of it: each step and each metric read is a collective operation that waits for
all workers, so nothing in here (nor in a callback that reads a variable) may depend on which worker runs it.
:func:`share_from_chief` and :func:`sync_variables` hand the chief's values (its run state, its checkpoint's
weights) to the other workers the same way, as sums to which only the chief adds anything.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from covidxray.outputs import json_text

LOG_NAMES: tuple[str, ...] = ("loss", "accuracy", "auc")
"""What one epoch logs, for training and (with ``val_``) validation: the names Keras' ``fit`` gives them."""


def _sum_from_first_replica(strategy: tf.distribute.Strategy, value: np.ndarray) -> np.ndarray:
    """``value`` as replica 0 holds it, summed over all replicas where every other replica adds zeros.

    Replica 0 lives on the chief, so this hands the chief's ``value`` to every worker; the others must pass an
    array of the same shape and dtype (its contents are ignored). Sums with zeros are exact.
    """
    zeros = np.zeros_like(value)
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(value if ctx.replica_id_in_sync_group == 0 else zeros))
    return np.asarray(strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None))


def share_from_chief(strategy: tf.distribute.Strategy, workers: int, payload: Any) -> Any:
    """The chief's ``payload`` (JSON-able) on every worker; the other workers pass None.

    Two collective sums: the length of the chief's JSON text, then its bytes. Every worker must call this at
    the same point of the program. With one worker it returns ``payload`` without any collective operation.
    """
    if workers <= 1:
        return payload
    data = np.frombuffer(json_text(payload, sort_keys=False).encode(), np.uint8).astype(np.float32) \
        if payload is not None else np.zeros(0, np.float32)
    n = int(_sum_from_first_replica(strategy, np.array([data.size], np.float32))[0])
    buffer = data if data.size == n else np.zeros(n, np.float32)
    text = _sum_from_first_replica(strategy, buffer).astype(np.uint8).tobytes()
    return json.loads(text.decode())


def sync_variables(strategy: tf.distribute.Strategy, workers: int, variables: Sequence[tf.Variable],
                   values: Sequence[np.ndarray] | None) -> None:
    """Assign the chief's ``values`` to ``variables`` on every worker (the others pass None).

    The variables must have been created in the same order on every worker (one model built the same way);
    each is one collective sum, in its own dtype when floating (exact), else in float64 (exact for the
    optimizer's step counter).
    """
    if values is not None and len(values) != len(variables):
        raise ValueError(f"{len(values)} values for {len(variables)} variables")
    for i, var in enumerate(variables):
        own = tf.as_dtype(var.dtype)
        dtype = (own if own.is_floating else tf.float64).as_numpy_dtype
        mine = np.zeros(tuple(var.shape), dtype) if values is None else np.asarray(values[i]).astype(dtype)
        value = _sum_from_first_replica(strategy, mine) if workers > 1 else mine
        var.assign(tf.cast(value, own))


def _compiled(model: keras.Model) -> tuple[keras.losses.Loss, list[dict]]:
    """The compiled loss of ``model`` without reduction (one value per example) and its metrics' configs."""
    config = model.get_compile_config() or {}
    loss = keras.losses.deserialize(config["loss"]) if config.get("loss") is not None else None
    if not isinstance(loss, keras.losses.Loss):
        raise TypeError(f"the custom loop needs a model compiled with a Loss object, got {config.get('loss')!r}")
    return loss.__class__.from_config({**loss.get_config(), "reduction": None}), list(config.get("metrics") or [])


def _metric(config: dict, prefix: str) -> keras.metrics.Metric:
    """A fresh metric from its serialized ``config``, its name prefixed with ``prefix``."""
    metric = keras.metrics.deserialize(config)
    return metric.__class__.from_config({**metric.get_config(), "name": prefix + metric.name})


class CustomLoop:
    """Train a compiled Keras model under ``strategy`` (build and compile the model in ``strategy.scope()``).

    The loss and the metrics are the compiled model's (from its compile config), so they cannot drift from
    what ``fit`` would use. It also reads the data as Keras 3's ``fit`` does: at the end of each epoch ``fit``
    opens an iterator it never reads, then a fresh one for the next epoch; opening one draws the next reshuffle
    seed of a ``shuffle(..., seed=..., reshuffle_each_iteration=True)``. Doing the same, this loop sees the
    batches ``fit`` sees, so under the default strategy it trains to the same weights
    (tests/training/test_distribute.py).
    ``jit_compile``: XLA for the training and validation steps (only where one replica trains).
    """

    def __init__(self, strategy: tf.distribute.Strategy, model: keras.Model, *, jit_compile: bool = False) -> None:
        self.strategy, self.model = strategy, model
        with strategy.scope():
            self.loss_fn, metrics = _compiled(model)
            self.train_metrics = [keras.metrics.Mean(name="loss"), *(_metric(m, "") for m in metrics)]
            self.val_metrics = [keras.metrics.Mean(name="val_loss"), *(_metric(m, "val_") for m in metrics)]
        self._train_step = tf.function(self._distributed_train_step, jit_compile=jit_compile)
        self._val_step = tf.function(self._distributed_val_step, jit_compile=jit_compile)
        self.seconds = 0.0
        """How long the last epoch took (training and validation)."""
        self.steps = 0
        """How many training steps the last epoch took."""

    def _update(self, metrics: Sequence[keras.metrics.Metric], y: tf.Tensor, prob: tf.Tensor,
                per_example: tf.Tensor) -> None:
        metrics[0].update_state(per_example)
        for metric in metrics[1:]:
            metric.update_state(y, prob)

    def _replica_train_step(self, x: tf.Tensor, y: tf.Tensor) -> None:
        model, optimizer = self.model, self.model.optimizer
        local = tf.shape(y, out_type=tf.int32)[0]
        global_batch = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, local)
        with tf.GradientTape() as tape:
            prob = model(x, training=True)
            per_example = self.loss_fn(y, prob)
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
            scaled = optimizer.scale_loss(loss)
        weights = model.trainable_weights
        grads = tape.gradient(scaled, weights)
        optimizer.apply(grads, weights)
        self._update(self.train_metrics, y, prob, per_example)

    def _replica_val_step(self, x: tf.Tensor, y: tf.Tensor) -> None:
        prob = self.model(x, training=False)
        self._update(self.val_metrics, y, prob, self.loss_fn(y, prob))

    def _distributed_train_step(self, x: Any, y: Any) -> None:
        self.strategy.run(self._replica_train_step, args=(x, y))

    def _distributed_val_step(self, x: Any, y: Any) -> None:
        self.strategy.run(self._replica_val_step, args=(x, y))

    def distribute(self, ds: tf.data.Dataset) -> tf.distribute.DistributedDataset | tf.data.Dataset:
        """``ds`` (global batches; its auto-shard policy already set) split over the replicas and workers."""
        return self.strategy.experimental_distribute_dataset(ds)

    def fit(self, train_ds: tf.data.Dataset, val_ds: tf.data.Dataset, *, initial_epoch: int, epochs: int,
            callbacks: Sequence[keras.callbacks.Callback] = (), report: Callable[[str], None] | None = None,
            progress_bar: bool = False) -> None:
        """Epochs ``initial_epoch + 1`` ... ``epochs`` (Keras' 0-based ``epoch`` to the callbacks), stopping early
        when a callback sets ``model.stop_training``; ``report`` gets one line per epoch (its time, time per
        step and logs); ``progress_bar`` shows Keras' progress bar of the steps on stderr (for a terminal).

        Callbacks get ``on_train_begin``, ``on_epoch_begin``/``on_epoch_end`` and (also after an error)
        ``on_train_end``; no batch hooks, so Keras' TensorBoard callback writes its per-epoch scalars.
        """
        model = self.model
        train_dist, val_dist = self.distribute(train_ds), self.distribute(val_ds)
        steps = int(train_ds.cardinality())
        for callback in callbacks:
            callback.set_model(model)
        model.stop_training = False
        for callback in callbacks:
            callback.on_train_begin()
        try:
            for epoch in range(initial_epoch, epochs):
                bar = keras.utils.Progbar(steps if steps > 0 else None) if progress_bar else None
                logs = self._epoch(epoch, train_dist, val_dist, callbacks, bar)
                if report is not None:
                    shown = " - ".join(f"{k}: {v:.4f}" for k, v in logs.items())
                    per_step = f"{1000 * self.seconds / max(self.steps, 1):.0f}ms/step"
                    report(f"epoch {epoch + 1}/{epochs} - {self.seconds:.1f}s - {per_step} - {shown}")
                if model.stop_training:
                    break
        finally:
            for callback in callbacks:
                callback.on_train_end()

    def _epoch(self, epoch: int, train_dist: Any, val_dist: Any, callbacks: Sequence[keras.callbacks.Callback],
               bar: keras.utils.Progbar | None) -> dict[str, float]:
        """One epoch: train on every batch, validate, hand the logs to the callbacks; returns the logs."""
        started = time.perf_counter()
        for callback in callbacks:
            callback.on_epoch_begin(epoch)
        for metric in (*self.train_metrics, *self.val_metrics):
            metric.reset_state()
        self.steps = 0
        for x, y in train_dist:
            self._train_step(x, y)
            self.steps += 1
            if bar is not None:
                with contextlib.redirect_stdout(sys.stderr):  # Keras' bar writes to stdout, which carries results
                    bar.update(self.steps)
        iter(train_dist)  # as fit does (see the class docstring): an unread iterator, one reshuffle seed drawn
        for x, y in val_dist:
            self._val_step(x, y)
        logs = {m.name: float(m.result()) for m in (*self.train_metrics, *self.val_metrics)}
        self.seconds = time.perf_counter() - started
        for callback in callbacks:
            callback.on_epoch_end(epoch, dict(logs))
        return logs
