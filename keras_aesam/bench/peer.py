"""The Keras 2 peer row (tf_keras's ``SharpnessAwareMinimization``) and the framework probe."""

from __future__ import annotations

import datetime
import sys
from pathlib import Path

import numpy as np

from keras_aesam import recipe
from keras_aesam.bench.networks import build_network
from keras_aesam.bench.plan import PEER_TRAIN_MODE
from keras_aesam.bench.progress import epoch_callback
from keras_aesam.bench.records import _loadavg, _machine, _versions, _write_json
from keras_aesam.bench.worker import (
    _build_inner,
    _fit_and_evaluate,
    _load_data,
    _make_timer,
    _recipe,
    initial_weights,
)


def _twin(tf_keras, spec, out, data):
    """The tf_keras twin of the spec's network, with the seed's initial weights, checked on the probe batch.

    Returns ``(inner, parity)``: parity is the largest |logit difference| to the Keras 3 network.
    """
    weights, probe_x, probe_logits = initial_weights(out, spec, data)
    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(spec["seed"])
    inner = _build_inner(tf_keras, spec, data, weights)
    parity = float(np.max(np.abs(inner(probe_x, training=False).numpy() - probe_logits)))
    if not parity < 1e-3:
        raise RuntimeError(f"the tf_keras twin of {spec['network']} does not compute the same logits "
                           f"from the same weights (max |diff| {parity:g})")
    return inner, parity


def _run_peer(spec, out) -> dict:
    """The same SAM run through Keras 2's ``SharpnessAwareMinimization`` (tf_keras, imported explicitly).

    It trains with the same recipe (:mod:`keras_aesam.recipe`, built from ``tf_keras``). Its
    ``train_step`` leaves ``model.losses`` out of the gradient, so in the ``"l2"`` weight-decay
    mode the peer trains without weight decay; ``"decoupled"`` gives it the same decay as ours.
    """
    import keras
    import tensorflow as tf
    import tf_keras

    keras.utils.clear_session()
    keras.utils.set_random_seed(spec["seed"])  # as in _run_method: the same pipeline seeds
    data = _load_data(spec)
    inner, parity = _twin(tf_keras, spec, out, data)
    total_steps = recipe.total_steps(spec["epochs"], data.steps_per_epoch)
    cls = tf_keras.models.experimental.SharpnessAwareMinimization
    if spec["method"] == PEER_TRAIN_MODE:
        cls = _train_mode_sam(tf_keras)
    model = cls(inner, rho=spec["hyperparameters"]["rho"])
    recipe.compile_model(model, _recipe(spec), total_steps, tf_keras, jit_compile=False)
    epochs = epoch_callback(tf_keras, spec["run_id"], spec["epochs"])
    _, fields = _fit_and_evaluate(tf_keras, model, spec, data, [epochs])
    steps = int(model.optimizer.iterations.numpy())
    return {
        **fields,
        "steps": steps,
        "sam_steps": steps,  # by construction: a second pass on every step
        "sam_fraction": 1.0 if steps else None,
        "sam_fraction_per_epoch": None,
        "grad_evals": 2 * steps,
        "pass_equivalents": 2 * steps,
        "skipped_steps": None,
        "parameters": int(inner.count_params()),
        "resolved_hyperparameters": {"rho": model.rho, "num_batch_splits": model.num_batch_splits},
        "expected_sam_fraction": 1.0,
        "peer_logit_parity_max_abs": parity,
        "peer_regularization_losses": len(inner.losses),
        "framework": f"tf_keras {tf_keras.__version__}, tensorflow {tf.__version__}",
    }


def _train_mode_sam(tf_keras):
    """The peer with ``training=True`` on its first pass too (a diagnostic, not the peer).

    ``SharpnessAwareMinimization.train_step`` calls ``self(x)`` for the first pass
    and ``self(x, training=True)`` for the second; this subclass turns the
    unspecified ``training`` into ``True`` (``evaluate``/``predict`` pass ``False``
    explicitly). BatchNorm's moving statistics then move on both passes.
    """

    class TrainModeSAM(tf_keras.models.experimental.SharpnessAwareMinimization):
        def call(self, inputs, training=None, **kwargs):
            return self.model(inputs, training=True if training is None else training, **kwargs)

    return TrainModeSAM


# ---------------------------------------------------------- framework probe

#: (key, label) of the framework probe's configurations, in the order they run.
PROBE_CONFIGS = (
    ("k3_plain", "Keras 3, plain `fit` (no wrapper)"),
    ("k3_erm", "keras_aesam ERM"),
    ("k3_sam", "keras_aesam SAM"),
    ("tfk_plain", "tf_keras, plain `fit`"),
    ("tfk_plain_unfused_bn", "tf_keras, plain `fit`, BatchNormalization(fused=False)"),
    ("tfk_sam", "tf_keras SharpnessAwareMinimization (peer)"),
)


