"""Reliability: exact resume, determinism, non-finite steps, misuse, export.

Every case trains a tiny net (Dense-BatchNorm-Dropout-Dense) for a handful of
steps with SGD + momentum; the long-run guarantees follow from the per-step
ones checked here. What a run "is" is compared through ``full_state``: every
variable the wrapper, the inner net and the optimizer carry.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_aesam
from test_model import compile_sgd, small_net, toy_data

METHODS = sorted(keras_aesam.METHODS)
# Settings under which these methods take both kinds of step within a few
# steps; any other method of METHODS runs with its defaults.
HP = {
    "erm": {},
    "sam": {"rho": 0.1},
    "esam": {"seed": 3},
    "ss_sam": {"p": 0.5, "seed": 3},
    "looksam": {"k": 2},
    "ae_sam": {},
    "ae_looksam": {},
}
BATCH = 16
N = 48
STEPS = N // BATCH  # steps per epoch
EPOCHS = 3
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
SUBPROCESS_TIMEOUT = 240


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def initial_weights():
    """One fixed starting point (independent of Keras's RNG) for the runs of a test."""
    net = small_net(dropout=0.2)
    rng = np.random.default_rng(0)
    return [
        rng.normal(0.0, 0.5, size=w.shape).astype("float32") if "kernel" in w.path else w.numpy()
        for w in net.weights
    ]


def make_model(method, init, **kw):
    inner = small_net(dropout=0.2, seed=0)
    inner.set_weights(init)
    return compile_sgd(keras_aesam.wrap(inner, method=method, **HP.get(method, {}), **kw))


def full_state(model):
    """Every variable of a run, in creation order, as ``(path, value)``.

    The inner net's weights (BatchNorm statistics included), the Dropout seed
    state, the wrapper's step, total_steps, µ, σ² and LookSAM's g_v, and the
    optimizer's iteration count, learning rate and momenta.
    """
    variables = list(model.variables) + list(model.optimizer.variables)
    return [(v.path, np.array(v.numpy())) for v in variables]


def assert_same_state(actual, expected, rtol=0):
    """Equal variable by variable (matched by position: the paths' auto-numbered
    prefixes may differ). Bit for bit by default: a resumed run repeats the same
    float32 operations in the same order, so any difference is a real one."""
    assert len(actual) == len(expected), ([p for p, _ in actual], [p for p, _ in expected])
    for (path, a), (_, e) in zip(actual, expected):
        assert a.shape == e.shape, path
        if rtol == 0:
            np.testing.assert_array_equal(a, e, err_msg=path)
        else:
            np.testing.assert_allclose(a, e, rtol=rtol, atol=1e-9, err_msg=path)


def seed_variables(model):
    return [v for v in model.variables if "seed_generator_state" in v.path]


class Interrupted(Exception):
    pass


class EpochTracking(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch


class InterruptAt(EpochTracking):
    """Raises before the given batch of the given epoch runs (a crash mid-epoch)."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise Interrupted(f"interrupted before batch {self.at}")


class BackupAndRestoreWithSeeds(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` that also backs up the Dropout ``SeedGenerator`` state.

    Keras's weights file holds ``layer.weights``, which exclude seed-generator
    state, so without this the resumed run would draw other dropout masks than
    the uninterrupted one: a Keras matter, not keras_aesam's. It also records
    which batches the model had trained on when the last backup was written.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trained = []
        self.backed_up = None
        self._epoch = None

    def _seed_path(self):
        return os.path.join(self.backup_dir, "seed_generators.npy")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.trained.append((self._epoch, batch))
        super().on_train_batch_end(batch, logs)

    def _save_model(self):
        super()._save_model()
        np.save(self._seed_path(), np.stack([v.numpy() for v in seed_variables(self.model)]))
        self.backed_up = list(self.trained)

    def _load_model(self):
        super()._load_model()
        if os.path.exists(self._seed_path()):
            for v, value in zip(seed_variables(self.model), np.load(self._seed_path())):
                v.assign(value)


def build_optimizer(model):
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def restore(model, state):
    """Assign a ``full_state`` back to the model (same structure)."""
    variables = list(model.variables) + list(model.optimizer.variables)
    assert len(variables) == len(state)
    for v, (_, value) in zip(variables, state):
        v.assign(value)


def scramble(model, seed=99):
    """Overwrite every variable with garbage, as a stand-in for a fresh process,
    only harsher: whatever a restore fails to bring back stays visibly wrong."""
    rng = np.random.default_rng(seed)
    state = full_state(model)
    restore(model, [
        (path, (rng.integers(1, 1000, size=value.shape) if value.dtype.kind in "iu"
                else rng.normal(size=value.shape)).astype(value.dtype))
        for path, value in state
    ])


class StateAtBackup(BackupAndRestoreWithSeeds):
    """Also keeps ``full_state`` as it was when each backup was written."""

    def _save_model(self):
        super()._save_model()
        self.state = full_state(self.model)


class SaveAtEpochEnd(keras.callbacks.Callback):
    """``model.save`` at the end of an epoch, with the Dropout seed state (which
    the ``.keras`` format does not hold either) and the full state for reference."""

    def __init__(self, epoch, path):
        super().__init__()
        self.epoch, self.path = epoch, path

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            self.model.save(self.path)
            np.save(self.path + ".seeds.npy", np.stack([v.numpy() for v in seed_variables(self.model)]))
            self.state = full_state(self.model)


class StopBeforeFirstStep(EpochTracking):
    """Records where a resumed fit starts and the state it starts from, then stops."""

    def on_train_batch_begin(self, batch, logs=None):
        self.start = (self.epoch, batch)
        self.state = full_state(self.model)
        raise Interrupted("enough")


@pytest.fixture(scope="module", params=METHODS)
def runs(request, tmp_path_factory):
    """For one method: an uninterrupted run, and the same run crashed mid-epoch 1
    (before its batch 2) while backing up three ways: ``BackupAndRestore`` at
    each epoch end, ``BackupAndRestore`` every 2 steps, ``model.save`` at the end
    of epoch 0. The model object (and its traced step) is reused: every run
    starts from the same assigned state."""
    method = request.param
    keras.utils.clear_session()
    tmp = tmp_path_factory.mktemp(f"resume_{method}")
    x, y = toy_data(n=N)
    model = make_model(method, initial_weights())
    build_optimizer(model)
    initial = full_state(model)

    history = model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0).history
    assert model.policy_state["step"] == EPOCHS * STEPS
    expected = full_state(model)
    expected_policy = model.policy_state

    restore(model, initial)
    by_epoch = StateAtBackup(str(tmp / "by_epoch"), save_freq="epoch", delete_checkpoint=True)
    by_steps = StateAtBackup(str(tmp / "by_steps"), save_freq=2, delete_checkpoint=False)
    saved = SaveAtEpochEnd(0, str(tmp / "epoch0.keras"))
    with pytest.raises(Interrupted):
        model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0,
                  callbacks=[by_epoch, by_steps, saved, InterruptAt(1, 2)])
    assert model.policy_state["step"] == STEPS + 2  # two batches of epoch 1 are lost
    return {
        "method": method, "model": model, "x": x, "y": y, "history": history,
        "expected": expected, "expected_policy": expected_policy,
        "by_epoch": by_epoch, "by_steps": by_steps, "saved": saved,
    }


def test_backup_and_restore_resumes_exactly(runs):
    """Resumed from the last (epoch-end) backup into scrambled variables: the
    same weights, BatchNorm statistics, optimizer state, µ, σ², step,
    total_steps and g_v as the uninterrupted run (SS-SAM's and ESAM's draws
    follow the restored step)."""
    model, backup = runs["model"], runs["by_epoch"]
    assert backup.backed_up == [(0, b) for b in range(STEPS)]
    assert os.path.exists(os.path.join(backup.backup_dir, "latest.weights.h5"))
    scramble(model)
    history = model.fit(
        runs["x"], runs["y"], epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0,
        callbacks=[BackupAndRestoreWithSeeds(backup.backup_dir, save_freq="epoch", delete_checkpoint=True)],
    ).history
    assert len(history["loss"]) == EPOCHS - 1  # resumed at epoch 1
    assert not os.path.exists(backup.backup_dir)  # delete_checkpoint=True
    assert history["sam_fraction"] == runs["history"]["sam_fraction"][1:]
    assert model.policy_state == runs["expected_policy"]
    assert_same_state(full_state(model), runs["expected"])


def test_backup_every_n_steps_restores_the_full_state(runs):
    """``save_freq=<steps>``: a backup written mid-epoch brings back every piece
    of the state exactly.

    (The run then does *not* end like the uninterrupted one, for any Keras
    model: Keras 3's ``BackupAndRestore`` restores a mid-epoch backup but
    restarts that epoch from its first batch -- it writes the batch index to
    ``training_metadata.json`` and never reads it -- so the batches before the
    backup are trained twice. Exact resumption needs epoch-end backups.)
    """
    model, backup = runs["model"], runs["by_steps"]
    assert backup.backed_up[-1] == (1, 0)  # the last backup is mid-epoch 1
    scramble(model)
    start = StopBeforeFirstStep()
    with pytest.raises(Interrupted):
        model.fit(runs["x"], runs["y"], epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0,
                  callbacks=[BackupAndRestoreWithSeeds(backup.backup_dir, save_freq=2), start])
    assert start.start[0] == 1  # resumes in the backed-up epoch
    assert_same_state(start.state, backup.state, rtol=0)


def test_save_load_and_initial_epoch_resume_exactly(runs):
    """``model.save`` at an epoch boundary, ``load_model`` (a new object), then
    ``fit(initial_epoch=...)``: ends like the uninterrupted run."""
    saved = runs["saved"]
    loaded = keras.models.load_model(saved.path)
    assert type(loaded) is type(runs["model"])
    build_optimizer(loaded)
    for v, value in zip(seed_variables(loaded), np.load(saved.path + ".seeds.npy")):
        v.assign(value)
    assert_same_state(full_state(loaded), saved.state, rtol=0)
    loaded.fit(runs["x"], runs["y"], epochs=EPOCHS, initial_epoch=1, batch_size=BATCH, shuffle=False, verbose=0)
    assert loaded.policy_state == runs["expected_policy"]
    assert_same_state(full_state(loaded), runs["expected"])


# --------------------------------------------------------------------------
# 2. Determinism (op determinism is process-global: a fresh process)
# --------------------------------------------------------------------------
def run_python(code, *args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=env, cwd=TESTS_DIR,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


DETERMINISM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, %r)
    import numpy as np, keras, tensorflow as tf, keras_aesam
    from test_model import compile_sgd, small_net, toy_data
    tf.config.experimental.enable_op_determinism()

    def run(method, seed):
        keras.utils.clear_session()
        keras.utils.set_random_seed(seed)  # init, Dropout masks and Keras's shuffling
        x, y = toy_data(n=48)
        model = compile_sgd(keras_aesam.wrap(small_net(dropout=0.3), method=method))
        h = model.fit(x, y, epochs=3, batch_size=16, verbose=0)  # shuffled
        return {
            "sam_fraction": h.history["sam_fraction"],
            "weights": [w.tolist() for w in model.get_weights()],
            "policy_state": model.policy_state,
        }

    out = {m: [run(m, 11), run(m, 11)] for m in ("ae_looksam",)}
    print(json.dumps(out))
    """
) % TESTS_DIR


def test_seeded_runs_with_op_determinism_are_identical():
    out = run_python(DETERMINISM_SCRIPT)
    for method in ("ae_looksam",):  # decisions that hang on the numerics, g_v, Dropout, shuffling
        first, second = out[method]
        assert first["sam_fraction"] == second["sam_fraction"], method
        assert first["policy_state"] == second["policy_state"], method
        assert first["weights"] == second["weights"], method  # bit for bit
        assert 0.0 < sum(first["sam_fraction"]) < len(first["sam_fraction"]), method  # both kinds of step


# --------------------------------------------------------------------------
# 3. Non-finite steps without loss scaling
# --------------------------------------------------------------------------
class Snapshot(EpochTracking):
    """``full_state`` just before and just after one given step, and its logs."""

    def __init__(self, epoch, batch):
        super().__init__()
        self.at = (epoch, batch)

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            self.before = full_state(self.model)

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            self.after = full_state(self.model)
            self.logs = dict(logs)


def assert_nothing_moved(snapshot, skip=("seed_generator_state",)):
    """Everything but the Dropout RNG state (whose draw is harmless) is unchanged."""
    for (path, before), (_, after) in zip(snapshot.before, snapshot.after):
        if not any(s in path for s in skip):
            np.testing.assert_array_equal(after, before, err_msg=path)


def poisoned(x, batch, value):
    x = x.copy()
    x[batch * BATCH + 3, 0] = value
    return x


def nan_weight(batch):
    """Sample weights with one NaN: a NaN loss and gradient from a finite forward
    pass. (A NaN *input* is a poor probe: the fused ReLU maps NaN to 0, so the
    loss stays finite while the gradient is NaN.)"""
    sw = np.ones(N, "float32")
    sw[batch * BATCH + 3] = np.nan
    return sw


@pytest.mark.parametrize(
    "method, poison",
    [("erm", "inf"), ("esam", "-inf"), ("ss_sam", "inf"), ("ae_looksam", "nan_weight")],
)
def test_nonfinite_step_moves_nothing_and_is_counted(method, poison, capsys):
    """A NaN/Inf loss and gradient: the step leaves the weights, the optimizer
    (iterations, momenta), µ, σ², step and g_v exactly as they were, counts in
    ``skipped_steps`` (progress bar included), and training goes on."""
    x, y = toy_data(n=N)
    sw = None
    if poison == "nan_weight":
        sw = nan_weight(1)
    else:
        x = poisoned(x, 1, float(poison))
    model = compile_sgd(keras_aesam.wrap(small_net(batchnorm=False, dropout=0.2), method=method, **HP.get(method, {})))
    snapshot, after_bad = Snapshot(0, 1), Snapshot(0, 2)
    history = model.fit(x, y, sample_weight=sw, epochs=2, batch_size=BATCH, shuffle=False, verbose=2,
                        callbacks=[snapshot, after_bad]).history
    if poison == "nan_weight":
        assert not np.isfinite(snapshot.logs["loss"])
    # (an Inf input may leave the loss finite -- ReLU maps -inf to 0 -- and the
    # gradient not: skipped all the same)
    assert snapshot.logs["skipped_steps"] == 1.0
    assert_nothing_moved(snapshot)
    assert history["skipped_steps"] == [1.0, 1.0]  # the poisoned batch comes back each epoch
    assert "skipped_steps: 1.0" in capsys.readouterr().out
    assert model.policy_state["step"] == 2 * STEPS - 2
    # the next step trains again
    assert any(not np.array_equal(a, b) for (_, a), (_, b) in zip(after_bad.before, after_bad.after))
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert np.all(np.isfinite(model.predict(toy_data(n=N)[0], verbose=0)))


def flagged_loss(y_true, y_pred):
    """MSE plus ``0.01·sqrt(flag·‖ŷ‖²)``: finite everywhere, but its gradient is
    ``0·inf = NaN`` on the samples with ``flag = 0``."""
    target, flag = y_true[:, :3], y_true[:, 3]
    mse = keras.ops.mean(keras.ops.square(y_pred - target), axis=-1)
    return mse + 0.01 * keras.ops.sqrt(flag * keras.ops.sum(keras.ops.square(y_pred), axis=-1))


def test_nonfinite_gradient_with_finite_loss_moves_nothing():
    """Only the gradient is non-finite: skipped and counted all the same (and,
    the loss being finite, ``TerminateOnNaN`` would not see it)."""
    x, labels = toy_data(n=N)
    y = np.concatenate([np.eye(3, dtype="float32")[labels], np.ones((N, 1), "float32")], axis=1)
    y[BATCH:2 * BATCH, 3] = 0.0  # batch 1
    model = keras_aesam.wrap(small_net(batchnorm=False), method="ae_looksam")
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=flagged_loss)
    snapshot = Snapshot(0, 1)
    history = model.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[snapshot]).history
    assert np.isfinite(snapshot.logs["loss"])
    assert snapshot.logs["skipped_steps"] == 1.0
    assert_nothing_moved(snapshot)
    assert history["skipped_steps"] == [1.0]
    assert model.policy_state["step"] == STEPS - 1


