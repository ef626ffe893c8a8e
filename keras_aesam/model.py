"""*Where* it runs: the Keras model whose ``train_step`` mixes ERM and SAM steps.

This is the one module with TensorFlow control flow (tapes, ``tf.cond``,
replica context, variable assignment). Each step:

1. one tape at ``w`` gives the ERM gradient ``g`` (and updates BatchNorm once);
2. the policy reads ``‖g‖²`` and its state and decides ``use_sam``;
3. ``tf.cond`` runs either nothing more, or a second tape at ``w + e`` through a
   *stateless* call (weights are never written, BatchNorm statistics and
   metrics are left as the first pass set them);
4. the direction rule forms ``d`` and the optimizer applies it once, outside
   the cond. Non-finite steps move nothing and leave the policy state alone.
"""

import copy

import keras
import tensorflow as tf
from keras import ops
from keras.src.export import export_utils
from keras.src.losses import loss as keras_loss_module
from keras.src.trainers.data_adapters import data_adapter_utils

from keras_aesam import directions as directions_module
from keras_aesam import ops as sam_ops
from keras_aesam import policies as policies_module
from keras_aesam.methods import build_method, method_config, method_parameters
from keras_aesam.validation import check_bool, check_int

_PACKAGE = "keras_aesam"


def _serialize_part(obj):
    return {"class_name": type(obj).__name__, "config": obj.get_config()}


def _deserialize_part(config, module, base):
    if isinstance(config, base):
        return config
    cls = getattr(module, config["class_name"], None)
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"Unknown {base.__name__} {config['class_name']!r}.")
    return cls(**config["config"])


def _zeros_for_none(grads, variables):
    return [
        ops.zeros_like(v.value) if g is None else g for g, v in zip(grads, variables)
    ]


def _loss_scale(optimizer):
    """The dynamic loss scale of a ``LossScaleOptimizer``, else ``None``."""
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return optimizer.dynamic_scale
    return None


def _replica_context():
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return None
    return ctx


def _multi_worker():
    strategy = tf.distribute.get_strategy()
    extended = getattr(strategy, "extended", None)
    in_multi_worker = getattr(extended, "_in_multi_worker_mode", None)
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        in_multi_worker and in_multi_worker()
    )


# TensorFlow keeps, for the life of the process, the tensor shape of every
# collective instance it has run, by (group key, instance key). Every
# MirroredStrategy names its device group 1 and hands out instance keys from
# 100 on, one per all-reduce per step, so a model trained under a second
# strategy reuses the first one's keys: when the two models' all-reduces
# differ in shape or order (a plain Dense(2) model then a Dense(3) one already
# does), the step fails with "Shape mismatch in the collective instance".
# Before each fit/evaluate/predict, a sharpness-aware model moves its
# strategy's counters past every key handed out under a strategy it claimed
# before, in a range (from 2**30) that a fresh strategy's counters never reach.
_FIRST_CLAIMED_INSTANCE_KEY = 1 << 30
_claimed_key_groups = []  # {device: next instance key} of each claimed group


def _collective_keys_of(strategy):
    """The ``CollectiveKeys`` a (single-worker) MirroredStrategy draws from."""
    if not isinstance(strategy, tf.distribute.MirroredStrategy):
        return []
    extended = strategy.extended
    owners = [extended, getattr(extended, "_collective_ops", None),
              getattr(extended, "_cross_device_ops", None)]
    found = []
    for owner in owners:
        keys = getattr(owner, "_collective_keys", None)
        if keys is not None and hasattr(keys, "_instance_key_table") and all(
            keys is not k for k in found
        ):
            found.append(keys)
    return found


def _claim_fresh_collective_keys(strategy):
    """Make ``strategy``'s next instance keys unused in this process (see above)."""
    for keys in _collective_keys_of(strategy):
        with keys._lock:
            used = [n for group in _claimed_key_groups for n in group.values()]
            for group in keys._instance_key_table.values():
                start = max([_FIRST_CLAIMED_INSTANCE_KEY, *used, *group.values()])
                for device in group:
                    group[device] = start
                if all(group is not g for g in _claimed_key_groups):
                    _claimed_key_groups.append(group)


def _all_reduce_sum(tensors):
    ctx = _replica_context()
    if ctx is None:
        return tensors
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tensors)


