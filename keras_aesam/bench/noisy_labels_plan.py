"""The noisy-labels profile's plan: its regimes, stages and the spec of every run.

A regime on real data where sharpness matters: Fashion-MNIST with symmetric
label noise on a 10,000-image training subset, trained with SGD momentum 0.9
and a cosine schedule from lr 0.05, no weight decay; ERM memorizes the flipped
labels late in training, SAM resists. Two regimes (:class:`Regime`): the MLP
(784-512-512-10, 40 epochs; clean, 40 % and 60 % noise) and the CNN (``bn_cnn``,
a narrow BatchNorm CNN, 30 epochs; 40 % noise). In each setting, in order:

1. ``rho``: SAM with each ρ of the regime's grid on the first seeds; the ρ with
   the best mean *validation* accuracy (clean held-out labels, never the test
   set) is used by every method of that setting. Then Momentum-SAM's own ρ,
   chosen the same way from its grid (its ρ is on another scale).
2. ``main``, seed by seed: ERM, SAM, AE-SAM, LookSAM, AE-LookSAM; then, at the
   SAM fraction ζ that AE-SAM realised on the same seed, the regime's matched
   policies (MLP: SS-SAM, RST, late SAM, quantile SAM; CNN: SS-SAM, quantile
   SAM); in the MLP regime also, at AE-LookSAM's realised ζ, the LookSAM
   direction under late SAM and quantile SAM, LookSAM with ``k = round(1/ζ)``,
   and the paper's AE-LookSAM with ``g_v`` reused without bound
   (``max_age=None``). Then the rivals: Momentum-SAM at its ρ, LookSAM at
   ``k`` of ``LOOKSAM_PERIODS``, and ESAM at SAM's ρ.
3. ``budget`` (the MLP's main setting only): AE-SAM, SS-SAM, RST, late SAM and
   quantile SAM at fixed budgets of 10, 25, 50 and 75 % SAM steps.

A spec is a flat dict; a stored run counts for a spec only if its spec is
equal to it, so the keys and values built here are those of the stored runs.
Nothing here trains or draws: the runner (:mod:`keras_aesam.bench.noisy_labels`)
and the report (:mod:`keras_aesam.bench.noisy_labels_report`) both read it.
"""

from __future__ import annotations

import dataclasses

from keras_aesam.methods import PRETTY_NAMES

SEEDS = (0, 1, 2, 3, 4)
RHO_SEEDS = (0, 1)
BUDGETS = (0.1, 0.25, 0.5, 0.75)
#: The policies compared at a budget, by method name.
BUDGETED = ("ae_sam", "ss_sam", "rst", "late_sam", "quantile_sam")
#: Test accuracy is recorded every this many epochs (the learning curves).
CURVE_EVERY = 5
#: LookSAM's periods in the rivals stage (k = 5 is in the main stage).
LOOKSAM_PERIODS = (2, 10)
#: The bound on the age of LookSAM's ``g_v`` of every LookSAM-direction row
#: but LookSAM's own (whose period bounds it), recorded in the specs.
MAX_AGE = 10


@dataclasses.dataclass(frozen=True)
class Regime:
    """A network and its recipe, with the settings and ρ grids the profile runs on it.

    ``matched``: the policies run at AE-SAM's realised budget on each seed.
    ``looksam_matched``: also the LookSAM-direction rows at AE-LookSAM's realised
    budget (and the unbounded-``g_v`` AE-LookSAM). ``budget_stage``: the
    fixed-budget stage on the first setting.
    """

    name: str
    recipe: dict
    settings: tuple
    rho_grid: tuple
    msam_rho_grid: tuple
    matched: tuple
    looksam_matched: bool
    budget_stage: bool
    folder: str

    @property
    def main_noise(self):
        return self.settings[0]