def test_nonfinite_step_leaves_batchnorm_statistics_alone():
    x, y = toy_data(n=N)
    model = compile_sgd(keras_aesam.wrap(small_net(batchnorm=True), method="ae_sam"))
    snapshot = Snapshot(0, 1)
    model.fit(poisoned(x, 1, np.inf), y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0,
              callbacks=[snapshot])
    assert snapshot.logs["skipped_steps"] == 1.0
    assert np.all(np.isfinite(model.predict(toy_data(n=N)[0], verbose=0)))
    assert_nothing_moved(snapshot)


class BatchNormNet(keras_aesam.SharpnessAwareModel):
    """Dense -> BatchNormalization -> Dense as a subclass: Keras creates its
    weights at its first call, which ``fit`` makes inside the first step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.norm = keras.layers.BatchNormalization()
        self.out = keras.layers.Dense(3)

    def call(self, x, training=False):
        return self.out(self.norm(self.hidden(x), training=training))


def batchnorm_model(kind, method):
    """The same net as an unbuilt subclass or as a functional model (built at once)."""
    if kind == "subclass":
        return BatchNormNet(method=method, **HP[method])
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    outputs = keras.layers.Dense(3)(keras.layers.BatchNormalization()(hidden))
    return keras_aesam.SharpnessAwareModel(inputs=inputs, outputs=outputs, method=method, **HP[method])


def moving_statistics(model):
    """BatchNorm's moving mean and variance, in that order."""
    return [v.numpy() for v in sorted(model.weights, key=lambda v: v.path) if "moving_" in v.path]