def _apply_if(condition, optimizer, grads, variables):
    """``optimizer.apply(grads)`` when ``condition``; nothing (not even momentum) otherwise.

    Under a strategy that merges (MirroredStrategy) the cond must run in
    cross-replica context, since ``apply`` merges across replicas there (the
    pattern of Keras's loss scaling); collective strategies apply in place.
    """
    ctx = _replica_context()
    if ctx is None or tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(
            condition,
            lambda: _applied(optimizer, grads, variables),
            lambda: tf.constant(False),
        )
        return

    def cross_replica(distribution, grads, condition):
        first = distribution.experimental_local_results(condition)[0]

        def apply_fn():
            _apply_each_replica(distribution, optimizer, grads, variables)
            return tf.constant(True)

        tf.cond(first, apply_fn, lambda: tf.constant(False))

    ctx.merge_call(cross_replica, args=(grads, condition))


def _apply_each_replica(distribution, optimizer, grads, variables):
    """``optimizer.apply`` on every replica, called in cross-replica context.

    With ``gradient_accumulation_steps`` Keras's ``apply`` puts a ``cond``
    around calls that merge across replicas, which MirroredStrategy cannot run
    in replica context (plain ``keras.Model`` fails there too). So the cond
    "is this micro-batch the last of its window?" is taken here, and each
    branch runs per replica: add ``d`` to the optimizer's own accumulators, or
    apply their mean through Keras's ``apply`` with accumulation off for that
    call and reset them. Same arithmetic as Keras's, same variables.
    """
    steps = optimizer.gradient_accumulation_steps
    if not steps:
        distribution.extended.call_for_each_replica(optimizer.apply, args=(grads, variables))
        return
    is_last = tf.equal((optimizer._iterations + 1) % steps, 0)

    def window_sum(grads):
        unscaled = _unscaled_by_factor(optimizer, grads)
        return [
            g + optimizer._accumulated_gradients[optimizer._get_variable_index(v)]
            for g, v in zip(unscaled, variables)
        ]

    def apply_mean(grads):
        mean = [t / steps for t in window_sum(grads)]
        if optimizer.loss_scale_factor is not None:  # apply() divides by it again
            mean = [t * optimizer.loss_scale_factor for t in mean]
        optimizer.gradient_accumulation_steps = None
        try:
            optimizer.apply(mean, variables)
        finally:
            optimizer.gradient_accumulation_steps = steps

    def accumulate(grads):
        total = window_sum(grads)
        for acc, t in zip(optimizer._accumulated_gradients, _reordered(optimizer, total, variables)):
            acc.assign(t)
        optimizer._iterations.assign_add(1)

    def last():
        distribution.extended.call_for_each_replica(apply_mean, args=(grads,))
        for acc in optimizer._accumulated_gradients:
            distribution.extended.update(
                acc.value, lambda a: a.assign(tf.zeros_like(a)), group=False
            )
        return tf.constant(True)

    def not_last():
        distribution.extended.call_for_each_replica(accumulate, args=(grads,))
        return tf.constant(False)

    tf.cond(is_last, last, not_last)


def _unscaled_by_factor(optimizer, grads):
    factor = optimizer.loss_scale_factor
    return grads if factor is None else [g / factor for g in grads]


def _reordered(optimizer, tensors, variables):
    """``tensors`` (one per variable) in the order of the optimizer's accumulators."""
    by_index = {optimizer._get_variable_index(v): t for t, v in zip(tensors, variables)}
    return [by_index[i] for i in range(len(optimizer._accumulated_gradients))]


def _applied(optimizer, grads, variables):
    optimizer.apply(grads, variables)
    return tf.constant(True)


