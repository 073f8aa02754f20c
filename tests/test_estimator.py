"""The fitness estimator on synthetic per-document evidence whose answer is known."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from mergetune.eval.evidence import summarize
from mergetune.search.estimator import FitnessModel, Layout, departure_rate, discrimination_order, predict


def record(values: dict[str, list[float]], leaves: int = 1) -> dict:
    """A record with one suite entry per key, its documents spread over `leaves` lm-eval tasks."""
    tasks = {}
    for name, column in values.items():
        docs: dict[str, list] = {}
        for doc_id, value in enumerate(column):
            docs.setdefault(f"{name}_{doc_id % leaves}", []).append([doc_id, value])
        tasks[name] = {"metric": "acc", "proxy": None, "docs": docs}
    return {"tasks": tasks}


def merge_study(candidates: int, seed: int) -> np.ndarray:
    """Per-document results of merge candidates: most documents every candidate gets right (or wrong), a
    fifth separate them by a latent ability, as item-response theory models a benchmark (2PL)."""
    rng = np.random.default_rng(seed)
    docs = 200
    ability = rng.normal(0.0, 1.0, size=(candidates, 1))
    kind = rng.choice(3, size=docs, p=[0.55, 0.25, 0.20])  # easy, hard, discriminating
    difficulty = np.where(kind == 0, -6.0, np.where(kind == 1, 6.0, rng.normal(0.0, 0.7, size=docs)))
    slope = np.where(kind == 2, rng.uniform(1.5, 3.0, size=docs), 1.0)
    probability = 1 / (1 + np.exp(-slope * (ability - difficulty)))
    return (rng.random((candidates, docs)) < probability).astype(float)


def test_the_layout_weighs_documents_as_the_search_score_does():
    evidence = record({"arc": [1, 0, 1, 1], "mmlu": [0, 1, 0, 0, 0, 1, 1, 1]}, leaves=3)
    layout = Layout.of(evidence)
    assert len(layout.keys) == 12
    assert layout.values(evidence) @ layout.weights == pytest.approx(summarize(evidence).average)
    partial = {"tasks": {"arc": {**evidence["tasks"]["arc"], "docs": {"arc_0": [[0, 1.0]]}}}}
    assert not layout.covers(partial) and np.isnan(layout.values(partial)).sum() == 11


def test_documents_that_separate_candidates_come_first_and_agreed_ones_last():
    basis = np.array([[1, 1, 0, 0.0], [1, 0, 0, 1.0], [1, 1, 0, 1.0], [1, 0, 0, 0.0]])  # doc 0, 2: all agree
    order = discrimination_order(basis, np.full(4, 0.25), top_fraction=1.0)
    assert set(order[:2]) == {1, 3} and list(order[2:]) == [0, 2]


def test_a_rest_the_basis_predicts_exactly_is_estimated_exactly():
    # On every basis candidate the unscored half repeats the scored half: the estimate is exact, its stderr 0.
    rng = np.random.default_rng(0)
    half = rng.random((8, 10))
    basis = np.hstack([half, half])
    weights = np.full(20, 1 / 20)
    candidate = rng.random(10)
    estimate = predict(basis, weights, range(10), candidate)
    assert estimate.value == pytest.approx(candidate.mean())
    assert estimate.stderr == pytest.approx(0.0, abs=1e-12) and estimate.docs == 10


def test_a_candidates_values_count_with_their_own_documents_weights_in_any_order():
    # Tasks of 2 and 8 documents weigh their documents 1/4 and 1/16: the estimate must not depend on the order
    # the scored documents come in (the fitness model's order interleaves the tasks).
    weights = Layout.of(record({"small": [0, 0], "large": [0] * 8})).weights
    assert sorted(set(weights)) == [1 / 16, 1 / 4]
    basis = (np.random.default_rng(1).random((6, 10)) < 0.5).astype(float)
    assert list(weights[8:]) == [1 / 4, 1 / 4]  # documents 0-7: the large task's; 8, 9: the small one's
    candidate = np.array([0, 0, 1, 0, 1, 0, 0, 0, 1, 0.0])
    ranked, in_place = [8, 0, 9, 1], [0, 1, 8, 9]
    first = predict(basis, weights, ranked, candidate[ranked])
    second = predict(basis, weights, in_place, candidate[in_place])
    assert first.value == pytest.approx(second.value) and first.stderr == pytest.approx(second.stderr)
    on_all = predict(basis, weights, range(10), candidate)
    assert on_all.value == pytest.approx(candidate @ weights)  # nothing left to predict: its own score


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("completed", [6, 12, 24])
def test_on_merge_like_studies_a_quarter_of_the_documents_estimates_the_full_score_with_honest_error_bars(
    seed, completed
):
    results = merge_study(candidates=completed + 60, seed=seed)
    weights = np.full(results.shape[1], 1 / results.shape[1])
    full = results @ weights
    model = FitnessModel(results[:completed], weights)
    quarter = model.order[: results.shape[1] // 4]
    estimates = [model.estimate(row[quarter]) for row in results[completed:]]
    errors = np.array([e.value for e in estimates]) - full[completed:]
    rng = np.random.default_rng(seed)
    halves = [rng.permutation(results.shape[1])[: results.shape[1] // 2] for _ in errors]
    plain = np.array([row[half].mean() for row, half in zip(results[completed:], halves)]) - full[completed:]
    assert np.abs(errors).mean() < np.abs(plain).mean(), "a random half of the documents does better"
    covered = np.mean([abs(error) <= 1.96 * e.stderr for error, e in zip(errors, estimates)])
    assert covered >= 0.85, f"95% intervals cover only {covered:.0%} of the true scores"


def test_scored_documents_the_basis_does_not_separate_predict_the_rest_as_its_mean():
    basis = np.array([[1, 1, 0.0], [1, 0, 1.0], [1, 1, 1.0], [1, 0, 0.0]])
    estimate = predict(basis, np.full(3, 1 / 3), [0], np.array([1.0]))
    assert estimate.value == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert math.isfinite(estimate.stderr) and estimate.stderr > 0


def test_a_candidate_better_where_scored_than_every_completed_trial_is_never_stopped():
    # Weak early trials know nothing about better candidates: an estimate would extrapolate.
    basis = np.array([[0, 0, 1, 0.0], [0, 1, 0, 1.0], [1, 0, 0, 0.0]])
    estimate = predict(basis, np.full(4, 0.25), [0, 1], np.array([1.0, 1.0]))
    assert estimate.stderr == math.inf and estimate.upper(1.64) == math.inf


def test_identical_completed_trials_cannot_stop_a_candidate_one_document_behind_on_its_first_chunk():
    # The basis agrees on every document, so its regression sees no variation at all; a new candidate that departs
    # from it on a scored document may as well depart on unscored ones (here it gains 3 of them and ends ahead).
    weights = np.full(40, 1 / 40)
    basis = np.tile((np.random.default_rng(2).random(40) < 0.5).astype(float), (10, 1))
    model = FitnessModel(basis, weights)
    scored = model.order[:8]
    candidate = basis[0].copy()
    behind = next(i for i in scored if candidate[i] == 1)
    gains = [i for i in model.order[8:] if candidate[i] == 0][:3]
    candidate[behind], candidate[gains] = 0, 1
    bar = float(basis[0] @ weights)
    assert candidate @ weights > bar
    estimate = model.estimate(candidate[scored])
    assert estimate.value == pytest.approx(bar - 1 / 40)
    assert estimate.upper(NormalDist().inv_cdf(0.8)) > bar  # not stopped at the default confidence
    alike = model.estimate(basis[0, scored])
    assert 0 < alike.stderr < estimate.stderr  # departing where scored widens the error bar for the rest


def test_the_departure_rate_counts_how_often_one_trial_got_otherwise_what_all_the_others_got_alike():
    basis = np.ones((4, 10))
    basis[0, 3] = 0  # trial 0 departs once where trials 1-3 agree; the others, with trial 0 among theirs, never can there
    assert departure_rate(basis) == pytest.approx((1 + 1) / (10 + 3 * 9 + 2))
    assert departure_rate(basis[:1]) == 0.5  # one trial: nothing to go by
