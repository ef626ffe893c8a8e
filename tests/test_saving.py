"""Saving: .keras round trip, SavedModel export, tf.train.Checkpoint, configs."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_aesam
from keras_aesam import directions, policies
from test_model import SubclassedNet, compile_sgd, small_net, toy_data


def as_json(config):
    """Configs compare as they are stored: tuples and lists are the same there."""
    return json.loads(json.dumps(config))


def trained(method="ae_sam", epochs=2, **hp):
    model = compile_sgd(keras_aesam.wrap(small_net(dropout=0.1), method=method, **hp))
    x, y = toy_data()
    model.fit(x, y, epochs=epochs, batch_size=16, verbose=0)
    return model, x, y


def test_keras_file_round_trip_restores_method_hyperparameters_and_state(tmp_path):
    model, x, y = trained("ae_sam", rho=0.07, lambda1=-0.5, lambda2=1.5, delta=0.8)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded) is keras_aesam.SharpnessAwareModel
    assert loaded.method == "ae_sam"
    assert loaded.hyperparameters == model.hyperparameters
    assert loaded.hyperparameters["rho"] == 0.07 and loaded.hyperparameters["delta"] == 0.8
    assert loaded.policy_state == model.policy_state
    assert loaded.policy_state["step"] == 8 and loaded.policy_state["ema_mean"] > 0
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


@pytest.mark.parametrize("cls", [keras_aesam.AESAMModel, keras_aesam.AELookSAMModel])
def test_named_functional_classes_round_trip(tmp_path, cls):
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(3)(keras.layers.Dense(8, activation="relu")(inputs))
    model = compile_sgd(cls(inputs, outputs, rho=0.03))
    x, y = toy_data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    model.save(tmp_path / "f.keras")
    loaded = keras.models.load_model(tmp_path / "f.keras")
    assert type(loaded) is cls
    assert as_json(loaded.get_config()) == as_json(model.get_config())
    assert loaded.policy_state == model.policy_state
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)  # includes LookSAM's stored g_v


def test_subclassed_model_round_trip(tmp_path):
    model = compile_sgd(SubclassedNet(rho=0.05, lambda1=-2.0))
    x, y = toy_data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    model.save(tmp_path / "s.keras")
    loaded = keras.models.load_model(tmp_path / "s.keras", custom_objects={"SubclassedNet": SubclassedNet})
    assert loaded.hyperparameters["lambda1"] == -2.0
    assert loaded.policy_state == model.policy_state
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), rtol=1e-6)


def test_custom_policy_direction_pair_round_trip(tmp_path):
    model = keras_aesam.SharpnessAwareModel(
        inner=small_net(),
        policy=policies.Bernoulli(p=0.3, seed=4),
        direction=directions.LookSAM(rho=0.1, alpha=0.2, per_tensor=True),
    )
    compile_sgd(model)
    x, y = toy_data()
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    model.save(tmp_path / "c.keras")
    loaded = keras.models.load_model(tmp_path / "c.keras")
    assert as_json(loaded.get_config()) == as_json(model.get_config())
    assert isinstance(loaded.policy, policies.Bernoulli) and loaded.policy.p == 0.3
    assert isinstance(loaded.direction, directions.LookSAM) and loaded.direction.per_tensor


def test_config_naming_the_direction_interface_is_refused():
    """``Direction`` is the abstract interface, not a rule: a config naming it does not load."""
    config = keras_aesam.SharpnessAwareModel(
        inner=small_net(), policy=policies.Always(), direction=directions.SAM(rho=0.2, adaptive=True)
    ).get_config()
    config["direction"]["class_name"] = "Direction"
    with pytest.raises(ValueError, match="Unknown Direction 'Direction'"):
        keras_aesam.SharpnessAwareModel.from_config(config)
    with pytest.raises(TypeError):
        directions.Direction()  # the interface alone is no rule


def test_loaded_model_continues_training(tmp_path):
    model, x, y = trained("ae_looksam")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    loaded.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert loaded.policy_state["step"] == 12


def test_export_serves_the_same_predictions(tmp_path):
    model, x, _ = trained("ae_sam")
    model.export(str(tmp_path / "sm"), verbose=False)
    served = tf.saved_model.load(str(tmp_path / "sm"))
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), model.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_export_of_functional_and_subclassed(tmp_path):
    x, y = toy_data()
    inputs = keras.Input((6,))
    functional = compile_sgd(keras_aesam.SAMModel(inputs, keras.layers.Dense(3)(inputs)))
    subclassed = compile_sgd(SubclassedNet())
    for i, model in enumerate((functional, subclassed)):
        model.fit(x, y, epochs=1, batch_size=16, verbose=0)
        model.export(str(tmp_path / f"sm{i}"), verbose=False)
        served = tf.saved_model.load(str(tmp_path / f"sm{i}"))
        np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), model.predict(x, verbose=0),
                                   rtol=1e-5, atol=1e-6)


def test_tf_checkpoint_carries_policy_state(tmp_path):
    model, x, y = trained("ae_sam")
    state = model.policy_state
    ckpt = tf.train.Checkpoint(model=model)
    path = ckpt.save(str(tmp_path / "ckpt"))
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    assert model.policy_state != state
    ckpt.restore(path).assert_existing_objects_matched()
    assert model.policy_state == state


def test_save_weights_round_trip_includes_state(tmp_path):
    model, x, y = trained("ae_looksam")
    model.save_weights(tmp_path / "w.weights.h5")
    fresh = compile_sgd(keras_aesam.wrap(small_net(dropout=0.1), method="ae_looksam"))
    fresh.load_weights(tmp_path / "w.weights.h5")
    assert fresh.policy_state == model.policy_state
    for a, b in zip(fresh.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)
