"""Seconds per step of a profile's rows, measured side by side in one process.

A run's own fit time says little about its method's cost: the runs of a
profile are spread over hours and share the machine with whatever else runs.
So the cost axis in seconds comes from a separate measurement. Every row's
model (built from its spec on the spec's network and data, traced once) is
fitted for a few steps from its initial state, once per round, the rows in
alternating order from round to round; a row's figure is the median over
rounds of its mean step time over ERM's mean step time in the same round, so
slow drift of the machine cancels.

A row's SAM and non-SAM steps are timed apart (which step was which is read
from the ``sam_fraction`` log), because the share of SAM steps in a short timed
fit is not the share of a whole run: a row's seconds per step at its run's SAM
share ``ζ`` is ``(1 − ζ)·t_plain + ζ·t_sam`` (:func:`seconds_per_step`).
"""

from __future__ import annotations

import sys
import time

import numpy as np


class StepTimer:
    """Wall and process CPU time of every training step, and whether it was a SAM step.

    A Keras callback (made by :func:`step_timer`). The SAM flag of step ``k`` is
    the increase of ``round(sam_fraction·(k+1))``, the epoch's SAM-step count;
    it is ``None`` for models without the log.
    """

    def __init__(self):
        self.seconds = []
        self.cpu_seconds = []
        self.sam = []
        self._start = 0.0
        self._cpu_start = 0.0
        self._sam_count = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._sam_count = 0

    def on_train_batch_begin(self, batch, logs=None):
        self._cpu_start = time.process_time()
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)
        self.cpu_seconds.append(time.process_time() - self._cpu_start)
        fraction = (logs or {}).get("sam_fraction")
        if fraction is None:
            self.sam.append(None)
            return
        count = int(round(float(fraction) * (batch + 1)))
        step_was_sam = count - self._sam_count
        if step_was_sam not in (0, 1):
            raise RuntimeError(f"sam_fraction {fraction} at batch {batch} does not match a running mean of SAM "
                               "flags (is the log not reset each epoch?)")
        self._sam_count = count
        self.sam.append(bool(step_was_sam))


def step_timer():
    """A :class:`StepTimer` that is a ``keras.callbacks.Callback``."""
    import keras

    class _Timer(StepTimer, keras.callbacks.Callback):
        def __init__(self):
            keras.callbacks.Callback.__init__(self)
            StepTimer.__init__(self)

    return _Timer()


def split_means(seconds, sam):
    """``(mean non-SAM step, mean SAM step)`` of the timed steps; ``None`` for a kind with no step."""
    seconds = np.asarray(seconds, dtype=float)
    flags = np.array([bool(s) for s in sam], dtype=bool)
    plain = float(seconds[~flags].mean()) if (~flags).any() else None
    sam_mean = float(seconds[flags].mean()) if flags.any() else None
    return plain, sam_mean


def seconds_per_step(timing, zeta):
    """A row's seconds per step at SAM share ``zeta``: ``(1 − ζ)·t_plain + ζ·t_sam``.

    ``None`` when the share needs a kind of step the timing never saw.
    """
    plain, sam = timing.get("plain"), timing.get("sam")
    if zeta > 0 and sam is None or zeta < 1 and plain is None:
        return None
    return (1.0 - zeta) * (plain or 0.0) + zeta * (sam or 0.0)


class TimedFits:
    """A compiled model, traced once, put back to its initial state before each timed fit.

    Before every fit all of its variables (weights, BatchNorm statistics,
    Dropout seeds, the policy's state) and all of its optimizer's (step count,
    momenta) get their initial values back, so each fit times the same steps.
    """

    def __init__(self, model):
        self.model = model
        model.optimizer.build(model.trainable_variables)
        variables = list(model.variables) + list(model.optimizer.variables)
        self._initial = [(v, v.numpy()) for v in variables]

    def fit(self, dataset, steps):
        """Reset, then fit ``steps`` steps of ``dataset``; the :class:`StepTimer` of every step."""
        for variable, value in self._initial:
            variable.assign(value)
        timer = step_timer()
        self.model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer], shuffle=False)
        return timer


def _timed_row(spec, build, data, weights, total_steps):
    """``spec``'s compiled model around a fresh network loaded with ``weights``, as :class:`TimedFits`."""
    import keras

    from keras_aesam.bench.networks import build_network

    inner = build_network(keras, spec["network"], num_classes=data.num_classes, input_shape=data.input_shape)
    inner.set_weights(weights)
    return TimedFits(build(spec, inner, total_steps))


def time_rows(specs, build, steps=60, rounds=5, warmup=10, stream=sys.stderr):
    """Time every spec's step (the first spec must be ERM's), interleaved over ``rounds``.

    ``build(spec, inner, total_steps)`` is the profile's compiled model of a spec
    around the network ``inner``.

    Returns ``{label: {"plain": s, "sam": s, "plain_ratio": r, "sam_ratio": r}}``:
    seconds of a non-SAM and of a SAM step (ERM's median over rounds times the
    row's median ratio to ERM), ``None`` for a kind of step the row never took.
    """
    import keras

    from keras_aesam import data as data_module
    from keras_aesam.bench.networks import build_network

    if specs[0]["method"] != "erm":
        raise ValueError("the first spec to time must be ERM's (the reference of every ratio)")
    first = specs[0]
    keras.utils.set_random_seed(first["seed"])
    data = data_module.get_dataset(first["dataset"], batch_size=first["batch_size"], seed=first["seed"],
                                   label_noise=first["noise"], train_size=first["train_size"],
                                   validation_fraction=first["validation_fraction"])
    weights = build_network(keras, first["network"], num_classes=data.num_classes,
                            input_shape=data.input_shape).get_weights()
    rows = [_timed_row(spec, build, data, weights, warmup + steps) for spec in specs]
    train = data.train.repeat()
    ratios = {s["label"]: {"plain": [], "sam": []} for s in specs}
    erm_seconds = []
    for r in range(rounds):
        order = list(zip(specs, rows))
        order = order if r % 2 == 0 else order[:1] + order[:0:-1]
        means = {}
        for spec, row in order:
            timer = row.fit(train, warmup + steps)
            means[spec["label"]] = split_means(timer.seconds[warmup:], [bool(s) for s in timer.sam[warmup:]])
        erm = means[first["label"]][0]
        erm_seconds.append(erm)
        for label, (plain, sam_mean) in means.items():
            for kind, value in (("plain", plain), ("sam", sam_mean)):
                if value is not None:
                    ratios[label][kind].append(value / erm)
        print(f"    timing round {r + 1}/{rounds}: ERM {1000 * erm:.2f} ms a step", file=stream, flush=True)
    base = float(np.median(erm_seconds))
    out = {}
    for label, kinds in ratios.items():
        row = {}
        for kind, values in kinds.items():
            ratio = float(np.median(values)) if values else None
            row[f"{kind}_ratio"] = ratio
            row[kind] = None if ratio is None else base * ratio
            row[f"{kind}_rounds"] = len(values)
        out[label] = row
    return out
