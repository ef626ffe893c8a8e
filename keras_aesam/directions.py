"""*How* the update direction is formed: SAM, ASAM, ESAM, LookSAM and Momentum-SAM.

A direction rule answers three questions for the model's ``train_step``:

- ``perturbation(g, w, t)``: the ``e`` at which a SAM step takes its second
  gradient ``ĝ = ∇L(B; w + e)``;
- ``on_sam_step(g, ĝ, state)``: the direction ``d`` handed to the optimizer on a
  SAM step, and the rule's new state;
- ``on_erm_step(g, state)``: ``d`` on a step without a second pass.

State is a list of tensors shaped like the trainable weights (LookSAM's ``g_v``)
or empty; the model stores it in non-trainable variables, so checkpoints carry it.
"""

import abc
import re

import keras
import tensorflow as tf
from keras import ops

from keras_aesam import _keras_compat as compat, ops as sam_ops
from keras_aesam.validation import check_bool, check_int, check_range, check_seed


class Direction(abc.ABC):
    """The interface of a direction rule; ``SAM`` is the plain implementation.

    Capabilities are boolean properties the model reads when tracing:
    ``has_state`` (the rule keeps per-weight tensors across steps),
    ``selects_samples`` (the second pass uses a subset of the batch) and
    ``perturbs_before_pass`` (``e`` comes from the optimizer's state and the
    step's one pass is at ``w + e``).
    """

    name = None

    @property
    def has_state(self):
        """Whether the rule keeps per-weight state (stored by the model)."""
        return False

    @property
    def selects_samples(self):
        """Whether the second backward pass runs on a chosen subset of the batch."""
        return False

    def scalar_state_spec(self):
        """Initial values of the rule's scalar state, by name (float32 scalars).

        The model passes them after the per-weight tensors in ``state``.
        """
        return {}

    @property
    def perturbs_before_pass(self):
        """Whether ``e`` comes from the optimizer's state before the step's only
        pass, which is then taken at ``w + e`` (Momentum-SAM); the policy must
        be ``Never`` (no second pass)."""
        return False

    @abc.abstractmethod
    def perturbation(self, grads, weights, step, grad_norm_sq=None):
        """The ``e`` at which a SAM step takes its second gradient.

        ``grad_norm_sq`` is ``‖grads‖²`` when the step already has it (or None):
        a rule whose ``e`` needs that norm uses it instead of a pass over ``grads``.
        """

    @abc.abstractmethod
    def on_sam_step(self, grads, sam_grads, state):
        """``(d, new_state)`` on a SAM step."""

    @abc.abstractmethod
    def on_erm_step(self, grads, state):
        """``(d, new_state)`` on a step without a second pass."""

    @abc.abstractmethod
    def get_config(self):
        """The constructor arguments, JSON-serializable."""

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class SAM(Direction):
    """Plain SAM (Foret et al., 2021): ``e = ρ·g/‖g‖``, ``d = ĝ``; ERM steps use ``g``.

    ``adaptive=True`` gives ASAM's scale-invariant ball (Kwon et al., 2021).
    """

    name = "sam"

    def __init__(self, rho=0.05, adaptive=False):
        self.rho = check_range("rho", rho, 0.0, low_open=True)
        self.adaptive = check_bool("adaptive", adaptive)

    def perturbation(self, grads, weights, step, grad_norm_sq=None):
        if self.adaptive:
            return sam_ops.asam_perturbation(grads, weights, self.rho)
        return sam_ops.sam_perturbation(grads, self.rho, sq_norm=grad_norm_sq)

    def on_sam_step(self, grads, sam_grads, state):
        return sam_grads, state

    def on_erm_step(self, grads, state):
        return grads, state

    def get_config(self):
        return {"rho": self.rho, "adaptive": self.adaptive}


#: LookSAM's default bound on the age of ``g_v`` (see ``LookSAM``; the choice
#: and the measurements behind it are in docs/algorithms.md).
DEFAULT_MAX_AGE = 10


