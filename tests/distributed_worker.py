"""Distributed training jobs for tests/test_distribute.py, several models per
process (one TensorFlow start-up each). Logical devices and TF_CONFIG must be
set before TensorFlow starts, hence a subprocess; each job prints its result
as one JSON line.

    python tests/distributed_worker.py mirrored SYNC METHOD...  # 2 logical CPUs and one device, per method
    python tests/distributed_worker.py sequence METHOD...       # the methods one after another, twice
    python tests/distributed_worker.py outside_scope            # built outside the strategy's scope
    python tests/distributed_worker.py worker OUT METHOD...     # one process of a 2-worker cluster

Importing this module starts nothing: the one-device reference of the
multi-worker test runs in the test process with the same ``train``.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

EPOCHS = 3
STEPS_PER_EPOCH = 4  # 128 samples, global batch 32
GLOBAL_BATCH = 32
# The replicas take the same branch only if the decision is global; BatchNorm
# makes the two shards' gradients (and so their ‖g‖²) differ more.
BN_ENV = "KERAS_AESAM_TEST_BN"
# float64 separates "the same step" from float32 summation order (see the test).
FLOATX_ENV = "KERAS_AESAM_TEST_FLOATX"


# ae_sam's default c_t takes SAM on every one of these 12 steps; these lambdas
# give both kinds of step, so that replicas could disagree.
HYPERPARAMETERS = {"ae_sam": {"lambda1": 0.0, "lambda2": 2.0}}


def two_logical_cpus():
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
    )


def keras_floatx():
    import keras

    return keras.config.floatx()


def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype(keras_floatx())
    y = np.abs(x[:, :3]).argmax(1).astype("int32")
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(GLOBAL_BATCH)


def net(batchnorm=False):
    import keras

    keras.utils.set_random_seed(0)
    layers = [keras.Input((6,)), keras.layers.Dense(8, activation="relu")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    return keras.Sequential(layers + [keras.layers.Dense(3)])


def record_sam_branches(model, log):
    """Append ``(replica, step)`` to ``log`` each time a replica runs the SAM
    branch: the perturbation is formed there and nowhere else, so this is the
    branch each replica took, after every check the model makes."""
    direction = model.direction
    perturbation = direction.perturbation

    def recorded(grads, weights, step, grad_norm_sq=None):
        ctx = tf.distribute.get_replica_context()
        replica = ctx.replica_id_in_sync_group if ctx is not None else 0

        def record(r, t):
            log.append((int(r), int(t)))
            return np.int32(0)

        tick = tf.py_function(record, [replica, step], tf.int32)
        with tf.control_dependencies([tick]):
            return [tf.identity(e) for e in perturbation(grads, weights, step, grad_norm_sq)]

    direction.perturbation = recorded


def train(strategy, method, sync, batchnorm=False, log=None, epochs=EPOCHS):
    """Fit a fresh copy of ``net()`` (same initial weights every time) under
    ``strategy``; returns its per-epoch SAM fractions, weights and model."""
    import keras

    import keras_aesam

    with strategy.scope():
        inner = net(batchnorm)
        model = keras_aesam.wrap(
            inner, method=method, sync_perturbation=sync, **HYPERPARAMETERS.get(method, {})
        )
        if log is not None:
            record_sam_branches(model, log)
        model.compile(
            optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    history = model.fit(data(), epochs=epochs, verbose=0, shuffle=False).history
    return history["sam_fraction"], [w.tolist() for w in inner.get_weights()], model


def mirrored(sync, methods):
    """Per method: the 2-replica run, its SAM branches per replica and step,
    and (with SYNC) the one-device run on the same global batches."""
    batchnorm = os.environ.get(BN_ENV) == "1"
    out = {}
    for method in methods:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        log = []
        fractions, weights, _ = train(strategy, method, sync, batchnorm, log)
        one_fractions, one_weights = None, None
        if sync:  # (per-replica perturbations have no one-device counterpart)
            one_fractions, one_weights, _ = train(
                tf.distribute.OneDeviceStrategy("/cpu:0"), method, sync, batchnorm
            )
        branches = {}
        for replica, step in log:
            branches.setdefault(str(step), []).append(replica)
        out[method] = {
            "replicas": strategy.num_replicas_in_sync,
            "fractions": fractions,
            "one_device_fractions": one_fractions,
            "weights": weights,
            "one_device_weights": one_weights,
            "sam_branches": {k: sorted(v) for k, v in branches.items()},
        }
    return out


def sequence(methods):
    """Every method trained one after another in this process: first all under
    one shared MirroredStrategy, then each under a fresh one, with a plain Keras
    model first and last in each round. Returns each model's weights (or the
    error it raised) per round."""
    import keras

    def plain(strategy):
        with strategy.scope():
            model = net()
            model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
        model.fit(data(), epochs=1, verbose=0, shuffle=False)
        return [w.tolist() for w in model.get_weights()]

    def attempt(fn):
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - the error is the result
            return f"{type(error).__name__}: {str(error)[:300]}"

    out = {}
    shared = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    fresh = lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])  # noqa: E731
    # attempt() calls each closure at once, inside the iteration that made it (B023 cannot see that).
    for name, make in (("shared", lambda: shared), ("fresh", fresh)):
        runs = {"plain_first": attempt(lambda: plain(make()))}  # noqa: B023
        for method in methods:
            runs[method] = attempt(lambda: train(make(), method, True, epochs=1)[1])  # noqa: B023
        runs["plain_last"] = attempt(lambda: plain(make()))  # noqa: B023
        out[name] = runs
    return out


def outside_scope():
    """Build outside the strategy, compile and fit inside: Keras's error, ours alike."""
    import keras_aesam

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    x, y = next(iter(data().unbatch().batch(128)))
    errors = {}
    for kind in ("keras", "keras_aesam"):
        inner = net()
        model = inner if kind == "keras" else keras_aesam.wrap(inner, method="ae_sam")
        try:
            with strategy.scope():
                model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy")
                model.fit(x, y, epochs=1, verbose=0)
            errors[kind] = None
        except Exception as error:  # noqa: BLE001 - the type is the result
            errors[kind] = type(error).__name__
    return errors


def worker(out_path, methods):
    """One worker of a 2-worker cluster (TF_CONFIG): the methods one after
    another under one MultiWorkerMirroredStrategy."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    out = {}
    for method in methods:
        fractions, weights, model = train(strategy, method, True)
        out[method] = {"fractions": fractions, "weights": weights, "state": model.policy_state}
    with open(out_path, "w") as f:
        json.dump(out, f)


def main(argv):
    mode, args = argv[0], argv[1:]
    if mode in ("mirrored", "sequence", "outside_scope"):
        two_logical_cpus()
    import keras

    keras.config.disable_traceback_filtering()
    if os.environ.get(FLOATX_ENV):
        keras.config.set_floatx(os.environ[FLOATX_ENV])
    if mode == "mirrored":
        print(json.dumps(mirrored(args[0] == "1", args[1:])))
    elif mode == "sequence":
        print(json.dumps(sequence(args)))
    elif mode == "outside_scope":
        print(json.dumps(outside_scope()))
    elif mode == "worker":
        worker(args[0], args[1:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
