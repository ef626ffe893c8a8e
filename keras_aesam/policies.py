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
``Late``           the last ``f·T`` steps                 late SAM (rival)
``ScheduledCoin``  a coin with ``P(heads) = p_t``         RST (rival)
``Quantile``       ``‖g‖²`` above its running            quantile SAM (ours)
                   ``(1 - f_t)`` quantile
=================  ====================================  =======================

The budgeted policies (``Bernoulli``, ``Adaptive``, ``Late``, ``ScheduledCoin``,
``Quantile``) all take ``target_sam_fraction``: the share of SAM steps to aim for.
"""

from keras import ops

from keras_aesam import ops as sam_ops
from keras_aesam.validation import check_in_open_interval, check_int, check_range, check_seed


class Policy:
    """Base class. Subclasses set ``name`` and implement ``decide``."""

    name = None
    #: Every step is a SAM step, known when tracing.
    always_sam = False
    #: No step is a SAM step, known when tracing: the model builds no second
    #: pass, no ``tf.cond`` and no sharpness metric.
    never_sam = False
    #: Whether ``decide`` uses the total number of steps ``T``.
    needs_total_steps = False

    def state_spec(self):
        """Initial values of the policy's state, by name (float32 scalars)."""
        return {}

    def decide(self, state, grad_norm_sq, step, total_steps):
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
    always_sam = True

    def decide(self, state, grad_norm_sq, step, total_steps):
        return ops.convert_to_tensor(True), state, {}

    def expected_sam_fraction(self, total_steps=None):
        return 1.0


class Never(Policy):
    """No step is a SAM step (ERM)."""

    name = "never"
    never_sam = True

    def decide(self, state, grad_norm_sq, step, total_steps):
        return ops.convert_to_tensor(False), state, {}

    def expected_sam_fraction(self, total_steps=None):
        return 0.0


class Bernoulli(Policy):
    """SAM with probability ``p``, independently at each step (SS-SAM)."""

    name = "bernoulli"

    def __init__(self, p=None, seed=0, target_sam_fraction=None):
        if p is not None and target_sam_fraction is not None:
            raise ValueError(
                "p and target_sam_fraction are the same thing for this policy: pass one."
            )
        if target_sam_fraction is not None:
            p = _check_target(target_sam_fraction)
        self.p = check_range("p", 0.5 if p is None else p, 0.0, 1.0, low_open=True)
        self.seed = check_seed(seed)

    def decide(self, state, grad_norm_sq, step, total_steps):
        draw = sam_ops.uniform_from_counter((), self.seed, sam_ops.STREAM_COIN, step)
        return draw < self.p, state, {}

    def expected_sam_fraction(self, total_steps=None):
        return self.p

    def get_config(self):
        return {"p": self.p, "seed": self.seed}


class Periodic(Policy):
    """A SAM step every ``k`` steps, at ``t mod k == 0`` (LookSAM)."""

    name = "periodic"

    def __init__(self, k=5):
        self.k = check_int("k", k, low=1)

    def decide(self, state, grad_norm_sq, step, total_steps):
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

    def decide(self, state, grad_norm_sq, step, total_steps):
        mean, var = sam_ops.ema_moments(state["ema_mean"], state["ema_var"], grad_norm_sq, self.delta)
        c = sam_ops.threshold_coefficient(step, total_steps, self.lambda1, self.lambda2)
        std = ops.sqrt(var)
        threshold = mean + c * std
        logs = {
            "grad_norm_sq": grad_norm_sq,
            "ema_mean": mean,
            "ema_std": std,
            "sam_threshold": threshold,
        }
        return ops.greater_equal(grad_norm_sq, threshold), {"ema_mean": mean, "ema_var": var}, logs

    def expected_sam_fraction(self, total_steps=None):
        return sam_ops.expected_sam_fraction(self.lambda1, self.lambda2)

    def get_config(self):
        if self.target_sam_fraction is not None:
            return {"delta": self.delta, "target_sam_fraction": self.target_sam_fraction}
        return {"lambda1": self.lambda1, "lambda2": self.lambda2, "delta": self.delta}


def _check_target(value, default=0.5):
    """``target_sam_fraction``: a share of SAM steps in (0, 1), as for ``Adaptive``."""
    value = default if value is None else value
    return check_in_open_interval("target_sam_fraction", value, 0.0, 1.0)


class Late(Policy):
    """ERM first, then SAM for the last ``target_sam_fraction`` of the ``T`` steps.

    SAM's benefit concentrates late in training (Zhou et al., ICLR 2025), which
    makes this the simplest rival at a given budget. Exactly ``round(f·T)`` SAM
    steps; steps past ``T`` stay SAM steps.
    """

    name = "late"
    needs_total_steps = True

    def __init__(self, target_sam_fraction=None):
        self.target_sam_fraction = _check_target(target_sam_fraction)

    def decide(self, state, grad_norm_sq, step, total_steps):
        start = sam_ops.late_start(total_steps, self.target_sam_fraction)
        return ops.cast(step, "float32") >= start, state, {}

    def expected_sam_fraction(self, total_steps=None):
        return self.target_sam_fraction

    def get_config(self):
        return {"target_sam_fraction": self.target_sam_fraction}


