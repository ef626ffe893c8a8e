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

import collections
import contextlib
import copy
import inspect

import keras
import tensorflow as tf
from keras import ops

from keras_aesam import (
    _keras_compat as compat,
    directions as directions_module,
    distribution,
    losses,
    ops as sam_ops,
    policies as policies_module,
)
from keras_aesam.methods import build_method, method_config, method_parameters
from keras_aesam.validation import check_bool, check_int

_PACKAGE = "keras_aesam"


def _serialize_part(obj):
    return {"class_name": type(obj).__name__, "config": obj.get_config()}


def _deserialize_part(config, module, base):
    if isinstance(config, base):
        return config
    name = config["class_name"]
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, base)) or inspect.isabstract(cls):
        raise ValueError(f"Unknown {base.__name__} {config['class_name']!r}.")
    return cls(**config["config"])


def _zeros_for_none(grads, variables):
    """Dense zeros for a weight the loss does not reach; other gradients as the
    tape gave them (an embedding's ``tf.IndexedSlices`` stays sparse)."""
    return [
        ops.zeros_like(v.value) if g is None else g for g, v in zip(grads, variables)
    ]


def _per_replica_map(fn, grads, replicas):
    """``fn`` (a scaling) on each gradient, row by row for sparse ones; none on one replica."""
    return [sam_ops.map_values(fn, g) for g in grads] if replicas > 1 else grads


@keras.saving.register_keras_serializable(package=_PACKAGE)
class StepStatistics(keras.metrics.Metric):
    """The step's own metrics: ``sam_fraction`` (the share of applied SAM
    steps), ``skipped_steps`` (non-finite steps) and, unless the policy never
    takes SAM, ``sharpness`` (``L(w+e) - L(w)`` averaged over the SAM steps).

    One vector of sums ``[steps, SAM steps, skipped steps, Σ sharpness]``
    takes one ``assign_add`` per step: three Keras metrics cost three times
    the ops on every step, a fixed cost a small network notices.

    Keras reads a metric two ways under a strategy: the logs a step returns
    (each replica's own sums) and, at the end of an epoch, ``result()``
    outside the replicas, where the sums are added over replicas. The ratios
    are the same either way; every replica counts a skipped step, so outside
    the replicas the count is divided back by the replica count of the
    strategy in whose scope the metric was made (where its variable lives).
    """

    def __init__(self, sharpness=True, name="step_statistics", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.sharpness = bool(sharpness)
        self._replicas = tf.distribute.get_strategy().num_replicas_in_sync
        self.sums = self.add_variable(shape=(4,), initializer="zeros", name="sums")

    def update_state(self, ok, use_sam, sharpness):
        counted = tf.logical_and(use_sam, ok)
        ones = tf.cast(tf.stack([True, counted, tf.logical_not(ok)]), "float32")
        rise = tf.where(counted, ops.cast(sharpness, "float32"), 0.0)
        self.sums.assign_add(tf.concat([ones, rise[None]], axis=0))

    def result(self):
        steps, sam, skipped, rise = tf.unstack(ops.convert_to_tensor(self.sums))
        ctx = tf.distribute.get_replica_context()
        if self._replicas > 1 and (ctx is None or ctx.num_replicas_in_sync == 1):
            skipped = skipped / self._replicas
        results = {"sam_fraction": tf.math.divide_no_nan(sam, steps), "skipped_steps": skipped}
        if self.sharpness:
            results["sharpness"] = tf.math.divide_no_nan(rise, sam)
        return results

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, "sharpness": self.sharpness}


_Decision = collections.namedtuple(
    "_Decision", ["use_sam", "finite", "step", "old_state", "new_state", "logs"]
)