class LookSAM(SAM):
    """LookSAM (Liu et al., 2022): reuse the SAM gradient's orthogonal part.

    On a SAM step ``g_v = ĝ - (⟨ĝ,g⟩/‖g‖²)·g`` is stored and ``d = ĝ``; on the
    other steps ``d = g + α·(‖g‖/‖g_v‖)·g_v`` at the cost of one pass. Global
    norms by default; ``per_tensor=True`` projects each tensor on its own.

    ``max_age`` bounds how stale ``g_v`` may be: it is reused on the
    ``max_age`` steps after the SAM step that formed it, and the steps after
    those are plain ERM steps (``d = g``) until the next SAM step. The budget
    of SAM steps is the policy's, unchanged. Reused without bound
    (``max_age=None``, the paper's rule), a ``g_v`` formed hundreds of steps
    earlier pushes the weights along one old direction at ``α·‖g‖`` on every
    step; under a policy with long gaps between SAM steps (the adaptive one
    of AE-LookSAM, quantile SAM) training then ends at chance level.
    ``Periodic(k)`` bounds the age at ``k - 1`` by itself.
    """

    name = "looksam"

    def __init__(self, rho=0.05, alpha=0.7, per_tensor=False, adaptive=False, max_age=DEFAULT_MAX_AGE):
        super().__init__(rho=rho, adaptive=adaptive)
        self.alpha = check_range("alpha", alpha, 0.0)
        self.per_tensor = check_bool("per_tensor", per_tensor)
        self.max_age = check_int("max_age", max_age, low=1, allow_none=True)

    @property
    def has_state(self):
        return True

    def scalar_state_spec(self):
        """``age``: steps since the SAM step that formed ``g_v``."""
        return {"age": 0.0}

    def on_sam_step(self, grads, sam_grads, state):
        g_v, age = state[:-1], state[-1]
        new_g_v = sam_ops.looksam_orthogonal(sam_grads, grads, per_tensor=self.per_tensor)
        # d is dense on the other steps (g_v is), so on this one too
        d = [sam_ops.dense(t) for t in sam_grads]
        return d, [*(ops.cast(v, s.dtype) for v, s in zip(new_g_v, g_v)), ops.zeros_like(age)]

    def on_erm_step(self, grads, state):
        g_v, age = state[:-1], sam_ops.looksam_age(state[-1])
        alpha = sam_ops.looksam_alpha(self.alpha, age, self.max_age)
        d = sam_ops.looksam_reuse(grads, g_v, alpha, per_tensor=self.per_tensor)
        return d, [*g_v, age]

    def get_config(self):
        return {**super().get_config(), "alpha": self.alpha, "per_tensor": self.per_tensor,
                "max_age": self.max_age}


class ESAM(SAM):
    """ESAM (Du et al., 2022a): perturb a random ``beta`` share of the weight
    tensors (SWP, scaled by ``1/beta``) and take the second backward pass on the
    ``⌈gamma·|B|⌉`` samples whose loss rose most under ``e`` (SDS).

    The random tensor choice depends only on ``(seed, t)``: reproducible, equal
    on every replica, and resumed exactly with the step counter.
    """

    name = "esam"

    def __init__(self, rho=0.05, beta=0.6, gamma=0.5, seed=0, adaptive=False):
        super().__init__(rho=rho, adaptive=adaptive)
        self.beta = check_range("beta", beta, 0.0, 1.0, low_open=True)
        self.gamma = check_range("gamma", gamma, 0.0, 1.0, low_open=True)
        self.seed = check_seed(seed)

    @property
    def selects_samples(self):
        """SDS is on unless ``gamma`` keeps the whole batch."""
        return self.gamma < 1.0

    def swp_mask(self, num_tensors, step):
        """One Bernoulli(beta) draw per weight tensor, from ``(seed, t)``."""
        draws = sam_ops.uniform_from_counter((num_tensors,), self.seed, 2, step)
        return [draws[i] < self.beta for i in range(num_tensors)]

    def perturbation(self, grads, weights, step, grad_norm_sq=None):
        e = super().perturbation(grads, weights, step, grad_norm_sq)
        if self.beta >= 1.0:
            return e
        return sam_ops.swp_perturbation(e, self.swp_mask(len(e), step), self.beta)

    def get_config(self):
        return {**super().get_config(), "beta": self.beta, "gamma": self.gamma, "seed": self.seed}


