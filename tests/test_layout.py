"""The house rules a newcomer relies on: the read side stays light, extension points are registries,
and Optuna's private API is reached only through its adapter — which fails here, loudly, when Optuna changes."""

from __future__ import annotations

import inspect
import io
import subprocess
import sys
import tokenize
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mergetune.errors import MergetuneError
from mergetune.registry import Registry
from mergetune.search import optuna_adapter
from mergetune.search.methods import SEARCHABLE
from mergetune.search.samplers import PRUNERS, SAMPLERS, make_sampler

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "lm_eval")
PRIVATE = {  # the private third-party names mergetune uses, each behind its adapter
    "_storage", "_trial_id", "_study_id", "_get_stale_trial_ids", "_encode_pair", "_loglikelihood_tokens",
    "_detect_batch_size", "_model_call",
}


def test_the_read_side_imports_no_model_stack():
    code = (
        "import sys\n"
        "import mergetune.search.leaderboard, mergetune.search.report, mergetune.search.trials\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"the leaderboard/report import {loaded}"


def test_the_core_package_carries_no_demo_code():
    code = "import sys, mergetune.search.runner, mergetune.cli\nprint([m for m in sys.modules if m.startswith('mergetune.demo')])"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_an_unknown_name_is_refused_naming_the_known_ones():
    registry: Registry[int] = Registry("widget")
    registry.register("one", 1)
    registry.register("lazy", "math:pi")
    assert registry.get("lazy") == pytest.approx(3.14159, abs=1e-5)  # imported on first use
    with pytest.raises(MergetuneError, match="unknown widget 'two'; known: one, lazy"):
        registry.get("two")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("one", 2)


@pytest.mark.parametrize("name", SAMPLERS.names())
def test_every_registered_sampler_builds_with_a_seed(name):
    assert isinstance(make_sampler(name, seed=3), optuna.samplers.BaseSampler)


def test_every_registered_searchable_method_proposes_what_its_recipe_uses(tmp_path):
    from mergetune.merge_ops.plan import validate_recipe
    from mergetune.merge_ops.recipe import recipe_from_dict
    from mergetune.search.study_file import StudySpec

    spec = StudySpec.model_validate(
        {"name": "t", "models": ["a", "b"], "base_model": "a", "methods": ["linear"], "evaluation": {"tasks": ["x"]}}
    )
    for name in SEARCHABLE:
        method = SEARCHABLE.get(name)
        trial = optuna.create_study().ask()
        params = method.suggest(trial, spec)
        assert set(params) == set(method.baseline(spec)), name  # the baseline is a point of the same space
        recipe = recipe_from_dict(method.recipe(params, spec, str))
        assert recipe.merge_method == name
        validate_recipe(recipe)  # every parameter the method requires, each in its declared range


def test_every_mergekit_method_is_listed_for_the_search():
    from mergetune.merge_ops.methods import METHODS
    from mergetune.search.methods import MERGEKIT_METHODS

    assert set(MERGEKIT_METHODS) == set(METHODS), "search.methods.MERGEKIT_METHODS must list merge_ops.methods.METHODS"


def test_the_hand_written_spaces_restate_their_methods_declarations_exactly():
    """The search side restates what it needs of a method (without importing torch); each must match."""
    from mergetune.merge_ops.methods import METHODS, BasePolicy
    from mergetune.search.methods import WeightedMethod

    weighted = {name: SEARCHABLE.get(name) for name in SEARCHABLE if isinstance(SEARCHABLE.get(name), WeightedMethod)}
    assert weighted
    for name, method in weighted.items():
        declared = METHODS.get(name)
        assert method.needs_base == (declared.base == BasePolicy.REQUIRED), name
        prunes = declared.randomized or declared.ranking is not None  # DARE's draws, TIES' magnitude ranking
        assert method.sparsifying == prunes, name


def test_pruners_say_where_a_candidate_may_stop():
    from mergetune.search.study_file import Evaluation

    evaluation = Evaluation(tasks=["x"], limit=90)
    assert PRUNERS.get("successive_halving").rungs(evaluation) == [10, 30]
    assert PRUNERS.get("none").rungs(evaluation) == []
    assert isinstance(PRUNERS.get("none").pruner(evaluation), optuna.pruners.NopPruner)


def test_optunas_private_api_is_where_the_adapter_expects_it():
    """If this fails, Optuna moved something `mergetune.search.optuna_adapter` relies on: fix the adapter."""
    low, high = optuna_adapter.CHECKED_VERSIONS
    assert low <= optuna_adapter._major_minor(optuna.__version__) <= high, (
        f"Optuna {optuna.__version__} is not among the versions the adapter was checked against"
    )
    storage = optuna.storages.RDBStorage("sqlite://", heartbeat_interval=60, grace_period=120)
    study = optuna.create_study(storage=storage)
    study.enqueue_trial({"x": 0.5})
    trial = study.ask()
    frozen = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))[0]
    assert optuna_adapter.trial_id(trial) == optuna_adapter.trial_id(frozen)
    assert optuna_adapter.storage_of(study).get_trial(optuna_adapter.trial_id(trial)).number == trial.number
    assert optuna_adapter.was_enqueued(frozen)
    assert optuna_adapter.stale_trial_ids(study) == set()  # running, and not silent yet
    assert "study_id" in inspect.signature(type(storage)._get_stale_trial_ids).parameters


def private_attribute_uses(source: str) -> list[tuple[int, str]]:
    """(line, name) of every `.name` in code (not strings or comments) that is one of PRIVATE."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    return [
        (token.start[0], token.string)
        for before, token in zip(tokens, tokens[1:])
        if before.type == tokenize.OP and before.string == "." and token.type == tokenize.NAME and token.string in PRIVATE
    ]


def test_only_the_adapters_touch_private_third_party_api():
    """Private attributes of Optuna and lm-eval objects are used in their adapters alone."""
    assert private_attribute_uses("x = study._storage  # study._study_id\ny = 'lm._model_call'") == [(1, "_storage")]
    offenders = []
    packages = ("search/*.py", "eval/**/*.py", "merge_ops/*.py", "mergetune/**/*.py", "bench/*.py")
    for path in [path for pattern in packages for path in ROOT.glob(pattern)]:
        if path.name in ("optuna_adapter.py", "lm_eval_adapter.py"):
            continue
        offenders += [f"{path.relative_to(ROOT)}:{line}: .{name}" for line, name in private_attribute_uses(path.read_text())]
    assert offenders == []
