"""How a study proposes candidates (samplers) and stops weak ones early (pruners), by name.

A study file names one of each (`sampler: tpe`, `pruning: successive_halving`).
To add one, write a factory and register it below: samplers are built with
keyword arguments (`seed`), pruners are objects that say at which document counts
a candidate may stop (`rungs`) and which Optuna pruner decides (`pruner`).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable, Protocol

import optuna
from optuna.pruners import BasePruner, NopPruner, SuccessiveHalvingPruner
from optuna.samplers import BaseSampler

from mergetune.registry import Registry

if TYPE_CHECKING:
    from mergetune.search.study_file import Evaluation


def _tpe(seed: int) -> BaseSampler:
    # constant_liar: workers running in parallel don't all propose the same promising point.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5, constant_liar=True)


def _cmaes(seed: int) -> BaseSampler:
    return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)


def _gp(seed: int) -> BaseSampler:
    return optuna.samplers.GPSampler(seed=seed)


def _random(seed: int) -> BaseSampler:
    return optuna.samplers.RandomSampler(seed=seed)


SAMPLERS: Registry[Callable[..., BaseSampler]] = Registry("sampler")
SAMPLERS.register("tpe", _tpe)
SAMPLERS.register("cmaes", _cmaes)
SAMPLERS.register("gp", _gp)
SAMPLERS.register("random", _random)


def make_sampler(name: str, seed: int) -> BaseSampler:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return SAMPLERS.get(name)(seed=seed)


class Pruning(Protocol):
    """When a candidate may stop, and who decides."""

    uses_rungs: bool  # whether evaluation.first_limit / reduction_factor mean anything to it

    def rungs(self, evaluation: "Evaluation") -> list[int]:
        """Documents per task after which the candidate's score so far is reported (may be empty)."""

    def pruner(self, evaluation: "Evaluation") -> BasePruner:
        """The Optuna pruner that reads those reports."""


class SuccessiveHalving:
    """Asynchronous successive halving over nested document rungs: works the same for one worker or many."""

    uses_rungs = True

    def rungs(self, evaluation: "Evaluation") -> list[int]:
        return evaluation.rungs()

    def pruner(self, evaluation: "Evaluation") -> BasePruner:
        rungs = self.rungs(evaluation)
        if not rungs:
            return NopPruner()
        return SuccessiveHalvingPruner(
            min_resource=rungs[0], reduction_factor=evaluation.reduction_factor, min_early_stopping_rate=0
        )


class NoPruning:
    """Every candidate is scored on every search document."""

    uses_rungs = False

    def rungs(self, evaluation: "Evaluation") -> list[int]:
        return []

    def pruner(self, evaluation: "Evaluation") -> BasePruner:
        return NopPruner()


PRUNERS: Registry[Pruning] = Registry("pruner")
PRUNERS.register("successive_halving", SuccessiveHalving())
PRUNERS.register("none", NoPruning())
