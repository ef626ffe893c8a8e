"""A bench session: the worker groups, progress on the console, resume and ``--fresh``, bench.json."""

from __future__ import annotations

import datetime
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from keras_aesam.bench.plan import BadInput, estimate_seconds
from keras_aesam.bench.progress import PROGRESS_MARK, Progress
from keras_aesam.bench.records import (
    _loadavg,
    _machine,
    _read_bench_json,
    _result_path,
    _versions,
    _write_json,
    damaged_result,
    finished_result,
)
from keras_aesam.bench.report import write_report
from keras_aesam.bench.worker import DISAGREE_EXIT, ERROR_PREFIX, join_cluster, run_spec
from keras_aesam.cli import devices
from keras_aesam.cli.run_directory import DISK_FULL_EXIT, disk_full_message, is_disk_full
from keras_aesam.cli.run_lock import LOCK_FILE, LOCKED_EXIT, Locked, RunLock

#: Why a multi-worker session stops before running anything.
_DISAGREE = ("the workers of the --strategy multi-worker cluster disagree on the plan or on which of its runs "
             "are finished: every worker must run the same command, and --output must be storage every worker "
             "reads (the chief's results there decide which runs are skipped); nothing was run")


def _groups(plan):
    groups = []
    for spec in plan["runs"]:
        if plan["isolation"] == "run" or spec["kind"] == "peer":
            key = spec["run_id"]
        else:
            key = f"{spec['setting']}_s{spec['seed']}"
        if groups and groups[-1][0] == key:
            groups[-1][1].append(spec)
        else:
            groups.append((key, [spec]))
    return groups


def _describe(result):
    step = result.get("step_ms")
    epoch = result.get("epoch_seconds_after_first")
    timing = f"{epoch:.1f} s/epoch, {step:.0f} ms/step" if epoch is not None and step is not None else (
        f"{step:.0f} ms/step" if step is not None else "n/a")
    frac = result.get("sam_fraction")
    sam = "n/a" if frac is None else f"{100 * frac:.1f} %"
    replicas = result.get("replicas") or 1
    batch = (result.get("spec") or {}).get("batch_size")
    split = f", {devices.replicas_text(replicas, batch)}" if batch else ""
    return f"test acc {result['test_accuracy']:.4f}, SAM {sam}, {timing}{split}"


def _run_in_process(out, specs, progress, agreement=None):
    """``--isolation none``: the group's runs in this process, one after another (a multi-worker bench's
    after joining the cluster with ``agreement``).
    """
    if agreement is not None and not join_cluster(agreement):
        raise BadInput(_DISAGREE)
    for spec in specs:
        if finished_result(out, spec) is not None:
            continue
        try:
            result = run_spec(spec, out)
            progress(spec, result)
        except Exception as err:  # noqa: BLE001
            if is_disk_full(err):
                raise  # not this run's failure: the session stops (run_bench)
            text = traceback.format_exc()
            _result_path(out, spec).with_suffix(".error.txt").write_text(text)
            progress(spec, None)
    return sum(finished_result(out, s) is None for s in specs)


