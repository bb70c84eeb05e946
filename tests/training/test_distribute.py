"""Where training runs (covidxray.training.distribute) and covidxray's one training loop (covidxray.training.loop):
the loop
against Keras' ``fit`` on one device, and multi-worker training with two real worker processes on this machine,
compared with one process that trains the same global batches."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO
from PIL import Image

from covidxray.app.cli import main
from covidxray.errors import ClusterError, ModelError
from covidxray.runs.train import TrainConfig
from covidxray.training.distribute import (
    TF_CONFIG_VAR,
    choose_distribution,
    make_strategy,
    parse_cluster,
    wait_for_peers,
)

TRAIN = ["--model", "scratch", "--image-size", "32", "--batch-size", "8", "--lr", "1e-3", "--patience", "0",
         "--quiet"]
"""A scratch CNN on 32 px images in global batches of 8 (4 per worker)."""
WORKER_TIMEOUT = 120.0
WEIGHT_TOLERANCE = 1e-5
"""Largest absolute weight difference allowed between two workers and one process with two replicas."""
TWO_CPU_REPLICAS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from covidxray.app.cli import main
sys.exit(main(sys.argv[1:]))
"""
"""One process whose CPU is split into two logical devices, so ``--distribute mirrored`` has two replicas."""


def tf_config(ports: list[int], index: int) -> str:
    return json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


# ------------------------------------------------------------------------------------------------ the choice


def test_auto_is_one_device_without_tf_config_and_gpus(monkeypatch):
    monkeypatch.delenv(TF_CONFIG_VAR, raising=False)
    choice = choose_distribution("auto", gpus=0)
    assert (choice.used, choice.workers, choice.chief) == ("one", 1, True)
    assert "TF_CONFIG is not set" in choice.reason
    assert choose_distribution("auto", gpus=2).used == "mirrored"
    assert choose_distribution("one", gpus=2).used == "one"


def test_auto_is_multi_worker_with_tf_config(monkeypatch):
    monkeypatch.setenv(TF_CONFIG_VAR, tf_config([2222, 2223], 1))
    choice = choose_distribution("auto", gpus=0)
    assert (choice.used, choice.workers, choice.worker_index, choice.chief) == \
        ("multi-worker", 2, 1, False)
    assert choice.to_dict()["chief"] is False and "TF_CONFIG is set" in choice.reason
    # a cluster with a chief: the chief is worker 0, workers count after it
    monkeypatch.setenv(TF_CONFIG_VAR, json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]},
                                                  "task": {"type": "worker", "index": 0}}))
    choice = choose_distribution("multi-worker")
    assert (choice.workers, choice.worker_index, choice.chief) == (3, 1, False)
    monkeypatch.setenv(TF_CONFIG_VAR, json.dumps({"cluster": {"chief": ["a:1"], "worker": ["b:1"]},
                                                  "task": {"type": "chief", "index": 0}}))
    assert choose_distribution("auto").chief


