"""Conformance with ``keras.Model``: what ``fit`` and friends accept works through our models.

The invariant: with a policy that never takes a SAM step (``method="erm"``, and
``"ae_sam"`` with ``lambda1 = lambda2 = 1e9``) our model trains exactly like
``keras.Model`` -- the same weights and the same per-epoch logs, maximum
difference 0.0 -- in each usage form (``wrap``, functional, subclass). Runs with
a SAM policy of the same set-ups must train and report their metrics. Where our
model must differ from Keras it refuses with a clear message, and the test says
why; where a comparison cannot be exact, the reason is written next to it.

The usage form changes only how the forward pass is built (and how the losses
find the outputs); data adapters, optimizers and callbacks go through the same
``train_step`` in every form, so those cases rotate over the forms instead of
multiplying with them. Models are tiny and runs are a few steps long.
"""

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

import keras_aesam

FORMS = ["wrap", "functional", "subclass"]
NEVER_SAM = {"erm": {}, "ae_sam": {"lambda1": 1e9, "lambda2": 1e9}}
SEED = 3
N, BATCH, EPOCHS = 48, 16, 2
OUR_LOGS = {"sam_fraction", "skipped_steps"}
ADAPTIVE_LOGS = {"grad_norm_sq", "ema_mean", "ema_std", "sam_threshold"}



@pytest.fixture(autouse=True, scope="module")
def _sums_in_written_order():
    """Exact comparisons need each sum computed in one order. Grappler's
    arithmetic optimizer regroups sums of several terms by rules that depend on
    the rest of the graph, and our step's graph differs from Keras's (a
    tf.cond, control dependencies): a gradient summed from two heads then
    rounds differently (measured: 1 ulp, 6e-8, in BatchNorm's gamma). With that
    one rewrite off, both graphs sum in the order their code writes and agree
    bit for bit; the other graph optimizations stay on."""
    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": False})
    yield
    tf.config.optimizer.set_experimental_options({"arithmetic_optimization": True})


# The named classes, by method ("erm" -> ERMModel ...).
CLASSES = {
    cls.method: cls
    for cls in vars(keras_aesam).values()
    if isinstance(cls, type) and issubclass(cls, keras_aesam.SharpnessAwareModel) and cls.method
}


# --------------------------------------------------------------------------
# Networks: one set of layers and one forward function per output structure,
# used by the functional graph and by the subclass's call() alike
# --------------------------------------------------------------------------
class AddLoss(keras.layers.Layer):
    """An activity penalty through ``add_loss``."""

    def call(self, x):
        self.add_loss(1e-2 * ops.mean(ops.square(x)))
        return x


def custom_mse(y_true, y_pred):
    """A plain function as a loss (per-sample values)."""
    return ops.mean(ops.square(y_true - y_pred), axis=-1)


def trunk():
    return [
        keras.layers.Dense(8, kernel_regularizer=keras.regularizers.L2(1e-2)),
        keras.layers.BatchNormalization(),
        keras.layers.Activation("relu"),
    ]


def make_layers(structure):
    layers = {"trunk": trunk(), "cls": keras.layers.Dense(3, name="cls")}
    if structure != "single":
        layers.update(
            concat=keras.layers.Concatenate(), penalty=AddLoss(),
            reg=keras.layers.Dense(1, name="reg"), reg2=keras.layers.Dense(1, name="reg2"),
        )
    return layers


def forward(layers, structure, x):
    """``single``: one input and output; ``named``: dict inputs, outputs ``cls``
    and ``reg``; ``list``: the same as lists; ``nested``: ``{"cls", "aux": [reg, reg2]}``."""
    if structure == "single":
        h = x
    else:
        a, b = (x["a"], x["b"]) if isinstance(x, dict) else x
        h = layers["concat"]([a, b])
    for layer in layers["trunk"]:
        h = layer(h)
    if structure == "single":
        return layers["cls"](h)
    h = layers["penalty"](h)
    cls, reg = layers["cls"](h), layers["reg"](h)
    if structure == "list":
        return [cls, reg]
    if structure == "nested":
        return {"cls": cls, "aux": [reg, layers["reg2"](h)]}
    return {"cls": cls, "reg": reg}


def functional_graph(structure):
    if structure == "single":
        inputs = keras.Input((6,), name="x")
    elif structure == "list":
        inputs = [keras.Input((4,), name="a"), keras.Input((3,), name="b")]
    else:
        inputs = {"a": keras.Input((4,), name="a"), "b": keras.Input((3,), name="b")}
    outputs = forward(make_layers(structure), structure, inputs)
    if structure == "named":
        # The everyday multi-head form: a list of outputs whose layers are
        # named, with losses keyed by those names.
        outputs = [outputs["cls"], outputs["reg"]]
    return inputs, outputs


