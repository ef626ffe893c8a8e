"""Running one spec: data, initial weights, the wrapped model, timing; and the worker process."""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from keras_aesam import recipe
from keras_aesam.bench.networks import build_network
from keras_aesam.bench.plan import FORWARD_COST
from keras_aesam.bench.progress import epoch_callback
from keras_aesam.bench.records import (
    _loadavg,
    _result_path,
    _write_json,
    finished_result,
)
from keras_aesam.callbacks import writing
from keras_aesam.cli import devices
from keras_aesam.cli.run_directory import DISK_FULL_EXIT, disk_full_message, is_disk_full


def _make_timer(K):
    """A callback timing every step and epoch (for ``keras`` or ``tf_keras``).

    Wall time with ``time.perf_counter``; CPU time of the whole process (all
    threads) with ``time.process_time``, which other jobs on the machine disturb
    much less than wall time.
    """

    class StepTimer(K.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch_seconds = []
            self.step_seconds = []
            self.step_cpu_seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.step_seconds.append([])
            self.step_cpu_seconds.append([])
            self._epoch_start = time.perf_counter()

        def on_train_batch_begin(self, batch, logs=None):
            self._step_cpu_start = time.process_time()
            self._step_start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.step_seconds[-1].append(time.perf_counter() - self._step_start)
            self.step_cpu_seconds[-1].append(time.process_time() - self._step_cpu_start)

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_seconds.append(time.perf_counter() - self._epoch_start)

    return StepTimer()


def _timing(timer):
    """Epoch and step times with the first epoch reported apart (tracing, cache filling).

    With one epoch only, the step mean leaves out the first 5 steps instead.
    """
    epochs = timer.epoch_seconds
    steps = timer.step_seconds
    if len(epochs) > 1:
        later = [s for epoch in steps[1:] for s in epoch]
        later_cpu = [s for epoch in timer.step_cpu_seconds[1:] for s in epoch]
        epoch_mean = float(np.mean(epochs[1:]))
    else:
        later = [s for epoch in steps for s in epoch][5:]
        later_cpu = [s for epoch in timer.step_cpu_seconds for s in epoch][5:]
        epoch_mean = None
    return {
        "epoch_seconds": [round(e, 4) for e in epochs],
        "first_epoch_seconds": round(epochs[0], 4) if epochs else None,
        "epoch_seconds_after_first": None if epoch_mean is None else round(epoch_mean, 4),
        "step_ms": round(1000 * float(np.mean(later)), 3) if later else None,
        "step_cpu_ms": round(1000 * float(np.mean(later_cpu)), 3) if later_cpu else None,
        "step_ms_first_epoch": round(1000 * float(np.mean(steps[0])), 3) if steps and steps[0] else None,
        "timed_steps": len(later),
    }


def _load_data(spec):
    from keras_aesam import data as data_module

    return data_module.get_dataset(
        spec["dataset"], batch_size=spec["batch_size"], seed=spec["seed"], label_noise=spec["noise"],
        train_size=spec["train_size"], validation_fraction=spec["validation_fraction"],
    )


def _init_path(out, spec, input_shape, num_classes):
    shape = "x".join(str(s) for s in input_shape)
    return Path(out) / "init" / f"{spec['network']}_{shape}_{num_classes}c_s{spec['seed']}.npz"


def _save_npz(path, **arrays):
    """Writes ``arrays`` to ``path`` whole or not at all (a temporary file, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(tmp), open(tmp, "wb") as f:
            np.savez(f, **arrays)
    except OSError:
        tmp.unlink(missing_ok=True)  # a partial file would only hold on to the space
        raise
    os.replace(tmp, path)


def _weight_arrays(net):
    return {f"w{i:04d}": w for i, w in enumerate(net.get_weights())}


def final_weights_path(out, spec) -> Path:
    """Where a method run's final network weights are kept (``w0000``, ``w0001``, … as in ``init/``)."""
    return Path(out) / "final" / f"{spec['run_id']}.npz"


def initial_weights(out, spec, data):
    """The seed's initial weights (built once, then loaded by every method) and a probe batch.

    Returns ``(weights, probe_x, probe_logits)``: logits (inference mode) of a seeded
    random probe batch, so the peer can check that its tf_keras twin computes the
    same function from the same weights.
    """
    path = _init_path(out, spec, data.input_shape, data.num_classes)
    if not path.is_file():
        import keras

        keras.utils.clear_session()
        keras.utils.set_random_seed(spec["seed"])
        net = build_network(keras, spec["network"], num_classes=data.num_classes, input_shape=data.input_shape,
                            weight_decay=spec["weight_decay"], weight_decay_mode=spec["weight_decay_mode"])
        probe_x = np.random.default_rng(spec["seed"]).normal(size=(16, *data.input_shape)).astype("float32")
        probe_logits = np.asarray(net(probe_x, training=False))
        _save_npz(path, probe_x=probe_x, probe_logits=probe_logits, **_weight_arrays(net))
    with np.load(path) as stored:
        names = sorted(k for k in stored.files if k.startswith("w"))
        return [stored[k] for k in names], stored["probe_x"], stored["probe_logits"]


def _sam_steps_per_epoch(fractions, steps_per_epoch):
    return [int(round(f * steps_per_epoch)) for f in fractions]


def _recipe(spec):
    """The spec's optimizer, schedule and weight decay, as :mod:`keras_aesam.recipe` trains them."""
    return recipe.Recipe(lr=spec["lr"], momentum=spec["momentum"], weight_decay=spec["weight_decay"],
                         weight_decay_mode=spec["weight_decay_mode"], schedule=spec.get("schedule", "cosine"))


def _build_inner(K, spec, data, weights):
    """The spec's network in framework ``K``, regularized as the recipe says, loaded with ``weights``."""
    inner = build_network(K, spec["network"], num_classes=data.num_classes, input_shape=data.input_shape,
                          weight_decay=spec["weight_decay"], weight_decay_mode=spec["weight_decay_mode"])
    inner.set_weights(weights)
    return inner


def _fit_and_evaluate(K, model, spec, data, callbacks=(), train=None, evaluate=None):
    """Fits ``model`` (compiled) on ``train`` (default ``data.train.repeat()``) with the step timer, then
    evaluates it (with ``evaluate(model, dataset)``, default Keras's ``model.evaluate``).

    Returns ``(history, fields)``: the result fields every run has, the peer's too.
    """
    timer = _make_timer(K)
    load_start = _loadavg()
    fit_start = time.perf_counter()
    train = data.train.repeat() if train is None else train
    history = model.fit(train, steps_per_epoch=data.steps_per_epoch, epochs=spec["epochs"],
                        verbose=0, callbacks=[timer, *callbacks], shuffle=False)
    fit_seconds = time.perf_counter() - fit_start
    test = data.test if not spec["test_batches"] else data.test.take(spec["test_batches"])
    if evaluate is None:
        evaluation = model.evaluate(test, verbose=0, return_dict=True)
    else:
        evaluation = evaluate(model, test)
    return history, {
        "test_accuracy": float(evaluation["accuracy"]),
        "test_loss": float(evaluation["loss"]),
        "train_accuracy_last_epoch": float(history.history["accuracy"][-1]),
        "train_loss_last_epoch": float(history.history["loss"][-1]),
        "steps_per_epoch": data.steps_per_epoch,
        "fit_seconds": round(fit_seconds, 3),
        **_timing(timer),
        "train_examples": data.train_examples,
        "test_examples": data.test_examples if not spec["test_batches"] else None,
        "num_classes": data.num_classes,
        "noise_rate_realised": data.noise_rate_realised,
        "data_source": data.source,
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
    }


def _passes(spec, hp, steps, sam_steps):
    """Forward-backward passes in whole-batch units (ESAM: ⌈γB⌉/B and a third for its extra forward)."""
    if spec["method"] == "esam":
        second = math.ceil(hp["gamma"] * spec["batch_size"]) / spec["batch_size"]
        return steps + sam_steps * (second + FORWARD_COST)
    return steps + sam_steps


#: This process's ``MultiWorkerMirroredStrategy``: made once, it holds the task's port of the cluster.
_CLUSTER = []


def _cluster_strategy():
    """The process's multi-worker strategy from ``TF_CONFIG``, made on first use (before other TensorFlow work)."""
    if not _CLUSTER:
        _CLUSTER.append(devices.strategy_for("multi-worker")[0])
    return _CLUSTER[0]


def join_cluster(agreement: str) -> bool:
    """Joins the ``TF_CONFIG`` cluster; whether every worker brought the same ``agreement``.

    ``agreement`` names the plan and the runs this session will train: the workers
    must train the same runs in the same order, or each would wait for the
    others in a collective that never comes.
    """
    return devices.cluster_agrees(_cluster_strategy(), agreement)


def _strategy(spec):
    """The spec's ``tf.distribute`` strategy (made first: a CPU split needs TensorFlow not yet started).

    ``--batch-size`` is the global batch: each of the replicas trains on its equal share.
    """
    if spec.get("strategy") == "multi-worker":
        strategy = _cluster_strategy()
    else:
        strategy, _ = devices.strategy_for(spec.get("strategy", "one"), spec.get("cpu_devices"))
    replicas = strategy.num_replicas_in_sync
    if spec["batch_size"] % replicas:
        raise ValueError(f"--batch-size (the global batch) must be a multiple of the {replicas} replicas, "
                         f"got {spec['batch_size']}")
    return strategy


def _training_stream(strategy, data, steps):
    """The training batches ``fit`` gets: ``data.train.repeat()``, the same batches on any devices.

    Keras opens the training data of a distributed model twice (a batch to build
    it, then to train), and a second iterator of the shuffled pipeline would start
    at another shuffle than one device does; under a strategy ``fit`` therefore
    reads a replayable view (``StreamView``) of one iterator, so every strategy
    trains on the batches, in the order, of one device; under multi-worker each
    worker reads the whole stream and takes its share of every global batch.
    """
    import tensorflow as tf

    train = data.train.repeat()
    if strategy is tf.distribute.get_strategy():  # the default strategy: Keras opens the data once
        return train
    from keras_aesam.cli.training_loop import replayable_dataset

    return replayable_dataset(iter(train), steps, data.train.element_spec)


def _run_method(spec, out) -> dict:
    """One keras_aesam run of the spec, trained with :mod:`keras_aesam.recipe` on the spec's devices;
    its result fields. The final network weights go to ``final_weights_path``.
    """
    import keras
    import tensorflow as tf

    import keras_aesam

    strategy = _strategy(spec)
    keras.utils.clear_session()
    keras.utils.set_random_seed(spec["seed"])
    data = _load_data(spec)  # a fresh pipeline under the same seeds: the same batch order for every method
    weights, _, _ = initial_weights(out, spec, data)
    keras.utils.clear_session()
    keras.utils.set_random_seed(spec["seed"])
    total_steps = recipe.total_steps(spec["epochs"], data.steps_per_epoch)
    sync = spec.get("sync_perturbation", True)
    with strategy.scope():  # the variables of network, optimizer and metrics are mirrored
        inner = _build_inner(keras, spec, data, weights)
        model = keras_aesam.wrap(inner, method=spec["method"], total_steps=total_steps, sync_perturbation=sync,
                                 **spec["hyperparameters"])
        recipe.compile_model(model, _recipe(spec), total_steps, keras, jit_compile=False)
    epochs = epoch_callback(keras, spec["run_id"], spec["epochs"])
    train = _training_stream(strategy, data, total_steps)
    evaluate = None
    cluster = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    if cluster:
        # Keras's evaluate fails under this strategy: every worker evaluates the same weights on its own.
        from keras_aesam.cli.training_loop import evaluate_locally as evaluate
    history, fields = _fit_and_evaluate(keras, model, spec, data, [epochs], train, evaluate)
    _save_npz(final_weights_path(out, spec), **_weight_arrays(inner))

    fractions = [float(f) for f in history.history.get("sam_fraction", [])]
    state = model.policy_state
    steps = int(state["step"])
    sam_steps = int(sum(_sam_steps_per_epoch(fractions, data.steps_per_epoch)))
    hp = model.hyperparameters
    return {
        **fields,
        "steps": steps,
        "sam_steps": sam_steps,
        "sam_fraction": sam_steps / steps if steps else None,
        "sam_fraction_per_epoch": fractions,
        "grad_evals": steps + sam_steps,
        "pass_equivalents": round(_passes(spec, hp, steps, sam_steps), 3),
        "skipped_steps": int(sum(history.history.get("skipped_steps", [0]))),
        "parameters": int(inner.count_params()),
        "resolved_hyperparameters": hp,
        "expected_sam_fraction": model.policy.expected_sam_fraction(total_steps),
        "policy_state": state,
        "framework": f"keras {keras.__version__}, tensorflow {tf.__version__}",
        "strategy": "MultiWorkerMirroredStrategy" if cluster else type(strategy).__name__,  # not its alias's name
        "replicas": strategy.num_replicas_in_sync,
        "sync_perturbation": bool(sync),
    }


#: How a run that does not say otherwise was made: TensorFlow's default strategy, one device.
_ONE_DEVICE = {"strategy": "_DefaultDistributionStrategy", "replicas": 1, "sync_perturbation": None}


def run_spec(spec, out) -> dict:
    """Runs one spec and writes its result JSON (the moment it finishes); returns the result."""
    started = time.perf_counter()
    started_at = datetime.datetime.now().isoformat(timespec="seconds")
    from keras_aesam import (
        bench,  # the runners are looked up on the package: the seam tests replace
    )

    body = bench._run_peer(spec, out) if spec["kind"] == "peer" else bench._run_method(spec, out)
    for key, value in _ONE_DEVICE.items():  # the peer (tf_keras) always trains on one device
        body.setdefault(key, value)
    result = {
        "run_id": spec["run_id"],
        "spec_hash": spec["spec_hash"],
        "kind": spec["kind"],
        "method": spec["method"],
        "setting": spec["setting"],
        "noise": spec["noise"],
        "seed": spec["seed"],
        **body,
        "run_seconds": round(time.perf_counter() - started, 3),
        "started_at": started_at,
        "finished_at": datetime.datetime.now().isoformat(timespec="seconds"),
        "pid": os.getpid(),
        "spec": spec,
    }
    _write_json(_result_path(out, spec), result)
    error = _result_path(out, spec).with_suffix(".error.txt")
    if error.exists():
        error.unlink()
    return result


#: A worker's exit code when the cluster's workers disagree on what to run (nothing ran).
DISAGREE_EXIT = 3
#: How the bench's error lines start (the session finds a worker's in its log).
ERROR_PREFIX = "keras-aesam bench: error: "


def _worker(job_path) -> int:
    """Worker process: runs the job's specs in order, each result written when it finishes.

    A job of a multi-worker bench first joins the cluster and checks that every
    worker brought the same plan and runs (``DISAGREE_EXIT`` otherwise).
    """
    job = json.loads(Path(job_path).read_text())
    out = job["out"]
    if job.get("agreement") is not None and not join_cluster(job["agreement"]):
        print("the workers of the cluster disagree on the plan or on its finished runs", file=sys.stderr, flush=True)
        return DISAGREE_EXIT
    cpu_devices = {spec.get("cpu_devices") for spec in job["specs"]} - {None}
    for count in cpu_devices:  # the bench's one split, made before TensorFlow's runtime starts
        devices.split_cpu(count)
    failures = 0
    for spec in job["specs"]:
        if finished_result(out, spec) is not None:
            continue
        try:
            result = run_spec(spec, out)
            print(f"finished {spec['run_id']}: test accuracy {result['test_accuracy']:.4f}", flush=True)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # noqa: BLE001 - recorded, the next run still runs
            if is_disk_full(err):  # no run can finish: one line for the session (if the log takes it), which stops
                try:
                    print(f"{ERROR_PREFIX}{disk_full_message(err, out)}", file=sys.stderr, flush=True)
                except OSError:
                    pass
                return DISK_FULL_EXIT
            failures += 1
            text = traceback.format_exc()
            print(text, file=sys.stderr, flush=True)
            path = _result_path(out, spec).with_suffix(".error.txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return 1 if failures else 0