@pytest.mark.parametrize(("text", "says"), [
    ("{not json", "is not valid JSON"),
    ('{"cluster": {"worker": ["a:1"]}}', '"task" object'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', "0 ... 1"),
    ('{"cluster": {"worker": ["a:1"], "ps": ["b:2"]}, "task": {"type": "worker", "index": 0}}', "['ps']"),
    ('{"cluster": {"worker": ["a"]}, "task": {"type": "worker", "index": 0}}', '"host:port"'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "task type 'chief'"),
    ('{"task": {"type": "worker", "index": 0}}', 'has no "cluster" object'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker"}}',
     'has no task "index"; add "index": N to "task", N being this machine\'s place in the cluster\'s "worker" '
     'list (0 ... 1)'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": "1"}}',
     'has task index "1", a string; write it as a number, without quotes ("index": 1)'),
    ('{"cluster": {"chief": ["c:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 1}}',
     'has task index 1; the cluster lists 1 "worker" task(s), so it must be 0 ... 0'),
    ('{"cluster": {"worker": ["a:x1"]}, "task": {"type": "worker", "index": 0}}',
     "has cluster \"worker\" address \"a:x1\", whose port 'x1' is not an integer in [1, 65535]"),
    ('{"cluster": {"worker": ["a:70000"]}, "task": {"type": "worker", "index": 0}}',
     "port '70000' is not an integer in [1, 65535]"),
    ('{"cluster": {"worker": ["a:0"]}, "task": {"type": "worker", "index": 0}}', "port '0' is not an integer"),
    ('{"cluster": {"chief": ["a:1"], "worker": ["a:1"]}, "task": {"type": "worker", "index": 0}}',
     'lists "a:1" twice (chief 0 and worker 0)'),
])
def test_a_bad_tf_config_names_the_variable_the_problem_and_the_fix(monkeypatch, text, says):
    monkeypatch.setenv(TF_CONFIG_VAR, text)
    for requested in ("auto", "multi-worker"):
        with pytest.raises(ModelError) as err:
            choose_distribution(requested, gpus=0)
        assert "TF_CONFIG environment variable" in str(err.value) and says in str(err.value)
        assert '"task": {"type": "worker", "index": 0}' in str(err.value)


def test_multi_worker_without_tf_config_says_how_to_set_it(monkeypatch):
    monkeypatch.delenv(TF_CONFIG_VAR, raising=False)
    with pytest.raises(ModelError, match="needs the TF_CONFIG environment variable"):
        choose_distribution("multi-worker")


def test_distribute_is_checked_in_the_config():
    with pytest.raises(ModelError, match=r"distribute \(--distribute\) must be one of"):
        TrainConfig(distribute="cluster").validate()
    assert TrainConfig().distribute == "auto"


def test_multi_worker_after_tensorflow_started_is_refused(monkeypatch):
    import tensorflow as tf

    tf.constant(1.0) + 1.0  # TensorFlow's runtime runs now, as in a process that did other work first
    monkeypatch.setenv(TF_CONFIG_VAR, tf_config(free_ports(1), 0))
    with pytest.raises(ModelError, match="before TensorFlow runs anything else"):
        make_strategy(choose_distribution("multi-worker"))


# ------------------------------------------------------------------------------------------------ two workers


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A built-dataset folder: 32 train and 16 val images (48 px), covid = a bright disc on noise."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:48, :48]
    rows = []
    for split, n in (("train", 32), ("val", 16)):
        for i in range(n):
            img = rng.normal(90, 20, (48, 48))
            if i % 2:
                cy, cx = rng.integers(16, 32, 2)
                img[(yy - cy) ** 2 + (xx - cx) ** 2 < 64] = 230
            label = "covid" if i % 2 else "normal"
            rel = f"{split}/{label}/img_{i}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(root / rel)
            rows.append({"path": rel, "label": label, "split": split, "patient_id": f"p{split}{i}"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root


def test_one_device_trains_the_vgg16_tail_on_cached_features_and_resumes(data, tmp_path, monkeypatch):
    """The loop trains the VGG16 tail on cached activations (the checkpoint holds the tail), saves the full model,
    and a resumed run rebuilds the frozen part, restores the tail and its optimizer, and trains on."""
    import keras

    from covidxray.runs.train import train

    monkeypatch.delenv(TF_CONFIG_VAR, raising=False)
    cfg = TrainConfig(model="vgg16", weights="none", image_size=32, batch_size=8, epochs=1, lr=1e-3, patience=0,
                      distribute="one")
    out = tmp_path / "run"
    first = train(cfg, data, out, progress=False)
    assert first["distribute"]["used"] == "one" and "features" in json.loads((out / "timing.json").read_text())
    tail = keras.models.load_model(out / "checkpoint" / "epoch_0001.keras", compile=False)
    full = keras.models.load_model(out / "model.keras", compile=False)
    assert tail.name.endswith("_tail") and full.input_shape == (None, 32, 32, 3)
    before = tail.get_weights()
    second = train(TrainConfig(**{**cfg.to_dict(), "epochs": 2}), data, out, progress=False, resume=True)
    assert second["resumed_from_epoch"] == 1 and second["epochs_run"] == 2
    after = keras.models.load_model(out / "checkpoint" / "epoch_0002.keras", compile=False).get_weights()
    assert any(not np.array_equal(a, b) for a, b in zip(before, after, strict=True)), "the resumed run did not train"
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2] and history["val_loss"].notna().all()


def test_one_device_resumes_from_the_checkpoint(data, tmp_path, monkeypatch):
    """A resumed run restores the checkpoint's weights and optimizer state and writes the run folder's files
    (the path a multi-worker resume takes, with no other worker)."""
    from covidxray.runs.train import train

    monkeypatch.delenv(TF_CONFIG_VAR, raising=False)
    cfg = TrainConfig(model="scratch", image_size=32, batch_size=8, epochs=1, lr=1e-3, patience=0, distribute="one")
    out = tmp_path / "run"
    first = train(cfg, data, out, progress=False)
    assert first["distribute"]["used"] == "one"
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"model.keras", "history.csv", "threshold.json", "summary.json", "checkpoint/state.json",
            "checkpoint/epoch_0001.keras", "model_card.md"} <= files
    second = train(TrainConfig(**{**cfg.to_dict(), "epochs": 2}), data, out, progress=False, resume=True)
    assert second["resumed_from_epoch"] == 1 and second["epochs_run"] == 2
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2] and history["val_loss"].notna().all()