def subclass(base, structure):
    """The subclass form: a class of ``base`` that defines its own layers and call()."""

    class Net(base):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.parts = make_layers(structure)

        def call(self, x, training=False):
            return forward(self.parts, structure, x)

    return Net


def build(form, structure, method=None, **hyperparameters):
    """Plain Keras (``method=None``) or ours, from the same seed."""
    keras.utils.set_random_seed(SEED)
    if form == "subclass":
        if method is None:
            return subclass(keras.Model, structure)()
        return subclass(CLASSES[method], structure)(**hyperparameters)
    inputs, outputs = functional_graph(structure)
    if method is None:
        return keras.Model(inputs, outputs)
    if form == "wrap":
        return keras_aesam.wrap(keras.Model(inputs, outputs), method, **hyperparameters)
    return CLASSES[method](inputs, outputs, **hyperparameters)


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
def arrays(structure, n=N, seed=0):
    """Inputs, targets and per-sample weights shaped for ``structure``."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.normal(size=shape).astype("float32")
    sw = rng.uniform(0.5, 1.5, size=n).astype("float32")
    if structure == "single":
        x = f32(n, 6)
        return x, np.abs(x[:, :3]).argmax(axis=1).astype("int32"), sw
    a, b = f32(n, 4), f32(n, 3)
    cls = np.abs(a[:, :3]).argmax(axis=1).astype("int32")
    reg = (a[:, :1] - b[:, 1:2]).astype("float32")
    sw2 = rng.uniform(0.5, 1.5, size=n).astype("float32")
    if structure == "list":
        return [a, b], [cls, reg], [sw, sw2]
    if structure == "nested":
        reg2 = f32(n, 1)
        return {"a": a, "b": b}, {"cls": cls, "aux": [reg, reg2]}, {"cls": sw, "aux": [sw2, sw]}
    return {"a": a, "b": b}, {"cls": cls, "reg": reg}, {"cls": sw, "reg": sw2}


SCCE = lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def compile_for(structure, optimizer=None, **extra):
    """Losses, metrics and ``loss_weights`` in the form each structure takes them."""
    optimizer = optimizer or keras.optimizers.SGD(0.05, momentum=0.9)
    if structure == "single":
        kw = dict(loss=SCCE(), metrics=["accuracy"])
    elif structure == "list":
        kw = dict(loss=[SCCE(), "mse"], loss_weights=[1.0, 0.3],
                  metrics=[["accuracy"], ["mae"]], weighted_metrics=[[], ["mse"]])
    elif structure == "nested":
        kw = dict(loss={"cls": SCCE(), "aux": ["mse", custom_mse]},
                  loss_weights={"cls": 1.0, "aux": [0.5, 0.2]},
                  metrics={"cls": ["accuracy"], "aux": [[], ["mae"]]})
    else:
        kw = dict(loss={"cls": SCCE(), "reg": custom_mse},
                  loss_weights={"cls": 1.0, "reg": 0.5},
                  metrics={"cls": ["accuracy"], "reg": ["mae"]},
                  weighted_metrics={"reg": ["mse"]})
    return dict(optimizer=optimizer, **{**kw, **extra})


# --------------------------------------------------------------------------
# Running and comparing
# --------------------------------------------------------------------------
def network_weights(model):
    """The network's weights (trainable and BatchNorm's), without our policy state."""
    own = {id(v) for v in getattr(model, "_own_state_variables", list)()}
    return [v.numpy() for v in model.weights if id(v) not in own]


def max_abs_diff(a, b):
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    return max(float(np.max(np.abs(x - y))) for x, y in zip(a, b))


def train(model, compile_kwargs, fit_args, fit_kwargs):
    model.compile(**compile_kwargs)
    keras.utils.set_random_seed(SEED)  # the same shuffling for every run
    history = model.fit(*fit_args, verbose=0, **fit_kwargs)
    return network_weights(model), history.history


def assert_like_keras(plain, ours, method):
    """Weights and every Keras log identical; ours adds only its own logs."""
    (w_plain, h_plain), (w_ours, h_ours) = plain, ours
    assert max_abs_diff(w_ours, w_plain) == 0.0
    for key, values in h_plain.items():
        assert h_ours[key] == values, key
    assert OUR_LOGS | (ADAPTIVE_LOGS if method == "ae_sam" else set()) <= set(h_ours)
    assert h_plain["loss"][0] != h_plain["loss"][-1]  # it trained: the check is not vacuous


def compare_never_sam(form, structure, compile_kwargs, fit_args, fit_kwargs):
    """Train plain Keras and both never-SAM policies from the same start; compare."""
    plain = train(build(form, structure), compile_kwargs(), fit_args, fit_kwargs)
    for method, hp in NEVER_SAM.items():
        ours = train(build(form, structure, method, **hp), compile_kwargs(), fit_args, fit_kwargs)
        assert_like_keras(plain, ours, method)
    return plain


def assert_sam_run_reports(history, method, fraction=None):
    expected = OUR_LOGS | (ADAPTIVE_LOGS if method.startswith("ae_") else set())
    assert expected <= set(history)
    assert not any(k.startswith("val_") and k[4:] in expected for k in history)
    for key, values in history.items():
        assert np.all(np.isfinite(values)), key
    assert history["skipped_steps"] == [0.0] * len(history["loss"])
    if fraction is not None:
        assert history["sam_fraction"] == pytest.approx([fraction] * len(history["loss"]))


# --------------------------------------------------------------------------
# Inputs and outputs, losses, metrics, weights
# --------------------------------------------------------------------------
def _lr_schedule():
    return keras.optimizers.schedules.ExponentialDecay(0.02, decay_steps=2, decay_rate=0.9)


def as_fit_weights(form, structure, sw):
    """Keras matches sample weights to the output *structure*, not to output
    names: with a list of named outputs and targets keyed by name (the
    ``named`` structure outside the subclass form) plain Keras accepts neither
    a dict nor a list of sample weights, so none are passed there; the other
    structures carry per-output sample weights."""
    if structure == "named" and form != "subclass":
        return None
    return sw


# case -> (structure, compile extras, fit keyword arguments); every case keeps
# sample weights or class weights, a validation set and several outputs or
# regularization losses, so that each reaches both passes and the logs.
CASES = {
    "single_sample_weight_validation_split": (
        "single",
        lambda: dict(optimizer=keras.optimizers.AdamW(_lr_schedule()), steps_per_execution=2),
        lambda x, y, sw: dict(sample_weight=sw, validation_split=0.25),
    ),
    "single_class_weight_weighted_metrics": (
        "single",
        lambda: dict(loss=lambda yt, yp: keras.losses.sparse_categorical_crossentropy(
            yt, yp, from_logits=True), weighted_metrics=["accuracy"]),
        lambda x, y, sw: dict(class_weight={0: 1.0, 1: 2.0, 2: 0.5},
                              validation_data=arrays("single", 16, seed=1)),
    ),
    "named_outputs_dicts": (
        "named", dict,
        lambda x, y, sw: dict(sample_weight=sw, validation_data=arrays("named", 16, seed=1)[:2]),
    ),
    "list_outputs_lists": (
        "list", dict, lambda x, y, sw: dict(sample_weight=sw, validation_split=0.25),
    ),
    "nested_outputs": (
        "nested", dict,
        lambda x, y, sw: dict(sample_weight=sw, validation_data=arrays("nested", 16, seed=1)),
    ),
}
# Rotated over the cases, so that every form trains with SAM on several structures.
SAM_METHODS = ["sam", "ae_sam", "esam", "ae_looksam", "looksam", "ss_sam"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_never_sam_trains_exactly_like_keras(form, case):
    structure, extras, fit_extras = CASES[case]
    x, y, sw = arrays(structure)
    compile_kwargs = lambda: compile_for(structure, **extras())
    fit_kwargs = dict(batch_size=BATCH, epochs=EPOCHS,
                      **fit_extras(x, y, as_fit_weights(form, structure, sw)))
    compare_never_sam(form, structure, compile_kwargs, (x, y), fit_kwargs)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_sam_policy_trains_and_reports(form, case):
    structure, extras, fit_extras = CASES[case]
    method = SAM_METHODS[(sorted(CASES).index(case) + FORMS.index(form)) % len(SAM_METHODS)]
    x, y, sw = arrays(structure)
    model = build(form, structure, method)
    _, history = train(
        model, compile_for(structure, **extras()), (x, y),
        dict(batch_size=BATCH, epochs=EPOCHS,
             **fit_extras(x, y, as_fit_weights(form, structure, sw))),
    )
    assert_sam_run_reports(history, method, fraction=1.0 if method in ("sam", "esam") else None)
    assert "val_loss" in history


def named_functional_twin(method):
    """The ``named`` network as a functional model with dict outputs, like the
    subclass's; built after the same seed, it starts from the same weights."""
    keras.utils.set_random_seed(SEED)
    inputs = {"a": keras.Input((4,), name="a"), "b": keras.Input((3,), name="b")}
    return CLASSES[method](inputs, forward(make_layers("named"), "named", inputs))


