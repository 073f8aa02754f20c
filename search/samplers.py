"""How a study proposes candidates (samplers) and stops weak ones early (pruners), by name.

A study file names one of each (`sampler: tpe`, `pruning: successive_halving`).
To add one, write a factory and register it below: samplers are built with
keyword arguments (`seed`), pruners are objects that give each candidate its race:
which documents it is scored on, stage by stage, and after each stage whether it
stops (successive halving asks Optuna's pruner at its rungs; the estimator decides
itself from the study's completed trials, `mergetune.search.estimator`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

import numpy as np
import optuna
from optuna.pruners import BasePruner, NopPruner, SuccessiveHalvingPruner
from optuna.samplers import BaseSampler

from mergetune.eval.evidence import Record, summarize
from mergetune.registry import Registry
from mergetune.search.estimator import Estimate, FitnessModel, Layout
from mergetune.search.optuna_adapter import experimental

if TYPE_CHECKING:
    from mergetune.search.documents import DocIds, Documents
    from mergetune.search.study_file import Evaluation


#: Trials TPE samples at random before it models the completed ones.
TPE_STARTUP_TRIALS = 5


def _tpe(seed: int) -> BaseSampler:
    # constant_liar: workers running in parallel don't all propose the same promising point.
    return optuna.samplers.TPESampler(
        seed=seed, multivariate=True, n_startup_trials=TPE_STARTUP_TRIALS, constant_liar=True
    )


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
    with experimental():
        return SAMPLERS.get(name)(seed=seed)


class Race(Protocol):
    """One candidate's scoring schedule under a pruner: what to score, and when it may stop."""

    stages: list[DocIds]  # cumulative, each nested in the next; the last is every search document

    def stop(self, trial: optuna.Trial, stage: int, record: Record) -> bool:
        """After scoring `stages[stage]` (any but the last), with the candidate's `record` so far: stop it?"""

    def notes(self) -> Optional[dict[str, Any]]:
        """What the trial stores about its race (an estimator's estimates), None if nothing."""


@dataclass(frozen=True)
class Completed:
    """A completed trial's evidence, as a pruner that learns reads it."""

    method: str
    number: int
    record: Record


#: The study's completed trials, every method's (True) or the candidate's method's: in the study file's order, by number.
Basis = Callable[[bool], list[Completed]]


class Pruning(Protocol):
    """When a candidate may stop, and who decides."""

    fields: tuple[str, ...]  # the `evaluation` settings it reads (given with another pruner, they are refused)

    def rungs(self, evaluation: "Evaluation") -> list[int]:
        """Documents per task after which the candidate's score so far is reported (may be empty)."""

    def pruner(self, evaluation: "Evaluation") -> BasePruner:
        """The Optuna pruner that reads those reports."""

    def race(self, documents: "Documents", evaluation: "Evaluation", method: str, basis: Basis) -> Race:
        """The schedule of one (non-baseline) candidate of `method`, given the trials completed so far."""


@dataclass
class Rungs:
    """Scored rung by rung; the study's Optuna pruner decides from the score at each rung."""

    stages: list[DocIds]
    steps: list[int]  # documents per task of each rung, the step reported to Optuna

    def stop(self, trial: optuna.Trial, stage: int, record: Record) -> bool:
        trial.report(summarize(record).average, step=self.steps[stage])
        return trial.should_prune()

    def notes(self) -> Optional[dict[str, Any]]:
        return None


def in_full(documents: "Documents") -> Race:
    """Every search document in one stage: nothing to decide."""
    return Rungs([documents.search], [])


class SuccessiveHalving:
    """Asynchronous successive halving over nested document rungs: works the same for one worker or many."""

    fields = ("first_limit", "reduction_factor")

    def rungs(self, evaluation: "Evaluation") -> list[int]:
        return evaluation.rungs()

    def pruner(self, evaluation: "Evaluation") -> BasePruner:
        rungs = self.rungs(evaluation)
        if not rungs:
            return NopPruner()
        return SuccessiveHalvingPruner(
            min_resource=rungs[0], reduction_factor=evaluation.reduction_factor, min_early_stopping_rate=0
        )

    def race(self, documents: "Documents", evaluation: "Evaluation", method: str, basis: Basis) -> Race:
        return Rungs([ids for _, ids in documents.rungs] + [documents.search], [size for size, _ in documents.rungs])


