"""The stored trial record: every key a study keeps in its storage, who writes it, who reads it.

One Optuna study per method, named `<study name>.<method>`. Workers share it
through the storage alone, so this is the contract between them and the read
side (leaderboard, report, export, benchmarks). Nothing else reads or writes
these keys; they use the functions below. Importing this module loads Optuna,
not torch or lm-eval.

Trial user attributes (`FrozenTrial.user_attrs`):

======================  ===========================================  ========================================
key                     written by, when                             read by
======================  ===========================================  ========================================
``baseline``            setup, when the study is created (enqueued   runner (never pruned), leaderboard,
                        trial); kept when a dead worker's trial is   finalists, report
                        queued again
``worker``              runner, right after ``ask`` — before that    reaper (is its worker dead?)
                        a RUNNING trial has no owner; the reaper
                        fails it after the grace period
``method``              runner, once the candidate is built          (people browsing the storage)
``recipe``              runner, once the candidate is built: the     leaderboard, export, finalists, report
                        mergekit YAML that was built
``seed``                runner, with ``recipe``: the seed of DARE/   leaderboard, export, finalists
                        DELLA masks
``device``              runner, with ``recipe``: the device type     export (re-merges there: random masks
                        the candidate was built on (cpu, cuda)       depend on the device's generator)
``draws``               runner, with ``recipe``: the random-draw     export (says so when this mergetune
                        scheme of its masks (`sparsify.DRAWS`);      draws otherwise: other masks from the
                        absent before it was recorded (float32)      same seed)
``record``              runner, when scoring stops (complete or      leaderboard (search score), benchmarks
                        pruned): per-document evidence as JSON
                        (`mergetune.eval.evidence`)
``docs_scored``         runner, with ``record``                      benchmarks
``timings``             runner, with ``record``: build, evaluate,    benchmarks
                        forward (in forward passes) and total
                        seconds; ``forward_tokens`` (positions run
                        through the model) where the backend counts
                        them (hf)
``race``                runner, with ``record``, under a pruner      leaderboard and report (estimated vs
                        that estimates (``pruning: estimator``):     measured), benchmarks, tests (decisions
                        the completed trials it learned from, as     replayed from the stored basis)
                        [method, number] (``basis``; a bare number
                        before other methods' trials could be
                        among them), the score to beat (``bar``),
                        ``z``, and each estimate as [documents,
                        value, stderr]
``fail_reason``         runner (a failing or refused trial; one      leaderboard and report (failed trials,
                        stopped by Ctrl-C, ``interrupted``, or by    not ranked), people, tests
                        SIGTERM, ``terminated``) or reaper (a dead
                        worker's), before the FAIL
======================  ===========================================  ========================================

Optuna's own fields carry the rest: ``state`` (RUNNING is owned by the worker
named in ``worker``; only the reaper fails another worker's trial, and only one
reaper succeeds), ``value`` (search score of a COMPLETE trial),
``intermediate_values`` (score at each pruning rung, step = documents per task; under
``pruning: estimator`` the estimated full score, step = documents scored),
``params`` (what the sampler proposed).

Study user attributes (`Study.user_attrs`):

=========================  ==========================================  =========================================
key                        written by, when                            read by
=========================  ==========================================  =========================================
``definition``             setup, by the worker that created the       setup (to say what differs)
                           study: what the trials mean
``definition_hash``        setup, with ``definition``                  setup (refuse another study file), demo
``model_fingerprints``     setup, with ``definition`` (or by the       setup (refuse a worker whose checkpoint
                           first worker to run an older study): each   under a model's name has other weights),
                           model as the study file names it, to        export (refuse to re-merge other weights
                           `CheckpointSource.fingerprint`              than the study scored)
``final.<number>``         finalists, once per trial (whichever        leaderboard (held-out score), export,
                           worker gets there): held-out evidence       benchmarks
``final_claim.<number>``   finalists, before a worker scores that      finalists (another worker skips it, then
                           trial's held-out documents: its ``worker``  waits for its ``final.<number>`` or takes
                           and the time (``at``); last writer wins;    it over once that worker is gone)
                           null once its scoring failed
=========================  ==========================================  =========================================
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from mergetune.errors import MergetuneError
from mergetune.eval.evidence import Record
from mergetune.search.study_file import Study, StudySpec, redact_url

BASELINE = "baseline"
WORKER = "worker"
METHOD = "method"
RECIPE = "recipe"
SEED = "seed"
DEVICE = "device"
DRAWS = "draws"
RECORD = "record"
DOCS_SCORED = "docs_scored"
TIMINGS = "timings"
RACE = "race"
FAIL_REASON = "fail_reason"
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)  # a trial that counts towards the budget
RETRIED = (BASELINE,)  # what a dead worker's trial passes on to its retry; the rest belongs to the attempt

DEFINITION = "definition"
DEFINITION_HASH = "definition_hash"
MODEL_FINGERPRINTS = "model_fingerprints"
FINAL_PREFIX = "final."
FINAL_CLAIM_PREFIX = "final_claim."

FAIL_REASON_CHARS = 2000
AnyTrial = Union[optuna.Trial, FrozenTrial]


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def optuna_study_name(spec: StudySpec, method: str) -> str:
    return f"{spec.name}.{method}"


def load_optuna_study(study: Study, method: str, storage: Union[BaseStorage, str, None] = None) -> Optional[optuna.Study]:
    """The method's stored study for reading, or None if no worker has created it yet."""
    try:
        return optuna.load_study(study_name=optuna_study_name(study.spec, method), storage=storage or study.storage_url)
    except KeyError:
        return None
    except Exception as error:  # storage drivers raise their own types
        raise MergetuneError(f"cannot open the study storage {study.storage_display}: {redact_url(str(error))}") from None