class MSAM(Direction):
    """Momentum-SAM (Becker et al., 2024): ``e = -ρ·v/‖v‖`` from the optimizer's
    momentum ``v`` (gradient units), known before the step, so each step is one
    forward-backward pass, at ``w + e``; its gradient is applied at ``w``.

    ``v`` is read from the compiled optimizer: SGD's velocity ``m``
    (``m ← µm - lr·g``, so ``v = -m`` up to the learning rate and ``e = ρ·m/‖m‖``)
    or Adam's/AdamW's first moment (``v = m``). An optimizer without momentum has
    no ``v`` and is refused (``check_optimizer``). ρ is on its own scale, not
    SAM's: a step along the momentum raises the loss less than one along ``g``
    (default 0.6; the authors use 3 on CIFAR-100 where SAM uses 0.2).
    """

    name = "msam"

    def __init__(self, rho=0.6):
        self.rho = check_range("rho", rho, 0.0, low_open=True)

    @property
    def perturbs_before_pass(self):
        return True

    def perturbation(self, momentum, weights, step, grad_norm_sq=None):
        """``-ρ·m/‖m‖`` for the optimizer's momentum slots ``m`` (no gradient norm):
        ``e`` itself where the slot is ``v`` (Adam), ``-e`` where it is ``-v`` (SGD)."""
        return sam_ops.momentum_perturbation(momentum, self.rho)

    def on_sam_step(self, grads, sam_grads, state):
        raise ValueError("msam takes no second pass: its policy must be Never.")

    def on_erm_step(self, grads, state):
        return grads, state

    def get_config(self):
        return {"rho": self.rho}

    @staticmethod
    def check_optimizer(optimizer):
        """Refuse an optimizer whose state has no momentum to perturb along."""
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
        if isinstance(inner, keras.optimizers.SGD):
            if inner.momentum > 0.0:
                return
            raise ValueError(
                "method 'msam' perturbs along the optimizer's momentum, but the "
                f"optimizer is SGD with momentum={inner.momentum!r}: pass "
                "keras.optimizers.SGD(momentum=...) with momentum in (0, 1) "
                "(0.9 is usual), or Adam/AdamW."
            )
        if isinstance(inner, keras.optimizers.Adam):  # AdamW is an Adam
            return
        raise ValueError(
            "method 'msam' perturbs along the optimizer's momentum and reads it "
            "from keras.optimizers.SGD (momentum > 0), Adam or AdamW; the "
            f"optimizer is {type(inner).__name__}."
        )

    @classmethod
    def momentum(cls, optimizer, variables):
        """``(slots, sign)``: the optimizer's momentum slot per variable and the
        sign ``s`` with ``v = s·slot`` in gradient units.

        SGD keeps ``m ← µm - lr·g`` (``s = -1``), Adam and AdamW their first
        moment (``s = +1``). The sign is returned, not applied: the step folds
        it into ``w + e`` (``w - e(m)``, the same bits) instead of negating
        every slot, a pass over all the weights' worth of memory.
        """
        cls.check_optimizer(optimizer)
        inner = getattr(optimizer, "inner_optimizer", optimizer)
        sgd = isinstance(inner, keras.optimizers.SGD)
        slots = inner.momentums if sgd else compat.first_moments(inner)
        # read once: the norm and the scaling use the same tensor
        read = [tf.convert_to_tensor(slots[compat.variable_index(inner, v)].value) for v in variables]
        return read, -1.0 if sgd else 1.0


# --------------------------------------------------------------------------
# Which weights are perturbed
# --------------------------------------------------------------------------
def check_perturb_filter(value):
    """``perturb_filter`` as ``None``, one regular expression, or a list of them.

    Returned as given (a tuple becomes a list) so that ``get_config`` stays JSON.
    """
    if value is None:
        return None
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not patterns or not all(
        isinstance(p, str) and p for p in patterns
    ):
        raise ValueError(
            "perturb_filter must be None, a non-empty regular expression string "
            f"or a non-empty list of them, got {value!r}."
        )
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(
                f"perturb_filter pattern {pattern!r} is not a valid regular expression: {error}."
            ) from None
    return value if isinstance(value, str) else list(patterns)


def perturb_mask(perturb_filter, paths):
    """Which of the variables at ``paths`` get ``e``: those where some pattern
    is found by ``re.search`` (all of them without a filter).

    A pattern found in no path is an error that names it: a typo would
    otherwise silently turn SAM into ERM for the weights it meant.
    """
    if perturb_filter is None:
        return [True] * len(paths)
    patterns = [perturb_filter] if isinstance(perturb_filter, str) else perturb_filter
    unmatched = [p for p in patterns if not any(re.search(p, path) for path in paths)]
    if unmatched:
        raise ValueError(
            f"perturb_filter pattern(s) {unmatched} match no trainable variable; "
            f"the trainable variable paths are {list(paths)}."
        )
    return [any(re.search(p, path) for p in patterns) for path in paths]