class NoPruning:
    """Every candidate is scored on every search document."""

    fields = ()

    def rungs(self, evaluation: "Evaluation") -> list[int]:
        return []

    def pruner(self, evaluation: "Evaluation") -> BasePruner:
        return NopPruner()

    def race(self, documents: "Documents", evaluation: "Evaluation", method: str, basis: Basis) -> Race:
        return in_full(documents)


@dataclass
class Estimated:
    """Scored in chunks, most discriminating documents first; stops when its estimate cannot reach the bar."""

    stages: list[DocIds]
    sizes: list[int]  # documents in each stage: the first `size` of the model's order
    layout: Layout
    model: FitnessModel
    bar: float  # the search score to beat: the k-th best completed trial's of the candidate's method
    z: float
    basis_trials: list[list]  # [method, number] of each completed trial it learned from, in the model's row order
    estimates: list[Estimate] = field(default_factory=list)

    def stop(self, trial: optuna.Trial, stage: int, record: Record) -> bool:
        estimate = self.model.estimate(self.layout.values(record)[self.model.order[: self.sizes[stage]]])
        self.estimates.append(estimate)
        trial.report(estimate.value, step=estimate.docs)  # what the sampler learns from a stopped trial
        return estimate.upper(self.z) < self.bar

    def notes(self) -> Optional[dict[str, Any]]:
        return {
            "basis": self.basis_trials,
            "bar": self.bar,
            "z": self.z,
            "estimates": [[e.docs, e.value, e.stderr] for e in self.estimates],
        }


class Estimator:
    """Racing against the best of the candidate's method, each candidate's full score estimated from completed trials.

    Until `min_trials` trials are complete (the study's, or the method's: `learn_from`)
    and its method has `rank` of its own (any candidate takes a finalist's place
    until then), a candidate is scored in full; afterwards see
    `mergetune.search.estimator`.
    """

    fields = ("estimator",)

    def rungs(self, evaluation: "Evaluation") -> list[int]:
        return []

    def pruner(self, evaluation: "Evaluation") -> BasePruner:
        return NopPruner()  # the race decides; Optuna only sees the estimates

    def race(self, documents: "Documents", evaluation: "Evaluation", method: str, basis: Basis) -> Race:
        settings = evaluation.estimator
        completed = basis(settings.learn_from == "study")
        if not completed:
            return in_full(documents)
        layout = Layout.of(completed[0].record)
        usable = [t for t in completed if layout.covers(t.record)]  # not trials stored before the search documents were these
        rank = evaluation.estimator_rank()
        if len(usable) < settings.min_trials or sum(t.method == method for t in usable) < rank:
            return in_full(documents)
        values = np.stack([layout.values(t.record) for t in usable])
        own = sorted((score for t, score in zip(usable, values @ layout.weights) if t.method == method), reverse=True)
        model = FitnessModel(values, layout.weights, settings.top_fraction)
        step = max(1, round(len(model.order) * settings.chunk))
        sizes = list(range(step, len(model.order), step))
        stages = [_doc_ids(layout, model.order[:count]) for count in sizes] + [documents.search]
        z = NormalDist().inv_cdf(settings.confidence)
        return Estimated(stages, sizes, layout, model, float(own[rank - 1]), z, [[t.method, t.number] for t in usable])


def _doc_ids(layout: Layout, indices: np.ndarray) -> DocIds:
    ids: DocIds = {}
    for index in sorted(indices.tolist()):
        _, leaf, doc_id = layout.keys[index]
        ids.setdefault(leaf, []).append(doc_id)
    return ids


PRUNERS: Registry[Pruning] = Registry("pruner")
PRUNERS.register("successive_halving", SuccessiveHalving())
PRUNERS.register("estimator", Estimator())
PRUNERS.register("none", NoPruning())