@pytest.mark.parametrize("augment", [False, True])
def test_the_loop_trains_what_keras_fit_trains_on_one_device(data, augment):
    """Same model, same data pipeline, same seed: covidxray's loop and Keras' ``fit`` end with the same weights
    and the same logs, so training with the loop changes no result that ``fit`` gave."""
    import keras
    import tensorflow as tf

    from covidxray.data.manifest import read_manifest, split_frame
    from covidxray.training.loop import CustomLoop
    from covidxray.training.models import build_model, compile_model
    from covidxray.training.pipeline import make_dataset

    cfg = TrainConfig(model="scratch", image_size=32, batch_size=8, lr=1e-3, augment=augment)
    frame = read_manifest(data)
    train_df, val_df = split_frame(frame, "train"), split_frame(frame, "val")

    def run(use_fit: bool) -> tuple[list[np.ndarray], list[dict]]:
        keras.utils.set_random_seed(0)
        train_ds = make_dataset(train_df, image_size=32, batch_size=8, training=True, augment=cfg.augment_config(),
                                seed=0, cache="memory")
        val_ds = make_dataset(val_df, image_size=32, batch_size=8, training=False, cache="memory")
        model = compile_model(build_model("scratch", image_size=32, dropout=0.5, seed=0), 1e-3, jit_compile=False)
        logs: list[dict] = []
        record = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, epoch_logs: logs.append(dict(epoch_logs)))
        if use_fit:
            model.fit(train_ds, validation_data=val_ds, epochs=3, callbacks=[record], verbose=0, shuffle=False)
        else:
            CustomLoop(tf.distribute.get_strategy(), model).fit(train_ds, val_ds, initial_epoch=0, epochs=3,
                                                                callbacks=[record])
        return model.get_weights(), logs

    (fit_weights, fit_logs), (loop_weights, loop_logs) = run(True), run(False)
    assert all(np.array_equal(a, b) for a, b in zip(fit_weights, loop_weights, strict=True))
    assert [sorted(r) for r in loop_logs] == [sorted(r) for r in fit_logs]
    assert all(abs(r[k] - f[k]) <= 1e-6 for r, f in zip(loop_logs, fit_logs, strict=True) for k in f)


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the system just handed out (bound to port 0 together, then released)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_processes(commands: list[tuple[list[str], dict[str, str | None]]], logs: Path) -> list[tuple[int, str, str]]:
    """Run the commands at once, each with its environment changes (None: unset); (exit code, stdout, stderr) of
    each, all killed after WORKER_TIMEOUT seconds."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, (cmd, env) in enumerate(commands):
        with open(logs / f"{i}.out", "wb") as out, open(logs / f"{i}.err", "wb") as err:
            environ = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
            procs.append(subprocess.Popen(cmd, env=environ, cwd=REPO, stdout=out, stderr=err))
    deadline = time.monotonic() + WORKER_TIMEOUT
    try:
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
            proc.wait()
        pytest.fail(f"workers still running after {WORKER_TIMEOUT} s: "
                    + " | ".join((logs / f"{i}.err").read_text()[-2000:] for i in range(len(procs))))
    return [(proc.returncode, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
            for i, proc in enumerate(procs)]


def run_two_workers(data: Path, outs: list[Path], tmp: Path, *extra: str) -> list[dict]:
    """``covidxray train --distribute multi-worker`` on two local workers (``outs[i]`` the ``--out`` of worker i);
    their printed summaries. Their temporary folders go under ``tmp``; the non-chief's must be gone after."""
    ports = free_ports(2)
    tmp.mkdir(parents=True, exist_ok=True)
    commands = [([sys.executable, "-m", "covidxray", "train", "--data", str(data), "--out", str(out),
                  "--distribute", "multi-worker", *TRAIN, *extra],
                 {TF_CONFIG_VAR: tf_config(ports, i), "TMPDIR": str(tmp)}) for i, out in enumerate(outs)]
    results = run_processes(commands, tmp.parent / f"logs-{tmp.name}")
    for i, (code, _, err) in enumerate(results):
        assert code == 0, f"worker {i} exited {code}: {err[-3000:]}"
    left = sorted(p.name for p in tmp.glob("covidxray-worker-*"))
    assert not left, f"the non-chief left its private run folder behind: {left}"
    return [json.loads(out) for _, out, _ in results]


