"""The ``fit`` of a ``keras-aesam train`` run: one stream of batches, its callbacks, signals and evaluation.

The batches are one stream over all epochs, drawn from a single iterator, so
that a run resumed at step N sees exactly the batches an uninterrupted run
sees from step N on. SIGINT and SIGTERM ask the backup callback for a backup
at the next step boundary; a second signal stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading
import time

__all__ = ["StreamView", "TrainingLoop", "evaluate_locally", "replayable_dataset"]


class StreamView:
    """The next ``count`` batches of a shared iterator, as a generator function that may be called again.

    Under a distribution strategy Keras opens the training data once to build
    the model and once more to train; each call of this object starts at the
    view's first batch again, replaying the batches an earlier call took (an
    earlier call stops once a later one starts). Only the last ``keep`` batches
    are kept: a call that would need older ones raises RuntimeError.
    """

    def __init__(self, stream, count, keep=256):
        self.stream, self.count, self.keep = stream, count, keep
        self.taken = []  # the batches taken from ``stream`` so far, from index ``self.dropped`` on
        self.dropped = 0
        self.calls = 0
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.calls += 1
            call = self.calls
            if self.dropped:
                raise RuntimeError(f"the training data was read again after {self.dropped} of its "
                                   f"batches were passed on; at most {self.keep} can be replayed")
        for index in range(self.count):
            with self.lock:
                if call != self.calls:  # a later call took over
                    return
                if index - self.dropped == len(self.taken):
                    try:
                        self.taken.append(next(self.stream))
                    except StopIteration:
                        return
                batch = self.taken[index - self.dropped]
                if len(self.taken) > self.keep:
                    del self.taken[0]
                    self.dropped += 1
            yield batch


def replayable_dataset(stream, count, element_spec):
    """The next ``count`` batches of the iterator ``stream`` as a ``tf.data.Dataset`` that Keras may
    open more than once (:class:`StreamView`); under multi-worker each worker takes its share of
    every global batch (``AutoShardPolicy.DATA``)."""
    import tensorflow as tf

    part = tf.data.Dataset.from_generator(StreamView(stream, count), output_signature=element_spec)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return part.prefetch(tf.data.AUTOTUNE).with_options(options)


def evaluate_locally(model, dataset):
    """``{"accuracy", "loss"}`` of ``model`` on ``dataset`` in this process, as ``model.evaluate`` computes them.

    The loss is the mean cross-entropy over the examples plus the weight penalty.
    """
    import numpy as np

    total_loss, correct, count = 0.0, 0, 0
    for x, y in dataset:
        logits = model(x, training=False).numpy().astype("float64")
        labels = np.asarray(y).reshape(-1)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total_loss -= float(log_probs[np.arange(len(labels)), labels].sum())
        correct += int((logits.argmax(axis=1) == labels).sum())
        count += len(labels)
    penalty = float(sum(float(loss) for loss in model.losses))
    return {"accuracy": correct / max(count, 1), "loss": total_loss / max(count, 1) + penalty}


def _local_validation(evaluate, validation):
    """A callback adding ``val_accuracy`` and ``val_loss`` of :func:`evaluate_locally` at each epoch end."""
    import keras

    class LocalValidation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if logs is not None:
                logs.update({f"val_{name}": value for name, value in evaluate(validation).items()})

    return LocalValidation()


def _policy_printer(model):
    """A callback printing the policy state after each epoch (``--verbose``)."""
    import keras

    class PolicyPrinter(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            state = model.policy_state
            parts = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in state.items())
            print(f"  policy state after epoch {epoch + 1}: {parts}", flush=True)

    return PolicyPrinter()


class TrainingLoop:
    """The recorder, the backup and the other callbacks of one run, and its ``fit`` calls.

    ``session`` carries the spec, the run directory, the options, the strategy,
    the data, the compiled model and the backup's state on --resume.
    """

    def __init__(self, session):
        self.session = session
        spec, data = session.spec, session.data
        step, _, _ = session.start
        # The ‖g‖² sample batches are drawn once, before the stream (iterating the
        # training set again later would move the shuffle's seed and so the stream).
        samples = None
        if spec.grad_norm_epochs:
            samples = list(data.train.repeat().take(spec.grad_norm_batches))
        self.stream = iter(data.train.repeat().skip(step))
        self.recorder, self.backup = self._recorder_and_backup(samples)
        self._evaluation()

    def _recorder_and_backup(self, samples):
        from keras_aesam.callbacks import RunBackup, StepRecorder

        session = self.session
        spec, run_dir, steps_per_epoch = session.spec, session.run_dir, session.data.steps_per_epoch
        _, epoch, batch = session.start
        recorder = StepRecorder(
            run_dir.file("steps.csv"), append=True, initial_step=epoch * steps_per_epoch,
            grad_norm_epochs=list(spec.grad_norm_epochs), grad_norm_data=samples,
            grad_norm_batches=spec.grad_norm_batches, grad_norm_path=run_dir.file("grad_norms.csv"),
        )
        recorder.load_rows()
        backup = RunBackup(
            run_dir.backup_file, steps_per_epoch=steps_per_epoch, every_steps=session.options.backup_steps,
            extra_state=lambda: {"steps_per_epoch": steps_per_epoch, "files": run_dir.csv_sizes(),
                                 "recorder": recorder.get_state()},
        )
        meta = session.resume_meta
        if meta:
            recorder.set_state(meta["recorder"], batch_offset=batch)
            recorder.grad_norm_epochs = [e for e in recorder.grad_norm_epochs if e > epoch]
            backup.batch_offset = batch
            if batch:
                backup.metric_values = meta["metric_values"]
        return recorder, backup

    def _evaluation(self):
        """Validation and test data (``--eval-batches`` of them), how to evaluate, and the callbacks."""
        import tensorflow as tf

        from keras_aesam.callbacks import CSVLogger

        session = self.session
        model, data, eval_batches = session.model, session.data, session.spec.eval_batches
        self.validation, self.test = data.validation, data.test
        if eval_batches is not None:
            self.validation = None if self.validation is None else self.validation.take(eval_batches)
            self.test = self.test.take(eval_batches)
        self.evaluate = lambda dataset: model.evaluate(dataset, verbose=0, return_dict=True)
        self.callbacks = []
        if isinstance(session.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras's evaluate fails under this strategy (it reduces scalar metrics along an axis):
            # every worker evaluates on its own, at fixed weights, the same numbers.
            self.evaluate = lambda dataset: evaluate_locally(model, dataset)
            if self.validation is not None:
                self.callbacks.append(_local_validation(self.evaluate, self.validation))
                self.validation = None
        self.callbacks += [CSVLogger(str(session.run_dir.file("history.csv")), append=True),
                           self.recorder]
        if session.options.verbose:
            self.callbacks.append(_policy_printer(model))
        self.callbacks.append(self.backup)  # last: its epoch-end backup includes the rows written before it

    def _stream_part(self, batches):
        """The next ``batches`` batches of the stream, bounded (about 0.7 ms per batch, measured)."""
        return replayable_dataset(self.stream, batches, self.session.data.train.element_spec)

    def segments(self):
        """``(first epoch, end epoch, steps per epoch)`` of each fit: a resumed run first finishes its epoch."""
        session = self.session
        epochs, steps_per_epoch = session.spec.epochs, session.data.steps_per_epoch
        _, epoch, batch = session.start
        parts = []
        if batch:
            parts.append((epoch, epoch + 1, steps_per_epoch - batch))
        first_whole = epoch + 1 if batch else epoch
        if first_whole < epochs:
            parts.append((first_whole, epochs, steps_per_epoch))
        return parts

    def fit(self):
        """Trains; returns ``(the interruption or None, seconds of training)``."""
        from keras_aesam.callbacks import RunInterrupted

        quiet = self.session.options.quiet
        started = time.perf_counter()
        interrupted = None
        previous_handlers = _catch_stop_signals(self.backup)
        try:
            for first, end, steps in self.segments():
                self.session.model.fit(
                    self._stream_part(steps * (end - first)), initial_epoch=first, epochs=end,
                    steps_per_epoch=steps, validation_data=self.validation, callbacks=self.callbacks,
                    # A live bar on a terminal, one line per epoch in a log file.
                    verbose=0 if quiet else (1 if sys.stdout.isatty() else 2),
                    shuffle=False,  # the pipelines shuffle (seeded) themselves
                )
        except (RunInterrupted, KeyboardInterrupt) as err:  # KeyboardInterrupt: a second signal, stopped at once
            interrupted = err
        finally:
            _restore_signals(previous_handlers)
        if interrupted is None and self.backup.stop_signal is not None:  # arrived after the last check
            interrupted = RunInterrupted(self.backup.stop_signal, self.session.steps)
        if interrupted is not None:
            self.recorder.on_train_end()  # the interrupted epoch's rows, for the plots (a resume cuts them off)
        return interrupted, time.perf_counter() - started


def _catch_stop_signals(backup):
    """SIGINT/SIGTERM ask ``backup`` for a backup at the next step boundary; a second one stops at once."""

    def handler(signum, frame):
        if backup.stop_signal is not None:
            raise KeyboardInterrupt
        backup.request_stop(signum)
        print(f"\nkeras-aesam: {signal.Signals(signum).name}: writing the backup after this step "
              "(send it again to stop at once)", file=sys.stderr, flush=True)

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[signum] = signal.signal(signum, handler)
        except ValueError:  # not the main thread: no handlers, Keras's behaviour
            break
    return previous


def _restore_signals(previous):
    for signum, handler in previous.items():
        signal.signal(signum, handler)