def framework_probe(out, network="resnet8", batch_size=128, steps=20, repeats=5, warmup=3, rho=0.05,
                    stream=sys.stdout) -> dict:
    """Per-step cost of one network in Keras 3 and tf_keras, with and without SAM, in one process.

    Every configuration is built from the same initial weights and fitted on the same
    cached batches (synthetic, Fashion-MNIST-shaped: the cost does not depend on the
    values); the configurations run interleaved, ``repeats`` times ``steps`` steps
    each, the first ``warmup`` steps of every fit dropped. Writes
    ``OUT/framework_probe.json`` and ``.md``; answers why the peer's step is cheaper
    (or not) than ours.
    """
    import keras
    import tensorflow as tf
    import tf_keras

    import keras_aesam

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size * 8, 28, 28, 1)).astype("float32")
    y = rng.integers(0, 10, batch_size * 8).astype("int32")
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).cache().repeat().prefetch(2)
    keras.utils.set_random_seed(0)
    weights = build_network(keras, network, num_classes=10, input_shape=(28, 28, 1)).get_weights()

    probe_recipe = recipe.Recipe(lr=0.01, schedule="constant")  # the cost does not depend on the recipe

    def make(key):
        K = tf_keras if key.startswith("tfk") else keras
        options = {"bn_options": {"fused": False}} if key == "tfk_plain_unfused_bn" else {}
        inner = build_network(K, network, num_classes=10, input_shape=(28, 28, 1), **options)
        inner.set_weights(weights)
        if key in ("k3_plain", "tfk_plain", "tfk_plain_unfused_bn"):
            model = inner
        elif key == "tfk_sam":
            model = tf_keras.models.experimental.SharpnessAwareMinimization(inner, rho=rho)
        else:
            model = keras_aesam.wrap(inner, method=key.split("_", 1)[1], rho=rho)
        recipe.compile_model(model, probe_recipe, steps, K, jit_compile=False)
        model.fit(ds, steps_per_epoch=warmup, epochs=1, verbose=0)  # tracing
        return model, _make_timer(K)

    keys = [k for k, _ in PROBE_CONFIGS]
    models = {k: make(k) for k in keys}
    load_start = _loadavg()
    wall, cpu = _probe_rounds(models, ds, repeats, steps, warmup)
    result = {
        "network": network, "batch_size": batch_size, "steps": steps, "repeats": repeats, "warmup": warmup,
        "loadavg_start": load_start, "loadavg_end": _loadavg(), "machine": _machine(), "versions": _versions(),
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "configs": {k: {"label": label, "n": len(wall[k]), "wall_ms": 1000 * float(np.mean(wall[k])),
                        "cpu_ms": 1000 * float(np.mean(cpu[k]))} for k, label in PROBE_CONFIGS},
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "framework_probe.json", result)
    (out / "framework_probe.md").write_text(_probe_markdown(result))
    print(_probe_markdown(result), file=stream, flush=True)
    return result


def _probe_rounds(models, ds, repeats, steps, warmup):
    """``(wall, cpu)``: per configuration, the step times of ``repeats`` interleaved fits, warm-up left out."""
    wall = {k: [] for k in models}
    cpu = {k: [] for k in models}
    for _ in range(repeats):
        for key in models:
            model, timer = models[key]
            timer.step_seconds.clear()
            timer.step_cpu_seconds.clear()
            timer.epoch_seconds.clear()
            model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
            wall[key] += timer.step_seconds[0][warmup:]
            cpu[key] += timer.step_cpu_seconds[0][warmup:]
    return wall, cpu


def _probe_markdown(result):
    c = result["configs"]
    base = {"k3": c["k3_plain"], "tfk": c["tfk_plain"]}
    lines = [
        f"Framework probe: {result['network']}, batch {result['batch_size']}, {result['repeats']} interleaved "
        f"rounds of {result['steps']} steps per configuration (first {result['warmup']} of each dropped), one "
        f"process, finished {result['finished']}, load average {result['loadavg_start']} → "
        f"{result['loadavg_end']}.",
        "",
        "| configuration | n | wall ms/step | CPU ms/step | CPU / Keras 3 plain | CPU / same framework's plain |",
        "|---|---|---|---|---|---|",
    ]
    for key, label in PROBE_CONFIGS:
        row = c[key]
        own = base["tfk" if key.startswith("tfk") else "k3"]
        lines.append(f"| {label} | {row['n']} | {row['wall_ms']:.0f} | {row['cpu_ms']:.0f} | "
                     f"{row['cpu_ms'] / c['k3_plain']['cpu_ms']:.2f} | {row['cpu_ms'] / own['cpu_ms']:.2f} |")
    return "\n".join(lines) + "\n"