class MovingStatistics(keras.callbacks.Callback):
    """``moving_statistics`` after every step."""

    def on_train_begin(self, logs=None):
        self.after = []

    def on_train_batch_end(self, batch, logs=None):
        self.after.append(moving_statistics(self.model))


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["graph", "eager"])
@pytest.mark.parametrize("kind", ["subclass", "functional"])
@pytest.mark.parametrize("method", ["erm", "sam", "ae_sam"])
def test_nonfinite_steps_leave_batchnorm_statistics_of_a_model_fit_builds(method, kind, run_eagerly):
    """Batches 0 and 2 of 3 carry an Inf input. Both steps are skipped and
    leave BatchNorm's moving statistics bit for bit as they were: at their
    initial mean 0 and variance 1 for the first step, the one in which ``fit``
    builds the subclass; batch 1 moves them."""
    x, y = toy_data(n=N)
    model = compile_sgd(batchnorm_model(kind, method), run_eagerly=run_eagerly)
    stats = MovingStatistics()
    history = model.fit(poisoned(poisoned(x, 0, np.inf), 2, np.inf), y, epochs=1, batch_size=BATCH,
                        shuffle=False, verbose=0, callbacks=[stats]).history
    assert history["skipped_steps"] == [2.0]
    mean, variance = stats.after[0]
    np.testing.assert_array_equal(mean, np.zeros(8, "float32"))
    np.testing.assert_array_equal(variance, np.ones(8, "float32"))
    assert not np.array_equal(stats.after[1][0], mean)  # a finite step moves them
    for after, before in zip(stats.after[2], stats.after[1]):
        np.testing.assert_array_equal(after, before)
    assert all(np.all(np.isfinite(v)) for v in stats.after[2])


