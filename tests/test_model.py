"""SharpnessAwareModel as a Keras model: usage forms, metrics, BatchNorm, saving, errors."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_aesam


def small_net(dropout=0.0, batchnorm=True, seed=0):
    layers = [keras.Input((6,)), keras.layers.Dense(8, activation="relu")]
    if batchnorm:
        layers.append(keras.layers.BatchNormalization())
    if dropout:
        layers.append(keras.layers.Dropout(dropout, seed=seed))
    layers.append(keras.layers.Dense(3))
    return keras.Sequential(layers)


def toy_data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = (np.abs(x[:, :3]).argmax(axis=1)).astype("int32")
    return x, y


def compile_sgd(model, **kw):
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        **kw,
    )
    return model


# --------------------------------------------------------------------------
# Three ways to use it
# --------------------------------------------------------------------------
def test_wrap_shares_weights_and_leaves_inner_clean():
    inner = small_net()
    n_inner_weights = len(inner.weights)
    model = compile_sgd(keras_aesam.wrap(inner, method="ae_sam", rho=0.1))
    x, y = toy_data()
    before = [w.copy() for w in inner.get_weights()]
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    after = inner.get_weights()
    assert any(np.max(np.abs(a - b)) > 0 for a, b in zip(after, before))
    assert len(inner.weights) == n_inner_weights
    assert not any("ema" in w.name or "sam_" in w.name for w in inner.weights)
    np.testing.assert_allclose(inner.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)
    compile_sgd(inner).fit(x, y, epochs=1, batch_size=16, verbose=0)  # still trains on its own


def test_functional_form():
    inputs = keras.Input((6,))
    h = keras.layers.Dense(8, activation="relu")(inputs)
    outputs = keras.layers.Dense(3)(h)
    model = compile_sgd(keras_aesam.AESAMModel(inputs, outputs, rho=0.02, lambda1=-0.5))
    x, y = toy_data()
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert model.hyperparameters["rho"] == 0.02 and model.hyperparameters["lambda1"] == -0.5
    assert len(history.history["sam_fraction"]) == 2


class SubclassedNet(keras_aesam.AESAMModel):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.bn = keras.layers.BatchNormalization()
        self.out = keras.layers.Dense(3)

    def call(self, x, training=False):
        return self.out(self.bn(self.hidden(x), training=training))


def test_subclass_form_trains():
    model = compile_sgd(SubclassedNet(rho=0.05))
    x, y = toy_data()
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0)
    assert 0.0 <= history.history["sam_fraction"][-1] <= 1.0
    assert model.policy_state["step"] == 8


class SubclassedInner(keras.Model):
    def __init__(self):
        super().__init__()
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.bn = keras.layers.BatchNormalization()
        self.out = keras.layers.Dense(3)

    def call(self, x, training=False):
        return self.out(self.bn(self.hidden(x), training=training))


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
@pytest.mark.parametrize("method", ["erm", "ae_sam", "msam"])
def test_an_unbuilt_subclass_trains_under_loss_scaling(method, jit_compile):
    """mixed_float16 wraps the optimizer in a LossScaleOptimizer, whose dynamic
    scale exists only once it is built; a subclass unbuilt at compile time is
    built by its first step, which reads that scale (and, with XLA and no SAM
    branch, must not create variables inside the compiled step)."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = compile_sgd(keras_aesam.wrap(SubclassedInner(), method=method), jit_compile=jit_compile)
        x, y = toy_data()
        history = model.fit(x, y, epochs=2, batch_size=16, verbose=0).history
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert np.all(np.isfinite(history["loss"])) and history["loss"][-1] < history["loss"][0]
    assert model.policy_state["step"] + round(sum(history["skipped_steps"])) == 8
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer) and model.optimizer.built