class _LogRelay:
    """Echoes the epoch lines a worker writes to its log (marked ``PROGRESS_MARK``) to the console."""

    def __init__(self, path, stream):
        self.path, self.stream = Path(path), stream
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def __call__(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except OSError:
            return
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line still being written waits for the next call
        self.offset += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            if line.startswith(PROGRESS_MARK):
                print(f"    {line[len(PROGRESS_MARK):]}", file=self.stream, flush=True)


def _watch(proc, out, specs, progress, relay):
    """Polls the worker: relays its epoch lines and reports each run the moment its result is written."""
    reported = set()
    while True:
        try:
            proc.wait(timeout=2.0)
            done = True
        except subprocess.TimeoutExpired:
            done = False
        relay()
        for spec in specs:
            if spec["run_id"] in reported:
                continue
            result = finished_result(out, spec)
            if result is not None and result.get("pid") == proc.pid:
                reported.add(spec["run_id"])
                progress(spec, result)
        if done:
            return


def _run_group(out, key, specs, isolation, progress, stream=sys.stdout, agreement=None):
    """Runs one group; returns the number of specs without a result afterwards.

    ``agreement`` (multi-worker): the process joins the cluster and checks that
    every worker runs the same specs first, BadInput if not.
    """
    if isolation == "none":
        return _run_in_process(out, specs, progress, agreement)
    job = Path(out) / "logs" / f"{key}.job.json"
    _write_json(job, {"out": str(out), "specs": specs, "agreement": agreement})
    log_path = Path(out) / "logs" / f"{key}.log"
    env = os.environ.copy()
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with open(log_path, "a") as log:
        log.write(f"--- {datetime.datetime.now().isoformat(timespec='seconds')} ---\n")
        log.flush()
        relay = _LogRelay(log_path, stream)
        proc = subprocess.Popen([sys.executable, "-m", "keras_aesam.bench", "--worker", str(job)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            _watch(proc, out, specs, progress, relay)
        except BaseException:
            if proc.poll() is None:  # our own child, by its id
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            raise
    if proc.returncode == DISAGREE_EXIT:
        raise BadInput(_DISAGREE)
    if proc.returncode == DISK_FULL_EXIT:
        raise _WorkerDiskFull(_last_error_line(log_path) or f"the disk is full (writing into {out}: "
                              "No space left on device)")
    missing = 0
    for spec in specs:
        if finished_result(out, spec) is None:
            missing += 1
            progress(spec, None)
    return missing


class _WorkerDiskFull(Exception):
    """A worker stopped on a full disk; the message is its error line."""


def _last_error_line(log_path):
    """The worker's ``keras-aesam bench: error:`` line from its log (without the prefix), or None."""
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    found = [line.split(ERROR_PREFIX, 1)[1] for line in lines if ERROR_PREFIX in line]
    return found[-1] if found else None


#: What a bench writes at the top of its output folder (besides runs/, init/, logs/).
_BENCH_TOP_FILES = ("bench.json", "results.csv", "report.md", "accuracy_vs_sam.png", "time_per_epoch.png",
                    "framework_probe.json", "framework_probe.md")


def _bench_paths(out, plan):
    """Paths (relative to ``out``) this plan writes; init files only once they exist."""
    paths = list(_BENCH_TOP_FILES)
    for spec in plan["runs"]:
        paths += [f"runs/{spec['run_id']}.json", f"runs/{spec['run_id']}.error.txt",
                  f"final/{spec['run_id']}.npz", f"final/{spec['run_id']}.npz.tmp"]
        paths += [p.relative_to(out).as_posix()
                  for p in (out / "init").glob(f"{spec['network']}_*_s{spec['seed']}.npz")]
    for key, _ in _groups(plan):
        paths += [f"logs/{key}.log", f"logs/{key}.job.json"]
    if plan["config"].get("strategy") == "multi-worker":
        paths += [f"logs/{CLUSTER_KEY}.log", f"logs/{CLUSTER_KEY}.job.json"]
    return paths


def _record_bench_files(out, plan):
    """Lists in ``out``'s manifest (keras_aesam.cli.safety) what this bench writes there."""
    from keras_aesam.cli import safety

    out.mkdir(parents=True, exist_ok=True)
    ours = set(safety.written(out))
    new_dirs = [d for d in ("runs", "init", "final", "logs") if not (out / d).exists()]
    for d in new_dirs:
        (out / d).mkdir()
    # A file already there that the manifest does not list stays someone else's.
    fresh = [p for p in _bench_paths(out, plan)
             if p not in ours and (not (out / p).exists() or p.startswith("init/"))]
    safety.record(out, *(out / p for p in fresh), *(out / d for d in new_dirs))


def _remove_previous_bench(out, plan, stream):
    """``--fresh``: deletes the files a previous bench wrote in ``out``, and only those."""
    from keras_aesam.cli import safety

    previous = _read_bench_json(out)
    if previous.get("run_ids") and not safety.is_ours(out):  # written before the manifest existed
        safety.adopt(out, "bench.json", [*_BENCH_TOP_FILES, "init/*.npz", "logs/*.log", "logs/*.job.json",
                                         *(f"runs/{r}.json" for r in previous["run_ids"]),
                                         *(f"runs/{r}.error.txt" for r in previous["run_ids"])])
    if any(p.name != LOCK_FILE for p in out.iterdir()) and "bench.json" not in safety.written(out):
        raise BadInput(f"--fresh refuses to delete anything in {str(out)!r}: it holds no keras-aesam bench "
                       f"(no bench.json listed in {safety.MANIFEST}); check --output")
    if (out / "init").is_dir():
        _record_bench_files(out, plan)  # init files of an interrupted session
    left = safety.remove_written(out)
    if left:
        print(f"keras-aesam bench: --fresh kept {len(left)} file(s) in {out} that the bench did not write: "
              f"{', '.join(left)}", file=stream, flush=True)


def _session_meta(plan, argv, program, previous, finished, estimate):
    """bench.json: the plan, the machine, and the sessions so far plus this one."""
    for session in previous.get("sessions", []):  # files written before sessions recorded their command
        session.setdefault("command", previous.get("command"))
    command = " ".join([program, *argv]) if argv else program
    now = datetime.datetime.now().isoformat(timespec="seconds")
    return {
        "command": command,
        "argv": list(argv or []),
        **{key: plan[key] for key in ("profile", "config", "methods", "noise", "seeds", "peer", "peer_note",
                                      "isolation", "budget_minutes")},
        "run_ids": [s["run_id"] for s in plan["runs"]],
        "machine": _machine(),
        "versions": _versions(),
        "started": previous.get("started") or now,
        "sessions": previous.get("sessions", []) + [{
            "command": command,
            "started": now,
            "skipped_finished_runs": finished,
            "estimated_seconds": round(estimate),
            "loadavg_start": _loadavg(),
        }],
    }


def _reporter(out, total, finished, failed, stream):
    """``progress(spec, result)``: a line per finished run (time left, chance-level runs flagged), or FAILED."""
    tracker = Progress(total, stream, done=finished)

    def progress(spec, result):
        if result is None:
            failed.append(spec["run_id"])
            err = _result_path(out, spec).with_suffix(".error.txt")
            where = f"see {err}" if err.exists() else f"see {out / 'logs'}"
            print(f"  FAILED {spec['run_id']} ({where})", file=stream, flush=True)
            return
        tracker.finished(spec, result, result.get("run_seconds") or 0.0, _describe(result))

    return progress


#: The one worker process of a multi-worker session (its log: ``logs/cluster.log``).
CLUSTER_KEY = "cluster"


def _agreement(plan, todo):
    """What every worker of a cluster must bring: the plan (its specs) and the runs this session trains."""
    text = "\n".join([*(s["spec_hash"] for s in plan["runs"]), "todo:", *(s["run_id"] for s in todo)])
    return hashlib.sha256(text.encode()).hexdigest()


def _run_groups(plan, done, progress, stream):
    """Runs every group with unfinished runs; returns whether it was interrupted (Ctrl-C or SIGTERM).

    Under multi-worker the session's runs go to one process (``CLUSTER_KEY``),
    started even when none is left: it holds this task's port of the cluster for
    the whole session, and its check that every worker runs the same specs is what
    keeps a worker from waiting forever for a peer that skipped them.
    """
    try:
        previous_handler = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        previous_handler = None
    try:
        if plan["config"].get("strategy") == "multi-worker":
            todo = [s for s in plan["runs"] if done[s["run_id"]] is None]
            _run_group(plan["output"], CLUSTER_KEY, todo, plan["isolation"], progress, stream,
                       agreement=_agreement(plan, todo))
            return False
        for key, specs in _groups(plan):
            todo = [s for s in specs if done[s["run_id"]] is None]
            if todo:
                _run_group(plan["output"], key, todo, plan["isolation"], progress, stream)
    except KeyboardInterrupt:
        print("\ninterrupted: the finished runs are kept; run the same command again to resume",
              file=stream, flush=True)
        return True
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return False


def _split_cpu_here(plan):
    """``--isolation none --cpu-devices N``: this process's CPU split, made now or refused (BadInput).

    It must come before this process's first TensorFlow operation; the worker
    processes of the other isolation modes start fresh and split it themselves.
    """
    count = plan["config"].get("cpu_devices")
    if plan["isolation"] != "none" or not count:
        return
    try:
        devices.split_cpu(count)
    except devices.DeviceError as err:
        raise BadInput(f"{err} (e.g. --isolation group: a fresh worker process)") from None


def _is_chief(plan):
    """Whether this process writes the bench folder: always, but for a non-chief worker of a cluster."""
    if plan["config"].get("strategy") != "multi-worker":
        return True
    try:
        return devices.tf_config_is_chief()
    except devices.DeviceError as err:
        raise BadInput(str(err)) from None


def _run_as_other_worker(plan, fresh, stream):
    """A non-chief worker of a cluster: the chief's runs, in the chief's order, into a temporary folder.

    What to skip is read from the chief's ``--output`` (storage every worker
    reads), as ``keras-aesam train --resume`` reads the chief's backup; the folder
    is removed at the end, whatever happens.
    """
    chief_out = plan["output"]
    done = {s["run_id"]: None if fresh else finished_result(chief_out, s) for s in plan["runs"]}
    finished = sum(r is not None for r in done.values())
    scratch = Path(tempfile.mkdtemp(prefix="keras-aesam-worker-"))
    try:
        for folder in ("runs", "init", "final", "logs"):
            (scratch / folder).mkdir()
        print(f"keras-aesam bench: worker of a cluster, {len(plan['runs'])} runs ({finished} finished by the "
              f"chief, skipped); the chief writes {chief_out}", file=stream, flush=True)
        failed = []
        progress = _reporter(scratch, len(plan["runs"]), finished, failed, stream)
        interrupted = _run_groups({**plan, "output": scratch}, done, progress, stream)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if interrupted:
        return 130
    return 1 if failed else 0


def run_bench(plan, argv=None, *, fresh=False, stream=None, program="keras-aesam bench") -> int:
    """Runs the plan's unfinished runs and writes the report; returns the exit code (console: ``stream``).

    Under ``--strategy multi-worker`` every worker runs the same command; only the
    chief writes ``--output``, holding its lock (keras_aesam.cli.run_lock) for the
    whole session: a second bench on the folder exits with ``LOCKED_EXIT``. A
    full disk stops the session with one line on stderr and ``DISK_FULL_EXIT``;
    the finished runs stay, and the same command continues once there is space.
    """
    stream = stream or sys.stdout
    _split_cpu_here(plan)
    if not _is_chief(plan):
        return _run_as_other_worker(plan, fresh, stream)
    out = plan["output"]
    try:
        lock = RunLock.acquire(out, "keras-aesam bench", stream=stream)
    except Locked as err:
        print(f"{ERROR_PREFIX}{err}", file=sys.stderr, flush=True)
        return LOCKED_EXIT
    try:
        return _run_chief(plan, argv, fresh, stream, program)
    except Exception as err:
        if not is_disk_full(err):
            raise
        line = str(err) if isinstance(err, _WorkerDiskFull) else disk_full_message(err, out)
        print(f"{ERROR_PREFIX}{' '.join(line.split())}; the finished runs are kept: free space, then run the "
              "same command again", file=sys.stderr, flush=True)
        return DISK_FULL_EXIT
    finally:
        lock.release()


def _run_chief(plan, argv, fresh, stream, program):
    """:func:`run_bench` in the folder it holds."""
    out = plan["output"]
    if fresh:
        _remove_previous_bench(out, plan, stream)
    done = {spec["run_id"]: finished_result(out, spec) for spec in plan["runs"]}  # BadInput on mismatch
    damaged = {s["run_id"]: why for s in plan["runs"] if (why := damaged_result(out, s)) is not None}
    finished = sum(r is not None for r in done.values())
    _record_bench_files(out, plan)
    estimate = estimate_seconds([s for s in plan["runs"] if done[s["run_id"]] is None], plan["isolation"])
    meta = _session_meta(plan, argv, program, _read_bench_json(out), finished, estimate)
    meta["sessions"][-1]["redone_damaged_results"] = sorted(damaged)
    _write_json(out / "bench.json", meta)
    total = len(plan["runs"])
    print(f"keras-aesam bench: {total} runs ({finished} already finished, skipped), profile {plan['profile']}, "
          f"estimated {estimate / 60:.0f} min on the reference machine -> {out}", file=stream, flush=True)
    for run_id, why in damaged.items():
        print(f"  note: {why}: run {run_id} is run again", file=stream, flush=True)
    if plan["peer_note"]:
        print(f"  no peer row: {plan['peer_note']}", file=stream, flush=True)
    failed = []
    started = time.perf_counter()
    interrupted = _run_groups(plan, done, _reporter(out, total, finished, failed, stream), stream)
    meta["sessions"][-1].update(
        finished=datetime.datetime.now().isoformat(timespec="seconds"),
        wall_seconds=round(time.perf_counter() - started, 1),
        loadavg_end=_loadavg(),
        interrupted=interrupted,
        failed=failed,
    )
    _write_json(out / "bench.json", meta)
    paths = write_report(out)
    print(f"report: {paths['report']}", file=stream, flush=True)
    if interrupted:
        return 130
    return 1 if failed else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
