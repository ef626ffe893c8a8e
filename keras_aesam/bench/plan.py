"""The bench's plan: profiles, flags, resolving them into runs, and the cost model.

``resolve(args)`` checks every argument and returns the plan (a dict of runs and
their shared configuration) without touching TensorFlow or the disk;
``check_budget(plan)`` estimates its wall time on the reference machine.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
from pathlib import Path

from keras_aesam import methods as _methods, recipe
from keras_aesam.bench.networks import BENCH_NETWORKS, _network_names
from keras_aesam.cli import flags
from keras_aesam.cli.flags import HYPERPARAMETER_FLAGS, BadInput  # noqa: F401  (re-exported: keras_aesam.bench's API)
from keras_aesam.validation import canonical_name as _canonical

#: The seven methods, in the paper's order of presentation.
ALL_METHODS = _methods.PAPER_METHODS
PEER_METHOD = "peer_tf_keras_sam"
#: A diagnostic variant of the peer: its first pass in training mode as well.
PEER_TRAIN_MODE = "peer_tf_keras_sam_train_mode"
PEER_METHODS = (PEER_METHOD, PEER_TRAIN_MODE)
PEER_REQUIREMENT = "tf-keras==2.21.0"

#: Settings shared by every profile (the paper's §4.1 optimizer, scaled to a 2-core CPU).
COMMON = {
    "dataset": "fashion_mnist",
    "network": "resnet8",
    "batch_size": 128,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "weight_decay_mode": recipe.Recipe().weight_decay_mode,
    "schedule": "cosine",
    "rho": 0.05,
    "validation_fraction": 0.1,
    "test_batches": None,
}

#: Profiles: what runs by default, and the time it must fit in (minutes) on the
#: reference machine (2 shared cores; see ``REFERENCE_STEP_SECONDS``).
PROFILES = {
    "quick": {
        "methods": ("erm", "sam", "ss_sam", "ae_sam"),
        "seeds": 2,
        "epochs": 2,
        "train_size": 1024,
        "noise": (0.0,),
        "budget_minutes": 10.0,
    },
    "standard": {
        "methods": ALL_METHODS,
        "seeds": 3,
        "epochs": 4,
        "train_size": 3072,
        "noise": (0.0, 0.4, 0.8),
        "budget_minutes": 90.0,
    },
}

#: The paper's §4.3 settings for label noise (applied when the noise rate is > 0,
#: unless the flag is given explicitly).
NOISY_HYPERPARAMETERS = {
    "looksam": {"k": 2},
    "ae_sam": {"lambda1": -1.0, "lambda2": 1.0},
    "ae_looksam": {"lambda1": -1.0, "lambda2": 1.0},
}

#: Seconds per training step (ERM, batch 128) measured on the reference machine, an
#: Intel Xeon @ 2.50GHz VM with 2 cores shared with other jobs (load average 4-6):
#: the budget check's cost model. Other networks get a conservative guess.
REFERENCE_STEP_SECONDS = {
    "resnet8": 0.30,
    "resnet14": 0.47,
    "resnet20": 0.84,
    "small_cnn": 0.13,
    "resnet32": 1.4,
}
UNKNOWN_NETWORK_STEP_SECONDS = 2.0
#: Per run: data pipeline, network build, tracing of both branches.
RUN_OVERHEAD_SECONDS = 20.0
#: Per worker process: importing TensorFlow and Keras.
PROCESS_OVERHEAD_SECONDS = 15.0
#: A forward pass costs about a third of a forward-backward pass (the cost model
#: behind ESAM's extra forward pass and the evaluation time).
FORWARD_COST = 1.0 / 3.0


#: The evidence profile (:mod:`keras_aesam.bench.noisy_labels`): its own plan, flags and report.
NOISY_LABELS_PROFILE = "noisy-labels"

#: Display names: the methods' own, and the peer rows'.
_PRETTY = {**_methods.PRETTY_NAMES, PEER_METHOD: "Keras 2 SAM (peer)",
           PEER_TRAIN_MODE: "Keras 2 SAM, 1st pass training=True (diagnostic)"}


def _pretty(method):
    return _PRETTY.get(method, method)


# --------------------------------------------------------------------- parser

_EPILOG = """\
profiles (flags override them; --budget-minutes 0 turns the time check off):
  quick     erm, sam, ss_sam, ae_sam; 2 seeds; 1024 training examples; 2 epochs; clean
            labels; the peer row when tf_keras is installed. Under 10 minutes.
  standard  all seven methods; 3 seeds; 3072 training examples; 4 epochs; clean labels and
            40 %% / 80 %% label noise (there LookSAM k=2, AE-SAM and AE-LookSAM
            lambda1=-1, lambda2=1, as the paper's section 4.3); the peer row on clean
            labels. Under 90 minutes.
Both: Fashion-MNIST, a CIFAR-style ResNet-8 (78 k parameters), batch 128, SGD momentum
0.9, lr 0.1 with a cosine schedule to 0, rho 0.05, weight decay 1e-4 as an L2 penalty
(PyTorch's coupled SGD(weight_decay=1e-4); inside g, the same for every method).

examples:
  keras-aesam bench                                   # quick, into bench_results/quick
  keras-aesam bench --profile standard --output docs/results/fashion_mnist_standard
  keras-aesam bench --profile standard --seeds 5 --epochs 10 --budget-minutes 0
  keras-aesam bench --methods erm,sam,ae_sam --label-noise 0,0.4 --seeds 3 --output runs/bench
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="keras-aesam bench",
        description="Run methods side by side (same data, network, initial weights and seeds) and "
        "write a Markdown report, a CSV of every run and plots.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = parser.add_argument_group("what runs")
    g.add_argument("--profile", choices=sorted(PROFILES) + [NOISY_LABELS_PROFILE], default="quick",
                   help="default %(default)s; noisy-labels is the evidence profile, with flags of its own "
                        "(keras-aesam bench --profile noisy-labels --help)")
    g.add_argument("--methods", default=None,
                   help=f"comma-separated, or 'all' ({', '.join(ALL_METHODS)}); default: the profile's")
    g.add_argument("--seeds", type=int, default=None, help="number of seeds (default: the profile's)")
    g.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed, first-seed+1, … (default 0)")
    g.add_argument("--label-noise", dest="noise", default=None,
                   help="comma-separated label-noise rates in [0, 1), e.g. 0,0.4,0.8 (default: the profile's)")
    g.add_argument("--epochs", type=int, default=None, help="default: the profile's")
    g.add_argument("--train-size", default=None,
                   help="training examples kept after the validation split, or 'all' (default: the profile's)")
    g.add_argument("--dataset", default=None, help=f"default {COMMON['dataset']}")
    g.add_argument("--network", default=None,
                   help=f"default {COMMON['network']}; resnet8/14/20 are defined here (and in tf_keras "
                   "for the peer row), the others come from keras_aesam.networks")
    g.add_argument("--test-batches", type=int, default=None,
                   help="evaluate on the first N test batches only (default: the whole test set)")
    o = parser.add_argument_group("optimizer (the same for every method)")
    o.add_argument("--batch-size", type=int, default=None,
                   help=f"the global batch, split over the replicas (default {COMMON['batch_size']})")
    o.add_argument("--lr", type=float, default=None, help=f"initial learning rate (default {COMMON['lr']})")
    o.add_argument("--momentum", type=float, default=None, help=f"default {COMMON['momentum']}")
    o.add_argument("--weight-decay", type=float, default=None, help=f"default {COMMON['weight_decay']}")
    o.add_argument("--weight-decay-mode", choices=recipe.WEIGHT_DECAY_MODES, default=None,
                   help=f"default {COMMON['weight_decay_mode']} (see the module docstring)")
    h = parser.add_argument_group("method hyperparameters (to every method that takes them; paper defaults)")
    flags.add_hyperparameter_flags(h)
    from keras_aesam.cli import devices

    devices.add_strategy_flags(parser.add_argument_group(
        "devices (every run the same; multi-worker: every worker runs the same command)"))
    _running_flags(parser.add_argument_group("running"))
    return parser


def _running_flags(r):
    """Where results go, resuming, the peer row, isolation, the time budget and the other modes."""
    r.add_argument("--output", "-o", default=None, help="output directory (default bench_results/<profile>)")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="skip finished runs (the default when the output directory has results)")
    mode.add_argument("--fresh", action="store_true", help="delete the previous results in --output first")
    r.add_argument("--peer", action=argparse.BooleanOptionalAction, default=None,
                   help=f"the Keras 2 SAM peer row (default: on when tf_keras is installed: pip install "
                   f"'{PEER_REQUIREMENT}')")
    r.add_argument("--peer-diagnostic", action="store_true",
                   help="also run the peer with training=True on its first pass (which of its differences "
                   "moves the accuracy)")
    r.add_argument("--isolation", choices=("group", "run", "none"), default="group",
                   help="a worker process per (setting, seed) group (default), per run, or none")
    r.add_argument("--budget-minutes", type=float, default=None,
                   help="refuse plans estimated to take longer (default: the profile's; 0 = no check)")
    r.add_argument("--dry-run", action="store_true", help="print the plan and its time estimate, run nothing")
    r.add_argument("--report-only", action="store_true", help="rewrite the report from the results in --output")
    r.add_argument("--framework-probe", action="store_true",
                   help="time one network in Keras 3 and tf_keras, with and without SAM, interleaved in one "
                   "process (why the peer's step costs what it does); writes OUT/framework_probe.md")
    r.add_argument("--probe-repeats", type=int, default=5, help="rounds of the framework probe (default 5)")
    r.add_argument("--worker", default=None, help=argparse.SUPPRESS)


# ------------------------------------------------------------------ resolving


def _parse_methods(text, default):
    from keras_aesam import METHODS

    if text is None:
        return list(default)
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise BadInput(f"--methods is empty; give one or more of {', '.join(METHODS)} (or 'all')")
    if len(parts) == 1 and parts[0].lower() == "all":
        return list(ALL_METHODS)
    chosen, unknown = [], []
    for part in parts:
        match = [m for m in METHODS if _canonical(m) == _canonical(part)]
        if not match:
            unknown.append(part)
        elif match[0] not in chosen:
            chosen.append(match[0])
    if unknown:
        raise BadInput(f"unknown method(s) {', '.join(repr(u) for u in unknown)}; valid methods: "
                       f"{', '.join(METHODS)}")
    return chosen


def _parse_noise(text, default, flag="--label-noise"):
    """The label-noise rates of ``flag`` (as the user spelled it, for the messages), without repeats."""
    if text is None:
        return list(default)
    values = []
    for part in str(text).split(","):
        if not part.strip():
            continue
        try:
            value = float(part)
        except ValueError:
            raise BadInput(f"{flag} must be comma-separated numbers in [0, 1), got {text!r}") from None
        if not 0.0 <= value < 1.0:
            raise BadInput(f"{flag} rates must be in [0, 1), got {value:g}")
        if value not in values:
            values.append(value)
    if not values:
        raise BadInput(f"{flag} is empty; give at least one rate, e.g. 0 or 0,0.4,0.8")
    return values


def setting_label(noise) -> str:
    """``clean`` for no label noise, ``noise40`` for 40 %."""
    return "clean" if noise == 0 else f"noise{100 * noise:g}".replace(".", "p")


#: Spec keys added after results were first stored, with the value every earlier run had:
#: left out of the hash at that value, so benches written before them still resume.
_ADDED_SPEC_KEYS = {"strategy": "auto", "cpu_devices": None, "sync_perturbation": True}


def _spec_hash(spec) -> str:
    payload = {k: v for k, v in spec.items() if k not in ("run_id", "index")
               and not (k in _ADDED_SPEC_KEYS and v == _ADDED_SPEC_KEYS[k])}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _peer_available():
    return importlib.util.find_spec("tf_keras") is not None


def resolve(args) -> dict:
    """Checks every argument and returns the plan (no TensorFlow work, no files written)."""
    profile = PROFILES[args.profile]
    methods = _parse_methods(args.methods, profile["methods"])
    noise = _parse_noise(args.noise, profile["noise"], "--label-noise")
    seeds = _seeds(args, profile)
    config = _config(args, profile)
    _check_config(config)
    if "msam" in methods and config["momentum"] <= 0.0:
        raise BadInput("msam perturbs along SGD's momentum: with msam among --methods, --momentum must be in "
                       f"(0, 1), got {config['momentum']:g}")
    runs = _method_runs(args, config, methods, noise, seeds)
    peer, peer_note, peer_runs = _peer_runs(args, config, noise, seeds)
    runs = _ordered(runs + peer_runs, noise, seeds)
    budget = profile["budget_minutes"] if args.budget_minutes is None else args.budget_minutes
    if budget < 0:
        raise BadInput(f"--budget-minutes must be >= 0, got {budget:g}")
    output = Path(args.output) if args.output else Path("bench_results") / args.profile
    if output.exists() and not output.is_dir():
        raise BadInput(f"--output {str(output)!r} is a file")
    return {
        "profile": args.profile,
        "config": config,
        "methods": methods,
        "noise": noise,
        "seeds": seeds,
        "peer": bool(peer),
        "peer_note": peer_note,
        "runs": runs,
        "budget_minutes": budget,
        "isolation": args.isolation,
        "output": output,
    }


def _seeds(args, profile):
    seeds_n = profile["seeds"] if args.seeds is None else args.seeds
    if seeds_n < 1:
        raise BadInput(f"--seeds must be >= 1, got {seeds_n}")
    if args.first_seed < 0:
        raise BadInput(f"--first-seed must be >= 0, got {args.first_seed}")
    seeds = list(range(args.first_seed, args.first_seed + seeds_n))
    return seeds


def _config(args, profile):
    """The configuration every run shares: COMMON, the profile's, then the flags."""
    config = dict(COMMON)
    for key in ("dataset", "network", "batch_size", "lr", "momentum", "weight_decay", "weight_decay_mode",
                "test_batches"):
        value = getattr(args, key)
        if value is not None:
            config[key] = value
    config["epochs"] = profile["epochs"] if args.epochs is None else args.epochs
    train_size = profile["train_size"] if args.train_size is None else args.train_size
    config["train_size"] = flags.parse_train_size(train_size)
    config.update(strategy=args.strategy, cpu_devices=args.cpu_devices, sync_perturbation=args.sync_perturbation)
    return config


def _check_config(config):
    """Names the dataset and network canonically; BadInput for any value out of range."""
    from keras_aesam.data import DATASETS

    datasets = [d for d in DATASETS if _canonical(d) == _canonical(config["dataset"])]
    if not datasets:
        raise BadInput(f"unknown dataset {config['dataset']!r}; valid datasets: {', '.join(sorted(DATASETS))}")
    config["dataset"] = datasets[0]
    networks = [n for n in _network_names() if _canonical(n) == _canonical(config["network"])]
    if not networks:
        raise BadInput(f"unknown network {config['network']!r}; valid networks: {', '.join(_network_names())}")
    config["network"] = networks[0]
    flags.check_recipe(config["epochs"], config["batch_size"], config["lr"], config["momentum"],
                       config["weight_decay"])
    if config["test_batches"] is not None and config["test_batches"] < 1:
        raise BadInput(f"--test-batches must be >= 1, got {config['test_batches']}")
    _check_devices(config)


def _check_devices(config):
    """BadInput unless the device flags go together (and TF_CONFIG is set for multi-worker)."""
    import os

    from keras_aesam.cli import devices

    try:
        devices.check_flags(config["strategy"], config["cpu_devices"])
    except devices.DeviceError as err:
        raise BadInput(str(err)) from None
    if config["strategy"] == "multi-worker" and not os.environ.get("TF_CONFIG"):
        raise BadInput("--strategy multi-worker reads the cluster from TF_CONFIG, which is not set (every "
                       "worker runs the same keras-aesam bench command with its own TF_CONFIG)")


#: Why a multi-worker bench has no peer row.
_PEER_NOT_IN_CLUSTER = "the tf_keras peer trains on one device and cannot join a --strategy multi-worker cluster"


def _method_runs(args, config, methods, noise, seeds):
    """One run per (setting, seed, method); the flags' hyperparameters go to every method taking them."""
    from keras_aesam import build_method, method_parameters

    # Method hyperparameters: the user's flags go to every method that takes them.
    given = flags.given_hyperparameters(args)
    config["rho"] = given.get("rho", COMMON["rho"])
    takers = {name: [m for m in methods if name in flags.method_takes(m)] for name in given}
    unused = [f"{hp.flag} ({', '.join(flags.methods_taking(hp.name))} take it)"
              for hp in HYPERPARAMETER_FLAGS if hp.name in given and not takers[hp.name]]
    if unused:
        raise BadInput(f"none of the methods {', '.join(methods)} takes {'; '.join(unused)}")

    runs = []
    for rate in noise:
        label = setting_label(rate)
        for seed in seeds:
            for method in methods:
                hp = {"rho": config["rho"]}
                if rate > 0:
                    hp.update(NOISY_HYPERPARAMETERS.get(method, {}))
                hp.update({k: v for k, v in given.items() if k in method_parameters(method)})
                if "seed" in method_parameters(method):
                    hp["seed"] = seed
                try:
                    build_method(method, **hp)
                except (ValueError, TypeError) as err:
                    raise BadInput(f"invalid hyperparameter for {method}: {' '.join(str(err).split())}") from err
                runs.append(dict(run_id=f"{label}_s{seed}_{method}", kind="method", method=method,
                                 setting=label, noise=rate, seed=seed, hyperparameters=hp, **config))
    return runs


def _peer_runs(args, config, noise, seeds):
    """``(peer, note, runs)``: whether the peer row runs, why not if it does not, and its runs."""
    peer = args.peer
    peer_note = None
    if config["strategy"] == "multi-worker":
        if peer or getattr(args, "peer_diagnostic", False):
            raise BadInput(f"--peer/--peer-diagnostic: {_PEER_NOT_IN_CLUSTER}; pass --no-peer")
        return False, (_PEER_NOT_IN_CLUSTER if peer is None else None), []
    if peer is None:
        peer = _peer_available() and config["network"] in BENCH_NETWORKS
        if not _peer_available():
            peer_note = f"tf_keras is not installed (pip install '{PEER_REQUIREMENT}')"
        elif config["network"] not in BENCH_NETWORKS:
            peer_note = f"network {config['network']!r} has no tf_keras twin here"
    elif peer:
        if not _peer_available():
            raise BadInput(f"--peer needs tf_keras: pip install '{PEER_REQUIREMENT}'")
        if config["network"] not in BENCH_NETWORKS:
            raise BadInput(f"--peer needs a network with a tf_keras twin: {', '.join(sorted(BENCH_NETWORKS))}")
    if getattr(args, "peer_diagnostic", False) and not peer:
        raise BadInput("--peer-diagnostic needs the peer row (tf_keras installed, a network with a tf_keras twin)")
    runs = []
    if peer:
        rate = noise[0]
        label = setting_label(rate)
        peer_methods = PEER_METHODS if getattr(args, "peer_diagnostic", False) else (PEER_METHOD,)
        for seed in seeds:
            for peer_method in peer_methods:
                runs.append(dict(run_id=f"{label}_s{seed}_{peer_method}", kind="peer", method=peer_method,
                                 setting=label, noise=rate, seed=seed, hyperparameters={"rho": config["rho"]},
                                 **config))
    return bool(peer), peer_note, runs


def _ordered(runs, noise, seeds):
    """Runs by setting, then seed, the peer last in each; numbered and hashed."""
    # Order: setting, seed, then the methods and the peer (interleaved across seeds).
    order = {(setting_label(r), s): i for i, (r, s) in enumerate((r, s) for r in noise for s in seeds)}
    runs.sort(key=lambda spec: (order[(spec["setting"], spec["seed"])], spec["kind"] == "peer"))
    for index, spec in enumerate(runs):
        spec["index"] = index
        spec["spec_hash"] = _spec_hash(spec)
    return runs


# ------------------------------------------------------------ time estimates


def _train_examples(config):
    """Training examples after the split (Fashion-MNIST: 60 000 · (1 - validation_fraction))."""
    pool = {"fashion_mnist": 60000, "cifar10": 50000, "cifar100": 50000}.get(config["dataset"], 1_281_167)
    pool = int(round(pool * (1 - config["validation_fraction"])))
    return pool if config["train_size"] is None else min(config["train_size"], pool)


def _cost_per_step(method, hp, batch_size=128, expected_fraction=None):
    """Forward-backward passes per step, expected (ESAM: 1 + a forward + ⌈γB⌉/B)."""
    if method in PEER_METHODS:
        return 2.0
    if method == "esam":
        return 1.0 + FORWARD_COST + math.ceil(hp.get("gamma", 0.5) * batch_size) / batch_size
    if expected_fraction is None:
        expected_fraction = {"erm": 0.0, "sam": 1.0, "ss_sam": hp.get("p", 0.5),
                             "looksam": 1.0 / hp.get("k", 5)}.get(method)
    if expected_fraction is None:  # adaptive: the policy's expectation under normal ‖g‖²
        from keras_aesam import build_method

        policy, _ = build_method(method, **hp)
        expected_fraction = policy.expected_sam_fraction(1000) or 0.5
    return 1.0 + expected_fraction


def estimate_seconds(runs, isolation="group") -> float:
    """Wall time of ``runs`` on the reference machine (2 shared cores), from the cost model."""
    total = 0.0
    groups = set()
    for spec in runs:
        step = REFERENCE_STEP_SECONDS.get(spec["network"], UNKNOWN_NETWORK_STEP_SECONDS)
        step *= spec["batch_size"] / 128.0
        steps = math.ceil(_train_examples(spec) / spec["batch_size"]) * spec["epochs"]
        test_batches = math.ceil(10000 / spec["batch_size"])
        if spec["test_batches"]:
            test_batches = min(test_batches, spec["test_batches"])
        cost = _cost_per_step(spec["method"], spec["hyperparameters"], spec["batch_size"])
        total += RUN_OVERHEAD_SECONDS + steps * step * cost + test_batches * step * FORWARD_COST
        if isolation == "run" or spec["kind"] == "peer":
            groups.add(spec["run_id"])
        elif isolation == "group":
            groups.add((spec["setting"], spec["seed"]))
    return total + PROCESS_OVERHEAD_SECONDS * len(groups)


def check_budget(plan) -> float:
    """The plan's estimated seconds; BadInput if it exceeds the budget (0 = no check)."""
    seconds = estimate_seconds(plan["runs"], plan["isolation"])
    budget = plan["budget_minutes"]
    if budget and seconds > 60.0 * budget:
        per_seed = seconds / max(1, len(plan["seeds"]))
        fits = int((60.0 * budget) // per_seed) if per_seed > 0 else 0
        raise BadInput(
            f"profile {plan['profile']!r} must finish within {budget:g} minutes, but "
            f"{len(plan['runs'])} runs ({len(plan['methods'])} methods x {len(plan['seeds'])} seeds x "
            f"{len(plan['noise'])} settings{' + peer' if plan['peer'] else ''}, {plan['config']['epochs']} "
            f"epochs of {_train_examples(plan['config'])} examples) are estimated at "
            f"{seconds / 60:.0f} minutes on the reference machine (2 shared cores); at most {fits} "
            f"seed(s) fit. Use fewer --seeds/--methods/--epochs, or --budget-minutes N (0 = no check) "
            "to run it anyway."
        )
    return seconds