def named_layer_weights(model):
    """The weights of the layers that have some, in the order of ``forward``."""
    if model.inner is not None:  # functional: its layers in graph order
        layers = [layer for layer in model.inner.layers if layer.weights]
    else:
        layers = [*model.parts["trunk"][:2], model.parts["cls"], model.parts["reg"]]
    return [w.numpy() for layer in layers for w in layer.weights]


@pytest.mark.parametrize("called_first", [False, True], ids=["unbuilt", "called_first"])
@pytest.mark.parametrize("method", ["looksam", "ae_looksam"])
def test_looksam_on_a_subclass_with_several_inputs_trains_like_the_functional_form(
        method, called_first):
    """LookSAM keeps one g_v per trainable weight, created once the subclass's
    weights exist: at its first call, or inside the first step when fit()
    builds it. The subclass then trains bit for bit like the same network in
    the functional form: the same weights, g_v and logs (the forms differ only
    in how the forward pass is assembled, not in any operation it runs)."""
    x, y, sw = arrays("named")
    fit_kwargs = dict(sample_weight=sw, batch_size=BATCH, epochs=EPOCHS)
    subclassed = build("subclass", "named", method)
    if called_first:
        subclassed(x)  # built outside fit (no state moves: inference mode)
    _, h_sub = train(subclassed, compile_for("named"), (x, y), fit_kwargs)
    functional = named_functional_twin(method)
    _, h_fun = train(functional, compile_for("named"), (x, y), fit_kwargs)

    assert max_abs_diff(named_layer_weights(subclassed), named_layer_weights(functional)) == 0.0
    g_v_sub = [v.numpy() for v in subclassed._direction_state]
    g_v_fun = [v.numpy() for v in functional._direction_state]
    assert max_abs_diff(g_v_sub, g_v_fun) == 0.0
    assert any(np.any(v) for v in g_v_sub)  # a SAM step stored g_v ...
    assert 0.0 < np.mean(h_sub["sam_fraction"]) < 1.0  # ... and ERM steps reused it
    assert h_sub == h_fun
    assert_sam_run_reports(h_sub, method)


