"""keras_aesam.callbacks: the StepRecorder's per-step rows from Keras's running
means, its state across a restart, and the training-state backup."""

import json
import math

import numpy as np
import pytest

from keras_aesam.callbacks import (
    STEP_COLUMNS,
    StepRecorder,
    sam_step_values_from_means,
    step_counts_from_fractions,
    step_values_from_means,
)


def _step_losses(n):
    return [2.0 + math.sin(i) for i in range(n)]


def _feed(recorder, epoch, batches, fractions, skipped=None, stats=None):
    """Logs as Keras reports them: running means of loss and SAM indicator."""
    recorder.on_epoch_begin(epoch)
    batches = list(batches)
    running_loss = np.cumsum(_step_losses(len(batches))) / np.arange(1, len(batches) + 1)
    for i, (batch, fraction) in enumerate(zip(batches, fractions)):
        logs = {"loss": np.float32(running_loss[i]), "sam_fraction": fraction,
                "skipped_steps": (skipped or {}).get(batch, 0.0)}
        if stats:
            logs.update({k: v[i] for k, v in stats.items()})
        recorder.on_train_batch_end(batch, logs)
    recorder.on_epoch_end(epoch)


def test_recorder_derives_sam_steps_from_the_running_fraction(tmp_path):
    pattern = [1, 1, 0, 0, 1, 0, 1, 0, 0, 0, 1, 1]
    fractions = list(np.cumsum(pattern) / np.arange(1, len(pattern) + 1, dtype=np.float32))
    path = tmp_path / "steps.csv"
    recorder = StepRecorder(path)
    recorder.on_train_begin()
    _feed(recorder, 0, range(len(pattern)), fractions)
    second = [0, 1, 1]
    _feed(recorder, 1, range(3), list(np.cumsum(second) / np.arange(1, 4)))  # reset each epoch
    recorder.on_train_end()
    assert [r["sam"] for r in recorder.rows] == pattern + second
    assert [r["step"] for r in recorder.rows] == list(range(15))
    assert [r["epoch"] for r in recorder.rows] == [0] * 12 + [1] * 3
    # The step's own loss, recovered from Keras's running mean over the epoch.
    np.testing.assert_allclose([r["loss"] for r in recorder.rows], _step_losses(12) + _step_losses(3), rtol=1e-5)
    assert recorder.sam_steps == sum(pattern) + 2 and recorder.total_steps == 15
    assert math.isclose(recorder.sam_fraction, (sum(pattern) + 2) / 15)
    from keras_aesam.cli.plots import read_csv

    table = read_csv(path)
    assert list(table) == list(STEP_COLUMNS)
    assert table["sam"].tolist() == pattern + second
    assert np.isnan(table["grad_norm_sq"]).all()  # not an adaptive method: empty cells


def test_sharpness_of_each_sam_step_is_recovered_from_its_mean_over_sam_steps():
    pattern = [1, 0, 1, 1, 0, 0, 1]
    own = [0.5, None, 0.2, 0.9, None, None, 0.4]  # L(w + e) - L(w) on the SAM steps
    counts = np.cumsum(pattern)
    fractions = counts / np.arange(1, len(pattern) + 1)
    sums = np.cumsum([v or 0.0 for v in own])
    means = [sums[i] / counts[i] for i in range(len(pattern))]
    got = sam_step_values_from_means(range(len(pattern)), list(fractions), means)
    assert [None if v is None else round(v, 12) for v in got] == own


def test_recorder_writes_the_sharpness_of_sam_steps_only(tmp_path):
    pattern = [1, 0, 1, 1]
    own = [0.5, 0.0, 0.2, 0.9]
    counts = np.cumsum(pattern)
    fractions = list(counts / np.arange(1, 5))
    means = list(np.cumsum(own) / counts)
    recorder = StepRecorder(tmp_path / "steps.csv")
    recorder.on_train_begin()
    _feed(recorder, 0, range(4), fractions, stats={"sharpness": means})
    recorder.on_train_end()
    got = [r["sharpness"] for r in recorder.rows]
    assert got[1] is None
    np.testing.assert_allclose([got[0], got[2], got[3]], [0.5, 0.2, 0.9], rtol=1e-6)