# --- written when the study is created -------------------------------------------------------------


def baseline_attrs(method: str) -> dict[str, str]:
    """User attributes of the enqueued hand-written baseline trial."""
    return {BASELINE: f"hand-written {method}"}


def set_definition(optuna_study: optuna.Study, spec: StudySpec) -> None:
    optuna_study.set_user_attr(DEFINITION_HASH, spec.definition_hash())
    optuna_study.set_user_attr(DEFINITION, spec.definition())


def stored_definition_hash(attrs: dict[str, Any]) -> Optional[str]:
    """The definition hash in a study's (or a study summary's) user attributes, None before it is stored."""
    return attrs.get(DEFINITION_HASH)


def stored_definition(optuna_study: optuna.Study) -> dict[str, Any]:
    return optuna_study.user_attrs.get(DEFINITION, {})


def set_model_fingerprints(optuna_study: optuna.Study, fingerprints: dict[str, str]) -> None:
    optuna_study.set_user_attr(MODEL_FINGERPRINTS, fingerprints)


def stored_model_fingerprints(optuna_study: optuna.Study) -> Optional[dict[str, str]]:
    """Each model's fingerprint when the study was started; None for a study stored before they were."""
    return optuna_study.user_attrs.get(MODEL_FINGERPRINTS)


def refuse_changed_models(stored: dict[str, str], current: dict[str, str], since: str, remedy: str) -> None:
    """One message naming the first model whose weights here are not those `since` says, with both fingerprints."""
    for model, fingerprint in current.items():
        if stored.get(model, fingerprint) != fingerprint:
            raise MergetuneError(
                f"model {model}: its weights here (fingerprint {fingerprint}) are not those {since} "
                f"(fingerprint {stored[model]}); {remedy}"
            )


# --- written by the worker that runs the trial ------------------------------------------------------


def set_worker(trial: optuna.Trial, worker: dict[str, Any]) -> None:
    trial.set_user_attr(WORKER, worker)


def set_candidate(trial: optuna.Trial, method: str, recipe_yaml: str, seed: int, device: str, draws: str) -> None:
    trial.set_user_attr(METHOD, method)
    trial.set_user_attr(RECIPE, recipe_yaml)
    trial.set_user_attr(SEED, seed)
    trial.set_user_attr(DEVICE, device)
    trial.set_user_attr(DRAWS, draws)


def set_evidence(trial: optuna.Trial, record: Record, docs_scored: int, timings: dict[str, float]) -> None:
    trial.set_user_attr(RECORD, _json(record))
    trial.set_user_attr(DOCS_SCORED, docs_scored)
    trial.set_user_attr(TIMINGS, timings)


def set_race(trial: optuna.Trial, notes: dict[str, Any]) -> None:
    trial.set_user_attr(RACE, notes)