class SubclassedLookSAMNet(keras_aesam.LookSAMModel):
    def __init__(self, late_layer=False, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu")
        self.out = keras.layers.Dense(3)
        self.late = keras.layers.Dense(3) if late_layer else None

    def call(self, x, training=False):
        y = self.out(self.hidden(x))
        if training and self.late is not None:  # weights first made by a training call
            y = y + self.late(x)
        return y


def direction_state_shapes(model):
    return [tuple(v.shape) for v in model._direction_state or []]


@pytest.mark.parametrize("built_by", ["a call", "fit"])
def test_looksam_state_is_created_when_a_subclass_gets_its_weights(built_by):
    """One g_v slot per trainable weight, shaped like it, made when the
    subclass is built (not at __init__, when it has no weights yet)."""
    model = compile_sgd(SubclassedLookSAMNet(k=2))
    x, y = toy_data()
    assert model._direction_state is None
    if built_by == "a call":
        model(x[:2])
        assert direction_state_shapes(model) == [(6, 8), (8,), (8, 3), (3,)]
        assert all(not np.any(v.numpy()) for v in model._direction_state)
    history = model.fit(x, y, epochs=1, batch_size=16, verbose=0).history
    assert direction_state_shapes(model) == [tuple(v.shape) for v in model.trainable_variables]
    assert history["sam_fraction"] == [0.5]  # k=2: SAM on every other step, g_v reused between
    assert any(np.any(v.numpy()) for v in model._direction_state)
    own = {id(v) for v in model._direction_state}
    assert own <= {id(v) for v in model.weights}  # saved with the model


def test_looksam_subclass_resumed_from_a_backup_trains_like_the_uninterrupted_run(tmp_path):
    """BackupAndRestore (which needs a built model) restores g_v with the
    weights, momenta and step counter: epoch 2 after the restore repeats the
    same float32 operations on the same batches, so the result is bit for bit."""
    x, y = toy_data()

    def fresh():
        keras.utils.set_random_seed(0)
        model = compile_sgd(SubclassedLookSAMNet(k=3))
        model(x[:2])
        return model

    def fit(model, epochs):
        backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"), delete_checkpoint=False)
        return model.fit(x, y, epochs=epochs, batch_size=16, shuffle=False, verbose=0,
                         callbacks=[backup]).history

    uninterrupted = fresh()
    uninterrupted.fit(x, y, epochs=2, batch_size=16, shuffle=False, verbose=0)
    fit(fresh(), epochs=1)
    resumed = fresh()
    assert len(fit(resumed, epochs=2)["loss"]) == 1  # restored epoch 1, trained epoch 2 only
    assert resumed.policy_state["step"] == uninterrupted.policy_state["step"] == 8
    for a, b in zip(resumed.weights, uninterrupted.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.path)


def test_perturb_filter_of_an_unbuilt_subclass_is_matched_once_fit_builds_it():
    x, y = toy_data()
    model = compile_sgd(SubclassedLookSAMNet(perturb_filter="dense_1/"))
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert model._perturb_mask == [False, False, True, True]  # the output layer only
    typo = compile_sgd(SubclassedLookSAMNet(perturb_filter="dnese"))
    with pytest.raises(ValueError, match=r"\['dnese'\] match no trainable variable.*dense_\d+/kernel"):
        typo.fit(x, y, epochs=1, batch_size=16, verbose=0)


def test_looksam_subclass_whose_weights_appear_after_its_build_is_a_clear_error():
    model = compile_sgd(SubclassedLookSAMNet(late_layer=True))
    x, y = toy_data()
    model(x[:2])  # inference: the late layer stays unbuilt, g_v has 4 slots
    with pytest.raises(ValueError, match="one state tensor per trainable weight: 4 were"):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------
def test_metrics_in_history_and_reset_each_epoch():
    model = compile_sgd(keras_aesam.wrap(small_net(), method="ae_sam"))
    x, y = toy_data()
    history = model.fit(x, y, epochs=3, batch_size=16, verbose=0).history
    for key in ("sam_fraction", "grad_norm_sq", "ema_mean", "ema_std", "sam_threshold", "skipped_steps"):
        assert key in history and len(history[key]) == 3
    # an epoch of 4 steps: the fraction is a multiple of 1/4, not a running total
    for f in history["sam_fraction"]:
        assert f * 4 == pytest.approx(round(f * 4), abs=1e-6)
    sam = compile_sgd(keras_aesam.wrap(small_net(), method="sam"))
    assert sam.fit(x, y, epochs=2, batch_size=16, verbose=0).history["sam_fraction"] == [1.0, 1.0]
    erm = compile_sgd(keras_aesam.wrap(small_net(), method="erm"))
    assert erm.fit(x, y, epochs=2, batch_size=16, verbose=0).history["sam_fraction"] == [0.0, 0.0]


# --------------------------------------------------------------------------
# BatchNorm, Dropout, training mode
# --------------------------------------------------------------------------
def test_batchnorm_statistics_move_once_per_sam_step():
    x, y = toy_data(n=16)
    inner = small_net()
    reference = small_net()
    reference.set_weights(inner.get_weights())
    model = compile_sgd(keras_aesam.wrap(inner, method="sam", rho=0.5))
    model.fit(x, y, epochs=1, batch_size=16, verbose=0, shuffle=False)
    reference(x, training=True)  # a single ERM forward pass in training mode
    bn, ref_bn = inner.layers[1], reference.layers[1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), ref_bn.moving_mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(bn.moving_variance.numpy(), ref_bn.moving_variance.numpy(), rtol=1e-6, atol=1e-7)
    assert model.policy_state["step"] == 1


def test_second_pass_runs_in_training_mode():
    """With Dropout(0.9) in training mode the SAM gradient differs from inference mode."""
    calls = []

    class Probe(keras.layers.Layer):
        def call(self, x, training=None):
            calls.append(training)
            return x

    inner = keras.Sequential([keras.Input((6,)), Probe(), keras.layers.Dense(3)])
    model = compile_sgd(keras_aesam.wrap(inner, method="sam"))
    x, y = toy_data(n=16)
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    traced_in_fit = calls[-2:]  # the two passes traced by the train function
    assert traced_in_fit == [True, True]


# --------------------------------------------------------------------------
# sample_weight, class_weight
# --------------------------------------------------------------------------
def test_class_weight_trains_like_the_equivalent_sample_weight():
    """A reference test only: Keras turns ``class_weight`` into ``sample_weight``
    before ``train_step``, so this cannot catch a weight dropped inside the step;
    that both passes use ``sample_weight`` is checked against the NumPy
    reference (tests/test_reference.py)."""
    x, y = toy_data()
    cw = {0: 1.0, 1: 3.0, 2: 0.5}

    def run(**fit_kw):
        inner = small_net(batchnorm=False)
        inner.set_weights(small_net(batchnorm=False, seed=1).get_weights())
        keras.utils.set_random_seed(7)
        init = [np.random.default_rng(5).normal(size=w.shape).astype("float32") * 0.3 for w in inner.get_weights()]
        inner.set_weights(init)
        model = compile_sgd(keras_aesam.wrap(inner, method="sam"))
        model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False, **fit_kw)
        return inner.get_weights()

    with_cw = run(class_weight=cw)
    with_sw = run(sample_weight=np.array([cw[int(c)] for c in y], "float32"))
    without = run()
    for a, b in zip(with_cw, with_sw):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert max(np.max(np.abs(a - b)) for a, b in zip(with_cw, without)) > 1e-4


