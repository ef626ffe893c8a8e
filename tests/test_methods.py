"""The named methods: same seed same run for SS-SAM, any policy with any
direction, every name and class, the paper's defaults."""


import keras
import numpy as np
import pytest

import keras_aesam
from keras_aesam import directions, policies
from test_model import compile_sgd, small_net, toy_data


def test_ss_sam_same_seed_same_decisions_and_weights():
    x, y = toy_data(n=128)
    init = small_net().get_weights()

    def run(seed):
        inner = small_net()
        inner.set_weights(init)
        model = compile_sgd(keras_aesam.wrap(inner, method="ss_sam", seed=seed))
        h = model.fit(x, y, epochs=3, batch_size=16, shuffle=False, verbose=0).history
        return h["sam_fraction"], inner.get_weights()

    (f1, w1), (f2, w2), (f3, _) = run(0), run(0), run(1)
    assert f1 == f2 and f1 != f3
    for a, b in zip(w1, w2):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------
# Every policy with every direction
# --------------------------------------------------------------------------
ALL_POLICIES = [
    policies.Never(), policies.Always(), policies.Bernoulli(0.5), policies.Periodic(3), policies.Adaptive(),
    policies.Late(1 / 3), policies.ScheduledCoin(0.5), policies.Quantile(0.5),
]
ALL_DIRECTIONS = [
    directions.SAM(rho=0.05),
    directions.SAM(rho=0.5, adaptive=True),
    directions.LookSAM(alpha=0.5),
    directions.LookSAM(per_tensor=True),
    directions.ESAM(beta=0.5, gamma=0.5),
]


@pytest.mark.parametrize("policy", ALL_POLICIES, ids=lambda p: p.name)
@pytest.mark.parametrize("direction", ALL_DIRECTIONS, ids=repr)
def test_any_policy_with_any_direction_trains(policy, direction):
    # Eager keeps 25 combinations fast; graph mode and XLA are covered per method.
    model = keras_aesam.SharpnessAwareModel(inner=small_net(), policy=policy, direction=direction)
    compile_sgd(model, run_eagerly=True)
    x, y = toy_data(n=48)
    h = model.fit(x, y, epochs=1, batch_size=16, verbose=0).history
    assert np.isfinite(h["loss"][0]) and h["skipped_steps"] == [0.0]
    expected = {"never": 0.0, "always": 1.0, "periodic": 1 / 3, "late": 1 / 3}.get(policy.name)
    if expected is not None:
        assert h["sam_fraction"][0] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", sorted(keras_aesam.METHODS))
def test_every_named_method_and_class(name):
    cls = {
        "erm": keras_aesam.ERMModel, "sam": keras_aesam.SAMModel, "esam": keras_aesam.ESAMModel,
        "ss_sam": keras_aesam.SSSAMModel, "looksam": keras_aesam.LookSAMModel,
        "ae_sam": keras_aesam.AESAMModel, "ae_looksam": keras_aesam.AELookSAMModel,
        "late_sam": keras_aesam.LateSAMModel, "rst": keras_aesam.RSTModel,
        "quantile_sam": keras_aesam.QuantileSAMModel, "msam": keras_aesam.MSAMModel,
    }[name]
    assert cls.method == name
    wrapped = keras_aesam.wrap(small_net(), method=name)
    inputs = keras.Input((6,))
    built = cls(inputs, keras.layers.Dense(3)(inputs))
    assert wrapped.hyperparameters == built.hyperparameters


def test_paper_defaults():
    hp = lambda m: keras_aesam.wrap(small_net(), method=m).hyperparameters
    assert hp("ss_sam")["p"] == 0.5
    assert hp("looksam")["k"] == 5 and hp("looksam")["alpha"] == 0.7
    assert (hp("ae_sam")["lambda1"], hp("ae_sam")["lambda2"]) == (-1.0, 1.0)
    assert (hp("ae_looksam")["lambda1"], hp("ae_looksam")["lambda2"]) == (0.0, 2.0)
    assert hp("esam")["beta"] == 0.6 and hp("esam")["gamma"] == 0.5
    assert all(hp(m)["rho"] == 0.05 for m in keras_aesam.METHODS if m != "msam")
    assert hp("msam")["rho"] == keras_aesam.directions.MSAM().rho  # its own scale
    assert hp("ae_sam")["delta"] == 0.9