def set_fail_reason(trial: optuna.Trial, reason: str) -> None:
    trial.set_user_attr(FAIL_REASON, reason[:FAIL_REASON_CHARS])


def fail_reason_in_storage(storage: BaseStorage, trial_id: int, reason: str) -> None:
    """The reaper's write: another worker's trial, by storage id."""
    storage.set_trial_user_attr(trial_id, FAIL_REASON, reason[:FAIL_REASON_CHARS])


def retried_attrs(trial: FrozenTrial) -> dict[str, Any]:
    return {key: value for key, value in trial.user_attrs.items() if key in RETRIED}


# --- written once per finalist ------------------------------------------------------------------------


def set_final(optuna_study: optuna.Study, number: int, record: Record) -> None:
    optuna_study.set_user_attr(f"{FINAL_PREFIX}{number}", _json(record))


def has_final(optuna_study: optuna.Study, number: int) -> bool:
    return f"{FINAL_PREFIX}{number}" in optuna_study.user_attrs


def claim_final(optuna_study: optuna.Study, number: int, worker: dict[str, Any]) -> bool:
    """Say that `worker` scores trial `number`'s held-out documents; False when another worker's claim, written
    at the same moment, stands instead (the storage keeps the last one written)."""
    key, claim = f"{FINAL_CLAIM_PREFIX}{number}", {"worker": worker, "at": time.time()}
    optuna_study.set_user_attr(key, claim)
    return optuna_study.user_attrs.get(key) == claim


def release_final(optuna_study: optuna.Study, number: int) -> None:
    """Withdraw this worker's claim on trial `number`: its scoring failed, another worker may take it."""
    optuna_study.set_user_attr(f"{FINAL_CLAIM_PREFIX}{number}", None)


def final_claim(optuna_study: optuna.Study, number: int) -> Optional[dict[str, Any]]:
    """The last claim on trial `number`'s held-out scoring: {"worker": ..., "at": seconds since the epoch}."""
    return optuna_study.user_attrs.get(f"{FINAL_CLAIM_PREFIX}{number}")


def final_records(optuna_study: optuna.Study) -> dict[int, Record]:
    """Held-out evidence by trial number."""
    return {
        int(key[len(FINAL_PREFIX) :]): json.loads(value)
        for key, value in optuna_study.user_attrs.items()
        if key.startswith(FINAL_PREFIX)
    }


# --- read side --------------------------------------------------------------------------------------


def best_by_search(completed: list[Any], count: int) -> list[Any]:
    """The `count` finalists among `completed` trials (FrozenTrial or StoredTrial): highest search score first,
    ties to the lower number. The runner scores these on held-out documents; the leaderboard checks they were."""
    return sorted(completed, key=lambda t: t.value, reverse=True)[:count]


def worker_attr(trial: AnyTrial) -> Optional[dict[str, Any]]:
    return trial.user_attrs.get(WORKER)


def is_baseline(trial: AnyTrial) -> bool:
    return bool(trial.user_attrs.get(BASELINE))


@dataclass(frozen=True)
class StoredTrial:
    """A finished trial as the read side sees it."""

    number: int
    state: TrialState
    value: Optional[float]
    baseline: Optional[str]
    recipe: Optional[str]
    seed: Optional[int]
    device: Optional[str]  # None for trials stored before devices were recorded
    draws: Optional[str]  # None for trials stored before draw schemes were recorded
    record: Optional[Record]
    docs_scored: int
    fail_reason: Optional[str]
    race: Optional[dict[str, Any]] = None  # the estimator's notes (`set_race`), if it raced this trial

    @classmethod
    def of(cls, trial: FrozenTrial) -> "StoredTrial":
        attrs = trial.user_attrs
        record = attrs.get(RECORD)
        seed = attrs.get(SEED)
        return cls(
            number=trial.number,
            state=trial.state,
            value=trial.value,
            baseline=attrs.get(BASELINE),
            recipe=attrs.get(RECIPE),
            seed=None if seed is None else int(seed),
            device=attrs.get(DEVICE),
            draws=attrs.get(DRAWS),
            record=None if record is None else json.loads(record),
            docs_scored=attrs.get(DOCS_SCORED, 0),
            fail_reason=attrs.get(FAIL_REASON),
            race=attrs.get(RACE),
        )