#: The MLP regime (a 2-core CPU runs one model in 15-40 s). Momentum-SAM's ρ is a
#: distance along the momentum, on another scale than SAM's (ρ ≥ 2 collapses this
#: MLP in a 10-epoch check).
MLP = Regime(
    name="mlp",
    recipe={"dataset": "fashion_mnist", "train_size": 10000, "validation_fraction": 0.1, "network": "mlp",
            "epochs": 40, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
            "schedule": "cosine"},
    settings=(0.4, 0.0, 0.6),
    rho_grid=(0.05, 0.1, 0.2),
    msam_rho_grid=(0.3, 0.6, 1.0, 1.5),
    matched=BUDGETED[1:],
    looksam_matched=True,
    budget_stage=True,
    folder="docs/results/noisy_labels",
)
#: The CNN regime: a narrow CNN with BatchNorm (``bn_cnn`` of
#: :mod:`keras_aesam.bench.networks`), one label-noise setting, the frontier's
#: methods only (no fixed-budget stage, no LookSAM-direction rivals). In a probe
#: (seed 0, ρ = 0.1) ERM fitted the noise from epoch ~15 on (test accuracy 83 % →
#: 73 % at epoch 30) while SAM rose to 85 % (+12.6 points); at 20 epochs the gap was 2.4.
#: Its MSAM grid reaches ρ = 3, the value Momentum-SAM's authors use with
#: BatchNorm ResNets.
CNN = Regime(
    name="cnn",
    recipe={"dataset": "fashion_mnist", "train_size": 10000, "validation_fraction": 0.1, "network": "bn_cnn",
            "epochs": 30, "batch_size": 128, "lr": 0.05, "momentum": 0.9, "weight_decay": 0.0,
            "schedule": "cosine"},
    settings=(0.4,),
    rho_grid=(0.05, 0.1, 0.2),
    msam_rho_grid=(0.5, 1.0, 2.0, 3.0),
    matched=("ss_sam", "quantile_sam"),
    looksam_matched=False,
    budget_stage=False,
    folder="docs/results/noisy_labels_cnn",
)
REGIMES = {r.name: r for r in (MLP, CNN)}


def setting_name(noise):
    return f"noise{int(round(100 * noise))}"


def _spec(noise, seed, label, method, hp, direction_from=None, budget=None, regime=MLP):
    return {
        "setting": setting_name(noise), "noise": noise, "seed": seed, "label": label,
        "method": method, "direction_from": direction_from or method,
        "hyperparameters": dict(hp), "budget": budget, **regime.recipe,
    }


def run_id(spec):
    return f"{spec['setting']}__{spec['label']}__s{spec['seed']}"


def rho_label(rho, method="sam"):
    """The label of ``method``'s row at ``rho`` (SAM's or MSAM's ρ search and chosen ρ): ``'sam_rho0.2'``."""
    return f"{method}_rho{rho:g}"


def realised_budget(result):
    """The budget a matched row aims at: the SAM share a run realised, to 0.001 and at least 0.001
    (a budget must be > 0)."""
    return max(round(result["sam_fraction"], 3), 0.001)


def rho_specs(noise, regime=MLP):
    return [_spec(noise, seed, rho_label(rho), "sam", {"rho": rho}, regime=regime)
            for rho in regime.rho_grid for seed in RHO_SEEDS]


def main_specs(noise, seed, rho, zeta=None, zeta_look=None, regime=MLP):
    """The main stage for one seed; the ζ-matched runs need ``zeta`` (AE-SAM's
    realised fraction) and ``zeta_look`` (AE-LookSAM's)."""
    def spec(*args, **kwargs):
        return _spec(noise, seed, *args, regime=regime, **kwargs)

    specs = [
        spec("erm", "erm", {}),
        spec(rho_label(rho), "sam", {"rho": rho}),
        spec("ae_sam", "ae_sam", {"rho": rho}),
        spec("looksam", "looksam", {"rho": rho}),
        spec("ae_looksam", "ae_looksam", {"rho": rho, "max_age": MAX_AGE}),
    ]
    if zeta is not None:
        for method in regime.matched:
            specs.append(spec(f"{method}@ae", method, {"rho": rho, "target_sam_fraction": zeta}, budget="ae_sam"))
    if zeta_look is not None and regime.looksam_matched:
        for method in ("late_sam", "quantile_sam"):
            specs.append(spec(f"{method}+looksam@ae", method,
                              {"rho": rho, "target_sam_fraction": zeta_look, "max_age": MAX_AGE},
                              direction_from="looksam", budget="ae_looksam"))
        specs.append(spec("looksam@ae", "looksam", {"rho": rho, "k": looksam_k(zeta_look)}, budget="ae_looksam"))
        specs.append(spec("ae_looksam_unbounded", "ae_looksam", {"rho": rho, "max_age": None}))
    return specs