def test_recorder_with_steps_per_execution_and_out_of_order_batches():
    # steps_per_execution=3: Keras reports the last step of each execution.
    pattern = [1, 0, 1, 1, 1, 0, 0, 0, 0]
    running = np.cumsum(pattern) / np.arange(1, 10)
    batches = [2, 5, 8]
    recorder = StepRecorder(None)
    recorder.on_train_begin()
    recorder.on_epoch_begin(0)
    for batch in (5, 2, 8):  # async dispatch may deliver out of order
        skipped = 1.0 if batch >= 5 else 0.0
        recorder.on_train_batch_end(batch, {"sam_fraction": running[batch], "skipped_steps": skipped})
    recorder.on_epoch_end(0)
    assert [r["batch"] for r in recorder.rows] == batches
    assert [r["steps"] for r in recorder.rows] == [3, 3, 3]
    assert [r["sam"] for r in recorder.rows] == [2, 2, 0]
    assert [r["skipped"] for r in recorder.rows] == [0, 1, 0]
    assert [r["step"] for r in recorder.rows] == batches
    assert step_counts_from_fractions([0, 1], [float("nan"), 1.0]) == [None, 2]
    # Loss of an execution = the mean over its steps.
    losses = np.array([3.0, 1.0, 2.0, 6.0, 0.0, 3.0])
    running = np.cumsum(losses) / np.arange(1, 7)
    np.testing.assert_allclose(step_values_from_means([1, 3, 5], running[[1, 3, 5]]), [2.0, 4.0, 1.5])
    assert step_values_from_means([0, 1, 2], [1.0, float("nan"), 2.0]) == [1.0, None, None]


def test_recorder_checks_its_arguments():
    with pytest.raises(ValueError, match="needs grad_norm_data"):
        StepRecorder(None, grad_norm_epochs=[1])
    with pytest.raises(ValueError, match="grad_norm_epochs must be >= 0"):
        StepRecorder(None, grad_norm_epochs=[-1], grad_norm_data=[])



def test_recorder_state_carries_an_epoch_across_a_restart(tmp_path):
    """Rows of a half-done epoch, restored in a new recorder, come out as if never interrupted."""
    pattern = [1, 0, 0, 1, 1, 0]
    running = list(np.cumsum(pattern) / np.arange(1, 7))
    whole = StepRecorder(None)
    whole.on_train_begin()
    whole.on_epoch_begin(0)
    for b in range(6):
        whole.on_train_batch_end(b, {"sam_fraction": running[b], "loss": 1.0})
    whole.on_epoch_end(0)

    first = StepRecorder(None)
    first.on_train_begin()
    first.on_epoch_begin(0)
    for b in range(4):
        first.on_train_batch_end(b, {"sam_fraction": running[b], "loss": 1.0})
    state = json.loads(json.dumps(first.get_state()))  # as stored in the backup

    second = StepRecorder(None)
    second.set_state(state, batch_offset=4)
    second.on_train_begin()
    second.on_epoch_begin(0)  # Keras counts the resumed epoch's batches from 0 again
    for b in range(2):
        second.on_train_batch_end(b, {"sam_fraction": running[4 + b], "loss": 1.0})
    second.on_epoch_end(0)
    assert second.rows == whole.rows
    assert [r["sam"] for r in second.rows] == pattern


def test_a_backup_from_another_model_is_refused(tmp_path):
    import keras

    from keras_aesam.callbacks import load_training_state, save_training_state

    def model(units):
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(units)])
        m.compile(optimizer="sgd", loss="mse")
        return m

    save_training_state(model(2), tmp_path / "state.npz", {"step": 0})
    with pytest.raises(ValueError, match="does not match this model"):
        load_training_state(model(4), tmp_path / "state.npz")
    meta = load_training_state(model(2), tmp_path / "state.npz")
    assert meta["step"] == 0



def test_recorder_samples_the_squared_gradient_norm_of_the_models_loss():
    """‖∇L(B; w)‖² of the compiled loss plus the regularizer, at the weights training starts from."""
    import keras

    import keras_aesam
    from test_reference import make_data

    X, Y, w0, b0 = make_data(n=8, d=3, seed=2)
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, kernel_regularizer=keras.regularizers.L2(0.1))])
    inner.set_weights([w0, b0])
    model = keras_aesam.wrap(inner, method="sam")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    recorder = StepRecorder(None, grad_norm_epochs=[0], grad_norm_data=[(X, Y), (X[:4], Y[:4])], grad_norm_batches=2)
    model.fit(X, Y, batch_size=8, epochs=1, verbose=0, callbacks=[recorder])

    def reference(x, y):
        x, y, w = x.astype(float), y.astype(float), w0.astype(float)
        r = x @ w + b0 - y
        g_w = 2 * x.T @ r / len(x) + 2 * 0.1 * w  # mean squared error + 0.1·‖w‖²
        g_b = 2 * r.sum(0) / len(x)
        return np.sum(g_w**2) + np.sum(g_b**2)

    # float32 sums of at most 8 products each carry a relative error of a few
    # ulp (≈ 1e-7 each); 1e-5 relative is well above that and far below any
    # change of the loss or the weights the sample is taken at.
    np.testing.assert_allclose(recorder.grad_norm_samples[0], [reference(X, Y), reference(X[:4], Y[:4])], rtol=1e-5)