@pytest.mark.parametrize("run_eagerly", [False, True], ids=["graph", "eager"])
def test_subclass_fit_builds_trains_like_one_built_by_a_call(run_eagerly):
    """Building the subclass inside the first step (to guard its BatchNorm)
    changes no result: bit for bit the run of the same net called once first."""
    x, y = toy_data(n=N)
    runs = []
    for call_first in (False, True):
        keras.utils.set_random_seed(0)  # the layers' initializer seeds
        model = compile_sgd(BatchNormNet(method="ae_sam"), run_eagerly=run_eagerly)
        if call_first:
            model(x[:BATCH])
        model.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0)
        runs.append(full_state(model))
    assert_same_state(*runs)


MIRRORED_BATCHNORM_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, %r)
    import distributed_worker as dw
    dw.two_logical_cpus()
    import numpy as np, keras, tensorflow as tf
    from test_reliability import BATCH, N, MovingStatistics, batchnorm_model, poisoned
    from test_model import compile_sgd, toy_data

    x, y = toy_data(n=N)
    x = poisoned(poisoned(x, 0, np.inf), 2, np.inf)
    out = {}
    for method in sys.argv[1:]:
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            model = compile_sgd(batchnorm_model("subclass", method))
        stats = MovingStatistics()
        history = model.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0,
                            callbacks=[stats]).history
        out[method] = {
            "replicas": strategy.num_replicas_in_sync,
            "applied_steps": int(model.policy_state["step"]),
            "skipped_steps": history["skipped_steps"],
            "after": [[v.tolist() for v in step] for step in stats.after],
        }
    print(json.dumps(out))
    """
    % TESTS_DIR
)


def test_nonfinite_steps_leave_batchnorm_statistics_of_a_mirrored_subclass():
    """The same under MirroredStrategy on two logical CPUs (each replica gets
    half of every batch, only one of them the Inf): skipped on both, bit for
    bit. float32 values survive the JSON round trip exactly (Python floats
    are float64)."""
    methods = ["erm", "sam", "ae_sam"]
    out = run_python(MIRRORED_BATCHNORM_SCRIPT, *methods)
    for method in methods:
        run = out[method]
        assert run["replicas"] == 2, method
        assert run["applied_steps"] == 1, method  # of 3: both poisoned steps skipped
        # counted once, not once per replica, whichever way Keras reads the
        # metric (its result summed over replicas for erm and sam, the
        # replicas' step logs averaged when the step logs more, as AE-SAM's)
        assert run["skipped_steps"] == [2.0], method
        (mean, variance), moved, last = [np.array(s, "float32") for s in run["after"][0]], *run["after"][1:]
        np.testing.assert_array_equal(mean, np.zeros(8, "float32"), err_msg=method)
        np.testing.assert_array_equal(variance, np.ones(8, "float32"), err_msg=method)
        assert moved[0] != mean.tolist(), method
        assert last == moved, method
        assert np.all(np.isfinite(last)), method


def test_terminate_on_nan_still_stops_training():
    x, y = toy_data(n=N)
    model = compile_sgd(keras_aesam.wrap(small_net(batchnorm=False), method="ae_sam"))
    history = model.fit(x, y, sample_weight=nan_weight(1), epochs=3, batch_size=BATCH, shuffle=False,
                        verbose=0, callbacks=[keras.callbacks.TerminateOnNaN()]).history
    assert len(history["loss"]) == 1  # stopped in the first epoch, after the NaN batch
    assert history["skipped_steps"] == [1.0]
    assert model.policy_state["step"] == 1  # batch 0 only; the NaN batch moved nothing
    with pytest.raises(RuntimeError, match="NaN or Inf loss"):
        model.fit(x, y, sample_weight=nan_weight(1), epochs=3, batch_size=BATCH, shuffle=False,
                  verbose=0, callbacks=[keras.callbacks.TerminateOnNaN(raise_error=True)])
    assert model.policy_state["step"] == 2
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


# --------------------------------------------------------------------------
# 5. Misuse
# --------------------------------------------------------------------------
def test_fit_before_compile_is_a_clear_error():
    model = keras_aesam.wrap(small_net(), method="ae_sam")
    x, y = toy_data(n=N)
    with pytest.raises(ValueError, match=r"call compile\(\) before fit\(\).*optimizer and a loss"):
        model.fit(x, y, verbose=0)
    # Keras's own message for the other entry points
    with pytest.raises(ValueError, match="compile"):
        model.train_on_batch(x[:BATCH], y[:BATCH])


def batches(x, y):
    """A generator: Keras cannot know how many steps an epoch has."""
    for i in range(0, len(x), BATCH):
        yield x[i:i + BATCH], y[i:i + BATCH]


@pytest.mark.parametrize("method", ["ae_looksam"])
def test_unknowable_total_steps_is_refused_before_any_step(method):
    x, y = toy_data(n=N)
    model = compile_sgd(keras_aesam.wrap(small_net(), method=method))
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(ValueError, match=r"total_steps is unknown.*steps_per_epoch=.*total_steps="):
        model.fit(batches(x, y), epochs=2, verbose=0)
    assert model.policy_state["step"] == 0
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)
    # either remedy works
    endless = tf.data.Dataset.from_tensor_slices((x, y)).batch(BATCH).repeat()
    model.fit(endless, epochs=2, steps_per_epoch=STEPS, verbose=0)
    assert model.policy_state["total_steps"] == 2 * STEPS
    # (the other remedy, total_steps= on the model, is used by the past-T test)


@pytest.mark.parametrize("method", ["looksam"])
def test_methods_without_a_schedule_need_no_total_steps(method):
    x, y = toy_data(n=N)
    # (eager: what is checked here does not depend on the traced step)
    model = compile_sgd(keras_aesam.wrap(small_net(), method=method, **HP.get(method, {})), run_eagerly=True)
    model.fit(batches(x, y), epochs=1, verbose=0)
    assert model.policy_state["step"] == STEPS
    assert model.policy_state["total_steps"] is None


class StepLogs(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rows = []

    def on_train_batch_end(self, batch, logs=None):
        self.rows.append({k: float(logs[k]) for k in ("ema_mean", "ema_std", "sam_threshold", "sam_fraction")}
                         | {"batch": batch})


@pytest.mark.parametrize(
    "lambdas, sam_after_total",
    # (1000, 3000): c_t falls 3000 -> 1000, so no SAM step while c >= 1000; an
    # extrapolated c_t would turn negative after 2T and force SAM steps.
    # (-1000, 1000): c = -1000 after T, so every step there is a SAM step.
    [((1000.0, 3000.0), 0.0), ((-1000.0, 1000.0), 1.0)],
)
def test_training_past_total_steps_keeps_lambda1(lambdas, sam_after_total):
    """Documented: past ``T`` the coefficient stays ``c = λ1`` (no extrapolation)."""
    lambda1, lambda2 = lambdas
    total = STEPS
    x, y = toy_data(n=N)
    model = compile_sgd(keras_aesam.wrap(small_net(), method="ae_sam", lambda1=lambda1, lambda2=lambda2,
                                         total_steps=total))
    logs = StepLogs()
    history = model.fit(x, y, epochs=EPOCHS, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[logs]).history
    assert model.policy_state["step"] == EPOCHS * STEPS > 2 * total
    assert model.policy_state["total_steps"] == total  # not re-inferred when given
    for t, row in enumerate(logs.rows):
        c = (row["sam_threshold"] - row["ema_mean"]) / row["ema_std"]
        expected_c = lambda1 if t >= total else (t / total) * lambda1 + (1 - t / total) * lambda2
        # c is recovered as (threshold - µ)/σ from float32 logs: threshold = µ + c·σ
        # carries u·|threshold| (u = 2^-24), so c is off by ≤ 2u·(|µ|/σ + |c|):
        # under 1e-4 for |c| ≤ 3000 and µ/σ ≤ 100 here, far inside rel 1e-3 /
        # abs 1e-2, while consecutive c_t differ by ≥ 600.
        assert c == pytest.approx(expected_c, rel=1e-3, abs=1e-2), t
        # the step's own decision, from the epoch's running mean of decisions
        k = row["batch"]
        previous = logs.rows[t - 1]["sam_fraction"] * k if k else 0.0
        decision = round(row["sam_fraction"] * (k + 1) - previous)
        if t >= total:
            assert decision == sam_after_total, t
    assert history["sam_fraction"][1:] == [sam_after_total] * (EPOCHS - 1)


@pytest.mark.parametrize("method", ["looksam"])
def test_model_without_trainable_weights_is_a_clear_error(method):
    inner = small_net()
    inner.trainable = False
    model = compile_sgd(keras_aesam.wrap(inner, method=method, **HP.get(method, {})))
    x, y = toy_data(n=N)
    with pytest.raises(ValueError, match="no trainable weights"):
        model.fit(x, y, epochs=1, batch_size=BATCH, verbose=0)
    assert model.policy_state["step"] == 0
    weightless = keras.Sequential([keras.Input((6,)), keras.layers.Activation("relu")])
    model = keras_aesam.wrap(weightless, method="ae_sam")
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="no trainable weights"):
        model.fit(x, np.zeros((N, 6), "float32"), epochs=1, verbose=0)


def test_wrapping_a_wrapper_is_refused():
    model = keras_aesam.wrap(small_net(), method="sam")
    with pytest.raises(ValueError, match=r"already sharpness-aware.*model\.inner"):
        keras_aesam.wrap(model, method="ae_sam")
    with pytest.raises(ValueError, match="already sharpness-aware"):
        keras_aesam.SAMModel(inner=model)


def test_two_wrappers_of_one_inner_share_weights_but_not_state(tmp_path):
    """Allowed: both train the same weights, each keeps its own policy state,
    g_v and optimizer, and each saves and loads on its own."""
    x, y = toy_data(n=N)
    inner = small_net()
    first = compile_sgd(keras_aesam.wrap(inner, method="ae_looksam"))
    second = compile_sgd(keras_aesam.wrap(inner, method="looksam", k=2))
    assert first.name != second.name
    first.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0)
    assert first.policy_state["step"] == STEPS
    assert second.policy_state == {"step": 0, "total_steps": None}
    assert all(not np.any(v.numpy()) for v in second._direction_state)  # g_v untouched
    np.testing.assert_array_equal(second(x, training=False), first(x, training=False))
    shared = [w.copy() for w in inner.get_weights()]
    g_v_first = [v.numpy().copy() for v in first._direction_state]
    second.fit(x, y, epochs=1, batch_size=BATCH, shuffle=False, verbose=0)
    assert second.policy_state["step"] == STEPS and first.policy_state["step"] == STEPS
    assert any(not np.array_equal(a, b) for a, b in zip(inner.get_weights(), shared))
    for v, before in zip(first._direction_state, g_v_first):
        np.testing.assert_array_equal(v.numpy(), before)
    assert first.optimizer is not second.optimizer
    for model in (first, second):
        path = tmp_path / f"{model.name}.keras"
        model.save(path)
        loaded = keras.models.load_model(path)
        assert loaded.method == model.method and loaded.policy_state == model.policy_state
        for a, b in zip(loaded.get_weights(), model.get_weights()):  # its own g_v included
            np.testing.assert_array_equal(a, b)


def per_sample_cross_entropy(y_true, y_pred):
    return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)  # (batch,)


def per_element_squared_error(y_true, y_pred):
    return keras.ops.square(y_pred - y_true)  # (batch, 3)


@pytest.mark.parametrize(
    "method, unreduced, reduced, one_hot",
    [
        ("esam", per_sample_cross_entropy, lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True), False),
        ("esam", per_element_squared_error, keras.losses.MeanSquaredError, True),
    ],
    ids=["esam-per-sample", "esam-per-element"],
)
def test_loss_returning_per_sample_values_is_mean_reduced(method, unreduced, reduced, one_hot):
    """A loss function returning one value per sample (or per element) trains,
    and exactly like Keras's mean-reduced loss of the same values (ESAM's
    selection ranks the samples by it, averaged over the other axes)."""
    x, y = toy_data(n=N)
    if one_hot:
        y = np.eye(3, dtype="float32")[y]
    init = initial_weights()
    runs = []
    for loss in (unreduced, reduced()):
        inner = small_net(dropout=0.2, seed=0)
        inner.set_weights(init)
        model = keras_aesam.wrap(inner, method=method, **HP.get(method, {}))
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss=loss)
        history = model.fit(x, y, epochs=2, batch_size=BATCH, shuffle=False, verbose=0).history
        runs.append((history, full_state(model)))
    (h_unreduced, s_unreduced), (h_reduced, s_reduced) = runs
    assert np.all(np.isfinite(h_unreduced["loss"]))
    # The two losses reduce the same 16×k non-negative float32 values in another
    # order (all at once, or per sample first): they differ by at most
    # 2·γ(47) = 2·47·2^-24 ≈ 5.6e-6 relative (k = 3; measured 1.7e-7). The
    # gradients' scale factors (1/48, or 1/3 then 1/16) differ by ≤ 2u, which
    # 6 SGD steps (lr 0.05, momentum 0.9: ≤ 6·0.05/(1-0.9) = 3× a gradient
    # error) keep near 1e-7·G; rtol = 1e-5 for both (the states measured equal).
    np.testing.assert_allclose(h_unreduced["loss"], h_reduced["loss"], rtol=1e-5)
    assert h_unreduced["sam_fraction"] == h_reduced["sam_fraction"]
    assert_same_state(s_unreduced, s_reduced, rtol=1e-5)


# --------------------------------------------------------------------------
# 6. Export round trip
# --------------------------------------------------------------------------
@pytest.fixture(scope="session")
def export_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("exports")


def export_artifacts(method, directory):
    """A model with non-trivial weights and state (assigned, to skip a training
    trace), saved as ``.keras`` and exported as a SavedModel, with its inputs,
    predictions and policy state."""
    x, _ = toy_data(n=32)
    model = compile_sgd(keras_aesam.wrap(small_net(dropout=0.2), method=method, **HP.get(method, {})))
    build_optimizer(model)
    rng = np.random.default_rng(len(method))
    for v in model.weights:
        if v.dtype == "float32":
            v.assign(np.abs(rng.normal(size=v.shape)).astype("float32") + 0.1)  # moving_variance > 0
    model.applied_steps.assign(17)
    model.sam_total_steps.assign(40 if model.policy.needs_total_steps else 0)
    expected = model.predict(x, verbose=0)
    base = os.path.join(str(directory), method)
    model.save(base + ".keras")
    model.export(base + "_sm", verbose=False)
    np.save(base + "_x.npy", x)
    np.save(base + "_pred.npy", expected)
    with open(base + "_state.json", "w") as f:
        json.dump(model.policy_state, f)
    return model, x, expected


@pytest.mark.parametrize("method", METHODS)
def test_export_round_trip_reproduces_predictions_exactly(method, export_dir):
    model, x, expected = export_artifacts(method, export_dir)
    base = os.path.join(str(export_dir), method)
    loaded = keras.models.load_model(base + ".keras")
    assert type(loaded) is type(model) and loaded.method == method
    assert loaded.hyperparameters == model.hyperparameters
    assert loaded.policy_state == model.policy_state
    for a, b in zip(loaded.get_weights(), model.get_weights()):  # g_v included
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), expected)
    served = tf.saved_model.load(base + "_sm")
    np.testing.assert_array_equal(served.serve(tf.constant(x)).numpy(), expected)


FRESH_PROCESS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import tensorflow as tf
    directory, methods = sys.argv[1], sys.argv[2:]
    out = {"saved_model": {}, "keras_file": {}}
    # 1. the SavedModels need nothing but TensorFlow
    for method in methods:
        base = directory + "/" + method
        served = tf.saved_model.load(base + "_sm")
        pred = served.serve(tf.constant(np.load(base + "_x.npy"))).numpy()
        out["saved_model"][method] = bool(np.array_equal(pred, np.load(base + "_pred.npy")))
    out["package_imported_for_saved_model"] = any(m.startswith("keras_aesam") for m in sys.modules)
    # 2. a .keras file needs the package's registration
    import keras
    try:
        keras.models.load_model(directory + "/" + methods[0] + ".keras")
        out["without_package"] = "loaded"
    except Exception as e:
        out["without_package"] = str(e)
    import keras_aesam
    for method in methods:
        base = directory + "/" + method
        loaded = keras.models.load_model(base + ".keras")
        pred = loaded.predict(np.load(base + "_x.npy"), verbose=0)
        out["keras_file"][method] = {
            "class": type(loaded).__name__,
            "method": loaded.method,
            "policy_state": loaded.policy_state,
            "equal": bool(np.array_equal(pred, np.load(base + "_pred.npy"))),
        }
    print(json.dumps(out))
    """
)


def test_artifacts_load_in_a_fresh_process(export_dir):
    for method in METHODS:  # written by the round-trip tests, or now if run alone
        if not os.path.exists(os.path.join(str(export_dir), method + "_pred.npy")):
            export_artifacts(method, export_dir)
    out = run_python(FRESH_PROCESS_SCRIPT, str(export_dir), *METHODS)
    assert out["saved_model"] == {m: True for m in METHODS}
    assert out["package_imported_for_saved_model"] is False
    assert "SharpnessAwareModel" in out["without_package"]
    for method in METHODS:
        with open(os.path.join(str(export_dir), method + "_state.json")) as f:
            state = json.load(f)
        assert out["keras_file"][method] == {
            "class": "SharpnessAwareModel", "method": method, "policy_state": state, "equal": True,
        }