def assert_wrote_nothing(folder: Path) -> None:
    assert not folder.exists() or not any(folder.rglob("*")), f"the non-chief wrote {list(folder.rglob('*'))}"


def max_weight_difference(a: Path, b: Path) -> float:
    import keras

    wa = keras.models.load_model(a, compile=False).get_weights()
    wb = keras.models.load_model(b, compile=False).get_weights()
    assert [w.shape for w in wa] == [w.shape for w in wb]
    return max(float(np.max(np.abs(x - y))) for x, y in zip(wa, wb, strict=True))


def test_two_workers_train_what_one_process_trains_and_only_the_chief_writes(data, tmp_path):
    """Two worker processes (4 images of each global batch of 8 each) end with the weights of one process
    that trains the same global batches on two replicas with the same loop.

    The reference has two replicas, not one, because the scratch CNN's dropout draws its mask per replica batch
    (both replicas draw from the same seed): one replica over the global batch draws other masks, so its
    weights differ by about the learning rate, not by rounding.
    """
    started = time.perf_counter()
    chief_out, other_out = tmp_path / "chief", tmp_path / "other"
    summaries = run_two_workers(data, [chief_out, other_out], tmp_path / "tmp", "--epochs", "2")
    assert_wrote_nothing(other_out)
    summary = json.loads((chief_out / "summary.json").read_text())
    assert summary["distribute"] == {"requested": "multi-worker", "used": "multi-worker", "reason": summary[
        "distribute"]["reason"], "workers": 2, "worker_index": 0, "chief": True}
    assert summary["replicas"] == 2 and summary["epochs_run"] == 2
    history = pd.read_csv(chief_out / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    assert {"loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"} <= set(history.columns)
    assert summaries[0]["distribute"]["chief"] and summaries[1]["distribute"]["worker_index"] == 1
    assert summaries[1]["run_dir"] == summaries[0]["run_dir"] == str(chief_out)
    workers_seconds = time.perf_counter() - started

    one_out = tmp_path / "one"
    cmd = [sys.executable, "-c", TWO_CPU_REPLICAS, "train", "--data", str(data), "--out", str(one_out),
           "--distribute", "mirrored", "--epochs", "2", *TRAIN]
    [(code, _, err)] = run_processes([(cmd, {TF_CONFIG_VAR: None})], tmp_path / "logs-one")
    assert code == 0, err[-3000:]
    one = json.loads((one_out / "summary.json").read_text())
    assert (one["replicas"], one["distribute"]["used"]) == (2, "mirrored")
    difference = max_weight_difference(chief_out / "model.keras", one_out / "model.keras")
    print(f"two workers {workers_seconds:.1f} s; max |weight difference| to one process: {difference:.3g}")
    assert difference <= WEIGHT_TOLERANCE
    assert np.allclose(pd.read_csv(one_out / "history.csv")["val_loss"], history["val_loss"], atol=1e-5)


def test_two_workers_resume_from_the_chief_checkpoint(data, tmp_path):
    """A multi-worker run of one epoch, extended to two with --resume on both workers: the non-chief gets the
    chief's state and checkpoint over the network, so it needs no copy of the run folder. With --tensorboard
    (where the package is installed) only the chief writes logs."""
    board = ["--tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    chief_out, other_out = tmp_path / "chief", tmp_path / "other"
    run_two_workers(data, [chief_out, other_out], tmp_path / "tmp1", "--epochs", "1", *board)
    assert len(pd.read_csv(chief_out / "history.csv")) == 1
    summaries = run_two_workers(data, [chief_out, other_out], tmp_path / "tmp2", "--epochs", "2", "--resume", *board)
    assert_wrote_nothing(other_out)
    if board:  # the chief alone writes TensorBoard's logs, into its run folder
        assert {p.parent.name for p in (chief_out / "tensorboard").rglob("*") if p.is_file()} == {"train", "validation"}
    history = pd.read_csv(chief_out / "history.csv")
    assert list(history["epoch"]) == [1, 2]
    summary = json.loads((chief_out / "summary.json").read_text())
    assert summary["resumed_from_epoch"] == 1 and summary["epochs_run"] == 2
    assert summaries[1]["resumed_from_epoch"] == 1
    state = json.loads((chief_out / "checkpoint" / "state.json").read_text())
    assert state["sessions"] == 2 and state["epoch"] == 2


def test_a_chief_that_refuses_its_out_folder_stops_the_other_worker_too(data, tmp_path):
    """The chief fails before training (its --out holds a file of the user's); the other worker, waiting for
    the chief's start, gets the chief's error and exits 1 instead of waiting for ever."""
    chief_out, other_out = tmp_path / "chief", tmp_path / "other"
    chief_out.mkdir()
    (chief_out / "notes.txt").write_text("mine")
    ports = free_ports(2)
    commands = [([sys.executable, "-m", "covidxray", "train", "--data", str(data), "--out", str(out),
                  "--distribute", "multi-worker", "--epochs", "1", *TRAIN], {TF_CONFIG_VAR: tf_config(ports, i)})
                for i, out in enumerate([chief_out, other_out])]
    (chief_code, _, chief_err), (other_code, _, other_err) = run_processes(commands, tmp_path / "logs")
    assert chief_code == 1 and "notes.txt" in chief_err
    assert other_code == 1 and "the chief (worker 0) of this multi-worker run failed" in other_err
    assert "notes.txt" in other_err
    assert_wrote_nothing(other_out)
    assert sorted(p.name for p in chief_out.iterdir()) == ["notes.txt"]


def test_the_loop_shows_its_progress_on_stderr_only(data, capsys):
    """The progress bar (for a terminal) and the per-epoch line go to stderr: stdout carries the commands' results."""
    import tensorflow as tf

    from covidxray.data.manifest import read_manifest, split_frame
    from covidxray.training.loop import CustomLoop
    from covidxray.training.models import build_model, compile_model
    from covidxray.training.pipeline import make_dataset

    frame = read_manifest(data)
    train_ds = make_dataset(split_frame(frame, "train"), image_size=32, batch_size=8, training=True, seed=0)
    val_ds = make_dataset(split_frame(frame, "val"), image_size=32, batch_size=8, training=False)
    model = compile_model(build_model("scratch", image_size=32, seed=0), 1e-3, jit_compile=False)
    lines: list[str] = []
    CustomLoop(tf.distribute.get_strategy(), model).fit(train_ds, val_ds, initial_epoch=0, epochs=1,
                                                        report=lines.append, progress_bar=True)
    captured = capsys.readouterr()
    assert captured.out == "" and "4/4" in captured.err
    assert len(lines) == 1 and lines[0].startswith("epoch 1/1 - ") and "ms/step - loss: " in lines[0]


# ------------------------------------------------------------------------------------------------ bounded start-up

STARTUP_TIMEOUT = 3.0
"""--startup-timeout of the start-up tests: short, so a worker whose peer never comes fails fast."""
STOP_WITHIN = 5.0
"""Seconds a worker has to exit after its start-up timeout or a signal."""


def test_the_startup_timeout_is_checked_on_the_command_line_and_in_the_config(capsys):
    with pytest.raises(SystemExit) as err:
        main(["train", "--startup-timeout", "0"])
    assert err.value.code == 2 and "--startup-timeout: 0 is out of range" in capsys.readouterr().err
    with pytest.raises(ModelError, match=r"startup_timeout \(--startup-timeout\) is -1; it must be a number in"):
        TrainConfig(startup_timeout=-1).validate()
    assert TrainConfig().startup_timeout == 120.0


def test_a_bad_port_stops_train_before_anything_starts(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(TF_CONFIG_VAR, '{"cluster": {"worker": ["127.0.0.1:99999"]}, "task": {"type": "worker", '
                                      '"index": 0}}')
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--distribute", "multi-worker",
                 *TRAIN])
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1, err
    assert "address \"127.0.0.1:99999\", whose port '99999' is not an integer in [1, 65535]" in err
    assert not (tmp_path / "run").exists()


def test_tasks_meet_on_their_own_ports_before_tensorflow_starts():
    """Three tasks of one cluster, started one after the other, all get past the start-up wait; a fourth
    process on a port of the cluster that is not a covidxray task is named as such."""
    ports = free_ports(3)
    text = [tf_config(ports, i) for i in range(3)]
    errors: list[BaseException] = []

    def task(i: int) -> None:
        try:
            wait_for_peers(parse_cluster(text[i]), 20.0)
        except BaseException as exc:  # noqa: BLE001 - handed to the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=task, args=(i,)) for i in range(3)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
        time.sleep(0.5)
    for thread in threads:
        thread.join(30)
    assert not errors and not any(t.is_alive() for t in threads)
    assert time.monotonic() - started < 10
    # a port of the cluster held by something else: it answers, but not as a task of this run
    with socket.create_server(("127.0.0.1", ports[1])) as stranger:
        def answer() -> None:
            while True:
                try:
                    conn = stranger.accept()[0]
                except OSError:
                    return
                with conn:
                    conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer, daemon=True).start()
        with pytest.raises(ClusterError) as err:
            wait_for_peers(parse_cluster(tf_config(ports[:2], 0)), 1.0)
    assert f"127.0.0.1:{ports[1]} (worker 1: something listens there, but not `covidxray train`" in str(err.value)


