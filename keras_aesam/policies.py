"""*When* to take a SAM step: the policies.

A policy is a small object with hyperparameters and an explicit state (a dict of
float32 scalars, kept by the model in non-trainable variables). ``decide`` is a
pure function ``(state, ‖g‖², t, T) -> (use_sam, new_state, logs)``; the model
runs it once per step, after the ERM gradient and before the branch.

=================  ====================================  =======================
policy             decides SAM at step ``t`` when         paper's method(s)
=================  ====================================  =======================
``Always``         always                                 SAM, ESAM
``Never``          never                                  ERM
``Bernoulli(p)``   a seeded coin with ``P(heads) = p``    SS-SAM
``Periodic(k)``    ``t mod k == 0``                       LookSAM
``Adaptive``       ``‖g‖² ≥ µ + c_t·σ`` (Algorithm 1)     AE-SAM, AE-LookSAM
=================  ====================================  =======================
"""

from keras import ops

from keras_aesam import ops as sam_ops
from keras_aesam.validation import check_in_open_interval, check_int, check_range, check_seed


class Policy:
    """Base class. Subclasses set ``name`` and implement ``decide``."""

    name = None
    #: ``True``/``False`` when the decision is known when tracing (no ``tf.cond``).
    static_decision = None
    #: Whether ``decide`` uses the total number of steps ``T``.
    needs_total_steps = False

    def state_spec(self):
        """Initial values of the policy's state, by name (float32 scalars)."""
        return {}

    def decide(self, state, stat, step, total_steps):
        raise NotImplementedError

    def expected_sam_fraction(self, total_steps=None):
        """The share of SAM steps this policy aims at (for reports), or None."""
        return None

    def get_config(self):
        return {}

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"


class Always(Policy):
    """Every step is a SAM step (SAM, ESAM)."""

    name = "always"
    static_decision = True

    def decide(self, state, stat, step, total_steps):
        return ops.convert_to_tensor(True), state, {}

    def expected_sam_fraction(self, total_steps=None):
        return 1.0


class Never(Policy):
    """No step is a SAM step (ERM)."""

    name = "never"
    static_decision = False

    def decide(self, state, stat, step, total_steps):
        return ops.convert_to_tensor(False), state, {}

    def expected_sam_fraction(self, total_steps=None):
        return 0.0


class Bernoulli(Policy):
    """SAM with probability ``p``, independently at each step (SS-SAM)."""

    name = "bernoulli"

    def __init__(self, p=0.5, seed=0):
        self.p = check_range("p", p, 0.0, 1.0, low_open=True)
        self.seed = check_seed(seed)

    def decide(self, state, stat, step, total_steps):
        return sam_ops.uniform_from_counter((), self.seed, 1, step) < self.p, state, {}

    def expected_sam_fraction(self, total_steps=None):
        return self.p

    def get_config(self):
        return {"p": self.p, "seed": self.seed}


class Periodic(Policy):
    """A SAM step every ``k`` steps, at ``t mod k == 0`` (LookSAM)."""

    name = "periodic"

    def __init__(self, k=5):
        self.k = check_int("k", k, low=1)

    def decide(self, state, stat, step, total_steps):
        return ops.equal(ops.mod(ops.cast(step, "int64"), self.k), 0), state, {}

    def expected_sam_fraction(self, total_steps=None):
        return 1.0 / self.k

    def get_config(self):
        return {"k": self.k}


class Adaptive(Policy):
    """SAM where ``‖g‖²`` is large against its running statistics (Algorithm 1).

    ``µ`` and ``σ²`` are EMAs of ``s = ‖g‖²`` (eqs. 4–5, forgetting rate
    ``delta``); SAM is used when ``s ≥ µ + c_t·σ`` with ``c_t`` linear from
    ``lambda2`` at the first step to ``lambda1`` at step ``T`` (kept after).
    ``target_sam_fraction`` replaces both lambdas by the pair with spread
    ``spread`` whose expected SAM fraction under a normal ``s`` is the target.
    """

    name = "adaptive"
    needs_total_steps = True

    def __init__(
        self,
        lambda1=None,
        lambda2=None,
        delta=0.9,
        target_sam_fraction=None,
        default_lambdas=(-1.0, 1.0),
    ):
        self.delta = check_in_open_interval("delta", delta, 0.0, 1.0)
        if target_sam_fraction is not None:
            if lambda1 is not None or lambda2 is not None:
                raise ValueError(
                    "target_sam_fraction sets lambda1 and lambda2: pass either "
                    "target_sam_fraction or the lambdas, not both."
                )
            target_sam_fraction = check_in_open_interval(
                "target_sam_fraction", target_sam_fraction, 0.0, 1.0
            )
            spread = default_lambdas[1] - default_lambdas[0]
            lambda1, lambda2 = sam_ops.lambdas_for_sam_fraction(target_sam_fraction, spread)
        else:
            lambda1 = default_lambdas[0] if lambda1 is None else lambda1
            lambda2 = default_lambdas[1] if lambda2 is None else lambda2
        self.target_sam_fraction = target_sam_fraction
        self.lambda1 = check_range("lambda1", lambda1)
        self.lambda2 = check_range("lambda2", lambda2)
        if self.lambda1 > self.lambda2:
            raise ValueError(
                "lambda1 must be <= lambda2 (c_t falls from lambda2 to lambda1), "
                f"got lambda1={self.lambda1!r} > lambda2={self.lambda2!r}."
            )

    def state_spec(self):
        return {"ema_mean": 0.0, "ema_var": sam_ops.SIGMA2_INIT}

    def decide(self, state, stat, step, total_steps):
        mean, var = sam_ops.ema_moments(state["ema_mean"], state["ema_var"], stat, self.delta)
        c = sam_ops.threshold_coefficient(step, total_steps, self.lambda1, self.lambda2)
        std = ops.sqrt(var)
        threshold = mean + c * std
        logs = {
            "grad_norm_sq": stat,
            "ema_mean": mean,
            "ema_std": std,
            "sam_threshold": threshold,
        }
        return ops.greater_equal(stat, threshold), {"ema_mean": mean, "ema_var": var}, logs

    def expected_sam_fraction(self, total_steps=None):
        return sam_ops.expected_sam_fraction(self.lambda1, self.lambda2)

    def get_config(self):
        if self.target_sam_fraction is not None:
            return {"delta": self.delta, "target_sam_fraction": self.target_sam_fraction}
        return {"lambda1": self.lambda1, "lambda2": self.lambda2, "delta": self.delta}


__all__ = ["Policy", "Always", "Never", "Bernoulli", "Periodic", "Adaptive"]