def test_looksam_subclass_with_several_inputs_saves_and_resumes(tmp_path):
    """A saved and reloaded subclass carries g_v and the optimizer state:
    one more epoch from the file trains bit for bit like one more epoch in
    memory. save_weights into a subclass built by a call restores every
    weight; tf.train.Checkpoint read into an unbuilt one restores the step
    counter, policy state and g_v when its first call builds it."""
    x, y, sw = arrays("named")
    fit_kwargs = dict(sample_weight=sw, batch_size=BATCH, epochs=1)
    model = build("subclass", "named", "looksam")
    train(model, compile_for("named"), (x, y), fit_kwargs)
    net = type(model)
    model.save(tmp_path / "m.keras")
    model.save_weights(tmp_path / "m.weights.h5")
    tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    saved = [v.numpy() for v in model.weights]
    assert any(np.any(v) for v in model._direction_state)

    loaded = keras.models.load_model(
        tmp_path / "m.keras", custom_objects={"Net": net, "custom_mse": custom_mse})
    from_weights = build("subclass", "named", "looksam")
    from_weights(x)
    from_weights.load_weights(tmp_path / "m.weights.h5")
    # Read before the model is built: g_v, created by the build, is restored then.
    from_checkpoint = build("subclass", "named", "looksam")
    status = tf.train.Checkpoint(model=from_checkpoint).read(str(tmp_path / "ckpt"))
    from_checkpoint(x)
    status.expect_partial().assert_existing_objects_matched()  # all but the optimizer
    for restored in (loaded, from_weights):
        assert max_abs_diff([v.numpy() for v in restored.weights], saved) == 0.0
    # tf.train.Checkpoint does not look into the dict holding this subclass's
    # layers (Keras's tracked dict), so only the model's own state is compared.
    own = lambda m: [v.numpy() for v in m._own_state_variables()]
    assert max_abs_diff(own(from_checkpoint), own(model)) == 0.0

    keras.utils.set_random_seed(SEED)
    model.fit(x, y, verbose=0, **fit_kwargs)
    keras.utils.set_random_seed(SEED)
    loaded.fit(x, y, verbose=0, **fit_kwargs)
    assert max_abs_diff([v.numpy() for v in loaded.weights],
                        [v.numpy() for v in model.weights]) == 0.0


@pytest.mark.parametrize("method", sorted(keras_aesam.METHODS))
def test_every_method_trains_with_losses_keyed_by_output_name(method):
    """The multi-head form: a list of named outputs, dict losses, metrics and
    loss_weights. ESAM's sample selection ranks by the weighted sum of the
    outputs' per-sample losses."""
    x, y, sw = arrays("named")
    model = build("functional", "named", method)
    _, history = train(model, compile_for("named"), (x, y),
                       dict(sample_weight=as_fit_weights("functional", "named", sw),
                            batch_size=BATCH, epochs=EPOCHS))
    assert {"cls_loss", "reg_loss", "cls_accuracy", "reg_mae", "reg_mse"} <= set(history)
    assert_sam_run_reports(history, method)