def start_worker(data: Path, out: Path, tf_config_text: str, timeout: float) -> subprocess.Popen:
    """``covidxray train --distribute multi-worker --startup-timeout timeout`` as a process; stderr piped."""
    cmd = [sys.executable, "-m", "covidxray", "train", "--data", str(data), "--out", str(out), "--distribute",
           "multi-worker", "--startup-timeout", str(timeout), *TRAIN]
    return subprocess.Popen(cmd, env={**os.environ, TF_CONFIG_VAR: tf_config_text}, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_listening(port: int, proc: subprocess.Popen) -> float:
    """When ``proc`` listens on ``port`` (it is waiting for its peers), by time.monotonic()."""
    deadline = time.monotonic() + WORKER_TIMEOUT
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return time.monotonic()
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail(f"the worker never listened on {port}: {proc.communicate()[1][-2000:]}")


def test_a_worker_whose_peer_never_answers_stops_within_its_startup_timeout(data, tmp_path):
    ports = free_ports(2)
    proc = start_worker(data, tmp_path / "run", tf_config(ports, 0), STARTUP_TIMEOUT)
    waiting = wait_listening(ports[0], proc)
    try:
        _, err = proc.communicate(timeout=STARTUP_TIMEOUT + STOP_WITHIN)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still waiting {STARTUP_TIMEOUT + STOP_WITHIN} s after it began: {proc.communicate()[1]}")
    seconds = time.monotonic() - waiting
    print(f"failed {seconds:.1f} s after the start-up wait began (--startup-timeout {STARTUP_TIMEOUT})")
    assert proc.returncode == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"covidxray train: error: multi-worker start-up: no answer within {STARTUP_TIMEOUT:g} s")
    assert f"127.0.0.1:{ports[1]} (worker 1: connection refused: nothing listens on that port)" in err
    assert "raise --startup-timeout" in err
    assert seconds <= STARTUP_TIMEOUT + STOP_WITHIN and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("sig", "code", "says"), [(signal.SIGTERM, 143, "covidxray train: stopped by SIGTERM"),
                                                   (signal.SIGINT, 130, "covidxray train: interrupted")])
def test_a_signal_stops_a_waiting_worker_at_once(data, tmp_path, sig, code, says):
    ports = free_ports(2)
    proc = start_worker(data, tmp_path / "run", tf_config(ports, 1), 60.0)
    wait_listening(ports[1], proc)
    sent = time.monotonic()
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=STOP_WITHIN)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"{sig.name} did not stop the worker within {STOP_WITHIN} s: {proc.communicate()[1]}")
    print(f"{sig.name}: stopped in {time.monotonic() - sent:.1f} s")
    assert proc.returncode == code and err.splitlines() == [says], err
    assert not (tmp_path / "run").exists()