class _Replicas:
    """What the stages of one step share: replica context and count, loss scale."""

    def __init__(self, optimizer):
        self.ctx = distribution.replica_context()
        self.replicas = 1 if self.ctx is None else self.ctx.num_replicas_in_sync
        self.scale = distribution.loss_scale(optimizer)  # dynamic: the optimizer skips and adapts
        self.units = distribution.gradient_units(optimizer)  # the scale and/or loss_scale_factor
        self.unscale = distribution.unscaler(self.units)


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
        method: a name of ``keras_aesam.METHODS`` (``"erm"``, ``"sam"``,
            ``"ae_sam"``, ``"msam"`` …); its hyperparameters come as keyword
            arguments (``rho``, ``lambda1`` …).
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
                direction if direction is not None else directions_module.SAM(),
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
        if direction.perturbs_before_pass and not policy.never_sam:
            raise ValueError(
                f"The {direction.name} direction takes the step's only pass at w + e, "
                f"so it needs the Never policy (no second pass), got policy={policy!r}."
            )

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

        # sam_fraction, skipped_steps and (ERM has none) sharpness
        self.step_statistics = StepStatistics(
            sharpness=not self.policy.never_sam, name="step_statistics"
        )
        self._create_policy_state()
        self._direction_state = None
        if inner is not None and inner.built:
            self.built = True
            self._prepare_weight_state()  # a pattern matching nothing fails here

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
        self.applied_steps = self._state_weight("step", 0, dtype="int64")
        self.sam_total_steps = self._state_weight(
            "total_steps", self.total_steps or 0, dtype="int64"
        )
        self._policy_state = {
            name: self._state_weight(name, value)
            for name, value in self.policy.state_spec().items()
        }
        # the direction's scalar state (LookSAM's age of g_v), after its per-weight state
        self._direction_scalars = [
            self._state_weight(f"direction_{name}", value)
            for name, value in self.direction.scalar_state_spec().items()
        ]

    def _ensure_direction_state(self):
        """Create the direction's per-weight state (LookSAM's ``g_v``), one slot
        per trainable weight, as soon as those weights exist.

        A wrapped built model has them at ``__init__``; a subclass (or an
        unbuilt inner model) gets them when it is built: by a call, by
        ``build``, by ``fit``'s symbolic build under a strategy (inside its
        scope), or by the first traced step without one. Each of those paths
        calls this; only the first with weights creates the state, inside the
        model's strategy scope, so checkpoints restore it like any weight.
        """
        if self._direction_state is not None or not self.direction.has_state:
            return
        variables = self.trainable_variables
        if not variables:
            return  # not built yet
        strategy = self._distribute_strategy
        scope = (
            strategy.scope() if strategy is not None and not tf.distribute.has_strategy()
            else contextlib.nullcontext()
        )
        with scope, compat.state_unlocked(self):
            self._direction_state = [
                self._state_weight(
                    f"direction_state_{i}", 0.0, dtype=v.dtype, shape=tuple(v.shape)
                )
                for i, v in enumerate(variables)
            ]

    def _prepare_weight_state(self):
        """The direction's state and the ``perturb_filter`` mask, once the weights exist."""
        if self.trainable_variables:
            self._ensure_direction_state()
            self._resolve_perturb_mask()

    def _post_build(self):
        """Keras's hook after ``build`` (see ``_keras_compat``): the weights exist now."""
        super()._post_build()
        self._ensure_direction_state()

    def _resolve_perturb_mask(self):
        """One bool per trainable variable: does it get ``e``? (``None``: all do.)"""
        mask = directions_module.perturb_mask(
            self.perturb_filter, [v.path for v in self.trainable_variables]
        )
        self._perturb_mask = None if all(mask) else mask
        return mask

    def _own_state_variables(self):
        return [self.applied_steps, self.sam_total_steps, *self._policy_state.values(),
                *self._direction_variables()]

    def _direction_variables(self):
        """The direction's state: per-weight tensors, then its scalars."""
        return [*(self._direction_state or []), *self._direction_scalars]

    @property
    def policy_state(self):
        """The policy's state as Python floats (µ, σ² …) plus ``step`` and ``total_steps``."""
        state = {k: float(v.numpy()) for k, v in self._policy_state.items()}
        state["step"] = int(self.applied_steps.numpy())
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

    def _check_optimizer(self):
        """A direction that perturbs along the optimizer's state (MSAM) refuses an
        optimizer without one, before the first step is traced. (Not in
        ``compile``: Keras does not re-compile a loaded model whose class
        overrides it.)"""
        if self.direction.perturbs_before_pass and self.optimizer is not None:
            self.direction.check_optimizer(self.optimizer)

    def fit(self, *args, callbacks=None, **kwargs):
        if not self.compiled:
            raise ValueError(
                "You must call compile() before fit(): the model needs an "
                "optimizer and a loss."
            )
        callbacks = list(callbacks or []) + [_InferTotalSteps(self)]
        return super().fit(*args, callbacks=callbacks, **kwargs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        """Keras's private hook: build from the first replica's local batch
        under a strategy (see ``_keras_compat.symbolic_build_from_first_replica``)."""
        if not compat.symbolic_build_from_first_replica(self, iterator):
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        return None

    def make_train_function(self, force=False):
        """Keep the policy's ``tf.cond`` out of XLA; compile the passes instead.

        A SAM branch inside an XLA-compiled ``tf.cond`` is pathologically slow on
        CPU, so with ``jit_compile=True`` the step runs as a graph and each
        forward-backward pass is its own XLA cluster. A policy that never uses
        SAM (ERM, MSAM) has no such branch: on one replica its whole step is
        compiled, so XLA also fuses the guard, the update and MSAM's ``w + e``
        (once the model is built: a subclass built by its first step creates
        variables there, which an XLA function cannot).
        """
        distribution.claim_fresh_collective_keys(self.distribute_strategy)
        if self.train_function is not None and not force:
            return self.train_function
        self._prepare_weight_state()  # else at the first traced step, which builds the model
        self._check_optimizer()
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
        # The model's own strategy: fit() is often called outside strategy.scope().
        strategy = self.distribute_strategy
        if strategy.num_replicas_in_sync > 1 and not self.policy.never_sam:
            synced = compat.synchronized_layers(self)
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
        whole_step = self.policy.never_sam and strategy.num_replicas_in_sync == 1 and self.built
        if self.jit_compile and whole_step:
            # No SAM branch (ERM, MSAM): XLA compiles the whole step, as Keras does
            # for plain fit, the finiteness guard and the update included.
            self._xla_passes = False
            return super().make_train_function(force)
        self._xla_passes = bool(self.jit_compile)
        return compat.make_train_function_without_jit(self, super().make_train_function, force)

    def make_test_function(self, force=False):
        distribution.claim_fresh_collective_keys(self.distribute_strategy)
        return super().make_test_function(force=force)

    def make_predict_function(self, force=False):
        distribution.claim_fresh_collective_keys(self.distribute_strategy)
        return super().make_predict_function(force=force)

    def export(self, filepath, format="tf_saved_model", verbose=None, input_signature=None, **kwargs):
        """Export for inference; a wrapper takes its input signature from ``inner``.

        The served function is the forward pass only: no policy state, no
        custom class needed to load it.
        """
        if input_signature is None and self.inner is not None:
            input_signature = compat.input_signature(self.inner)
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

    def _per_sample_loss_fn(self):
        """ESAM's ``(y, y_pred) -> per-sample losses`` from the compiled loss (:mod:`keras_aesam.losses`)."""
        return losses.per_sample_loss_fn(self.loss, lambda: compat.flat_losses(self), self.output_names)

    def _forward_loss(self, x, y, sample_weight, values=None):
        """Forward pass and compiled loss (with regularizers) in training mode.

        With ``values`` (one tensor per trainable variable) the pass is
        stateless: the model sees ``values`` as its weights and every state
        update it makes (BatchNorm statistics, loss metrics) is discarded.
        """
        if values is None:
            y_pred = self(x, training=True)
            return y_pred, compat.compute_loss(self, x, y, y_pred, sample_weight)
        mapping = list(zip(self.trainable_variables, values))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            y_pred = self(x, training=True)
            loss = compat.compute_loss(self, x, y, y_pred, sample_weight)
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

    def _first_pass(self):
        """The step's first pass: at ``w`` (``g``), or, for a direction that
        perturbs before it (MSAM), the step's only pass, at ``w + e``."""
        if self.direction.perturbs_before_pass:
            return self._momentum_pass
        return self._xla(self._erm_pass)

    def _momentum_pass(self, x, y, sample_weight):
        """Momentum-SAM's one pass: ``(y_pred, L(w + e), ∇L(w + e))`` with ``e``
        from the optimizer's momentum, the weights left at ``w``.

        The trainable weights are mapped to ``w + e`` statelessly, but unlike the
        SAM pass every other state update the forward pass makes (BatchNorm
        statistics, dropout seeds) is kept: this is the step's only pass.
        """
        variables = self.trainable_variables
        slots, sign = self.direction.momentum(self.optimizer, variables)
        e_of_slots = self._perturbation(slots, variables, self.applied_steps.value)
        weights = [v.value for v in variables]
        # w + e: e is e_of_slots, or its negative for SGD's slot -v (no negated copy of m)
        values = (sam_ops.add_lists if sign > 0 else sam_ops.subtract_lists)(weights, e_of_slots)
        y_pred, loss, grads, new_values = self._xla(self._pass_at)(x, y, sample_weight, values)
        for var, value in zip(self._forward_state_variables(), new_values):
            var.assign(value)
        return y_pred, loss, grads

    def _pass_at(self, x, y, sample_weight, values):
        """Loss, scaled gradient and the new values of the forward pass's state
        variables, for a pass with the weights mapped to ``values``."""
        variables = self.trainable_variables
        with tf.GradientTape() as tape:
            tape.watch(values)
            with keras.StatelessScope(
                state_mapping=list(zip(variables, values)), collect_losses=True
            ) as scope:
                y_pred = self(x, training=True)
                loss = compat.compute_loss(self, x, y, y_pred, sample_weight)
            scaled = self.optimizer.scale_loss(loss)
        grads = _zeros_for_none(tape.gradient(scaled, values), variables)
        new_values = [
            v.value if scope.get_current_value(v) is None else scope.get_current_value(v)
            for v in self._forward_state_variables()
        ]
        return y_pred, loss, grads, new_values

    def _sam_pass(self, x, y, sample_weight, perturbation):
        """Scaled gradient of the loss at ``w + e`` and that loss, touching no state."""
        variables = self.trainable_variables
        values = sam_ops.add_lists([v.value for v in variables], perturbation)
        with tf.GradientTape() as tape:
            tape.watch(values)
            _, loss = self._forward_loss(x, y, sample_weight, values=values)
            scaled = self.optimizer.scale_loss(loss)
        return _zeros_for_none(tape.gradient(scaled, values), variables), loss

    def _perturbation(self, grads, variables, step, grad_norm_sq=None):
        """The direction's ``e``, over the weights ``perturb_filter`` chose (0 elsewhere).

        ``grad_norm_sq``: ``‖grads‖²`` if the step has it (used only when every
        weight is perturbed: a filter changes the norm).
        """
        weights = [v.value for v in variables]
        mask = self._perturb_mask
        if mask is None:
            return self.direction.perturbation(grads, weights, step, grad_norm_sq)
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
        x, y, sample_weight = compat.unpack_x_y_sample_weight(data)
        self._build_unbuilt(x)
        run = _Replicas(self.optimizer)
        # 1. the ERM gradient (scaled by 1/replicas and by the loss scale);
        # the forward pass moves BatchNorm statistics, kept only if the step applies
        guarded, guarded_before = self._snapshot_guarded(x)
        with tf.control_dependencies(guarded_before):
            y_pred, loss, local_grads = self._first_pass()(x, y, sample_weight)
        self._prepare_weight_state()  # a subclass that could not be built from shapes was built by that pass
        self._track_loss(loss, x)
        # 2. ‖g‖² (or, without SAM, just whether g is finite) and the decision, identical on every replica
        global_grads, perturb_from, grad_norm_sq = self._gradient_statistic(local_grads, run)
        decision = self._decide(grad_norm_sq)
        # 3. the second pass at w + e, on SAM steps only
        pass_grads, sharpness, pass_finite = self._second_pass(
            decision, run, (x, y, sample_weight), y_pred, loss, local_grads, perturb_from, grad_norm_sq
        )
        # 4. the direction d, applied only where the whole step is finite
        d, new_direction_state, direction_state = self._direction(
            decision.use_sam, global_grads, pass_grads, run
        )
        ok = tf.logical_and(decision.finite, self._d_finite(d, pass_finite, run))
        self._apply(ok, d, run)
        # 5. keep the step's state updates, or roll them back
        self._commit(ok, decision, zip(guarded, guarded_before),
                     zip(self._direction_variables(), new_direction_state, direction_state))
        # 6. metrics
        self._track_step(ok, decision.use_sam, sharpness)
        results = self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        results.update(decision.logs)
        return distribution.per_replica_outputs(results)

    # Stages of train_step -------------------------------------------------
    def _build_unbuilt(self, x):
        """Build an unbuilt model from ``x``'s shapes, then an unbuilt optimizer.

        A subclass is built by Keras at its first call: in the first traced
        step, or the first eager one. Built here, before the step reads
        anything, the variables the forward pass creates are in the rollback's
        snapshot at their initial values, and a ``LossScaleOptimizer`` has its
        dynamic scale before the step reads it. A built model is untouched.
        """
        if not self.built:
            compat.build_from_batch_shapes(self, x)
        if self.built and not self.optimizer.built:  # as Keras's apply would, before the step reads it
            self.optimizer.build(self.trainable_variables)

    def _snapshot_guarded(self, x):
        """The non-trainable variables the forward pass may move (BatchNorm
        statistics), and their values before it, for the rollback of a
        non-finite step."""
        guarded = self._forward_state_variables()
        return guarded, [tf.identity(v.value) for v in guarded]

    def _forward_state_variables(self):
        """The non-trainable variables a forward pass may move (BatchNorm
        statistics, seeds): all but the model's own policy and direction state."""
        own_state = {id(v) for v in self._own_state_variables()}
        return [v for v in self.non_trainable_variables if id(v) not in own_state]

    def _track_loss(self, loss, x):
        compat.loss_tracker(self).update_state(
            compat.unscale_loss_for_distribution(loss),
            sample_weight=tf.shape(tf.nest.flatten(x)[0])[0],
        )

    def _gradient_statistic(self, local_grads, run):
        """``(global g, g to perturb along, statistic)``, all still loss-scaled but the statistic.

        The replicas' ``g`` is summed when the perturbation is synced or the
        direction keeps state; the statistic is the global batch's ‖g‖², or
        the replicas' mean of their own ‖g‖² when ``e`` is per replica. A
        policy that never uses SAM (ERM, MSAM) reads only whether ``g`` is
        finite, so its statistic is the sum of ``g``'s entries instead
        (``sam_ops.global_sum``): as finite as ``g``, and the cheapest read of it.
        """
        replicas = run.replicas
        reduce = sam_ops.global_sum if self.policy.never_sam else sam_ops.global_sq_norm
        needs_global = replicas > 1 and (self.sync_perturbation or self.direction.has_state)
        global_grads = distribution.all_reduce_sum(local_grads) if needs_global else local_grads
        if replicas > 1 and self.sync_perturbation:
            return global_grads, global_grads, reduce(run.unscale(global_grads))
        own = _per_replica_map(lambda v: v * replicas, local_grads, replicas)
        statistic = reduce(run.unscale(own))
        if replicas > 1:
            statistic = run.ctx.all_reduce(tf.distribute.ReduceOp.MEAN, statistic)
        return global_grads, own, statistic

    def _decide(self, grad_norm_sq):
        """The policy's ``use_sam`` and new state; a non-finite or zero ‖g‖²
        makes an ERM step (a zero gradient has no direction to perturb along).
        A policy that never uses SAM gets the sum of ``g`` instead, which it ignores."""
        finite = tf.math.is_finite(grad_norm_sq)
        # read once: the commit reuses these tensors
        step = tf.convert_to_tensor(self.applied_steps.value)
        total_steps = tf.convert_to_tensor(self.sam_total_steps.value)
        old_state = {k: tf.convert_to_tensor(v.value) for k, v in self._policy_state.items()}
        use_sam, new_state, logs = self.policy.decide(
            old_state, tf.where(finite, grad_norm_sq, 0.0), step, total_steps
        )
        use_sam = tf.logical_and(
            tf.logical_and(tf.convert_to_tensor(use_sam), finite), grad_norm_sq > 0.0
        )
        return _Decision(use_sam, finite, step, old_state, new_state, logs)

    def _second_pass(self, decision, run, batch, y_pred, loss, local_grads, perturb_from, grad_norm_sq):
        """``(gradient to form d from, sharpness, is it finite here)``: ``ĝ`` at
        ``w + e`` on a SAM step, else ``g``, 0 and ``True`` (``‖g‖²`` already said
        whether ``g`` is finite). No ``tf.cond`` when the policy never uses SAM.

        ``e``'s norm is the statistic's ``‖g‖²`` where that is the norm of the
        ``g`` perturbed along (one replica, or ``e`` synced): no third pass over ``g``.
        """
        x, y, sample_weight = batch
        skip = lambda: (local_grads, tf.constant(0.0), tf.constant(True))
        if self.policy.never_sam:
            return skip()
        same_norm = run.replicas == 1 or self.sync_perturbation

        def sam_branch():
            variables = self.trainable_variables
            e = self._perturbation(run.unscale(perturb_from), variables, decision.step,
                                   grad_norm_sq if same_norm else None)
            if self.direction.selects_samples:
                xs, ys, sws, rise = self._select_samples(x, y, sample_weight, y_pred, e)
                grads = self._xla(self._sam_pass)(xs, ys, sws, e)[0]
                return grads, rise, self._locally_finite(grads)
            grads, loss_after = self._xla(self._sam_pass)(x, y, sample_weight, e)
            # sharpness L(w+e) - L(w) of this replica's batch (the mean over
            # replicas is the global batch's when e is synced)
            rise = ops.cast(
                compat.unscale_loss_for_distribution(loss_after)
                - compat.unscale_loss_for_distribution(loss),
                "float32",
            )
            return grads, rise, self._locally_finite(grads)

        return tf.cond(decision.use_sam, sam_branch, skip)

    def _direction(self, use_sam, global_grads, pass_grads, run):
        """``(d, new direction state, old direction state)``; ``d`` in the
        optimizer's units (per replica, loss-scaled)."""
        direction_state = [v.value for v in self._direction_variables()]
        if not self.direction.has_state:
            return pass_grads, direction_state, direction_state
        if len(direction_state) != len(global_grads) + len(self._direction_scalars):
            raise ValueError(
                f"The {self.direction.name} direction keeps one state tensor per "
                f"trainable weight: {len(self._direction_state)} were created when the "
                f"model was built, but it now has {len(global_grads)} trainable "
                "weights. Create every layer's weights when the model is built "
                "(call the model on a batch, or define build()), not later."
            )
        replicas = run.replicas
        reduced = distribution.all_reduce_sum(pass_grads) if replicas > 1 else pass_grads
        g, g_hat = run.unscale(global_grads), run.unscale(reduced)
        d, new_direction_state = tf.cond(
            use_sam,
            lambda: self.direction.on_sam_step(g, g_hat, direction_state),
            lambda: self.direction.on_erm_step(g, direction_state),
        )
        d = _per_replica_map(lambda v: v / replicas, d, replicas)
        return distribution.rescaled(d, run.units), new_direction_state, direction_state

    def _locally_finite(self, grads):
        """Whether ``grads`` is finite on this replica (one fused pass over
        them), if ``_d_finite`` will ask: a rule with state checks ``d`` itself."""
        if self.direction.has_state:
            return tf.constant(True)
        return tf.math.is_finite(sam_ops.global_sq_norm(grads))

    def _d_finite(self, d, pass_finite, run):
        """Whether ``d`` is finite on every replica, without a second pass over
        it when the direction keeps no state: ``d`` is then the pass's
        gradient, ``g`` (checked by its statistic: ``‖g‖²``, or its sum) or
        ``ĝ`` (checked in the SAM branch)."""
        if self.direction.has_state:
            return self._all_finite(d, run)
        if self.policy.never_sam:
            return pass_finite  # d is g: its statistic, global already, said it all
        return distribution.all_replicas_true(run.ctx, pass_finite)

    @staticmethod
    def _all_finite(d, run):
        """Whether ``d`` is finite on every replica."""
        return distribution.all_replicas_true(run.ctx, tf.math.is_finite(sam_ops.global_sq_norm(d)))

    def _apply(self, ok, d, run):
        # Each row index once: Keras's clipnorm / global_clipnorm sum the rows'
        # squares of an IndexedSlices, which is the dense norm only then.
        d = [sam_ops.merge_duplicates(t) for t in d]
        if run.scale is not None:
            self.optimizer.apply(d, self.trainable_variables)  # unscales, skips and adapts itself
        else:
            distribution.apply_if(ok, self.optimizer, d, self.trainable_variables)

    def _commit(self, ok, decision, guarded_pairs, direction_triples):
        """New state where ``ok``, old state elsewhere; ``t`` counts applied steps."""
        for var, old in guarded_pairs:
            var.assign(tf.where(ok, var.value, old))
        for name, var in self._policy_state.items():
            var.assign(tf.where(ok, decision.new_state[name], decision.old_state[name]))
        for var, new, old in direction_triples:
            var.assign(tf.where(ok, new, old))
        self.applied_steps.assign_add(tf.cast(ok, "int64"))

    def _track_step(self, ok, use_sam, sharpness):
        self.step_statistics.update_state(ok, use_sam, sharpness)


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


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ERMModel(SharpnessAwareModel):
    """Plain ERM steps (``method='erm'``): the baseline, one pass per step."""

    method = "erm"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SAMModel(SharpnessAwareModel):
    """SAM on every step (Foret et al., 2021): ``rho``, ``adaptive``."""

    method = "sam"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ESAMModel(SharpnessAwareModel):
    """ESAM (Du et al., 2022a): SAM with SWP (``beta``) and SDS (``gamma``)."""

    method = "esam"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SSSAMModel(SharpnessAwareModel):
    """SS-SAM (Zhao et al., 2022b): SAM with probability ``p``."""

    method = "ss_sam"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LookSAMModel(SharpnessAwareModel):
    """LookSAM (Liu et al., 2022): SAM every ``k`` steps, ``g_v`` reused with ``alpha``."""

    method = "looksam"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AESAMModel(SharpnessAwareModel):
    """AE-SAM (Algorithm 1): SAM where ``‖g‖² ≥ µ + c_t·σ``; ``lambda1``, ``lambda2``, ``delta``."""

    method = "ae_sam"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AELookSAMModel(SharpnessAwareModel):
    """AE-LookSAM (Algorithm 1): the adaptive policy deciding LookSAM's SAM steps."""

    method = "ae_looksam"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LateSAMModel(SharpnessAwareModel):
    """ERM, then SAM for the last ``target_sam_fraction`` of the steps."""

    method = "late_sam"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RSTModel(SharpnessAwareModel):
    """RST (Zhao et al., 2022): SAM by a coin whose probability follows a schedule."""

    method = "rst"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class QuantileSAMModel(SharpnessAwareModel):
    """SAM where ``‖g‖²`` is above its running ``(1 - f_t)`` quantile."""

    method = "quantile_sam"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MSAMModel(SharpnessAwareModel):
    """Momentum-SAM (Becker et al., 2024): one pass per step, at ``w + ρ·m/‖m‖``
    from SGD's momentum ``m`` (or Adam's first moment); ``rho``."""

    method = "msam"


__all__ = [
    "SharpnessAwareModel", "wrap", "method_parameters",
    "ERMModel", "SAMModel", "ESAMModel", "SSSAMModel", "LookSAMModel",
    "AESAMModel", "AELookSAMModel", "LateSAMModel", "RSTModel", "QuantileSAMModel",
    "MSAMModel",
]