class _InferTotalSteps(keras.callbacks.Callback):
    """Sets ``T`` from ``fit``'s epochs × steps per epoch when it was not given."""

    def __init__(self, sam_model):
        super().__init__()
        self._sam_model = sam_model

    def on_train_begin(self, logs=None):
        self._sam_model._resolve_total_steps(self.params.get("epochs"), self.params.get("steps"))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SharpnessAwareModel(keras.Model):
    """A ``keras.Model`` that takes SAM steps where its policy says so.

    Three ways to build it: ``SharpnessAwareModel(inner=model, ...)`` (or
    ``keras_aesam.wrap``) shares ``model``'s weights; ``Cls(inputs, outputs,
    ...)`` builds the functional model and wraps it; a subclass defines
    ``call`` (and, for saving, ``get_config``).

    Args:
        method: one of ``"erm"``, ``"sam"``, ``"esam"``, ``"ss_sam"``,
            ``"looksam"``, ``"ae_sam"``, ``"ae_looksam"``; its hyperparameters
            come as keyword arguments (``rho``, ``lambda1`` …).
        policy, direction: instead of ``method``, any ``keras_aesam.policies``
            policy with any ``keras_aesam.directions`` rule.
        total_steps: the paper's ``T`` for the ``c_t`` schedule; ``None``
            infers it from ``fit``'s epochs × steps per epoch.
        sync_perturbation: under a distribution strategy, perturb with the
            all-reduced gradient and decide on the global ``‖g‖²`` (``True``,
            the default: same training as one device on the global batch, one
            extra gradient all-reduce per step), or perturb each replica with
            its own shard's gradient (``False``, SAM's m-sharpness).
        perturb_filter: ``None`` (perturb every trainable weight), or a regular
            expression or list of them searched (``re.search``) in each
            trainable ``variable.path``: only matching weights get ``e``, whose
            norm is taken over them alone; the others stay at ``w`` in the
            second pass. A pattern matching no trainable variable is an error.
    """

    method = None  # the named subclasses fix it

    def __init__(
        self,
        inputs=None,
        outputs=None,
        *,
        inner=None,
        method=None,
        policy=None,
        direction=None,
        total_steps=None,
        sync_perturbation=True,
        perturb_filter=None,
        **kwargs,
    ):
        model_kwargs = {
            k: kwargs.pop(k) for k in ("name", "trainable", "dtype") if k in kwargs
        }
        # Keras bookkeeping that reaches __init__ through from_config.
        for key in ("build_config", "compile_config"):
            kwargs.pop(key, None)
        method = method if method is not None else type(self).method
        if policy is not None or direction is not None:
            if method is not None and type(self).method is None:
                raise ValueError("Pass either method= or policy=/direction=, not both.")
            if kwargs:
                raise TypeError(f"Unexpected arguments {sorted(kwargs)}.")
            policy = _deserialize_part(
                policy if policy is not None else policies_module.Always(),
                policies_module, policies_module.Policy,
            )
            direction = _deserialize_part(
                direction if direction is not None else directions_module.Direction(),
                directions_module, directions_module.Direction,
            )
            method = None
        else:
            if method is None:
                raise ValueError(
                    "SharpnessAwareModel needs method= (one of 'erm', 'sam', "
                    "'esam', 'ss_sam', 'looksam', 'ae_sam', 'ae_looksam') or "
                    "policy= and direction=."
                )
            policy, direction = build_method(method, **kwargs)

        if (inputs is None) != (outputs is None):
            raise ValueError("Pass both inputs and outputs, or neither.")
        if inputs is not None:
            if inner is not None:
                raise ValueError("Pass inputs/outputs or inner=, not both.")
            inner = keras.Model(inputs, outputs, name=model_kwargs.get("name"))
        if inner is not None:
            if isinstance(inner, dict):
                inner = keras.saving.deserialize_keras_object(inner)
            if not isinstance(inner, keras.Model):
                raise TypeError(
                    "inner must be a keras.Model (keras.Sequential, functional "
                    f"or subclassed), got {type(inner).__name__}."
                )
            if isinstance(inner, SharpnessAwareModel):
                raise ValueError(
                    "This model is already sharpness-aware; wrap its inner model "
                    "(model.inner) instead of wrapping it twice."
                )

        super().__init__(**model_kwargs)
        self.inner = inner
        self.policy = policy
        self.direction = direction
        self.method = method
        self.total_steps = check_int("total_steps", total_steps, low=1, allow_none=True)
        self.sync_perturbation = check_bool("sync_perturbation", sync_perturbation)
        self.perturb_filter = directions_module.check_perturb_filter(perturb_filter)
        self._perturb_mask = None
        self._xla_passes = False

        self.sam_fraction_tracker = keras.metrics.Mean(name="sam_fraction")
        self.skipped_steps_tracker = keras.metrics.Sum(name="skipped_steps")
        # L(w+e) - L(w), averaged over the epoch's SAM steps; ERM has none.
        self.sharpness_tracker = (
            None if self.policy.static_decision is False
            else keras.metrics.Mean(name="sharpness")
        )
        self._create_policy_state()
        self._direction_state = None
        if inner is not None and inner.built:
            self.built = True
            self._ensure_direction_state()
            self._resolve_perturb_mask()  # a pattern matching nothing fails here

    # ------------------------------------------------------------------
    # State
    # ------------------------------------------------------------------
    def _state_weight(self, name, initial, dtype="float32", shape=()):
        """A non-trainable state variable, also set as an attribute of its own
        name so that ``tf.train.Checkpoint`` (which does not look inside
        Keras's tracked dicts and lists) finds it."""
        var = self.add_weight(
            name=name,
            shape=shape,
            dtype=dtype,
            initializer=keras.initializers.Constant(initial),
            trainable=False,
            aggregation="only_first_replica",
        )
        setattr(self, f"_state_{name}", var)
        return var

    def _create_policy_state(self):
        self.sam_step = self._state_weight("step", 0, dtype="int64")
        self.sam_total_steps = self._state_weight(
            "total_steps", self.total_steps or 0, dtype="int64"
        )
        self._policy_state = {
            name: self._state_weight(name, value)
            for name, value in self.policy.state_spec().items()
        }

    def _ensure_direction_state(self):
        """Create the direction's per-weight state (LookSAM's ``g_v``) once built."""
        if self._direction_state is not None or not self.direction.has_state():
            return
        self._direction_state = [
            self._state_weight(
                f"direction_state_{i}", 0.0, dtype=v.dtype, shape=tuple(v.shape)
            )
            for i, v in enumerate(self.trainable_variables)
        ]

    def _resolve_perturb_mask(self):
        """One bool per trainable variable: does it get ``e``? (``None``: all do.)"""
        mask = directions_module.perturb_mask(
            self.perturb_filter, [v.path for v in self.trainable_variables]
        )
        self._perturb_mask = None if all(mask) else mask
        return mask

    def _own_state_variables(self):
        return [self.sam_step, self.sam_total_steps, *self._policy_state.values(),
                *(self._direction_state or [])]

    @property
    def policy_state(self):
        """The policy's state as Python floats (µ, σ² …) plus ``step`` and ``total_steps``."""
        state = {k: float(v.numpy()) for k, v in self._policy_state.items()}
        state["step"] = int(self.sam_step.numpy())
        state["total_steps"] = int(self.sam_total_steps.numpy()) or None
        return state

    @property
    def hyperparameters(self):
        """The method's hyperparameters, resolved (defaults included)."""
        return method_config(self.policy, self.direction)

    def _resolve_total_steps(self, epochs, steps_per_epoch):
        if self.total_steps is not None or not self.policy.needs_total_steps:
            return
        if not epochs or not steps_per_epoch:
            raise ValueError(
                f"total_steps is unknown: the {self.policy.name} policy's c_t "
                "schedule needs the total number of training steps T, and fit() "
                "cannot tell the number of steps per epoch (e.g. an endless or "
                "unsized dataset). Pass steps_per_epoch= to fit(), or "
                "total_steps= to the model."
            )
        self.sam_total_steps.assign(int(epochs) * int(steps_per_epoch))

    # ------------------------------------------------------------------
    # Keras plumbing
    # ------------------------------------------------------------------
    def call(self, inputs, training=None):
        if self.inner is None:
            raise NotImplementedError(
                "A subclass of SharpnessAwareModel without inner= must define call()."
            )
        return self.inner(inputs, training=training)

    def fit(self, *args, callbacks=None, **kwargs):
        if not self.compiled:
            raise ValueError(
                "You must call compile() before fit(): the model needs an "
                "optimizer and a loss."
            )
        callbacks = list(callbacks or []) + [_InferTotalSteps(self)]
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras learns the batch's shapes by ``strategy.reduce(MEAN, batch)``,
        which fails eagerly under MultiWorkerMirroredStrategy (Keras 3.15);
        the first replica's local batch has the same shapes."""
        strategy = self._distribute_strategy
        if strategy is None or iterator is None:
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        for _, _, it in iterator:
            batch = tf.nest.map_structure(
                lambda v: strategy.experimental_local_results(v)[0]
                if isinstance(v, tf.distribute.DistributedValues) else v,
                next(it),
            )
            break
        with strategy.scope():
            self._symbolic_build(data_batch=batch)

    def make_train_function(self, force=False):
        """Keep the policy's ``tf.cond`` out of XLA; compile the passes instead.

        A SAM branch inside an XLA-compiled ``tf.cond`` is pathologically slow on
        CPU, so with ``jit_compile=True`` the step runs as a graph and each
        forward-backward pass is its own XLA cluster.
        """
        _claim_fresh_collective_keys(self.distribute_strategy)
        if self.train_function is not None and not force:
            return self.train_function
        self._ensure_direction_state()
        self._resolve_perturb_mask()
        # gradient_accumulation_steps=n needs nothing here: every batch fit()
        # gives is a micro-batch that takes its own decision, e and d at the
        # weights of its window (they move only every n applies), and the
        # optimizer applies the mean d every n micro-batches. t, T, the EMAs,
        # sam_fraction and sharpness count micro-batches (README).
        inner_optimizer = getattr(self.optimizer, "inner_optimizer", None)
        if (
            getattr(inner_optimizer, "gradient_accumulation_steps", None)
            and isinstance(self.distribute_strategy, tf.distribute.MirroredStrategy)
            and self.distribute_strategy.num_replicas_in_sync > 1
        ):
            raise ValueError(
                "gradient_accumulation_steps with loss scaling (mixed_float16) "
                "is not supported under a multi-replica MirroredStrategy: Keras's "
                "LossScaleOptimizer applies the accumulating optimizer inside a "
                "cross-replica cond it cannot run there. Use mixed_bfloat16 (no "
                "loss scaling), float32, or one device."
            )
        strategy = tf.distribute.get_strategy()
        if strategy.num_replicas_in_sync > 1 and self.policy.static_decision is not False:
            synced = [
                layer.name for layer in self._flatten_layers()
                if getattr(layer, "synchronized", False)
            ]
            if synced:
                raise ValueError(
                    f"Layers {synced} use BatchNormalization(synchronized=True), "
                    "whose cross-replica all-reduce cannot run inside the SAM "
                    "branch's tf.cond under a multi-replica strategy. Use "
                    "synchronized=False (per-replica statistics)."
                )
        if self.optimizer is not None and not self.optimizer.built and self.built:
            # Loss scaling needs its dynamic scale before the step is traced.
            self.optimizer.build(self.trainable_variables)
        if self.direction.selects_samples:
            self._per_sample_loss_fn()  # fail before the first step, not inside it
        jit = self.jit_compile
        self._xla_passes = bool(jit)
        try:
            self._jit_compile = False
            return super().make_train_function(force=force)
        finally:
            self._jit_compile = jit

    def make_test_function(self, force=False):
        _claim_fresh_collective_keys(self.distribute_strategy)
        return super().make_test_function(force=force)

    def make_predict_function(self, force=False):
        _claim_fresh_collective_keys(self.distribute_strategy)
        return super().make_predict_function(force=force)

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Export for inference; a wrapper takes its input signature from ``inner``.

        The served function is the forward pass only: no policy state, no
        custom class needed to load it.
        """
        if input_signature is None and self.inner is not None:
            input_signature = export_utils.get_input_signature(self.inner)
        return super().export(
            filepath, format=format, verbose=verbose, input_signature=input_signature, **kwargs
        )

    def load_own_variables(self, store):
        self._ensure_direction_state()
        super().load_own_variables(store)

    def get_config(self):
        config = {"name": self.name, "trainable": self.trainable}
        if self.inner is not None:
            config["inner"] = keras.saving.serialize_keras_object(self.inner)
        if self.method is not None:
            if type(self).method is None:
                config["method"] = self.method
            config.update(self.hyperparameters)
        else:
            config["policy"] = _serialize_part(self.policy)
            config["direction"] = _serialize_part(self.direction)
        config["total_steps"] = self.total_steps
        config["sync_perturbation"] = self.sync_perturbation
        config["perturb_filter"] = self.perturb_filter
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = copy.deepcopy(config)  # Keras's functional from_config empties what it reads
        if "inner" in config and isinstance(config["inner"], dict):
            config["inner"] = keras.saving.deserialize_keras_object(
                config["inner"], custom_objects=custom_objects
            )
        return cls(**config)

    # ------------------------------------------------------------------
    # Losses
    # ------------------------------------------------------------------
    @property
    def output_names(self):
        """The inner model's output names (``None`` for a subclass).

        ``compile`` reads them to resolve losses, metrics and ``loss_weights``
        keyed by output name, as it does for the inner model itself.
        """
        return getattr(self.inner, "output_names", None)

    @staticmethod
    def _per_sample_values(values):
        """A loss function's output reduced to one value per sample."""
        values = ops.convert_to_tensor(values)
        if values.shape.rank == 0:
            raise ValueError(
                "ESAM's data selection (gamma < 1) needs per-sample losses, "
                "but the compiled loss returns a scalar. Use a loss with "
                "per-sample output, or gamma=1.0."
            )
        if values.shape.rank > 1:
            values = ops.mean(values, axis=tuple(range(1, values.shape.rank)))
        return values

    def _per_sample_loss_fn(self):
        """A function ``(y, y_pred) -> per-sample losses`` for ESAM's selection.

        With one loss per output it is the ``loss_weights``-weighted sum of the
        outputs' per-sample losses, resolved the way ``compile`` resolved them.
        """
        if keras.tree.is_nested(self.loss):
            return self._per_sample_multi_output_loss_fn()
        loss = self.loss
        if isinstance(loss, str):
            loss = keras.losses.get(loss)
        fn = None
        if isinstance(loss, keras.losses.Loss):
            fn = loss.call
        elif callable(loss):
            fn = loss
        if fn is None:
            raise ValueError(
                "ESAM's data selection (gamma < 1) needs per-sample losses: compile "
                "with a keras.losses.Loss, a loss name or a function returning "
                f"per-sample values (one, or one per output), got loss={self.loss!r}. "
                "Use gamma=1.0 to turn selection off."
            )
        return lambda y, y_pred: self._per_sample_values(fn(y, y_pred))

    def _per_sample_multi_output_loss_fn(self):
        def per_sample(y, y_pred):
            compile_loss = self._compile_loss
            names = self.output_names
            if isinstance(y, dict) and not isinstance(y_pred, dict) and names:
                y = [y[name] for name in names]
            if isinstance(compile_loss._y_pred_build_structure, dict) and not isinstance(
                y_pred, dict
            ):
                # compile keyed the losses by output name
                y_pred = dict(zip(names, keras.tree.flatten(y_pred)))
                y = dict(zip(names, keras.tree.flatten(y)))
            total = 0.0
            for path, loss_fn, weight, _ in compile_loss._flat_losses:
                y_t, y_p = y, y_pred
                for key in path:
                    y_t, y_p = y_t[key], y_p[key]
                values = self._per_sample_values(loss_fn.call(y_t, y_p))
                total = total + (values if weight is None else values * weight)
            return total

        return per_sample

    def _forward_loss(self, x, y, sample_weight, values=None):
        """Forward pass and compiled loss (with regularizers) in training mode.

        With ``values`` (one tensor per trainable variable) the pass is
        stateless: the model sees ``values`` as its weights and every state
        update it makes (BatchNorm statistics, loss metrics) is discarded.
        """
        if values is None:
            y_pred = self(x, training=True)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
            return y_pred, loss
        mapping = list(zip(self.trainable_variables, values))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            y_pred = self(x, training=True)
            loss = self._compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True
            )
        return y_pred, loss

    def _xla(self, fn):
        return tf.function(fn, jit_compile=True) if self._xla_passes else fn

    # ------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------
    def _erm_pass(self, x, y, sample_weight):
        with tf.GradientTape() as tape:
            y_pred, loss = self._forward_loss(x, y, sample_weight)
            scaled = self.optimizer.scale_loss(loss)
        variables = self.trainable_variables
        if not variables:
            raise ValueError(
                "The model has no trainable weights: there is nothing for SAM "
                "(or ERM) to update."
            )
        grads = _zeros_for_none(tape.gradient(scaled, variables), variables)
        return y_pred, loss, grads

    def _sam_pass(self, x, y, sample_weight, perturbation):
        """Scaled gradient of the loss at ``w + e`` and that loss, touching no state."""
        variables = self.trainable_variables
        values = sam_ops.add_lists([v.value for v in variables], perturbation)
        with tf.GradientTape() as tape:
            tape.watch(values)
            _, loss = self._forward_loss(x, y, sample_weight, values=values)
            scaled = self.optimizer.scale_loss(loss)
        return _zeros_for_none(tape.gradient(scaled, values), variables), loss

    def _perturbation(self, grads, variables, step):
        """The direction's ``e``, over the weights ``perturb_filter`` chose (0 elsewhere)."""
        weights = [v.value for v in variables]
        mask = self._perturb_mask
        if mask is None:
            return self.direction.perturbation(grads, weights, step)
        e = self.direction.perturbation(
            sam_ops.select(grads, mask), sam_ops.select(weights, mask), step
        )
        return sam_ops.scatter_selected(e, mask, weights)

    def _select_samples(self, x, y, sample_weight, y_pred, perturbation):
        """ESAM's SDS: the samples whose loss rose most under ``e``; also the
        mean per-sample rise over the whole batch (the step's sharpness)."""
        per_sample = self._per_sample_loss_fn()
        values = sam_ops.add_lists([v.value for v in self.trainable_variables], perturbation)
        mapping = list(zip(self.trainable_variables, values))
        with keras.StatelessScope(state_mapping=mapping):
            y_pred_after = self(x, training=True)
        before = tf.stop_gradient(per_sample(y, y_pred))
        after = tf.stop_gradient(per_sample(y, y_pred_after))
        keep = sam_ops.sds_select(before, after, self.direction.gamma)
        take = lambda t: None if t is None else tf.gather(t, keep)
        return (
            tf.nest.map_structure(take, x),
            tf.nest.map_structure(take, y),
            tf.nest.map_structure(take, sample_weight),
            ops.mean(ops.cast(after, "float32") - ops.cast(before, "float32")),
        )

    def test_step(self, data):
        """Keras's evaluation step, without the training-only SAM trackers."""
        logs = super().test_step(data)
        for name in ("sam_fraction", "skipped_steps", "sharpness"):
            logs.pop(name, None)
        return logs

    def train_step(self, data):
        x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
        optimizer = self.optimizer
        ctx = _replica_context()
        replicas = 1 if ctx is None else ctx.num_replicas_in_sync
        scale = _loss_scale(optimizer)
        unscale = (lambda gs: gs) if scale is None else (
            lambda gs: [g / ops.cast(scale, g.dtype) for g in gs]
        )

        # 1. the ERM gradient (scaled by 1/replicas, and by the loss scale);
        # the forward pass moves BatchNorm statistics, kept only if the step is
        own_state = {id(v) for v in self._own_state_variables()}
        guarded = [v for v in self.non_trainable_variables if id(v) not in own_state]
        guarded_before = [tf.identity(v.value) for v in guarded]
        with tf.control_dependencies(guarded_before):
            y_pred, loss, local_grads = self._xla(self._erm_pass)(x, y, sample_weight)
        variables = self.trainable_variables
        self._loss_tracker.update_state(
            keras_loss_module.unscale_loss_for_distribution(loss),
            sample_weight=tf.shape(tf.nest.flatten(x)[0])[0],
        )

        # 2. the statistic and the decision, identical on every replica
        needs_global = replicas > 1 and (
            self.sync_perturbation or self.direction.has_state()
        )
        global_grads = _all_reduce_sum(local_grads) if needs_global else local_grads
        if replicas > 1 and self.sync_perturbation:
            stat = sam_ops.global_sq_norm(unscale(global_grads))
            perturb_from = global_grads
        else:
            own = [g * replicas for g in local_grads] if replicas > 1 else local_grads
            stat = sam_ops.global_sq_norm(unscale(own))
            if replicas > 1:
                stat = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, stat)
            perturb_from = own
        finite = tf.math.is_finite(stat)
        step = self.sam_step.value
        total_steps = self.sam_total_steps.value
        old_state = {k: v.value for k, v in self._policy_state.items()}
        use_sam, new_state, logs = self.policy.decide(
            old_state, tf.where(finite, stat, 0.0), step, total_steps
        )
        # A zero gradient has no direction to perturb along: an ERM step.
        use_sam = tf.logical_and(
            tf.logical_and(tf.convert_to_tensor(use_sam), finite), stat > 0.0
        )

        # 3. the second pass, on SAM steps only
        def sam_branch():
            e = self._perturbation(unscale(perturb_from), variables, step)
            if self.direction.selects_samples:
                xs, ys, sws, rise = self._select_samples(x, y, sample_weight, y_pred, e)
                return self._xla(self._sam_pass)(xs, ys, sws, e)[0], rise
            grads, loss_after = self._xla(self._sam_pass)(x, y, sample_weight, e)
            # sharpness L(w+e) - L(w) of this replica's batch (the mean over
            # replicas is the global batch's when e is synced)
            rise = ops.cast(
                keras_loss_module.unscale_loss_for_distribution(loss_after)
                - keras_loss_module.unscale_loss_for_distribution(loss),
                "float32",
            )
            return grads, rise

        if self.policy.static_decision is False:
            pass_grads, sharpness = local_grads, tf.constant(0.0)
        else:
            pass_grads, sharpness = tf.cond(
                use_sam, sam_branch, lambda: (local_grads, tf.constant(0.0))
            )

        # 4. the direction, the optimizer step, the state
        direction_state = [v.value for v in self._direction_state or []]
        if self.direction.has_state():
            reduced = _all_reduce_sum(pass_grads) if replicas > 1 else pass_grads
            g, g_hat = unscale(global_grads), unscale(reduced)
            d, new_direction_state = tf.cond(
                use_sam,
                lambda: self.direction.on_sam_step(g, g_hat, direction_state),
                lambda: self.direction.on_erm_step(g, direction_state),
            )
            d = [t / replicas for t in d] if replicas > 1 else d
            d = d if scale is None else [t * ops.cast(scale, t.dtype) for t in d]
        else:
            d, new_direction_state = pass_grads, direction_state

        d_finite = tf.math.is_finite(sam_ops.global_sq_norm(d))
        if replicas > 1:
            bad = ctx.all_reduce(
                tf.distribute.ReduceOp.SUM, tf.cast(tf.logical_not(d_finite), tf.float32)
            )
            d_finite = tf.equal(bad, 0.0)
        ok = tf.logical_and(finite, d_finite)
        if scale is not None:
            optimizer.apply(d, variables)  # unscales, skips and adapts itself
        else:
            _apply_if(ok, optimizer, d, variables)

        for var, old in zip(guarded, guarded_before):
            var.assign(tf.where(ok, var.value, old))
        for name, var in self._policy_state.items():
            var.assign(tf.where(ok, new_state[name], old_state[name]))
        for var, new, old in zip(self._direction_state or [], new_direction_state, direction_state):
            var.assign(tf.where(ok, new, old))
        self.sam_step.assign_add(tf.cast(ok, "int64"))
        self.sam_fraction_tracker.update_state(
            tf.cast(tf.logical_and(use_sam, ok), "float32")
        )
        self.skipped_steps_tracker.update_state(tf.cast(tf.logical_not(ok), "float32"))
        if self.sharpness_tracker is not None:
            counted = tf.logical_and(use_sam, ok)
            self.sharpness_tracker.update_state(
                tf.where(counted, sharpness, 0.0), sample_weight=tf.cast(counted, "float32")
            )

        results = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        results.update(logs)
        if _multi_worker():
            # Keras 3.15 reduces multi-worker step outputs with reduce(MEAN,
            # axis=0), which needs a leading axis; scalars fail there.
            results = {k: tf.reshape(v, [1]) for k, v in results.items()}
        return results


