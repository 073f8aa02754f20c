"""Opening a method's Optuna study: created by exactly one worker, checked by every other.

Creating a study succeeds for exactly one worker, even when several start at once;
that one stores the definition and queues the hand-written baseline, and samples
with the study's seed. Every other worker (and every later run) compares its
definition with the stored one — refusing a study made from a different study
file — and samples with a seed of its own.
"""

from __future__ import annotations

import time
from typing import Optional

import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.storages import BaseStorage

from mergetune.errors import MergetuneError
from mergetune.search import trials
from mergetune.search.methods import SEARCHABLE
from mergetune.search.optuna_adapter import experimental
from mergetune.search.samplers import PRUNERS, make_sampler
from mergetune.search.storage import open_storage, storage_errors
from mergetune.search.study_file import RUN_SETTINGS, Study, StudySpec, upgraded
from mergetune.search.workers import Worker

DEFINITION_WAIT_SECONDS = 10.0  # how long a worker waits for the study's creator to store the definition


def open_optuna_study(
    study: Study, method: str, storage: Optional[BaseStorage] = None, fingerprints: Optional[dict[str, str]] = None
) -> optuna.Study:
    """The method's Optuna study, created or continued; refuses one made from a different study file, or
    (given this worker's model `fingerprints`) from other checkpoints under the same model names."""
    spec = study.spec
    storage = storage or open_storage(study)
    name = trials.optuna_study_name(spec, method)
    pruner = PRUNERS.get(spec.pruning).pruner(spec.evaluation)
    with storage_errors(study.storage_url), experimental():
        try:
            sampler = make_sampler(spec.sampler, spec.seed)
            optuna_study = optuna.create_study(
                study_name=name, storage=storage, direction="maximize", sampler=sampler, pruner=pruner
            )
        except DuplicatedStudyError:
            sampler = make_sampler(spec.sampler, Worker.this().seed(spec.seed))
            optuna_study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
            check_definition(optuna_study, spec)
            if fingerprints is not None:
                check_models(optuna_study, fingerprints)
        else:
            trials.set_definition(optuna_study, spec)
            if fingerprints is not None:
                trials.set_model_fingerprints(optuna_study, fingerprints)
            if spec.baselines:
                optuna_study.enqueue_trial(SEARCHABLE.get(method).baseline(spec), user_attrs=trials.baseline_attrs(method))
    return optuna_study


def check_stored_definitions(study: Study, storage: BaseStorage, fingerprints: dict[str, str]) -> None:
    """Refuse a study file whose methods' stored studies were made from a different one, or from other
    checkpoints, before any model loads: on a 70B that refusal would otherwise come minutes later.
    Studies not created yet pass."""
    for method in study.spec.methods:
        optuna_study = trials.load_optuna_study(study, method, storage)
        if optuna_study is not None and trials.stored_definition_hash(optuna_study.user_attrs) is not None:
            refuse_other_definition(optuna_study, study.spec)
            check_models(optuna_study, fingerprints)


def check_models(optuna_study: optuna.Study, fingerprints: dict[str, str]) -> None:
    """Refuse a worker whose checkpoint under one of the study's model names holds other weights than the
    study was started with (a re-trained fine-tune, another host's copy): its trials would mix two merges
    under one name. A study stored before fingerprints were takes this worker's."""
    stored = trials.stored_model_fingerprints(optuna_study)
    if stored is None:
        trials.set_model_fingerprints(optuna_study, fingerprints)
        return
    trials.refuse_changed_models(
        stored,
        fingerprints,
        f"study '{optuna_study.study_name}' was started with",
        "every worker and every run must merge the same checkpoints: restore that one, or use another study name or storage",
    )


def check_definition(optuna_study: optuna.Study, spec: StudySpec) -> None:
    """Refuse to run trials of a study that was made from a different study file, saying what differs."""
    deadline = time.monotonic() + DEFINITION_WAIT_SECONDS
    stored = trials.stored_definition_hash(optuna_study.user_attrs)
    while stored is None and time.monotonic() < deadline:  # its creator is storing it this moment
        time.sleep(0.2)
        stored = trials.stored_definition_hash(optuna_study.user_attrs)
    if stored is None:  # its creator died before storing it
        trials.set_definition(optuna_study, spec)
    else:
        refuse_other_definition(optuna_study, spec)


def refuse_other_definition(optuna_study: optuna.Study, spec: StudySpec) -> None:
    """One message saying which field differs, if the stored definition is not this file's."""
    stored = trials.stored_definition_hash(optuna_study.user_attrs)
    if not spec.has_definition(stored, trials.stored_definition(optuna_study)):
        definition = trials.stored_definition(optuna_study)
        difference = describe_difference(upgraded(definition), spec.comparable_definition(definition))
        raise MergetuneError(
            f"study '{optuna_study.study_name}' in the storage was made from a different study file "
            f"({difference or 'definition differs'}); use another study name or storage"
        )


def describe_difference(stored: dict, current: dict, prefix: str = "") -> str:
    """The first field whose value differs between two study definitions, for the refusal message ("" if none)."""
    for key in sorted(set(stored) | set(current)):
        if not prefix and key in RUN_SETTINGS:
            continue
        old, new = stored.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found = describe_difference(old, new, f"{prefix}{key}.")
            if found:
                return found
        elif old != new:
            return f"{prefix}{key}: stored {old!r}, this file {new!r}"
    return ""
