"""A candidate's full search score predicted from part of its documents, learned from the study's own trials.

Every candidate of a study is scored on the same search documents, and every
completed trial stores its value on each of them. Those trials (the *basis*) show
which documents separate candidates (most do not: a document every merge gets
right, or wrong, says nothing about the next one) and how the score on a subset
of documents relates to the score on the rest. A new candidate is scored first
on the documents that discriminate most between the basis's good candidates;
after each chunk, the score on the documents not yet scored is predicted by a
linear regression, fitted across the basis, on the score of those scored. Its
standard error is the larger of two: the regression's prediction interval,
widened by the chance that the candidate departs from the basis on the unscored
documents every basis trial got alike (which no regression over the basis can
see: identical completed trials would otherwise give an error of 0 and stop any
candidate one document behind on its first chunk), learned from how often one
basis trial departed from all the others; and the whole procedure's
leave-one-out error over the basis (ordering included: the documents chosen for
fitting the basis well fit it better than they predict a new candidate). The
candidate stops once even the upper end cannot reach the score it must beat.

Pure functions over plain records (`mergetune.eval.evidence`), NumPy only: the
same numbers come out on every worker and after every resume, given the same
completed trials.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mergetune.eval.evidence import Record

DocKey = tuple[str, str, int]  # (suite entry, lm-eval task, document id)
FLAT = 1e-12  # a spread below this is no spread


@dataclass(frozen=True)
class Layout:
    """The search documents as one vector: a record's search score is `weights @ values`.

    The score is the unweighted average over suite entries of each entry's mean over
    its documents (`evidence.summarize`), so a document weighs 1 / (entries × its
    entry's documents).
    """

    keys: tuple[DocKey, ...]
    weights: np.ndarray

    @classmethod
    def of(cls, record: Record) -> "Layout":
        """The layout of a fully scored record (every search document)."""
        names = sorted(record["tasks"])
        keys: list[DocKey] = []
        weights: list[float] = []
        for name in names:
            docs = record["tasks"][name]["docs"]
            size = sum(len(rows) for rows in docs.values())
            for leaf in sorted(docs):
                for doc_id in sorted(int(row[0]) for row in docs[leaf]):
                    keys.append((name, leaf, doc_id))
                    weights.append(1.0 / (len(names) * size))
        return cls(tuple(keys), np.asarray(weights))

    def values(self, record: Record) -> np.ndarray:
        """The record's value on each document, NaN where it has none."""
        found = {
            (name, leaf, int(doc_id)): float(value)
            for name, task in record["tasks"].items()
            for leaf, rows in task["docs"].items()
            for doc_id, value in rows
        }
        return np.asarray([found.get(key, math.nan) for key in self.keys])

    def covers(self, record: Record) -> bool:
        return not np.isnan(self.values(record)).any()


@dataclass(frozen=True)
class Estimate:
    """A candidate's predicted full search score and the standard error of that prediction."""

    value: float
    stderr: float
    docs: int  # documents it was predicted from

    def upper(self, z: float) -> float:
        return self.value + z * self.stderr


def discrimination_order(basis: np.ndarray, weights: np.ndarray, top_fraction: float = 0.5) -> np.ndarray:
    """Document indices, those that separate the basis's better candidates first.

    A document's discrimination is its weighted covariance with the full score
    across the best `top_fraction` of the basis (the candidates a new one must beat);
    documents on which those agree come last, in their stored order.
    """
    scores = basis @ weights
    keep = max(3, math.ceil(len(scores) * top_fraction))
    top = np.argsort(-scores, kind="stable")[:keep]
    values, totals = basis[top], scores[top]
    covariance = ((values - values.mean(axis=0)) * (totals - totals.mean())[:, None]).mean(axis=0)
    spread = values.var(axis=0)  # breaks ties among documents uncorrelated with the total
    return np.lexsort((np.arange(len(weights)), -spread, -np.abs(weights * covariance)))


def predict(
    basis: np.ndarray,
    weights: np.ndarray,
    scored: Sequence[int],
    values: np.ndarray,
    departure: float | None = None,
) -> Estimate:
    """The full search score of a candidate with `values` on the documents `scored` (indices).

    Across the basis, the weighted score on the documents not yet scored is
    regressed on the weighted score on those scored; the candidate's known part plus
    the regression's prediction for the rest is the estimate, and the regression's
    prediction interval its standard error.
    """
    order = np.asarray(list(scored), dtype=int)  # `values` follow this order, not the documents' own
    mask = np.zeros(len(weights), dtype=bool)
    mask[order] = True
    known = basis[:, order] @ weights[order]
    rest = basis[:, ~mask] @ weights[~mask]
    own = float(np.asarray(values) @ weights[order])
    n = len(known)
    if own > known.max() + FLAT:  # better than every completed trial where scored: nothing to extrapolate from
        return Estimate(own + float(rest.max()), math.inf, int(mask.sum()))
    centred = known - known.mean()
    sxx = float(centred @ centred)
    if sxx < FLAT:  # the scored documents do not separate the basis: predict the rest's mean
        slope, dof, leverage = 0.0, n - 1, 0.0
    else:
        slope, dof = float(centred @ (rest - rest.mean())) / sxx, n - 2
        leverage = (own - known.mean()) ** 2 / sxx
    intercept = float(rest.mean()) - slope * float(known.mean())
    residuals = rest - (intercept + slope * known)
    variance = float(residuals @ residuals) / max(dof, 1)
    if departure is None:
        departure = departure_rate(basis)
    unseen = unanimous_variance(basis, weights, order, np.asarray(values), ~mask, departure)
    stderr = math.sqrt(variance * (1 + 1 / n + leverage) + unseen)
    return Estimate(own + intercept + slope * own, stderr, int(mask.sum()))


def departure_rate(basis: np.ndarray) -> float:
    """How often a trial got a document otherwise than every other trial, which got it alike, pooled over
    trials and documents (with one success and one failure added: never 0, 1/2 with nothing to go by)."""
    events = chances = 0
    for index in range(len(basis)):
        others = np.delete(basis, index, axis=0)
        if not len(others):
            break
        alike = np.ptp(others, axis=0) < FLAT
        chances += int(alike.sum())
        events += int((alike & (np.abs(basis[index] - others[0]) > FLAT)).sum())
    return (events + 1) / (chances + 2)


def unanimous_variance(
    basis: np.ndarray, weights: np.ndarray, order: np.ndarray, values: np.ndarray, unscored: np.ndarray, departure: float
) -> float:
    """Variance of the candidate's weighted score on the unscored documents every basis trial got alike.

    The regression sees no variation there, yet a new candidate may depart from the
    basis on any of them: as often as one basis trial departed from all the others
    (`departure`), or as often as the candidate itself did where it was scored on such
    documents, if more. Each departure moves a document's value by up to 1.
    """
    agreed = np.ptp(basis, axis=0) < FLAT
    rest = agreed & unscored
    if not rest.any():
        return 0.0
    rate = departure
    seen = agreed[order]
    if seen.any():
        departed = np.abs(values[seen] - basis[0, order[seen]]) > FLAT
        rate = max(rate, float(departed.mean()))
    return rate * (1 - rate) * float(weights[rest] @ weights[rest])


def cross_validated_error(
    basis: np.ndarray, weights: np.ndarray, count: int, top_fraction: float, departure: float
) -> float:
    """Root mean square error of the estimate from `count` documents, each basis trial predicted by the others
    (with the whole basis's `departure_rate`: computing it again without each trial would cost n times more)."""
    errors = []
    for held_out in range(len(basis)):
        others = np.delete(basis, held_out, axis=0)
        scored = discrimination_order(others, weights, top_fraction)[:count]
        estimate = predict(others, weights, scored, basis[held_out, scored], departure)
        errors.append(estimate.value - float(basis[held_out] @ weights))
    return math.sqrt(float(np.mean(np.square(errors))))


class FitnessModel:
    """What the completed trials (`basis`, one row of document values each) say about a new candidate."""

    def __init__(self, basis: np.ndarray, weights: np.ndarray, top_fraction: float = 0.5):
        self.basis = basis
        self.weights = weights
        self.top_fraction = top_fraction
        self.order = discrimination_order(basis, weights, top_fraction)
        self.departure = departure_rate(basis)
        self._errors: dict[int, float] = {}

    def estimate(self, values: np.ndarray) -> Estimate:
        """The full score of a candidate whose values on the first `len(values)` documents of `order` are known."""
        count = len(values)
        regression = predict(self.basis, self.weights, self.order[:count], values, self.departure)
        if count not in self._errors:
            self._errors[count] = cross_validated_error(
                self.basis, self.weights, count, self.top_fraction, self.departure
            )
        return Estimate(regression.value, max(regression.stderr, self._errors[count]), count)