class ScheduledCoin(Policy):
    """A seeded coin whose probability ``p_t`` runs linearly from ``p_start`` to
    ``p_end`` over ``T`` steps (RST, Zhao et al., 2022); its mean is the budget.

    Give either ``target_sam_fraction`` with a ``schedule`` shape
    (``"linear"``: the steepest rising ramp with that mean; ``"constant"``:
    SS-SAM), or both endpoints.
    """

    name = "scheduled_coin"
    needs_total_steps = True
    SCHEDULES = ("linear", "constant")

    def __init__(self, target_sam_fraction=None, schedule="linear", p_start=None, p_end=None, seed=0):
        if schedule not in self.SCHEDULES:
            raise ValueError(f"schedule must be one of {self.SCHEDULES}, got {schedule!r}.")
        if p_start is not None:
            p_start = check_range("p_start", p_start, 0.0, 1.0)
        if p_end is not None:
            p_end = check_range("p_end", p_end, 0.0, 1.0)
        if p_start is not None or p_end is not None:
            if target_sam_fraction is not None or p_start is None or p_end is None:
                raise ValueError(
                    "Pass both p_start and p_end, or target_sam_fraction (with schedule), not a mix."
                )
            if p_start + p_end <= 0.0:
                raise ValueError("p_start and p_end are both 0: the coin would never take a SAM step.")
            self.target_sam_fraction = None
        else:
            self.target_sam_fraction = _check_target(target_sam_fraction)
            p_start, p_end = sam_ops.coin_endpoints(self.target_sam_fraction, schedule)
        self.schedule = schedule
        self.p_start, self.p_end = float(p_start), float(p_end)
        self.seed = check_seed(seed)

    def decide(self, state, grad_norm_sq, step, total_steps):
        p = sam_ops.linear_schedule(step, total_steps, self.p_start, self.p_end)
        draw = sam_ops.uniform_from_counter((), self.seed, sam_ops.STREAM_COIN, step)
        return draw < p, state, {"sam_probability": p}

    def expected_sam_fraction(self, total_steps=None):
        return 0.5 * (self.p_start + self.p_end)

    def get_config(self):
        if self.target_sam_fraction is not None:
            return {"target_sam_fraction": self.target_sam_fraction,
                    "schedule": self.schedule, "seed": self.seed}
        return {"p_start": self.p_start, "p_end": self.p_end, "seed": self.seed}


class Quantile(Policy):
    """SAM when ``log ‖g‖²`` sits above a running ``(1 - f_t)`` quantile of its
    deviation from its EMA: AE-SAM's rule without the normal assumption.

    ``u = log ‖g‖²``; ``m`` is an EMA of ``u`` (rate ``delta``) and ``z = u - m``.
    A SAM step is taken when ``z ≥ q``; then ``q`` moves by
    ``step_size · a · (1[z ≥ q] - f'_t)``, with ``a`` an EMA of ``|z|`` that gives
    the step its scale. Because ``q`` stays bounded, the share of SAM steps
    follows ``f'_t`` whatever the shape of ``‖g‖²``'s distribution.
    ``f_t = 1 - Φ(c_t)`` with ``c_t`` AE-SAM's linear coefficient for the
    ``(λ1, λ2)`` of spread 2 whose mean is ``target_sam_fraction``, so the
    budget, like AE-SAM's, grows over training. ``f'_t`` paces it: the surplus
    of SAM steps taken so far over ``Σ f_t`` is spread over the steps left,
    so the run ends on its budget even while ``‖g‖²``'s distribution drifts.
    """

    name = "quantile"
    needs_total_steps = True

    def __init__(self, target_sam_fraction=None, delta=0.9, step_size=0.3, spread=2.0):
        self.target_sam_fraction = _check_target(target_sam_fraction)
        self.delta = check_in_open_interval("delta", delta, 0.0, 1.0)
        self.step_size = check_range("step_size", step_size, 0.0, low_open=True)
        self.spread = check_range("spread", spread, 0.0)
        self.lambda1, self.lambda2 = sam_ops.lambdas_for_sam_fraction(
            self.target_sam_fraction, self.spread
        )

    def state_spec(self):
        return {"log_mean": 0.0, "log_absdev": 1.0, "quantile": 0.0, "surplus": 0.0, "seen": 0.0}

    def fraction_at(self, step, total_steps):
        """``f_t``: the share of SAM steps aimed at around step ``t``."""
        c = sam_ops.threshold_coefficient(step, total_steps, self.lambda1, self.lambda2)
        return sam_ops.normal_upper_tail(c)

    def decide(self, state, grad_norm_sq, step, total_steps):
        u = ops.log(ops.maximum(ops.cast(grad_norm_sq, "float32"), 1e-30))
        first = state["seen"] < 0.5
        mean = ops.where(first, u, self.delta * state["log_mean"] + (1.0 - self.delta) * u)
        z = u - mean
        absdev = ops.where(
            first, state["log_absdev"],
            self.delta * state["log_absdev"] + (1.0 - self.delta) * ops.abs(z),
        )
        target = self.fraction_at(step, total_steps)
        paced = sam_ops.paced_fraction(target, state["surplus"], step, total_steps)
        above = ops.greater_equal(z, state["quantile"])
        quantile = sam_ops.quantile_update(
            state["quantile"], above, paced, self.step_size * absdev
        )
        surplus = state["surplus"] + ops.cast(above, "float32") - target
        new_state = {"log_mean": mean, "log_absdev": absdev, "quantile": quantile,
                     "surplus": surplus, "seen": ops.ones_like(state["seen"])}
        logs = {
            "grad_norm_sq": grad_norm_sq,
            "sam_threshold": ops.exp(mean + state["quantile"]),
            "sam_target_fraction": paced,
        }
        return above, new_state, logs

    def expected_sam_fraction(self, total_steps=None):
        return self.target_sam_fraction

    def get_config(self):
        return {"target_sam_fraction": self.target_sam_fraction, "delta": self.delta,
                "step_size": self.step_size, "spread": self.spread}


__all__ = ["Policy", "Always", "Never", "Bernoulli", "Periodic", "Adaptive",
           "Late", "ScheduledCoin", "Quantile"]