def test_esam_selection_ranks_by_the_weighted_sum_of_output_losses():
    x, y, _ = arrays("named", n=8)
    model = build("wrap", "named", "esam")
    model.compile(**compile_for("named"))
    model.evaluate(x, y, verbose=0)  # builds the compiled loss, as the first training pass does
    y_pred = model(x)
    per_sample = model._per_sample_loss_fn()(y, y_pred)
    cls = keras.losses.sparse_categorical_crossentropy(y["cls"], y_pred[0], from_logits=True)
    reg = np.mean((y["reg"] - np.asarray(y_pred[1])) ** 2, axis=-1)
    # float32 rounding of two sums of a few terms: a few ulps of values ~1.
    np.testing.assert_allclose(np.asarray(per_sample), np.asarray(cls) + 0.5 * reg, rtol=1e-6)


# --------------------------------------------------------------------------
# Data inputs and fit options
# --------------------------------------------------------------------------
class Batches(keras.utils.PyDataset):
    def __init__(self, x, y, sw):
        super().__init__()
        self.x, self.y, self.sw = x, y, sw

    def __len__(self):
        return len(self.x) // BATCH

    def __getitem__(self, i):
        s = slice(i * BATCH, (i + 1) * BATCH)
        return self.x[s], self.y[s], self.sw[s]


def _generator(x, y, sw):
    while True:
        for i in range(0, len(x), BATCH):
            yield x[i:i + BATCH], y[i:i + BATCH], sw[i:i + BATCH]


