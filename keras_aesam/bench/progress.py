"""Console progress shared by the bench and its noisy-labels profile: runs done, time left, chance-level runs."""

from __future__ import annotations

import math
import sys
import time

import numpy as np

#: Printed after a run that ended at chance level (and in the reports).
DEGENERATE_FLAG = "  <-- DEGENERATE: chance-level accuracy"
#: Marks an epoch line in a worker's log, so the bench relays it to the console.
PROGRESS_MARK = "[epoch] "


def is_degenerate(result):
    """A run that ended at chance level (or with a non-finite loss): never an ordinary number."""
    chance = 1.0 / result.get("num_classes", 10)
    loss = result.get("test_loss")
    return (loss is not None and not math.isfinite(loss)) or result["test_accuracy"] <= chance + 0.02


def _duration(seconds):
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = int(seconds // 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


class Progress:
    """One console line per run, with an estimate of the time left (mean time of the runs that ran here).

    ``name(spec)`` is the run's id (``spec["run_id"]`` unless given); ``done`` counts runs already
    finished before, which are not timed.
    """

    def __init__(self, total_runs, stream, name=None, done=0):
        self.total, self.done, self.seconds, self.stream = total_runs, done, [], stream
        self.name = name or (lambda spec: spec["run_id"])
        self.seen = set()

    def eta(self):
        """``", about 12 min left"`` once a run has been timed, else ``""``."""
        if not self.seconds:
            return ""
        return f", about {_duration((self.total - self.done) * float(np.mean(self.seconds)))} left"

    def start(self, spec):
        if self.name(spec) in self.seen:
            return
        print(f"[{self.done + 1}/{self.total}] {self.name(spec)}{self.eta()}", file=self.stream, flush=True)

    def _count(self, spec, seconds, ran):
        if self.name(spec) in self.seen:
            return False
        self.seen.add(self.name(spec))
        self.done += 1
        if ran:
            self.seconds.append(seconds)
        return True

    def end(self, spec, result, seconds, ran):
        """The line under ``start``'s: accuracy, SAM share, seconds, and the flag of a degenerate run."""
        if not self._count(spec, seconds, ran):
            return
        flag = DEGENERATE_FLAG if is_degenerate(result) else ""
        print(f"    test acc {result['test_accuracy']:.4f}, SAM share {result['sam_fraction']:.3f}, "
              f"{'%.0f s' % seconds if ran else 'already done'}{flag}", file=self.stream, flush=True)

    def finished(self, spec, result, seconds, text):
        """One line for a run that finished elsewhere (a worker process): ``text``, time left, the flag."""
        if not self._count(spec, seconds, True):
            return
        flag = DEGENERATE_FLAG if is_degenerate(result) else ""
        print(f"  [{self.done}/{self.total}] {self.name(spec)}: {text}{self.eta()}{flag}", file=self.stream,
              flush=True)


def epoch_callback(K, run_id, epochs, every=None, stream=None):
    """A ``K.callbacks.Callback`` printing a line every few epochs (about 4 a run) with the run's time left."""
    every = every or max(1, epochs // 4)
    stream = stream or sys.stdout

    class EpochProgress(K.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if (epoch + 1) % every and epoch + 1 != epochs:
                return
            elapsed = time.perf_counter() - self.started
            left = elapsed / (epoch + 1) * (epochs - epoch - 1)
            logs = logs or {}
            print(f"{PROGRESS_MARK}{run_id} epoch {epoch + 1}/{epochs}: train loss "
                  f"{logs.get('loss', float('nan')):.4f}, train acc {logs.get('accuracy', float('nan')):.4f}, "
                  f"{elapsed:.0f} s, about {_duration(left)} left in this run", file=stream, flush=True)

    return EpochProgress()

