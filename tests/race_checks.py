"""Checks of the estimator's stored races, shared by the single-worker and the many-worker study tests."""

from __future__ import annotations

import json

import numpy as np
import optuna
from optuna.trial import TrialState

from mergetune.search.estimator import FitnessModel, Layout


def replayed(trial: optuna.trial.FrozenTrial, by_key: dict) -> list[list[float]]:
    """The trial's stored estimates, recomputed from the stored records of the trials its race learned from."""
    race = trial.user_attrs["race"]
    basis = [json.loads(by_key[method, number].user_attrs["record"]) for method, number in race["basis"]]
    layout = Layout.of(basis[0])
    model = FitnessModel(np.stack([layout.values(record) for record in basis]), layout.weights)
    values = layout.values(json.loads(trial.user_attrs["record"]))
    replay = []
    for docs, _, _ in race["estimates"]:
        estimate = model.estimate(values[model.order[:docs]])
        replay.append([estimate.docs, estimate.value, estimate.stderr])
    return replay


def assert_races_replay_and_decide_by_the_bar(trial_list: list) -> None:
    """`trial_list`: the study's trials, of every method its races may have learned from."""
    by_key = {(t.user_attrs["method"], t.number): t for t in trial_list if "method" in t.user_attrs}
    for trial in trial_list:
        if "race" not in trial.user_attrs:
            continue
        race = trial.user_attrs["race"]
        assert all(by_key[method, number].state == TrialState.COMPLETE for method, number in race["basis"])
        assert replayed(trial, by_key) == race["estimates"]
        uppers = [value + race["z"] * stderr for _, value, stderr in race["estimates"]]
        if trial.state == TrialState.PRUNED:
            assert uppers[-1] < race["bar"] and all(upper >= race["bar"] for upper in uppers[:-1])
            assert trial.user_attrs["docs_scored"] == race["estimates"][-1][0]
        else:
            assert all(upper >= race["bar"] for upper in uppers)
        assert trial.intermediate_values == {docs: value for docs, value, _ in race["estimates"]}