def wrap(model, method="ae_sam", **hyperparameters):
    """Make ``model`` sharpness-aware: a ``SharpnessAwareModel`` sharing its weights.

    ``model`` keeps working on its own and its ``weights`` hold no policy
    state. ``hyperparameters`` are the method's (``rho``, ``lambda1`` …) plus
    ``total_steps``, ``sync_perturbation`` and ``perturb_filter``.
    """
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"wrap() takes a keras.Model, got {type(model).__name__}."
        )
    return SharpnessAwareModel(inner=model, method=method, **hyperparameters)


def _named(class_name, method_name, doc):
    cls = type(class_name, (SharpnessAwareModel,), {"method": method_name, "__doc__": doc})
    cls.__module__ = __name__
    return keras.saving.register_keras_serializable(package=_PACKAGE)(cls)


ERMModel = _named("ERMModel", "erm", "Plain ERM steps (``method='erm'``): the baseline, one pass per step.")
SAMModel = _named("SAMModel", "sam", "SAM on every step (Foret et al., 2021): ``rho``, ``adaptive``.")
ESAMModel = _named("ESAMModel", "esam", "ESAM (Du et al., 2022a): SAM with SWP (``beta``) and SDS (``gamma``).")
SSSAMModel = _named("SSSAMModel", "ss_sam", "SS-SAM (Zhao et al., 2022b): SAM with probability ``p``.")
LookSAMModel = _named("LookSAMModel", "looksam", "LookSAM (Liu et al., 2022): SAM every ``k`` steps, ``g_v`` reused with ``alpha``.")
AESAMModel = _named("AESAMModel", "ae_sam", "AE-SAM (Algorithm 1): SAM where ``‖g‖² ≥ µ + c_t·σ``; ``lambda1``, ``lambda2``, ``delta``.")
AELookSAMModel = _named("AELookSAMModel", "ae_looksam", "AE-LookSAM (Algorithm 1): the adaptive policy deciding LookSAM's SAM steps.")
LateSAMModel = _named("LateSAMModel", "late_sam", "ERM, then SAM for the last ``target_sam_fraction`` of the steps.")
RSTModel = _named("RSTModel", "rst", "RST (Zhao et al., 2022): SAM by a coin whose probability follows a schedule.")
QuantileSAMModel = _named("QuantileSAMModel", "quantile_sam", "SAM where ``‖g‖²`` is above its running ``(1 - f_t)`` quantile.")

__all__ = [
    "SharpnessAwareModel", "wrap", "method_parameters",
    "ERMModel", "SAMModel", "ESAMModel", "SSSAMModel", "LookSAMModel",
    "AESAMModel", "AELookSAMModel", "LateSAMModel", "RSTModel", "QuantileSAMModel",
]
