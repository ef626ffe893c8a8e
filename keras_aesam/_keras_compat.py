"""The private Keras the model relies on, in one place.

Checked against Keras 3.15.1 (TensorFlow backend, TensorFlow 2.21). Each
entry says why no public API does the job; when Keras changes one of them,
this module is the one to update. Public equivalents are used where they
exist (``keras.utils.unpack_x_y_sample_weight``, ``keras.StatelessScope``,
``Model.compute_metrics``).

The model also overrides ``Layer._post_build``, which Keras calls once a
model's ``build`` has run (its weights exist) and before it locks the
model's state; no public hook runs there.
"""

import contextlib

import keras
import tensorflow as tf
from keras.src import backend as keras_backend
from keras.src.export import export_utils
from keras.src.losses import loss as keras_loss_module

CHECKED_KERAS_VERSIONS = ("3.15.1",)

unpack_x_y_sample_weight = keras.utils.unpack_x_y_sample_weight


def unscale_loss_for_distribution(loss):
    """The replica's loss times the number of replicas.

    Under a strategy ``compute_loss`` divides by the replica count so that
    summed gradients are the global batch's; the loss metric and the
    sharpness ``L(w+e) - L(w)`` need the undivided value, computed the way
    Keras's own ``train_step`` does (no public API).
    """
    return keras_loss_module.unscale_loss_for_distribution(loss)


@contextlib.contextmanager
def state_unlocked(layer):
    """Let ``layer`` add variables although it is built.

    Keras locks a layer's state tracker when its ``build`` returns; per-weight
    state (LookSAM's ``g_v``) can only be shaped once the weights exist, which
    for a subclass is after that. The lock is put back as it was (no public API).
    """
    tracker = layer._tracker
    locked = tracker.locked
    tracker.unlock()
    try:
        yield
    finally:
        if locked:
            tracker.lock()


def input_signature(model):
    """The input signature Keras's ``export`` would infer for ``model`` (no public API)."""
    return export_utils.get_input_signature(model)


def compute_loss(model, x, y, y_pred, sample_weight):
    """``Model._compute_loss`` in training mode: the wrapper Keras's own
    ``train_step`` calls, which passes ``training`` only to ``compute_loss``
    overrides that accept it."""
    return model._compute_loss(
        x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
    )


def loss_tracker(model):
    """The ``loss`` metric Keras's ``train_step`` updates (``Model._loss_tracker``)."""
    return model._loss_tracker


def flat_losses(model):
    """``(path, loss, weight, name)`` per output as ``compile`` resolved them,
    and whether the losses were keyed by output name. ESAM needs the
    per-sample losses, which the public ``compute_loss`` has already reduced."""
    compile_loss = model._compile_loss
    keyed = isinstance(compile_loss._y_pred_build_structure, dict)
    return compile_loss._flat_losses, keyed


def synchronized_layers(model):
    """Names of the BatchNormalization(synchronized=True) layers, nested ones included."""
    return [
        layer.name for layer in model._flatten_layers()
        if getattr(layer, "synchronized", False)
    ]


def make_train_function_without_jit(model, make, force):
    """``make(force)`` with the model's ``jit_compile`` off during the call.

    ``Model.jit_compile``'s setter also touches the compiled state, so the
    flag is flipped on the private attribute and restored afterwards.
    """
    jit = model.jit_compile
    try:
        model._jit_compile = False
        return make(force=force)
    finally:
        model._jit_compile = jit


def build_from_batch_shapes(model, x):
    """Build an unbuilt ``model`` for a training call on ``x`` without running it.

    The symbolic call (``backend.compute_output_spec``) is the one Keras's
    ``Layer._maybe_build`` makes at a subclass's first call: every weight a
    training call needs is created at its initial value, and nothing runs
    or moves. No public API builds a subclass without running its ``call``.
    When ``call`` cannot run symbolically the model is left unbuilt and
    its first real call builds it, as Keras itself falls back.
    """
    spec = keras.tree.map_structure(
        lambda v: None if v is None
        else keras.KerasTensor(v.shape, keras.backend.standardize_dtype(v.dtype)),
        x,
    )
    try:
        keras_backend.compute_output_spec(model, spec, training=True)
    except Exception:  # noqa: BLE001 -- Keras's own build-by-run falls back the same way
        pass


def symbolic_build_from_first_replica(model, iterator):
    """Body of the ``Trainer._maybe_symbolic_build`` override.

    Keras learns the batch's shapes by ``strategy.reduce(MEAN, batch)``,
    which fails eagerly under MultiWorkerMirroredStrategy (Keras 3.15); the
    first replica's local batch has the same shapes. Returns ``False`` when
    Keras's own method should run instead.
    """
    strategy = model._distribute_strategy
    if strategy is None or iterator is None:
        return False
    for _, _, it in iterator:
        batch = tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0]
            if isinstance(v, tf.distribute.DistributedValues) else v,
            next(it),
        )
        break
    with strategy.scope():
        model._symbolic_build(data_batch=batch)
    return True


# Optimizer internals used to run gradient accumulation per replica under a
# merging strategy (see ``distribution.apply_each_replica``): Keras exposes
# neither the accumulators nor the variable-to-slot index.
def optimizer_iterations(optimizer):
    """The optimizer's own step counter variable (``Optimizer._iterations``)."""
    return optimizer._iterations


def accumulated_gradients(optimizer):
    """The optimizer's gradient accumulators, one per variable (private list)."""
    return optimizer._accumulated_gradients


def variable_index(optimizer, variable):
    """The slot of ``variable`` in the optimizer's per-variable lists."""
    return optimizer._get_variable_index(variable)


def first_moments(optimizer):
    """Adam's (and AdamW's) first-moment slots, one per variable (private list).

    Momentum-SAM perturbs along them; SGD's ``momentums`` are public.
    """
    return optimizer._momentums