def looksam_k(zeta):
    """LookSAM's period whose share of SAM steps ``1/k`` is nearest to ``zeta``."""
    return max(1, int(round(1.0 / zeta)))


def msam_rho_specs(noise, regime=MLP):
    return [_spec(noise, seed, rho_label(rho, "msam"), "msam", {"rho": rho}, regime=regime)
            for rho in regime.msam_rho_grid for seed in RHO_SEEDS]


def rival_specs(noise, seed, rho, msam_rho, regime=MLP):
    """The rivals stage for one seed: MSAM at its chosen ρ, LookSAM at other periods, ESAM."""
    return [_spec(noise, seed, rho_label(msam_rho, "msam"), "msam", {"rho": msam_rho}, regime=regime),
            *(_spec(noise, seed, f"looksam_k{k}", "looksam", {"rho": rho, "k": k}, regime=regime)
              for k in LOOKSAM_PERIODS),
            _spec(noise, seed, "esam", "esam", {"rho": rho}, regime=regime)]


def budget_specs(noise, seed, rho, regime=MLP):
    return [_spec(noise, seed, f"{method}@{f:g}", method, {"rho": rho, "target_sam_fraction": f},
                  budget=f, regime=regime)
            for f in BUDGETS for method in BUDGETED]


def planned_runs(settings, seeds, budget_seeds, regime=MLP):
    """How many runs the profile has (for the progress line), shared runs counted once."""
    per_seed = (len(main_specs(0.0, 0, 0.1, zeta=0.5, zeta_look=0.2, regime=regime))
                + len(rival_specs(0.0, 0, 0.1, 1.0, regime=regime)))
    shared = len(set(RHO_SEEDS) & set(seeds))  # SAM (and MSAM) at the chosen ρ on the ρ seeds
    n = len(budget_seeds) * len(BUDGETS) * len(BUDGETED) if regime.budget_stage else 0
    for _ in settings:
        n += ((len(regime.rho_grid) + len(regime.msam_rho_grid)) * len(RHO_SEEDS) + len(seeds) * per_seed
              - 2 * shared)
    return n


#: The side-by-side timing of the rows (:mod:`keras_aesam.bench.step_timing`), in the profile's folder.
TIMING_FILE = "timing.json"


def timing_key(label):
    """The timing a row uses: its label, SAM's and MSAM's ρ rows collapsed (ρ does not change a step's cost)."""
    for prefix, key in (("sam_rho", "sam"), ("msam_rho", "msam")):
        if label.startswith(prefix):
            return key
    return label


#: The invocations that filled an output folder, oldest first (the runner records them, the report prints them).
COMMANDS_FILE = "commands.json"


def pretty(label):
    """``'quantile_sam+looksam@ae'`` -> ``'quantile SAM + LookSAM dir. @ AE-LookSAM budget'``.

    ``@ae`` is AE-SAM's realised budget, or AE-LookSAM's for the LookSAM direction.
    """
    name, _, budget = label.partition("@")
    policy, _, direction = name.partition("+")
    text = PRETTY_NAMES.get(policy, policy)
    for prefix, shown in (("sam_rho", "SAM (ρ={})"), ("msam_rho", "MSAM (ρ={})"), ("looksam_k", "LookSAM (k={})")):
        if policy.startswith(prefix):
            text = shown.format(policy[len(prefix):])
    if policy == "ae_looksam_unbounded":
        text = "AE-LookSAM, g_v unbounded (paper's rule)"
    if direction:
        text += f" + {PRETTY_NAMES.get(direction, direction)} dir."
    if budget == "ae":
        text += " @ AE-LookSAM budget" if "looksam" in (policy, direction) else " @ AE budget"
    elif budget:
        text += f" @ {float(budget):.0%}"
    return text
