"""The noisy-labels bench profile: when to take SAM steps, compared at equal cost.

Runs the plan of :mod:`keras_aesam.bench.noisy_labels_plan` (its regimes,
stages and specs) and writes the report of
:mod:`keras_aesam.bench.noisy_labels_report`; this module is the running: one
spec trained, stored results found, locks between processes sharing a folder,
the side-by-side timing and the command line.

Every run of a seed starts from the same initial weights and sees the same
labels and batch order. Each result is a JSON file written when its run ends,
so an interrupted profile resumes at the next unfinished run.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from keras_aesam.bench import noisy_labels_report
from keras_aesam.bench.noisy_labels_plan import (
    BUDGETS,
    COMMANDS_FILE,
    CURVE_EVERY,
    MLP,
    REGIMES,
    RHO_SEEDS,
    SEEDS,
    TIMING_FILE,
    budget_specs,
    main_specs,
    msam_rho_specs,
    planned_runs,
    realised_budget,
    rho_specs,
    rival_specs,
    run_id,
    setting_name,
    timing_key,
)
from keras_aesam.bench.progress import Progress
from keras_aesam.bench.records import machine
from keras_aesam.bench.step_timing import time_rows
from keras_aesam.cli.flags import write_json
from keras_aesam.cli.run_lock import Locked, RunLock

#: ρ of the sharpness readout, the same for every method so models compare.
SHARPNESS_RHO = 0.05
SHARPNESS_BATCHES = 8


# ---------------------------------------------------------------- one run
def build_model(spec, inner, total_steps):
    """The wrapped model of a spec: its method's policy with ``direction_from``'s direction."""
    import keras_aesam
    from keras_aesam import build_method
    from keras_aesam.methods import method_parameters

    hp = spec["hyperparameters"]
    if spec["direction_from"] == spec["method"]:
        policy, direction = build_method(spec["method"], **hp)
    else:
        takes = set(method_parameters(spec["method"]))
        policy, _ = build_method(spec["method"], **{k: v for k, v in hp.items() if k in takes})
        _, direction = build_method(spec["direction_from"], rho=hp["rho"],
                                    **{k: v for k, v in hp.items() if k not in takes})
    return keras_aesam.SharpnessAwareModel(
        inner=inner, policy=policy, direction=direction, total_steps=total_steps
    )


def compiled_model(spec, inner, total_steps):
    """:func:`build_model`'s model, compiled with the spec's recipe (SGD, schedule, weight decay)."""
    from keras_aesam import recipe

    model = build_model(spec, inner, total_steps)
    plan = recipe.Recipe(lr=spec["lr"], momentum=spec["momentum"], weight_decay=spec["weight_decay"],
                         schedule=spec["schedule"])
    recipe.compile_model(model, plan, total_steps)
    return model


def _curve_callback(test, every, stream):
    import keras

    class Curve(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.points = []
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            if (epoch + 1) % every:
                return
            acc = float(self.model.evaluate(test, verbose=0, return_dict=True)["accuracy"])
            self.points.append([epoch + 1, acc])
            print(f"    epoch {epoch + 1:3d}: train acc {logs.get('accuracy', float('nan')):.3f}, "
                  f"test acc {acc:.3f}, SAM share {logs.get('sam_fraction', 0.0):.2f}, "
                  f"{time.perf_counter() - self.started:.0f} s", file=stream, flush=True)

    return Curve()


def run_one(spec, stream=sys.stdout):
    """Train one spec and return its result (test accuracy, SAM steps, curve …)."""
    import keras

    from keras_aesam import data as data_module
    from keras_aesam.bench.networks import build_network
    from keras_aesam.bench.worker import _sam_steps_per_epoch
    from keras_aesam.sharpness import measure_sharpness

    keras.utils.clear_session()
    keras.utils.set_random_seed(spec["seed"])
    data = data_module.get_dataset(
        spec["dataset"], batch_size=spec["batch_size"], seed=spec["seed"], label_noise=spec["noise"],
        train_size=spec["train_size"], validation_fraction=spec["validation_fraction"],
    )
    inner = build_network(keras, spec["network"], num_classes=data.num_classes, input_shape=data.input_shape)
    total_steps = spec["epochs"] * data.steps_per_epoch
    model = compiled_model(spec, inner, total_steps)
    curve = _curve_callback(data.test, CURVE_EVERY, stream)
    started = time.perf_counter()
    history = model.fit(data.train, epochs=spec["epochs"], verbose=0, callbacks=[curve], shuffle=False)
    fit_seconds = time.perf_counter() - started
    test = model.evaluate(data.test, verbose=0, return_dict=True)
    val = model.evaluate(data.validation, verbose=0, return_dict=True)
    steps = int(model.policy_state["step"])
    sam_steps = int(sum(_sam_steps_per_epoch(history.history["sam_fraction"], data.steps_per_epoch)))
    return {
        "test_accuracy": float(test["accuracy"]), "test_loss": float(test["loss"]),
        "val_accuracy": float(val["accuracy"]), "val_loss": float(val["loss"]),
        "train_accuracy": float(history.history["accuracy"][-1]),
        "train_loss": float(history.history["loss"][-1]),
        "steps": steps, "sam_steps": sam_steps, "sam_fraction": sam_steps / steps,
        "grad_evals": steps + sam_steps,
        "skipped_steps": int(sum(history.history.get("skipped_steps", [0]))),
        "curve": curve.points,
        "sharpness": measure_sharpness(
            inner, data.train.take(SHARPNESS_BATCHES), rho=SHARPNESS_RHO,
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        ),
        "noise_rate_realised": data.noise_rate_realised,
        "num_classes": data.num_classes,
        "hyperparameters": model.hyperparameters,
        "fit_seconds": round(fit_seconds, 2),
    }


# ---------------------------------------------------------------- the driver
def _result_path(out, spec):
    return Path(out) / "runs" / f"{run_id(spec)}.json"


def finished(out, spec, stream=None):
    """The stored result of ``spec`` if it ran with exactly this spec, else None.

    A result file that does not parse (a crash or a full disk while it was
    copied) is reported on ``stream`` and counts as not run: the run is redone.
    """
    path = _result_path(out, spec)
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        print(f"note: damaged result file {path} ({err}): run {run_id(spec)} is run again",
              file=stream or sys.stderr, flush=True)
        return None
    return result if isinstance(result, dict) and result.get("spec") == spec else None


def run_specs(out, specs, progress, stream, poll_seconds=10, methods=None):
    """The results of ``specs``, in their order: stored ones read, the others run.

    A run that another live process is doing is put off: this process goes on
    with the next ones and waits for that result only when nothing else is left.
    With ``methods``, a spec of another method is not run: its stored result,
    or None.
    """
    results = [None] * len(specs)
    put_off = []
    for i, spec in enumerate(specs):
        if methods is not None and spec["method"] not in methods:
            results[i] = finished(out, spec, stream)
            continue
        started = time.perf_counter()
        result, ran = _run_once(out, spec, stream, started, wait=False, progress=progress)
        if result is None:
            put_off.append(i)
            continue
        progress.end(spec, result, time.perf_counter() - started, ran)
        results[i] = result
    for i in put_off:
        progress.start(specs[i])
        started = time.perf_counter()
        result, ran = _run_once(out, specs[i], stream, started, poll_seconds)
        progress.end(specs[i], result, time.perf_counter() - started, ran)
        results[i] = result
    return results


def _run_once(out, spec, stream, started, poll_seconds=10, wait=True, progress=None):
    """``(result, ran)``: the stored result of ``spec``, or its run by this process.

    Several processes may share the profile's folder (each takes the runs in
    its own order, e.g. ``--reverse-seeds``), so a run is done under a lock of
    its own (``locks/RUN_ID``): a process that meets a run another live process
    is doing waits for its result instead of running it a second time (or,
    with ``wait=False``, returns ``(None, False)`` at once); a lock left by a
    killed process is taken over. ``progress`` (given with ``wait=False``) is
    told of the start of a run that is not put off.
    """
    lock_dir = Path(out) / "locks" / run_id(spec)
    waiting = False
    while True:
        result = finished(out, spec, stream)
        if result is not None:
            if progress is not None:
                progress.start(spec)
            return result, False
        try:
            lock = RunLock.acquire(lock_dir, f"keras-aesam bench --profile noisy-labels ({run_id(spec)})",
                                   stream=stream)
        except Locked as held:
            if not wait:
                print(f"    put off {run_id(spec)}: {held}", file=stream, flush=True)
                return None, False
            if not waiting:
                print(f"    waiting: {held}", file=stream, flush=True)
                waiting = True
            time.sleep(poll_seconds)
            continue
        try:
            if progress is not None:
                progress.start(spec)
            result = finished(out, spec, stream)  # done by the holder we waited for
            if result is not None:
                return result, False
            body = run_one(spec, stream)
            result = {"run_id": run_id(spec), "spec": spec, **body,
                      "run_seconds": round(time.perf_counter() - started, 2),
                      "finished_at": datetime.datetime.now().isoformat(timespec="seconds")}
            write_json(_result_path(out, spec), result)
            return result, True
        finally:
            lock.release()
            try:
                lock_dir.rmdir()
                lock_dir.parent.rmdir()  # the last run's lock takes the folder with it
            except OSError:
                pass  # another process's lock is in it


def choose_rho(results):
    """The ρ of the best mean validation accuracy (ties: the smaller ρ); None if a ρ has no result."""
    if not results or any(r is None for r in results):
        return None
    by_rho = {}
    for r in results:
        by_rho.setdefault(r["spec"]["hyperparameters"]["rho"], []).append(r["val_accuracy"])
    return max(sorted(by_rho), key=lambda rho: np.mean(by_rho[rho]))


def profile_record(regime):
    """What ``profile.json`` says of a regime (the report reads its recipe and plan from it)."""
    return {"regime": regime.name, "recipe": regime.recipe, "settings": list(regime.settings),
            "seeds": list(SEEDS), "rho_grid": regime.rho_grid, "msam_rho_grid": regime.msam_rho_grid,
            "rho_seeds": RHO_SEEDS, "budgets": BUDGETS if regime.budget_stage else [],
            "main_noise": regime.main_noise}


def run_profile(out, settings=None, seeds=SEEDS, budget_seeds=SEEDS, stream=sys.stdout, regime=MLP, methods=None):
    """Run (or resume) the profile of ``regime`` into ``out``, then write the report.

    ``settings`` (label-noise rates) default to the regime's. The fixed-budget
    stage (a regime with one) runs on ``budget_seeds`` of the main setting once
    its ρ is known (from this process or from another one writing to ``out``),
    so two processes can share the work. ``methods`` (names): run only their
    specs now, reading the others' stored results (a method added to a
    folder, or the runs that matter most first).
    """
    out = Path(out)
    settings = regime.settings if settings is None else settings
    write_json(out / "profile.json", profile_record(regime))
    budget_seeds = budget_seeds if regime.budget_stage else ()
    progress = Progress(planned_runs(settings, seeds, budget_seeds, regime), stream, name=run_id)
    def run(specs):
        return run_specs(out, specs, progress, stream, methods=methods)

    for noise in settings:
        rho = choose_rho(run(rho_specs(noise, regime)))
        if rho is None:
            print(f"{setting_name(noise)}: SAM's rho search is not done and --methods leaves it out: skipped",
                  file=stream, flush=True)
            continue
        write_json(_rho_path(out, noise), {"rho": rho})
        print(f"{setting_name(noise)}: rho = {rho:g} (best validation accuracy)", file=stream, flush=True)
        msam_rho = choose_rho(run(msam_rho_specs(noise, regime)))
        if msam_rho is not None:
            write_json(_rho_path(out, noise, "msam_"), {"rho": msam_rho})
            print(f"{setting_name(noise)}: MSAM rho = {msam_rho:g} (best validation accuracy)", file=stream,
                  flush=True)
        for seed in seeds:
            first = run(main_specs(noise, seed, rho, regime=regime))
            if first[2] is not None and first[4] is not None:  # the zeta-matched runs need AE-SAM's and AE-LookSAM's
                run(main_specs(noise, seed, rho, realised_budget(first[2]), realised_budget(first[4]), regime)[5:])
            run([s for s in rival_specs(noise, seed, rho, msam_rho or 1.0, regime)
                 if msam_rho is not None or s["method"] != "msam"])
    if budget_seeds:
        rho = _wait_for_rho(out, regime.main_noise, stream)
        for seed in budget_seeds:
            run(budget_specs(regime.main_noise, seed, rho, regime))
    return noisy_labels_report.write_report(out)


#: The side-by-side timing: steps timed per row and round, rounds, untimed steps before them.
TIMING_STEPS, TIMING_ROUNDS, TIMING_WARMUP = 60, 5, 10


def timing_specs(out):
    """One spec per timing key, ERM's first: seed 0's stored runs, then seed 0's planned rows of the
    main setting not run yet (a matched row's budget read from AE-SAM's or AE-LookSAM's stored run)."""
    specs = {}
    for path in sorted((Path(out) / "runs").glob("*.json")):
        spec = json.loads(path.read_text())["spec"]
        if spec["seed"] == 0:
            specs.setdefault(timing_key(spec["label"]), spec)
    if "erm" not in specs:
        raise FileNotFoundError(f"no ERM run of seed 0 under {Path(out) / 'runs'}: nothing to time against")
    for spec in _planned_seed0(out):
        specs.setdefault(timing_key(spec["label"]), spec)
    return [specs.pop("erm"), *(specs[k] for k in sorted(specs))]


def _planned_seed0(out):
    """Seed 0's planned rows of the folder's main setting, as far as the stored runs fix them."""
    regime = noisy_labels_report.load_regime(out)
    setting = setting_name(regime.main_noise)
    rho, msam_rho = (noisy_labels_report.chosen_rhos(out, method).get(setting) for method in ("", "msam_"))
    if rho is None:
        return []
    first = [finished(out, s) for s in main_specs(regime.main_noise, 0, rho, regime=regime)]
    zeta, zeta_look = (None if r is None else realised_budget(r) for r in (first[2], first[4]))
    planned = main_specs(regime.main_noise, 0, rho, zeta, zeta_look, regime)
    if msam_rho is not None:
        planned += rival_specs(regime.main_noise, 0, rho, msam_rho, regime)
    return planned


def measure_timing(out, stream=sys.stdout, steps=TIMING_STEPS, rounds=TIMING_ROUNDS, warmup=TIMING_WARMUP):
    """Time every row of the folder side by side and write ``timing.json``."""
    specs = timing_specs(out)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    print(f"timing {len(specs)} rows: {rounds} rounds of {warmup} + {steps} steps each", file=stream, flush=True)
    rows = time_rows([{**s, "label": timing_key(s["label"])} for s in specs], compiled_model, steps=steps,
                     rounds=rounds, warmup=warmup, stream=stream)
    write_json(Path(out) / TIMING_FILE, {
        "rows": rows, "steps": steps, "rounds": rounds, "warmup": warmup,
        "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "seconds": round(time.perf_counter() - started, 1), "machine": machine(),
        "measured_at": datetime.datetime.now().isoformat(timespec="seconds"),
    })
    return rows


def _rho_path(out, noise, method=""):
    return Path(out) / f"{method}rho_{setting_name(noise)}.json"


def _wait_for_rho(out, noise, stream, poll_seconds=30):
    path = _rho_path(out, noise)
    if not path.is_file():
        print(f"waiting for {path.name} (the main setting's ρ search, run by another process)",
              file=stream, flush=True)
    while not path.is_file():
        time.sleep(poll_seconds)
    return json.loads(path.read_text())["rho"]


def build_parser(prog="keras-aesam bench --profile noisy-labels"):
    """The profile's own flags (``--label-noise`` as in ``train`` and ``bench``; ``--noise`` still parses)."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="folder of the profile's runs and report")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help="number of seeds (default 5)")
    parser.add_argument("--regime", choices=sorted(REGIMES), default=MLP.name,
                        help="the network and recipe: mlp (784-512-512-10, 40 epochs) or cnn (bn_cnn, a narrow "
                             "CNN with BatchNorm, 30 epochs); default mlp")
    parser.add_argument("--label-noise", dest="noise", type=float, nargs="*", default=None,
                        help="label-noise settings of the main stage (default: the regime's, 0.4 0.0 0.6 for "
                             "the MLP, 0.4 for the CNN)")
    parser.add_argument("--budget-seeds", type=int, nargs="*", default=None,
                        help="seeds of the fixed-budget stage on the 0.4 setting (default: all; none: skip)")
    parser.add_argument("--reverse-seeds", action="store_true",
                        help="take the seeds last first: a second process on the same settings meets the first "
                             "in the middle instead of repeating its runs")
    parser.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                        help="run only these methods' runs now (e.g. msam), reading the others' stored results; "
                             "a later invocation without it does the rest")
    parser.add_argument("--report-only", action="store_true", help="redraw the report from the stored runs")
    parser.add_argument("--timing", action="store_true",
                        help="time every row's step side by side in this process (timing.json; the seconds axis "
                             "of the report), then redraw the report; run it after the runs, on a quiet machine")
    return parser


def record_command(out, argv, prog="keras-aesam bench --profile noisy-labels"):
    """Appends this invocation (as typed, and when) to ``out/commands.json``."""
    path = Path(out) / COMMANDS_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else []
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    recorded.append({"command": " ".join([prog, *(shlex.quote(a) for a in argv)]), "started": started})
    write_json(path, recorded)


def main(argv=None, prog="keras-aesam bench --profile noisy-labels"):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    if args.timing:
        record_command(args.output, argv, prog)
        measure_timing(args.output)
    if args.report_only or args.timing:
        noisy_labels_report.write_report(args.output)
        print(f"report: {Path(args.output) / 'report.md'}")
        return 0
    regime = REGIMES[args.regime]
    stored = Path(args.output) / "profile.json"
    if stored.is_file():
        other = json.loads(stored.read_text()).get("regime", MLP.name)
        if other != regime.name:
            raise SystemExit(f"error: {args.output} holds the {other!r} regime's runs; --regime {regime.name} "
                             "needs a folder of its own (--output)")
    if args.methods:
        from keras_aesam.methods import METHODS

        unknown = sorted(set(args.methods) - set(METHODS))
        if unknown:
            raise SystemExit(f"error: --methods: unknown method(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(sorted(METHODS))}")
    seeds = tuple(range(args.seeds))[::-1 if args.reverse_seeds else 1]
    budget_seeds = seeds if args.budget_seeds is None else tuple(args.budget_seeds)
    settings = None if args.noise is None else tuple(args.noise)
    record_command(args.output, argv, prog)
    run_profile(args.output, settings=settings, seeds=seeds, budget_seeds=budget_seeds, regime=regime,
                methods=None if args.methods is None else set(args.methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