# --------------------------------------------------------------------------
# Degenerate steps
# --------------------------------------------------------------------------
def test_zero_gradient_is_an_erm_step_without_nan():
    inner = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, kernel_initializer="zeros")])
    model = keras_aesam.wrap(inner, method="sam")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = np.zeros((8, 4), "float32")
    y = np.zeros((8, 1), "float32")
    history = model.fit(x, y, epochs=1, batch_size=4, verbose=0).history
    assert history["sam_fraction"] == [0.0]
    assert all(np.all(np.isfinite(w)) for w in inner.get_weights())


class PassCounter(keras.layers.Layer):
    """Identity that counts, at run time, how many forward passes execute."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.count = 0

    def _tick(self):
        self.count += 1
        return np.int32(0)

    def call(self, x):
        tick = tf.py_function(self._tick, [], tf.int32)
        with tf.control_dependencies([tick]):
            return tf.identity(x)


@pytest.mark.parametrize("lambdas", [(1e9, 1e9), (-1e9, -1e9), (-1.0, 1.0)])
def test_only_the_taken_branch_runs(lambdas):
    counter = PassCounter()
    inner = keras.Sequential([keras.Input((6,)), counter, keras.layers.Dense(3)])
    model = compile_sgd(keras_aesam.wrap(inner, method="ae_sam", lambda1=lambdas[0], lambda2=lambdas[1]))
    x, y = toy_data(n=64)
    counter.count = 0
    history = model.fit(x, y, epochs=2, batch_size=16, verbose=0).history
    sam_steps = round(sum(f * 4 for f in history["sam_fraction"]))
    assert counter.count == 8 + sam_steps
    if lambdas[0] > 1e8:
        assert sam_steps == 0
    if lambdas[0] < -1e8:
        assert sam_steps == 8


# --------------------------------------------------------------------------
# total_steps
# --------------------------------------------------------------------------
def test_total_steps_inferred_from_fit():
    model = compile_sgd(keras_aesam.wrap(small_net(), method="ae_sam"))
    x, y = toy_data()
    model.fit(x, y, epochs=3, batch_size=16, verbose=0)
    assert model.policy_state["total_steps"] == 12


def test_total_steps_unknowable_is_a_clear_error():
    model = compile_sgd(keras_aesam.wrap(small_net(), method="ae_sam"))
    x, y = toy_data()
    endless = tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
    with pytest.raises(ValueError, match="total_steps"):
        model.fit(endless, epochs=1, verbose=0)
    # fine once steps_per_epoch is given
    model.fit(endless, epochs=2, steps_per_epoch=3, verbose=0)
    assert model.policy_state["total_steps"] == 6


# --------------------------------------------------------------------------
# XLA
# --------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ae_sam", "sam"])
def test_jit_compile_matches_graph_mode(method):
    x, y = toy_data()
    init = small_net().get_weights()
    results = []
    for jit in (False, True):
        inner = small_net()
        inner.set_weights(init)
        model = compile_sgd(keras_aesam.wrap(inner, method=method), jit_compile=jit)
        h = model.fit(x, y, epochs=2, batch_size=16, verbose=0, shuffle=False).history
        assert model.jit_compile is jit
        results.append((h["sam_fraction"], inner.get_weights()))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, whole_step", [("erm", True), ("msam", True), ("ae_sam", False), ("sam", False)])
def test_xla_compiles_the_whole_step_where_there_is_no_sam_branch(method, whole_step):
    """ERM and MSAM have no SAM branch: XLA compiles their whole step, as Keras
    does for plain fit; a policy's step keeps its cond outside XLA and compiles
    each pass."""
    model = compile_sgd(keras_aesam.wrap(small_net(), method=method), jit_compile=True)
    x, y = toy_data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert model._xla_passes is not whole_step


@pytest.mark.parametrize("method", ["erm", "msam"])
def test_a_non_finite_step_moves_nothing_when_xla_compiles_the_whole_step(method):
    """The guard is an XLA conditional there: weights, BatchNorm statistics,
    momentum, the optimizer's and the model's step counters all stay."""
    inner = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), keras.layers.BatchNormalization(),
                              keras.layers.Dense(3)])
    model = compile_sgd(keras_aesam.wrap(inner, method=method), jit_compile=True)
    x, y = toy_data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert model._xla_passes is False
    state = [v.numpy().copy() for v in model.variables + model.optimizer.variables]
    x_bad = x[:16].copy()
    x_bad[0, 0] = np.nan
    logs = model.train_on_batch(x_bad, y[:16], return_dict=True)
    assert logs["skipped_steps"] == 1.0
    for before, after in zip(state, model.variables + model.optimizer.variables):
        np.testing.assert_array_equal(after.numpy(), before)


def test_activity_regularizer_losses_reach_both_passes():
    """add_loss losses (here an activity regularizer) enter g and ĝ: compare one
    SAM step with the same step written out with assign-and-restore."""
    x, y = toy_data(n=16)
    make = lambda: keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(8, activation="tanh", activity_regularizer=keras.regularizers.L2(0.5)),
        keras.layers.Dense(3),
    ])
    inner, ref = make(), make()
    ref.set_weights(inner.get_weights())
    model = keras_aesam.wrap(inner, method="sam", rho=0.5)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss_fn)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)

    def grads():
        with tf.GradientTape() as tape:
            loss = loss_fn(y, ref(x, training=True)) + tf.add_n(ref.losses)
        return tape.gradient(loss, ref.trainable_variables)

    w0 = [v.numpy() for v in ref.trainable_variables]
    g = grads()
    norm = tf.linalg.global_norm(g)
    for v, gi in zip(ref.trainable_variables, g):
        v.assign_add(0.5 * gi / norm)
    g_hat = grads()
    for v, w, gh in zip(ref.trainable_variables, w0, g_hat):
        v.assign(w - 0.1 * gh)
    for a, b in zip(inner.get_weights(), ref.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    ref(x, training=True)
    assert float(tf.add_n(ref.losses)) > 0.1  # the regularizer weighs in the loss


def test_evaluation_reports_no_sam_metrics():
    model = compile_sgd(keras_aesam.wrap(small_net(), method="ae_sam"))
    x, y = toy_data()
    history = model.fit(x, y, epochs=1, batch_size=16, validation_data=(x, y), verbose=0).history
    assert "val_sam_fraction" not in history and "val_skipped_steps" not in history
    assert "val_loss" in history and "sam_fraction" in history
    assert "sam_fraction" not in model.evaluate(x, y, verbose=0, return_dict=True)