INPUT_KINDS = {
    "numpy": lambda x, y, sw: ((x, y), dict(sample_weight=sw, batch_size=BATCH)),
    "tf_data": lambda x, y, sw: (
        (tf.data.Dataset.from_tensor_slices((x, y, sw)).batch(BATCH),), {}),
    "generator": lambda x, y, sw: ((_generator(x, y, sw),), dict(steps_per_epoch=len(x) // BATCH)),
    "py_dataset": lambda x, y, sw: ((Batches(x, y, sw),), {}),
}


@pytest.mark.parametrize("kind", sorted(INPUT_KINDS))
def test_input_kinds_train_exactly_like_keras(kind):
    form = FORMS[sorted(INPUT_KINDS).index(kind) % len(FORMS)]
    x, y, sw = arrays("single")
    args, kwargs = INPUT_KINDS[kind](x, y, sw)
    if kind == "generator":
        # A generator is consumed: each run gets its own, at the same start.
        fresh = lambda: (_generator(x, y, sw),)
        plain = train(build(form, "single"), compile_for("single"), fresh(),
                      dict(epochs=EPOCHS, **kwargs))
        for method, hp in NEVER_SAM.items():
            ours = train(build(form, "single", method, **hp), compile_for("single"), fresh(),
                         dict(epochs=EPOCHS, **kwargs))
            assert_like_keras(plain, ours, method)
        return
    compare_never_sam(form, "single", lambda: compile_for("single"), args,
                      dict(epochs=EPOCHS, **kwargs))


FIT_OPTIONS = {
    "initial_epoch": (dict(), dict(epochs=3, initial_epoch=1)),
    "steps_per_epoch": (dict(), dict(epochs=2, steps_per_epoch=2)),
    "steps_per_execution": (dict(steps_per_execution=3), dict(epochs=2)),
    "run_eagerly": (dict(run_eagerly=True), dict(epochs=2)),
}


@pytest.mark.parametrize("option", sorted(FIT_OPTIONS))
def test_fit_options_train_exactly_like_keras(option):
    form = FORMS[sorted(FIT_OPTIONS).index(option) % len(FORMS)]
    compile_extra, fit_extra = FIT_OPTIONS[option]
    x, y, sw = arrays("single")
    compare_never_sam(form, "single", lambda: compile_for("single", **compile_extra), (x, y),
                      dict(sample_weight=sw, batch_size=BATCH, **fit_extra))


def test_jit_compile_trains_like_keras_up_to_float_rounding():
    """Not exact, by design: Keras compiles the whole step with XLA, ours
    compiles each forward-backward pass and keeps the policy's tf.cond and the
    optimizer update outside XLA (a SAM branch inside an XLA cond is very slow
    on CPU). XLA fuses and reorders float32 sums differently, so each of the 6
    steps may round differently: relative error per step a few float32 ulps
    (~1e-7 · a few) of gradient entries ~1, times lr 0.05 and a momentum sum of
    at most 1/(1-0.9) = 10 steps' worth, is ≤ ~1e-6 per weight; 1e-5 keeps a
    10× margin and still catches any real difference (one SGD update here
    moves weights by ~1e-2)."""
    x, y, sw = arrays("single")
    fit_kwargs = dict(sample_weight=sw, batch_size=BATCH, epochs=EPOCHS)
    plain = train(build("wrap", "single"), compile_for("single", jit_compile=True), (x, y), fit_kwargs)
    for method, hp in NEVER_SAM.items():
        w, h = train(build("wrap", "single", method, **hp),
                     compile_for("single", jit_compile=True), (x, y), fit_kwargs)
        assert max_abs_diff(w, plain[0]) < 1e-5
        np.testing.assert_allclose(h["loss"], plain[1]["loss"], rtol=1e-5)


# --------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------
_schedules = keras.optimizers.schedules
OPTIMIZERS = {
    "sgd_nesterov_exponential_decay": lambda: keras.optimizers.SGD(
        _schedules.ExponentialDecay(0.05, decay_steps=2, decay_rate=0.9), momentum=0.9, nesterov=True),
    "adam_cosine_decay": lambda: keras.optimizers.Adam(_schedules.CosineDecay(0.01, decay_steps=6)),
    "adamw_piecewise_constant": lambda: keras.optimizers.AdamW(
        _schedules.PiecewiseConstantDecay([3], [0.01, 0.005]), weight_decay=0.01),
    "rmsprop_clipnorm": lambda: keras.optimizers.RMSprop(0.01, clipnorm=0.1),
    "lion_global_clipnorm": lambda: keras.optimizers.Lion(1e-3, global_clipnorm=0.1),
    "sgd_use_ema": lambda: keras.optimizers.SGD(
        0.05, use_ema=True, ema_momentum=0.5, ema_overwrite_frequency=2),
    "adam_loss_scale_factor": lambda: keras.optimizers.Adam(0.01, loss_scale_factor=64.0),
    "sgd_gradient_accumulation": lambda: keras.optimizers.SGD(
        0.05, momentum=0.9, gradient_accumulation_steps=2),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizers_train_exactly_like_keras(name):
    form = FORMS[sorted(OPTIMIZERS).index(name) % len(FORMS)]
    x, y, sw = arrays("single")
    fit_kwargs = dict(sample_weight=sw, batch_size=BATCH, epochs=EPOCHS)
    compare_never_sam(form, "single", lambda: compile_for("single", optimizer=OPTIMIZERS[name]()),
                      (x, y), fit_kwargs)
    method = SAM_METHODS[sorted(OPTIMIZERS).index(name) % len(SAM_METHODS)]
    _, history = train(build(form, "single", method),
                       compile_for("single", optimizer=OPTIMIZERS[name]()), (x, y), fit_kwargs)
    assert_sam_run_reports(history, method)


def test_loss_scale_factor_leaves_the_reported_statistics_unscaled():
    x, y, sw = arrays("single")
    logs = []
    for factor in (None, 64.0):
        model = build("wrap", "single", "ae_sam")
        _, history = train(model, compile_for("single", optimizer=keras.optimizers.SGD(
            0.05, loss_scale_factor=factor)), (x, y), dict(batch_size=BATCH, epochs=1, shuffle=False))
        logs.append(history)
    # 64 is a power of two: scaling the loss and unscaling the gradients are exact.
    assert logs[1]["grad_norm_sq"] == logs[0]["grad_norm_sq"]


# --------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------
class CrashOnce(keras.callbacks.Callback):
    """Interrupts the first fit at the end of epoch 1 (a crash to resume from)."""

    def __init__(self):
        super().__init__()
        self.crashed = False

    def on_epoch_end(self, epoch, logs=None):
        if epoch == 1 and not self.crashed:
            self.crashed = True
            raise RuntimeError("interrupted")


def _custom_objects(model):
    return {type(model).__name__: type(model)}


@pytest.mark.parametrize("form", FORMS)
def test_monitoring_callbacks_act_exactly_like_keras(form, tmp_path):
    """EarlyStopping (stopping and restoring the best weights), ReduceLROnPlateau,
    CSVLogger and ModelCheckpoint see the same logs and act the same; the
    checkpoint file loads back to the same network."""
    x, y, sw = arrays("single")
    # mode="max" on a falling loss: no improvement after the first epoch, so
    # EarlyStopping stops at epoch 2 and restores epoch 1's weights;
    # min_delta=10 makes ReduceLROnPlateau halve the rate after every epoch.
    callbacks = lambda tag: [
        keras.callbacks.EarlyStopping(monitor="loss", mode="max", patience=1,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor="loss", min_delta=10, patience=0, factor=0.5),
        keras.callbacks.CSVLogger(str(tmp_path / f"{tag}.csv")),
        keras.callbacks.ModelCheckpoint(str(tmp_path / f"{tag}.keras"), monitor="val_loss",
                                        save_best_only=True),
    ]
    runs = {}
    for method, hp in [(None, {}), *NEVER_SAM.items()]:
        model = build(form, "single", method, **hp)
        runs[method] = train(model, compile_for("single"), (x, y), dict(
            sample_weight=sw, batch_size=BATCH, epochs=5, validation_split=0.25,
            callbacks=callbacks(method)))
        assert float(model.optimizer.learning_rate) == pytest.approx(0.025)  # halved once
        loaded = keras.models.load_model(tmp_path / f"{method}.keras",
                                         custom_objects=_custom_objects(model))
        assert type(loaded) is type(model)
        runs[method] += (network_weights(loaded),)
        with open(tmp_path / f"{method}.csv") as f:
            runs[method] += (list(csv.DictReader(f)),)
    plain = runs[None]
    assert len(plain[1]["loss"]) == 2  # stopped after the second epoch
    for method in NEVER_SAM:
        assert_like_keras(plain[:2], runs[method][:2], method)
        assert max_abs_diff(runs[method][2], plain[2]) == 0.0
        for row_plain, row_ours in zip(plain[3], runs[method][3]):
            assert {k: row_ours[k] for k in row_plain} == row_plain
            assert "sam_fraction" in row_ours


@pytest.mark.parametrize("form", FORMS)
def test_scheduling_and_resuming_callbacks_act_exactly_like_keras(form, tmp_path):
    """LearningRateScheduler, TensorBoard and TerminateOnNaN (on finite
    losses), and BackupAndRestore resuming a run interrupted after epoch 1."""
    x, y, sw = arrays("single")
    runs = {}
    for method, hp in [(None, {}), *NEVER_SAM.items()]:
        model = build(form, "single", method, **hp)
        model.compile(**compile_for("single"))
        model(x[:1])  # BackupAndRestore needs a built model (a subclass is built by its first call)
        crash = CrashOnce()
        callbacks = [
            keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.05 * 0.5 ** epoch),
            keras.callbacks.TensorBoard(str(tmp_path / f"tb_{method}"), write_graph=False),
            keras.callbacks.TerminateOnNaN(),
            keras.callbacks.BackupAndRestore(str(tmp_path / f"backup_{method}")),
        ]
        fit_kwargs = dict(sample_weight=sw, batch_size=BATCH, epochs=3, verbose=0)
        keras.utils.set_random_seed(SEED)
        with pytest.raises(RuntimeError, match="interrupted"):
            model.fit(x, y, callbacks=[*callbacks, crash], **fit_kwargs)
        keras.utils.set_random_seed(SEED)
        history = model.fit(x, y, callbacks=[*callbacks, crash], **fit_kwargs)
        runs[method] = (network_weights(model), history.history)
    # the resumed fit ran the third epoch only
    assert len(runs[None][1]["loss"]) == 1
    assert runs[None][1]["learning_rate"] == [pytest.approx(0.0125)]
    for method in NEVER_SAM:
        (w_plain, h_plain), (w_ours, h_ours) = runs[None], runs[method]
        assert max_abs_diff(w_ours, w_plain) == 0.0
        assert {k: h_ours[k] for k in h_plain} == h_plain


def _tensorboard_scalars(log_dir):
    """Every scalar Keras's TensorBoard callback wrote, as TensorBoard reads it."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={event_accumulator.TENSORS: 0})
    acc.Reload()
    return {tag: [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
            for tag in acc.Tags()["tensors"]}


@pytest.mark.parametrize("method", ["ae_sam", "ae_looksam"])
def test_our_metrics_land_in_tensorboard(method, tmp_path):
    x, y, sw = arrays("single")
    model = build("wrap", "single", method)
    model.compile(**compile_for("single"))
    history = model.fit(x, y, sample_weight=sw, batch_size=BATCH, epochs=EPOCHS, verbose=0,
                        validation_split=0.25,
                        callbacks=[keras.callbacks.TensorBoard(str(tmp_path), write_graph=False)])
    train_scalars = _tensorboard_scalars(tmp_path / "train")
    for name in sorted(OUR_LOGS | ADAPTIVE_LOGS | {"loss"}):
        # TensorBoard stores float32; History holds the same float32 values as floats.
        assert train_scalars[f"epoch_{name}"] == history.history[name], name
    validation_tags = set(_tensorboard_scalars(tmp_path / "validation"))
    assert "epoch_loss" in validation_tags and "epoch_sam_fraction" not in validation_tags


def test_terminate_on_nan_stops_at_the_same_batch_and_ours_keeps_finite_weights():
    """A deliberate difference: a step with a non-finite loss moves nothing in
    our model (counted in skipped_steps), while plain Keras applies the NaN
    update. TerminateOnNaN stops both at the same batch."""
    x, y, sw = arrays("single")
    x = x.copy()
    x[BATCH + 3, 0] = np.nan  # in the second batch
    runs = {}
    for method, hp in [(None, {}), *NEVER_SAM.items()]:
        model = build("wrap", "single", method, **hp)
        runs[method] = train(model, compile_for("single"), (x, y), dict(
            batch_size=BATCH, epochs=EPOCHS, shuffle=False,
            callbacks=[keras.callbacks.TerminateOnNaN()]))
        assert model.stop_training
    assert not all(np.all(np.isfinite(w)) for w in runs[None][0])
    # one good step, then nothing: the same as plain Keras on the first batch alone
    reference = train(build("wrap", "single"), compile_for("single"), (x[:BATCH], y[:BATCH]),
                      dict(batch_size=BATCH, epochs=1, shuffle=False))
    for method in NEVER_SAM:
        assert max_abs_diff(runs[method][0], reference[0]) == 0.0
        assert np.isnan(runs[method][1]["loss"][0])


# --------------------------------------------------------------------------
# The rest of the Model API
# --------------------------------------------------------------------------
@pytest.mark.parametrize("form", FORMS)
def test_model_api_matches_keras(form, tmp_path):
    """train_on_batch, test_on_batch, evaluate, predict, predict_on_batch,
    summary, .keras save/load and export, with ERM against plain Keras."""
    x, y, sw = arrays("single")
    plain, ours = build(form, "single"), build(form, "single", "erm")
    results = {}
    for tag, model in [("plain", plain), ("ours", ours)]:
        model.compile(**compile_for("single"))
        logs = [model.train_on_batch(x[i:i + BATCH], y[i:i + BATCH], sample_weight=sw[i:i + BATCH],
                                     return_dict=True) for i in range(0, N, BATCH)]
        results[tag] = dict(
            train=[{k: v for k, v in log.items() if k in ("loss", "accuracy")} for log in logs],
            test=model.test_on_batch(x[:BATCH], y[:BATCH], return_dict=True),
            evaluate=model.evaluate(x, y, batch_size=BATCH, verbose=0, return_dict=True),
            predict=model.predict(x, batch_size=BATCH, verbose=0),
            on_batch=model.predict_on_batch(x[:BATCH]),
            weights=network_weights(model),
        )
    for key in ("train", "test", "evaluate"):
        assert results["ours"][key] == results["plain"][key], key
    for key in ("predict", "on_batch"):
        np.testing.assert_array_equal(results["ours"][key], results["plain"][key])
    assert max_abs_diff(results["ours"]["weights"], results["plain"]["weights"]) == 0.0

    summaries = {}
    for tag, model in [("plain", plain), ("ours", ours)]:
        lines = []
        model.summary(print_fn=lambda line, **kw: lines.append(line))  # noqa: B023 (called within this iteration)
        summaries[tag] = [line for line in "\n".join(lines).splitlines() if "Trainable params" in line]
    assert summaries["ours"] == summaries["plain"] and summaries["plain"]

    ours.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", custom_objects=_custom_objects(ours))
    assert loaded.policy_state == ours.policy_state and loaded.hyperparameters == ours.hyperparameters
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), results["ours"]["predict"])

    ours.export(str(tmp_path / "exported"))
    reloaded = tf.saved_model.load(str(tmp_path / "exported"))
    served = reloaded.serve(tf.constant(x))
    # The SavedModel's serving graph is traced and optimized on its own, so
    # its float32 sums may be grouped differently: a few ulps of logits ~1.
    np.testing.assert_allclose(np.asarray(served), results["ours"]["predict"], rtol=1e-5, atol=1e-6)


def test_clone_model_of_the_inner_model_wraps_and_trains():
    x, y, sw = arrays("single")
    inner = build("functional", "single")
    clone = keras.models.clone_model(inner)
    clone.set_weights(inner.get_weights())
    plain = train(inner, compile_for("single"), (x, y), dict(sample_weight=sw, batch_size=BATCH,
                                                              epochs=EPOCHS))
    ours = train(keras_aesam.wrap(clone, "erm"), compile_for("single"), (x, y),
                 dict(sample_weight=sw, batch_size=BATCH, epochs=EPOCHS))
    assert_like_keras(plain, ours, "erm")
    _, history = train(keras_aesam.wrap(keras.models.clone_model(inner), "ae_sam"),
                       compile_for("single"), (x, y), dict(batch_size=BATCH, epochs=EPOCHS))
    assert_sam_run_reports(history, "ae_sam")
