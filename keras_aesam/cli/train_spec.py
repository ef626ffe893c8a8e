"""What one ``keras-aesam train`` run computes: :class:`TrainSpec`, its settings resolved, checked and typed.

A spec is built from the parsed flags (:meth:`TrainSpec.from_args`) or directly,
and checks itself at construction: names are looked up in the registries
(case, ``-`` and ``_`` ignored), numbers must lie in their ranges, and the
method must take every hyperparameter given. Each error names the flag and
what it accepts (:class:`keras_aesam.cli.flags.BadInput`). Nothing here touches
the disk or builds a tensor; where the run is written is
:mod:`keras_aesam.cli.run_directory`'s business, how it trains :mod:`keras_aesam.cli.training`'s.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Mapping, Optional, Tuple

from keras_aesam.cli.flags import (
    BadInput,
    check,
    check_recipe,
    given_hyperparameters,
    one_line,
    parse_train_size as _parse_train_size,
    refuse_unused,
)
from keras_aesam.validation import canonical_name

__all__ = ["DEFAULTS", "PAPER_LR", "SMALL_CNN_LR", "TrainSpec", "default_lr", "resolve_name"]

#: Defaults of ``keras-aesam train``. Chosen so that the bare command (offline
#: Fashion-MNIST, the 784-512-512-10 MLP, AE-SAM, all 54 000 training examples,
#: 10 epochs) trains in about a minute on 2 CPU cores: measured 89.3 % test
#: accuracy, 45.2 % SAM steps, 54 s of training (1m05s wall time) on 2 cores
#: shared with other jobs (load average 7-9). The small CNN took 5m42s for 86.5 %.
DEFAULTS = {
    "dataset": "fashion_mnist",
    "network": "mlp",
    "method": "ae_sam",
    "epochs": 10,
    "batch_size": 128,
    "lr": None,  # resolved by default_lr
    "momentum": 0.9,
    "weight_decay": 1e-4,
    "weight_decay_mode": "l2",
    "schedule": "cosine",
    "label_noise": 0.0,
    "seed": 0,
    "train_size": "all",
    "validation_fraction": 0.1,
    "grad_norm_batches": 32,
}

#: The paper's learning rate (§4.1, SGD for the CIFAR networks); the small CNN
#: (no BatchNorm before its dense layers) diverges at first with it: 0.02 was
#: the best of 0.005 / 0.01 / 0.02 / 0.03 / 0.05 / 0.1 in the default setting.
PAPER_LR = 0.1
SMALL_CNN_LR = 0.02


def default_lr(network) -> float:
    """The learning rate ``--lr`` defaults to for ``network``."""
    return SMALL_CNN_LR if canonical_name(network) == canonical_name("small_cnn") else PAPER_LR


def resolve_name(kind, name, valid) -> str:
    """The registry key matching ``name`` (case, '-', '_' ignored), else BadInput listing the valid ones."""
    wanted = canonical_name(name)
    for key in valid:
        if canonical_name(key) == wanted:
            return key
    raise BadInput(f"unknown {kind} {name!r}; valid {kind}s: {', '.join(sorted(valid))}")


def _registries():
    from keras_aesam.data import DATASETS
    from keras_aesam.methods import METHODS
    from keras_aesam.networks import NETWORKS

    return DATASETS, NETWORKS, METHODS


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Every setting that decides what a ``keras-aesam train`` run computes (not how it is shown or stored).

    ``network`` is a name of :data:`keras_aesam.networks.NETWORKS`, or with
    ``custom_network=True`` only the label of a builder passed to
    :func:`keras_aesam.cli.run`. ``hyperparameters`` holds the method's (the
    flags given, plus ``seed`` for a method drawing random numbers).
    """

    dataset: str = DEFAULTS["dataset"]
    network: str = DEFAULTS["network"]
    method: str = DEFAULTS["method"]
    epochs: int = DEFAULTS["epochs"]
    batch_size: int = DEFAULTS["batch_size"]
    train_size: Optional[int] = None
    label_noise: float = DEFAULTS["label_noise"]
    seed: int = DEFAULTS["seed"]
    validation_fraction: float = DEFAULTS["validation_fraction"]
    lr: float = PAPER_LR
    momentum: float = DEFAULTS["momentum"]
    weight_decay: float = DEFAULTS["weight_decay"]
    weight_decay_mode: str = DEFAULTS["weight_decay_mode"]
    schedule: str = DEFAULTS["schedule"]
    hyperparameters: Mapping[str, object] = dataclasses.field(default_factory=dict)
    total_steps: Optional[int] = None
    grad_norm_epochs: Tuple[int, ...] = ()
    grad_norm_batches: int = DEFAULTS["grad_norm_batches"]
    eval_batches: Optional[int] = None
    num_classes: Optional[int] = None
    augment: Optional[bool] = None
    data_dir: Optional[str] = None
    manual_dir: Optional[str] = None
    jit: bool = False
    steps_per_execution: int = 1
    sync_perturbation: bool = True
    custom_network: bool = False

    def __post_init__(self):
        datasets, networks, methods = _registries()
        self._set("dataset", resolve_name("dataset", self.dataset, datasets))
        if not self.custom_network:
            self._set("network", resolve_name("network", self.network, networks))
        self._set("method", resolve_name("method", self.method, methods))
        self._set("grad_norm_epochs", tuple(sorted(set(self.grad_norm_epochs))))
        self._check_data()
        self._check_optimizer()
        self._check_run()
        self._set("hyperparameters", types.MappingProxyType(self._checked_hyperparameters()))

    def _set(self, name, value):
        object.__setattr__(self, name, value)  # frozen: only the constructor normalizes

    def _check_data(self):
        check_recipe(self.epochs, self.batch_size, self.lr, self.momentum, self.weight_decay)
        check(self.train_size is None or self.train_size >= 1,
              f"--train-size must be >= 1 or 'all', got {self.train_size}")
        check(0.0 <= self.label_noise < 1.0, f"--label-noise must be in [0, 1), got {self.label_noise:g}")
        check(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        check(0.0 <= self.validation_fraction < 1.0,
              f"--validation-fraction must be in [0, 1), got {self.validation_fraction:g}")
        check(self.num_classes is None or self.num_classes >= 1, f"--num-classes must be >= 1, got {self.num_classes}")
        check(self.manual_dir is None or self.dataset == "imagenet2012",
              f"--manual-dir is for imagenet2012 only, not {self.dataset}")

    def _check_optimizer(self):
        from keras_aesam.recipe import SCHEDULES, WEIGHT_DECAY_MODES

        check(self.weight_decay_mode in WEIGHT_DECAY_MODES,
              f"--weight-decay-mode must be one of {', '.join(WEIGHT_DECAY_MODES)}, got {self.weight_decay_mode!r}")
        check(self.schedule in SCHEDULES, f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        check(self.steps_per_execution >= 1,
              f"--steps-per-execution must be >= 1, got {self.steps_per_execution}")
        check(self.method != "msam" or self.momentum > 0.0,
              "--method msam perturbs along SGD's momentum: --momentum must be in (0, 1), got 0")

    def _check_run(self):
        check(self.total_steps is None or self.total_steps >= 1, f"--total-steps must be >= 1, got {self.total_steps}")
        check(self.eval_batches is None or self.eval_batches >= 1,
              f"--eval-batches must be >= 1, got {self.eval_batches}")
        check(self.grad_norm_batches >= 1, f"--grad-norm-batches must be >= 1, got {self.grad_norm_batches}")
        bad = [e for e in self.grad_norm_epochs if not 0 <= e <= self.epochs]
        check(not bad, f"--grad-norm-epochs must be in [0, {self.epochs}] (completed epochs), got {bad}")

    def _checked_hyperparameters(self) -> dict:
        """The method's hyperparameters, refused unless the method takes them and accepts their values."""
        from keras_aesam.methods import build_method, method_parameters

        given = {k: v for k, v in self.hyperparameters.items() if k != "seed"}
        refuse_unused(self.method, given)
        if "seed" in method_parameters(self.method):
            given["seed"] = self.seed
        try:
            build_method(self.method, **given)
        except (ValueError, TypeError) as err:
            raise BadInput(f"invalid hyperparameter for {self.method}: {one_line(err)}") from err
        return given

    @classmethod
    def from_args(cls, args, *, custom_network: bool = False) -> "TrainSpec":
        """The spec of ``keras-aesam train``'s parsed flags (``args``); BadInput for any bad value."""
        epochs = args.epochs
        grad_norm_epochs = args.grad_norm_epochs
        if grad_norm_epochs is None:  # 'auto': the first, middle and last epoch
            grad_norm_epochs = {1, (epochs + 1) // 2, epochs}
        network = args.network
        if not custom_network:
            network = resolve_name("network", network, _registries()[1])
        return cls(
            dataset=args.dataset, network=network, method=args.method, epochs=epochs,
            batch_size=args.batch_size, train_size=_parse_train_size(args.train_size),
            label_noise=args.label_noise, seed=args.seed, validation_fraction=args.validation_fraction,
            lr=default_lr(network) if args.lr is None else args.lr, momentum=args.momentum,
            weight_decay=args.weight_decay, weight_decay_mode=args.weight_decay_mode, schedule=args.schedule,
            hyperparameters=given_hyperparameters(args), total_steps=args.total_steps,
            grad_norm_epochs=tuple(grad_norm_epochs), grad_norm_batches=args.grad_norm_batches,
            eval_batches=args.eval_batches, num_classes=args.num_classes, augment=args.augment,
            data_dir=args.data_dir, manual_dir=args.manual_dir, jit=bool(args.jit),
            steps_per_execution=args.steps_per_execution, sync_perturbation=bool(args.sync_perturbation),
            custom_network=custom_network,
        )

    def recipe(self):
        """The training recipe (:class:`keras_aesam.recipe.Recipe`): optimizer, schedule, weight decay."""
        from keras_aesam.recipe import Recipe

        return Recipe(lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay,
                      weight_decay_mode=self.weight_decay_mode, schedule=self.schedule)

    def dataset_kwargs(self) -> dict:
        """The arguments of :func:`keras_aesam.data.get_dataset` (besides the name) this spec sets."""
        kwargs = dict(batch_size=self.batch_size, seed=self.seed, label_noise=self.label_noise,
                      train_size=self.train_size, validation_fraction=self.validation_fraction)
        optional = dict(data_dir=self.data_dir, manual_dir=self.manual_dir, augment=self.augment)
        kwargs.update({k: v for k, v in optional.items() if v is not None})
        return kwargs
