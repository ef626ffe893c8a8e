"""Callbacks that record what a sharpness-aware model did, step by step.

:class:`StepRecorder` keeps the per-step series behind the plots of
:mod:`keras_aesam.cli.plots` (and ``keras-aesam train``'s ``steps.csv``):

* the step's ``loss``: Keras reports the running mean over the epoch
  (``loss_mean``, kept too), so the step's own value is recovered as
  ``(k + 1)·mean_k − k·mean_{k−1}`` (exact when the epoch's batches have equal
  size; the last, smaller batch of an epoch gets a value between its own loss
  and the mean), and, for the adaptive methods (AE-SAM, AE-LookSAM), the
  statistics behind the decision: ``grad_norm_sq`` (``‖g‖²``), ``ema_mean``
  (``µ``), ``ema_std`` (``σ``) and ``sam_threshold`` (``µ + c_t·σ``);
* whether the step took SAM. The model reports only ``sam_fraction``, the
  running mean of the SAM indicator over the epoch so far (reset each epoch),
  so after the ``k``-th step of an epoch (0-based) ``count_k =
  round(sam_fraction_k · (k + 1))`` SAM steps have been taken and the step
  took SAM iff ``count_k - count_{k-1} == 1``. The same difference of the
  ``skipped_steps`` sum marks steps skipped for non-finite gradients.

It only reads the logs ``train_step`` already returns, so it adds no work to
the step. It declares itself ``async_safe``: when nothing else needs the batch
logs synchronously (``verbose=0``), Keras hands them over from a thread pool
and the training loop does not wait for it.

**``steps_per_execution > 1``**: Keras calls the batch hooks once per
execution, with the logs of its last step, so the recorder writes **one row per
execution**: ``batch``/``step`` are those of the execution's last step,
``steps`` says how many steps the row covers, ``sam`` and ``skipped`` count the
SAM and skipped steps among them (exact, from the running means), ``loss`` is
the mean loss of those steps, and the ``‖g‖²`` statistics are the last step's.

Optionally it also samples the distribution the paper's Fig. 3 shows,
``{‖∇L(B; w)‖² : B ∼ D}`` at *fixed* weights, at chosen epochs: see
``grad_norm_epochs``. That costs one forward-backward pass per sampled batch,
at those epochs only, outside the train step.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import threading
from typing import Iterable, Optional

import keras
import numpy as np

from keras_aesam import ops as sam_ops

__all__ = [
    "BACKUP_GENERATIONS",
    "CSVLogger",
    "DamagedBackup",
    "GRAD_NORM_COLUMNS",
    "RunBackup",
    "RunInterrupted",
    "STEP_COLUMNS",
    "StepRecorder",
    "backup_generations",
    "load_training_state",
    "read_training_state",
    "save_training_state",
    "sam_step_values_from_means",
    "step_counts_from_fractions",
    "step_values_from_means",
    "writing",
]

#: Columns of ``steps.csv``, in order.
STEP_COLUMNS = (
    "step",
    "epoch",
    "batch",
    "steps",
    "loss",
    "loss_mean",
    "sam",
    "sam_fraction",
    "skipped",
    "grad_norm_sq",
    "ema_mean",
    "ema_std",
    "sam_threshold",
    "sharpness",
)

#: Columns of ``grad_norms.csv`` (the Fig. 3 samples).
GRAD_NORM_COLUMNS = ("epoch", "sample", "grad_norm_sq")

_STAT_KEYS = ("grad_norm_sq", "ema_mean", "ema_std", "sam_threshold")


def step_counts_from_fractions(batches, fractions):
    """Steps per row marked by a 0/1 indicator (SAM steps, skipped steps), from
    its running mean over one epoch.

    ``batches`` are the 0-based indices (within the epoch) of the last step of
    each row, increasing; ``fractions`` the running mean reported there (Keras's
    ``sam_fraction``, or ``skipped_sum / (batch + 1)``). Returns the number of
    marked steps each row covers: ``count_k - count_{k-1}`` with
    ``count_k = round(fraction_k · (batch_k + 1))`` and ``count_{-1} = 0``.
    """
    counts = []
    previous = 0
    for batch, fraction in zip(batches, fractions):
        if fraction is None or not math.isfinite(fraction):
            counts.append(None)
            continue
        count = int(round(float(fraction) * (int(batch) + 1)))
        counts.append(max(count - previous, 0))
        previous = count
    return counts


def sam_step_values_from_means(batches, fractions, means):
    """Per-row values of a metric averaged over the epoch's SAM steps only (``sharpness``).

    With ``n_k = round(fraction_k · (batch_k + 1))`` SAM steps up to row ``k`` and
    the running mean ``m_k`` over them, the row's own value is the mean over its
    new SAM steps, ``(n_k·m_k − n_{k−1}·m_{k−1}) / (n_k − n_{k−1})``; a row without
    a SAM step, or with an unknown mean, gives None.
    """
    values = []
    previous_count, previous_mean = 0, 0.0
    for batch, fraction, mean in zip(batches, fractions, means):
        if fraction is None or not math.isfinite(fraction):
            values.append(None)
            continue
        count = int(round(float(fraction) * (int(batch) + 1)))
        if count > previous_count and mean is not None and math.isfinite(mean) and previous_mean is not None:
            values.append((count * float(mean) - previous_count * previous_mean) / (count - previous_count))
        else:
            values.append(None)
        if count > previous_count:
            previous_mean = None if mean is None or not math.isfinite(mean) else float(mean)
        previous_count = count
    return values


def step_values_from_means(batches, means):
    """Per-row values from a running mean over the epoch (Keras's ``loss``).

    Row ``i`` covers the steps after ``batches[i-1]`` up to ``batches[i]``
    (0-based, increasing); its value is the mean over those steps,
    ``((b_i + 1)·m_i − (b_{i−1} + 1)·m_{i−1}) / (b_i − b_{i−1})``, assuming equal
    batch sizes. Missing means give None.
    """
    values = []
    previous_batch, previous_mean = -1, 0.0
    for batch, mean in zip(batches, means):
        batch = int(batch)
        if mean is None or not math.isfinite(mean):
            values.append(None)
            previous_mean = None
        elif previous_mean is None:  # cannot be told apart from the unknown steps before it
            values.append(None)
            previous_mean = float(mean)
        else:
            total = (batch + 1) * float(mean) - (previous_batch + 1) * previous_mean
            values.append(total / (batch - previous_batch))
            previous_mean = float(mean)
        previous_batch = batch
    return values


def _float_or_none(value):
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        try:
            value = float(np.asarray(value))
        except (TypeError, ValueError):
            return None
    return value


@contextlib.contextmanager
def writing(path):
    """An OSError while writing ``path`` names it (a failed ``write`` or ``close`` carries no file name),
    so that a full disk can be reported with the file it stopped."""
    try:
        yield
    except OSError as err:
        raise _named(err, path) from err


def _named(err: OSError, path) -> OSError:
    """``err`` with ``path`` as its file name, when it has none."""
    if err.filename is None and err.errno is not None:
        return type(err)(err.errno, err.strerror or os.strerror(err.errno), os.fspath(path))
    return err


def _format(value):
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)
    return str(value)


class StepRecorder(keras.callbacks.Callback):
    """Records one row per training step (per execution) and writes ``steps.csv``.

    Args:
        path: where to write the CSV (columns :data:`STEP_COLUMNS`), or None to
            keep the rows in memory only (``recorder.rows``). Rows are appended
            at the end of every epoch, so an interrupted run keeps its finished
            epochs.
        append: append to an existing file instead of overwriting it (for a
            resumed ``fit``; ``step`` then continues from ``initial_step``).
        initial_step: the global index of the first recorded step.
        grad_norm_epochs: numbers of *completed* epochs after which to sample
            ``‖g‖²`` over ``grad_norm_batches`` mini-batches at fixed weights
            (0 = before training starts). The samples go to
            ``recorder.grad_norm_samples`` (``{epoch: np.ndarray}``) and to
            ``grad_norm_path``. Needs ``grad_norm_data``.
        grad_norm_data: a dataset of ``(x, y)`` or ``(x, y, sample_weight)``
            batches (usually the training set; repeated as needed), or a list
            of such batches (the same batches at every sampled epoch; the
            ``keras-aesam`` command draws them once, so that sampling does
            not move the training set's shuffle).
        grad_norm_batches: mini-batches per sampled epoch.
        grad_norm_path: CSV for the samples (columns :data:`GRAD_NORM_COLUMNS`);
            default ``grad_norms.csv`` next to ``path``.

    The gradient samples use the model's loss with its regularization terms,
    in training mode, through a stateless call: BatchNorm statistics, dropout
    seeds and metrics are left exactly as training left them (so every sampled
    batch sees the same dropout seed). Single-device only.
    """

    async_safe = True

    def __init__(
        self,
        path: Optional[str] = None,
        *,
        append: bool = False,
        initial_step: int = 0,
        grad_norm_epochs: Optional[Iterable[int]] = None,
        grad_norm_data=None,
        grad_norm_batches: int = 64,
        grad_norm_path: Optional[str] = None,
    ):
        super().__init__()
        self.path = None if path is None else os.fspath(path)
        self.append = bool(append)
        self.initial_step = int(initial_step)
        epochs = sorted({int(e) for e in (grad_norm_epochs or ())})
        if any(e < 0 for e in epochs):
            raise ValueError(f"grad_norm_epochs must be >= 0 (0 = before training), got {epochs}")
        if epochs and grad_norm_data is None:
            raise ValueError("grad_norm_epochs needs grad_norm_data (a dataset of (x, y) batches).")
        if isinstance(grad_norm_batches, bool) or int(grad_norm_batches) < 1:
            raise ValueError(f"grad_norm_batches must be an integer >= 1, got {grad_norm_batches!r}")
        self.grad_norm_epochs = epochs
        self.grad_norm_data = grad_norm_data
        self.grad_norm_batches = int(grad_norm_batches)
        if grad_norm_path is None and self.path is not None and epochs:
            grad_norm_path = os.path.join(os.path.dirname(self.path) or ".", "grad_norms.csv")
        self.grad_norm_path = None if grad_norm_path is None else os.fspath(grad_norm_path)

        self.rows: list = []
        self.grad_norm_samples: dict = {}
        self._pending: list = []
        self._lock = threading.Lock()
        self._epoch = 0
        self._next_step = self.initial_step
        self._grad_norm_fn = None
        self._wrote_header = False
        self._grad_norm_header = False
        #: Added to Keras's batch index: a resumed run's first epoch starts mid-way.
        self.batch_offset = 0
        self._kept_epoch = None  # the epoch whose pending rows set_state restored

    # ------------------------------------------------------------------ summary
    @property
    def total_steps(self) -> int:
        """Steps recorded so far."""
        return sum(int(r["steps"]) for r in self.rows)

    @property
    def sam_steps(self) -> int:
        """SAM steps recorded so far."""
        return sum(int(r["sam"] or 0) for r in self.rows)

    @property
    def sam_fraction(self) -> Optional[float]:
        """SAM steps / steps over everything recorded (None before any step)."""
        total = self.total_steps
        return self.sam_steps / total if total else None

    def series(self, column: str) -> np.ndarray:
        """One column of the recorded rows as a float array (missing values NaN)."""
        return np.array(
            [np.nan if r.get(column) is None else float(r[column]) for r in self.rows],
            dtype=float,
        )

    # ------------------------------------------------------------------ hooks
    def on_train_begin(self, logs=None):
        self._open_file()
        if 0 in self.grad_norm_epochs and 0 not in self.grad_norm_samples:
            self._sample_grad_norms(0)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)
        if self._kept_epoch == self._epoch:  # resumed mid-epoch: keep the restored rows
            self._kept_epoch = None
            return
        self.batch_offset = 0
        with self._lock:
            self._pending = []

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        row = {
            "epoch": self._epoch,
            "batch": int(batch) + self.batch_offset,
            "loss": _float_or_none(logs.get("loss")),
            "sam_fraction": _float_or_none(logs.get("sam_fraction")),
            "skipped_sum": _float_or_none(logs.get("skipped_steps")),
        }
        for key in _STAT_KEYS:
            row[key] = _float_or_none(logs.get(key))
        row["sharpness_mean"] = _float_or_none(logs.get("sharpness"))
        with self._lock:
            self._pending.append(row)

    def on_epoch_end(self, epoch, logs=None):
        self._finish_epoch()
        if int(epoch) + 1 in self.grad_norm_epochs:
            self._sample_grad_norms(int(epoch) + 1)

    def on_train_end(self, logs=None):
        # An interrupted epoch (stop_training, KeyboardInterrupt handled by the
        # caller) still has pending rows.
        self._finish_epoch()

    # ------------------------------------------------------------------ resuming
    def get_state(self) -> dict:
        """What a backup needs to continue mid-epoch: the epoch's rows not yet written."""
        with self._lock:
            pending = [dict(r) for r in self._pending]
        return {"epoch": self._epoch, "next_step": self._next_step, "pending": pending}

    def set_state(self, state: dict, *, batch_offset: int = 0) -> None:
        """Restores :meth:`get_state`'s output before a resumed ``fit`` starts.

        ``batch_offset``: steps of the epoch already taken (Keras counts the
        resumed epoch's batches from 0).
        """
        self._epoch = int(state["epoch"])
        self._next_step = int(state["next_step"])
        with self._lock:
            self._pending = [dict(r) for r in state.get("pending", [])]
        self._kept_epoch = self._epoch
        self.batch_offset = int(batch_offset)

    def load_rows(self, path=None) -> None:
        """Reads the rows an earlier, interrupted run wrote (so the totals cover the whole run)."""
        path = self.path if path is None else os.fspath(path)
        if path is None or not os.path.isfile(path):
            return
        with open(path, newline="") as f:
            for raw in csv.DictReader(f):
                row = {}
                for column in STEP_COLUMNS:
                    text = raw.get(column, "")
                    if text in ("", None):
                        row[column] = None
                    elif column in ("step", "epoch", "batch", "steps", "sam", "skipped"):
                        row[column] = int(text)
                    else:
                        row[column] = float(text)
                self.rows.append(row)
        if self.rows:
            self._next_step = max(self._next_step, self.rows[-1]["step"] + 1)

    # ------------------------------------------------------------------ rows
    def _finish_epoch(self):
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return
        # Async dispatch may deliver batches out of order within an epoch.
        pending.sort(key=lambda r: r["batch"])
        batches = [r["batch"] for r in pending]
        sam = step_counts_from_fractions(batches, [r["sam_fraction"] for r in pending])
        skipped_fractions = [
            None if r["skipped_sum"] is None else r["skipped_sum"] / (r["batch"] + 1) for r in pending
        ]
        skipped = step_counts_from_fractions(batches, skipped_fractions)
        losses = step_values_from_means(batches, [r["loss"] for r in pending])
        sharpness = sam_step_values_from_means(
            batches, [r["sam_fraction"] for r in pending], [r["sharpness_mean"] for r in pending]
        )
        new_rows = []
        previous_batch = -1
        for row, n_sam, n_skipped, loss, sharp in zip(pending, sam, skipped, losses, sharpness):
            steps = row["batch"] - previous_batch
            previous_batch = row["batch"]
            self._next_step += steps
            out = {
                "step": self._next_step - 1,
                "epoch": row["epoch"],
                "batch": row["batch"],
                "steps": steps,
                "loss": loss,
                "loss_mean": row["loss"],
                "sam": n_sam,
                "sam_fraction": row["sam_fraction"],
                "skipped": n_skipped,
            }
            for key in _STAT_KEYS:
                out[key] = row[key]
            out["sharpness"] = sharp
            new_rows.append(out)
        self.rows.extend(new_rows)
        self._write_rows(new_rows)

    def _open_file(self):
        if self.path is None or self._wrote_header:
            return
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        if self.append and os.path.isfile(self.path) and os.path.getsize(self.path) > 0:
            self._wrote_header = True
            return
        with writing(self.path), open(self.path, "w", newline="") as f:
            csv.writer(f).writerow(STEP_COLUMNS)
        self._wrote_header = True

    def _write_rows(self, rows):
        if self.path is None:
            return
        self._open_file()
        with writing(self.path), open(self.path, "a", newline="") as f:
            writer = csv.writer(f)
            for row in rows:
                writer.writerow([_format(row.get(c)) for c in STEP_COLUMNS])

    # ------------------------------------------------------------------ Fig. 3 samples
    def _make_grad_norm_fn(self):
        import tensorflow as tf

        model = self.model

        @tf.function(reduce_retracing=True)
        def grad_norm_sq(x, y, sample_weight):
            # The model's own stateless forward pass: no BatchNorm or metric update.
            values = [tf.identity(v.value) for v in model.trainable_variables]
            with tf.GradientTape() as tape:
                tape.watch(values)
                _, loss = model._forward_loss(x, y, sample_weight, values=values)
            grads = tape.gradient(loss, values)
            return sam_ops.global_sq_norm([g for g in grads if g is not None])

        return grad_norm_sq

    def _sample_grad_norms(self, epoch):
        """``‖∇L(B; w)‖²`` over ``grad_norm_batches`` batches at the current weights."""
        if self._grad_norm_fn is None:
            self._grad_norm_fn = self._make_grad_norm_fn()
        data = self.grad_norm_data
        if hasattr(data, "repeat"):
            data = data.repeat()
        samples = []
        for batch in data:
            if len(samples) >= self.grad_norm_batches:
                break
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise ValueError("grad_norm_data must yield (x, y) or (x, y, sample_weight) batches.")
            x, y = batch[0], batch[1]
            sample_weight = batch[2] if len(batch) > 2 else None
            samples.append(float(self._grad_norm_fn(x, y, sample_weight)))
        values = np.asarray(samples, dtype=float)
        self.grad_norm_samples[epoch] = values
        if self.grad_norm_path is not None:
            directory = os.path.dirname(self.grad_norm_path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            new = not self._grad_norm_header and not (
                self.append
                and os.path.isfile(self.grad_norm_path)
                and os.path.getsize(self.grad_norm_path) > 0
            )
            with writing(self.grad_norm_path), open(self.grad_norm_path, "w" if new else "a", newline="") as f:
                writer = csv.writer(f)
                if new:
                    writer.writerow(GRAD_NORM_COLUMNS)
                for i, value in enumerate(values):
                    writer.writerow([epoch, i, repr(float(value))])
            self._grad_norm_header = True
        return values


class CSVLogger(keras.callbacks.CSVLogger):
    """``keras.callbacks.CSVLogger`` whose write errors name its file (a full disk says where)."""

    def on_epoch_end(self, epoch, logs=None):
        with writing(self.filename):
            super().on_epoch_end(epoch, logs)

    def on_train_begin(self, logs=None):
        with writing(self.filename):
            super().on_train_begin(logs)


# ---------------------------------------------------------------------- backups


def _state_variables(model):
    """Every variable a run's future depends on, in a fixed order, once each.

    The model's (weights, BatchNorm statistics, dropout seed states, the
    policy's µ, σ², t, T and LookSAM's ``g_v``), the optimizer's (iterations,
    momenta) and the metrics' (the epoch's running means).
    """
    seen, out = set(), []
    groups = [model.variables, model.metrics_variables]
    if model.optimizer is not None:
        groups.insert(1, model.optimizer.variables)
    for group in groups:
        for v in group:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


#: Backup generations kept (like ``tf.train.CheckpointManager(max_to_keep=2)``): the newest
#: and the one before it, so a damaged newest file costs one backup interval, not the run.
BACKUP_GENERATIONS = 2


class DamagedBackup(ValueError):
    """A backup file cannot be read back (truncated, corrupted, not a backup)."""


def backup_generations(path) -> list:
    """The files of a backup's generations, newest first: ``state.npz``, ``state.1.npz``."""
    path = os.fspath(path)
    root, ext = os.path.splitext(path)
    return [path] + [f"{root}.{i}{ext}" for i in range(1, BACKUP_GENERATIONS)]


def save_training_state(model, path, meta: dict) -> None:
    """Writes all of :func:`_state_variables` and ``meta`` to ``path`` (one .npz), then rotates.

    The new backup is written whole to ``<path>.tmp`` and synced first; only then
    does the previous backup become ``state.1.npz`` (the oldest generation is
    dropped) and the new one take its name. A process killed, or a disk that
    fills up, while writing leaves every earlier generation intact (the partial
    file is removed); an OSError names the file that could not be written.
    """
    variables = _state_variables(model)
    arrays = {f"v{i}": np.asarray(v.numpy()) for i, v in enumerate(variables)}
    record = dict(meta, paths=[v.path for v in variables])
    arrays["meta"] = np.frombuffer(json.dumps(record).encode("utf-8"), dtype=np.uint8)
    path = os.fspath(path)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    tmp = path + ".tmp"
    try:
        with writing(tmp), open(tmp, "wb") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        try:
            os.remove(tmp)  # a partial file would only hold on to the space
        except OSError:
            pass
        raise
    generations = backup_generations(path)
    for newer, older in reversed(list(zip(generations, generations[1:]))):
        if os.path.exists(newer):
            os.replace(newer, older)
    os.replace(tmp, path)


def read_training_state(path):
    """``(meta, arrays)`` of a :func:`save_training_state` file; DamagedBackup when it cannot be read whole.

    Every array is read, so a truncated file or a failed CRC check shows up here,
    before anything is assigned.
    """
    import zipfile

    try:
        with np.load(os.fspath(path)) as data:
            meta = json.loads(bytes(data["meta"]).decode("utf-8"))
            values = [data[f"v{i}"] for i in range(len(meta["paths"]))]
    except (OSError, EOFError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DamagedBackup(f"backup {os.fspath(path)!r} is damaged ({reason})") from err
    return meta, values


def load_training_state(model, path, *, assign: bool = True) -> dict:
    """Reads a :func:`save_training_state` file; assigns its values (unless ``assign``
    is False) and returns its ``meta`` with ``metric_values`` (the metrics' values,
    to be put back after Keras resets them at the start of the epoch).

    Raises DamagedBackup when the file cannot be read whole, ValueError when it
    was written by another model or optimizer.
    """
    meta, values = read_training_state(path)
    variables = _state_variables(model)
    # Shapes in order, not names: Keras numbers the names of a process's second model.
    mine = [(v.path, tuple(v.shape)) for v in variables]
    theirs = [(p, tuple(a.shape)) for p, a in zip(meta["paths"], values)]
    if [m[1] for m in mine] != [t[1] for t in theirs]:
        diff = next((f"{a} here, {b} in the backup" for a, b in zip(mine, theirs) if a[1] != b[1]),
                    f"{len(mine)} variables here, {len(theirs)} in the backup")
        raise ValueError(f"backup {os.fspath(path)!r} does not match this model and optimizer ({diff})")
    metric_ids = {id(v) for v in model.metrics_variables}
    meta["metric_values"] = []
    for v, value in zip(variables, values):
        if id(v) in metric_ids:
            meta["metric_values"].append((v, value))
        if assign:
            v.assign(value)
    return meta


class RunInterrupted(KeyboardInterrupt):
    """Raised by :class:`RunBackup` after it wrote the backup a signal asked for."""

    def __init__(self, signum, step):
        super().__init__(signum, step)
        self.signum = signum
        self.step = step


class RunBackup(keras.callbacks.Callback):
    """Backs up a run so it can continue exactly where it stopped.

    Writes :func:`save_training_state` to ``path`` at the end of every epoch
    (after the other callbacks' epoch-end work, so put it last) and, with
    ``every_steps=N``, after every N-th step. ``meta`` holds ``step`` (steps
    done in the run), ``epoch`` and ``batch`` (the epoch to continue and the
    steps of it already done) and whatever ``extra_state()`` returns (the
    ``keras-aesam`` command stores the StepRecorder's unwritten rows and the
    sizes of its CSV files there).

    :meth:`request_stop` (called from a signal handler) makes it write the
    backup at the next step boundary and raise :class:`RunInterrupted`.

    Not ``async_safe``: it reads the variables between two steps.
    """

    def __init__(self, path, *, steps_per_epoch: int, every_steps: int = 0, extra_state=None):
        super().__init__()
        if isinstance(every_steps, bool) or int(every_steps) < 0:
            raise ValueError(f"every_steps must be an integer >= 0 (0 = every epoch only), got {every_steps!r}")
        self.path = os.fspath(path)
        self.steps_per_epoch = int(steps_per_epoch)
        self.every_steps = int(every_steps)
        self.extra_state = extra_state
        self.batch_offset = 0  # steps of the first epoch done before a resumed fit
        self.metric_values = None  # metric values to put back at the resumed epoch's start
        self.stop_signal = None
        self.last_saved_step = None
        self._epoch = 0

    def request_stop(self, signum) -> None:
        self.stop_signal = signum

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = int(epoch)
        if self.metric_values is not None:  # Keras has just reset the metrics
            for variable, value in self.metric_values:
                variable.assign(value)
            self.metric_values = None

    def on_train_batch_end(self, batch, logs=None):
        done = int(batch) + 1 + self.batch_offset
        step = self._epoch * self.steps_per_epoch + done
        due = self.every_steps and (self.last_saved_step is None
                                    or step // self.every_steps > self.last_saved_step // self.every_steps)
        if due or self.stop_signal is not None:
            self.save(step, self._epoch, done)
        if self.stop_signal is not None:
            raise RunInterrupted(self.stop_signal, step)

    def on_epoch_end(self, epoch, logs=None):
        self.batch_offset = 0
        step = (int(epoch) + 1) * self.steps_per_epoch
        self.save(step, int(epoch) + 1, 0)
        if self.stop_signal is not None:
            raise RunInterrupted(self.stop_signal, step)

    def save(self, step, epoch, batch):
        meta = {"step": int(step), "epoch": int(epoch), "batch": int(batch)}
        if self.extra_state is not None:
            meta.update(self.extra_state())
        save_training_state(self.model, self.path, meta)
        self.last_saved_step = int(step)
