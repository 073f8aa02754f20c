"""Running a study: sources and evaluator loaded once, then trial after trial in one live model.

Per trial: Optuna proposes parameters → a mergekit recipe → built in memory →
scored on a small subset of the search documents → reported (and possibly pruned)
→ scored on the rest → stored. Every finished trial is in the study's storage the
moment it ends, so a crash or Ctrl-C loses at most the trial in flight, and
running the command again continues the same study up to the requested count.
Afterwards the best trials of each method (and the hand-written baselines) are
scored on held-out documents: the finalists' scores the leaderboard ranks by.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import optuna
import yaml
from optuna.trial import TrialState

from mergetune.errors import MergetuneError
from mergetune.eval import EvalConfig, Evaluator
from mergetune.merge_ops.inmemory import InMemoryBuilder
from mergetune.merge_ops.plan import DTYPES
from mergetune.merge_ops.recipe import recipe_from_dict
from mergetune.merge_ops.sources import open_source
from mergetune.search.records import Record, combine, record_from_result, summarize
from mergetune.search.space import baseline, recipe_for, suggest
from mergetune.search.study_file import Study, StudySpec, redact_url

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

DocIds = dict[str, list[int]]
FINAL_PREFIX = "final."
DEFINITION_KEY = "definition"
DEFINITION_HASH_KEY = "definition_hash"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def optuna_study_name(spec: StudySpec, method: str) -> str:
    return f"{spec.name}.{method}"


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(enabled: bool) -> optuna.pruners.BasePruner:
    if not enabled:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)


def open_optuna_study(study: Study, method: str, storage=None) -> optuna.Study:
    """The method's Optuna study, created or continued; refuses one made from a different study file."""
    spec = study.spec
    try:
        optuna_study = optuna.create_study(
            study_name=optuna_study_name(spec, method),
            storage=storage or study.storage_url,
            direction="maximize",
            sampler=make_sampler(spec.sampler, spec.seed),
            pruner=make_pruner(spec.pruning),
            load_if_exists=True,
        )
    except MergetuneError:
        raise
    except Exception as error:  # storage drivers raise their own types
        raise MergetuneError(f"cannot open the study storage {study.storage_display}: {redact_url(str(error))}") from None
    stored = optuna_study.user_attrs.get(DEFINITION_HASH_KEY)
    current = spec.definition_hash()
    if stored is None:
        optuna_study.set_user_attr(DEFINITION_HASH_KEY, current)
        optuna_study.set_user_attr(DEFINITION_KEY, spec.model_dump(mode="json"))
    elif stored != current:
        raise MergetuneError(
            f"study '{optuna_study.study_name}' in the storage was made from a different study file "
            f"({describe_difference(optuna_study.user_attrs.get(DEFINITION_KEY, {}), spec.model_dump(mode='json')) or 'definition differs'}); "
            "use another study name or storage"
        )
    return optuna_study


def describe_difference(stored: dict, current: dict, prefix: str = "") -> str:
    """The first field whose value differs between two study definitions, for the refusal message ("" if none)."""
    ignored = {"storage", "budget", "device", "backend"}
    for key in sorted(set(stored) | set(current)):
        if not prefix and key in ignored:
            continue
        old, new = stored.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            found = describe_difference(old, new, f"{prefix}{key}.")
            if found:
                return found
        elif old != new:
            return f"{prefix}{key}: stored {old!r}, this file {new!r}"
    return ""


@dataclass
class Documents:
    """The fixed documents every candidate of a study is scored on."""

    search: DocIds
    first: Optional[DocIds]
    final: DocIds

    @staticmethod
    def count(ids: Optional[DocIds]) -> int:
        return sum(len(v) for v in (ids or {}).values())


def choose_documents(evaluator: Evaluator, spec: StudySpec) -> Documents:
    """Search documents (seeded), a nested first subset for pruning, and held-out final documents."""
    evaluation = spec.evaluation
    search = evaluator.sample_doc_ids(limit=evaluation.limit, seed=spec.seed)
    rng = random.Random(spec.seed)
    first = None
    first_limit = evaluation.first_limit or max(1, evaluation.limit // 4)
    if spec.pruning and first_limit < evaluation.limit:
        first = {}
        for leaf, ids in search.items():
            keep = max(1, math.ceil(len(ids) * first_limit / evaluation.limit))
            first[leaf] = sorted(rng.sample(sorted(ids), min(keep, len(ids))))
    everything = evaluator.sample_doc_ids(limit=sys.maxsize, seed=spec.seed)
    final_rng = random.Random(evaluation.final.seed)
    final: DocIds = {}
    for name, loaded in evaluator.tasks.items():
        remaining = {leaf: sorted(set(everything[leaf]) - set(search.get(leaf, []))) for leaf in loaded.leaves}
        total = sum(len(ids) for ids in remaining.values())
        if total == 0:
            raise MergetuneError(f"task {name}: every document is used by the search; lower evaluation.limit")
        wanted = min(evaluation.final.limit or total, total)
        for leaf, ids in remaining.items():
            share = len(ids) if wanted == total else max(1, round(wanted * len(ids) / total)) if ids else 0
            final[leaf] = sorted(final_rng.sample(ids, min(share, len(ids))))
    return Documents(search=search, first=first, final=final)


@dataclass
class Workspace:
    """What a study loads once per process: resident sources, the live model, the evaluator, the documents."""

    study: Study
    builder: InMemoryBuilder
    evaluator: Evaluator
    documents: Documents

    @classmethod
    def open(cls, study: Study, say: Callable[[str], None] = log.info) -> "Workspace":
        spec = study.spec
        references = list(dict.fromkeys(study.resolve(m) for m in [*spec.models, *( [spec.base_model] if spec.base_model else [])]))
        say(f"loading {len(references)} model(s) onto {spec.device}")
        sources = {reference: open_source(reference) for reference in references}
        first_recipe = recipe_from_dict(recipe_for(spec.methods[0], baseline(spec.methods[0], spec), spec, study.resolve))
        builder = InMemoryBuilder.for_recipe(first_recipe, sources, device=spec.device, dtype=DTYPES[spec.dtype])
        from transformers import AutoTokenizer

        tokenizer_dir = sources[references[0]].directory
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        evaluation = spec.evaluation
        config = EvalConfig(
            suite=evaluation.suite,
            tasks=tuple(evaluation.tasks),
            include_paths=tuple(study.resolve(path) for path in evaluation.include_paths),
            data_dir=study.resolve(evaluation.data_dir) if evaluation.data_dir else None,
            num_fewshot=evaluation.num_fewshot,
            limit=evaluation.limit,
            seed=spec.seed,
        )
        say("preparing the evaluation tasks")
        options = {"engine_dir": tokenizer_dir} if spec.backend == "vllm" else {}
        evaluator = Evaluator.from_model(builder.model, tokenizer, config, backend=spec.backend, **options)
        return cls(study, builder, evaluator, choose_documents(evaluator, spec))


@dataclass
class TrialOutcome:
    number: int
    state: TrialState
    value: Optional[float]
    seconds: float
    docs_scored: int


@dataclass
class MethodRun:
    method: str
    outcomes: list[TrialOutcome] = field(default_factory=list)


Progress = Callable[[str, int, int, Optional[float]], None]  # (method, done, total, best so far)


def _counted(optuna_study: optuna.Study) -> int:
    return len(optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def recover_dead_trials(optuna_study: optuna.Study) -> int:
    """Mark trials left RUNNING by a dead process on this host as failed, re-queueing baselines.

    (Heartbeats, for workers on other hosts, are the storage's job.)
    """
    host = socket.gethostname()
    recovered = 0
    for trial in optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        worker_host, _, pid = worker.rpartition(":")
        if worker_host != host or not pid.isdigit() or _alive(int(pid)):
            continue
        optuna_study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", "worker died mid-trial")
        optuna_study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        if trial.user_attrs.get("baseline"):
            optuna_study.enqueue_trial(trial.params, user_attrs={"baseline": trial.user_attrs["baseline"]})
        recovered += 1
    return recovered


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def enqueue_baseline(optuna_study: optuna.Study, method: str, spec: StudySpec) -> None:
    if not spec.baselines:
        return
    if any(trial.user_attrs.get("baseline") for trial in optuna_study.get_trials(deepcopy=False)):
        return
    optuna_study.enqueue_trial(baseline(method, spec), user_attrs={"baseline": f"hand-written {method}"})


class StudyRunner:
    def __init__(self, workspace: Workspace, storage=None):
        self.workspace = workspace
        self.spec = workspace.study.spec
        self.storage = storage

    def score(self, doc_ids: DocIds) -> Record:
        return record_from_result(self.workspace.evaluator.score(doc_ids=doc_ids))

    def run_method(self, method: str, n_trials: Optional[int], timeout: Optional[float], progress: Optional[Progress]) -> MethodRun:
        optuna_study = open_optuna_study(self.workspace.study, method, self.storage)
        recovered = recover_dead_trials(optuna_study)
        if recovered:
            log.warning("%s: %d trial(s) left running by a dead process were marked failed", method, recovered)
        enqueue_baseline(optuna_study, method, self.spec)
        run = MethodRun(method)
        start = time.monotonic()
        target = n_trials
        while target is None or _counted(optuna_study) < target:
            if timeout is not None and time.monotonic() - start >= timeout:
                break
            run.outcomes.append(self.run_trial(optuna_study, method))
            if progress:
                progress(method, _counted(optuna_study), target or 0, _best_value(optuna_study))
        return run

    def run_trial(self, optuna_study: optuna.Study, method: str) -> TrialOutcome:
        trial = optuna_study.ask()
        trial.set_user_attr("worker", worker_id())
        started = time.perf_counter()
        documents = self.workspace.documents
        try:
            params = suggest(trial, method, self.spec)
            recipe_dict = recipe_for(method, params, self.spec, self.workspace.study.resolve)
            seed = self.spec.seed * 100_003 + trial.number
            build_start = time.perf_counter()
            self.workspace.builder.build(recipe_from_dict(recipe_dict), seed=seed)
            build_seconds = time.perf_counter() - build_start
            trial.set_user_attr("method", method)
            trial.set_user_attr("recipe", yaml.safe_dump(recipe_dict, sort_keys=False))
            trial.set_user_attr("seed", seed)
            eval_start = time.perf_counter()
            docs_scored = 0
            if documents.first:
                record = self.score(documents.first)
                docs_scored += Documents.count(documents.first)
                trial.report(summarize(record).average, step=docs_scored)
                if trial.should_prune():
                    self._store(trial, record, docs_scored, build_seconds, time.perf_counter() - eval_start, started)
                    optuna_study.tell(trial, state=TrialState.PRUNED)
                    return TrialOutcome(trial.number, TrialState.PRUNED, None, time.perf_counter() - started, docs_scored)
                rest = {
                    leaf: sorted(set(ids) - set(documents.first.get(leaf, [])))
                    for leaf, ids in documents.search.items()
                }
                rest = {leaf: ids for leaf, ids in rest.items() if ids}
                if rest:
                    record = combine(record, self.score(rest))
                    docs_scored += Documents.count(rest)
            else:
                record = self.score(documents.search)
                docs_scored += Documents.count(documents.search)
            value = summarize(record).average
            if not math.isfinite(value):
                raise MergetuneError(f"the score is {value}")
            self._store(trial, record, docs_scored, build_seconds, time.perf_counter() - eval_start, started)
            optuna_study.tell(trial, value)
            return TrialOutcome(trial.number, TrialState.COMPLETE, value, time.perf_counter() - started, docs_scored)
        except BaseException as error:
            reason = "interrupted" if isinstance(error, KeyboardInterrupt) else f"{type(error).__name__}: {error}"
            trial.set_user_attr("fail_reason", reason[:2000])
            optuna_study.tell(trial, state=TrialState.FAIL)
            raise

    def _store(self, trial, record: Record, docs: int, build: float, evaluate: float, started: float) -> None:
        trial.set_user_attr("record", json.dumps(record, separators=(",", ":")))
        trial.set_user_attr("docs_scored", docs)
        trial.set_user_attr("timings", {"build": build, "evaluate": evaluate, "total": time.perf_counter() - started})

    def finalize(self, method: str, say: Callable[[str], None] = log.info) -> list[int]:
        """Score the best trials and the baseline on the held-out documents (once each)."""
        optuna_study = open_optuna_study(self.workspace.study, method, self.storage)
        complete = optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        ranked = sorted(complete, key=lambda t: t.value, reverse=True)[: self.spec.evaluation.final.finalists]
        chosen = ranked + [t for t in complete if t.user_attrs.get("baseline") and t not in ranked]
        done = []
        for trial in chosen:
            key = f"{FINAL_PREFIX}{trial.number}"
            if key in optuna_study.user_attrs:
                continue
            say(f"{method}: final evaluation of trial {trial.number}")
            recipe = recipe_from_dict(yaml.safe_load(trial.user_attrs["recipe"]))
            self.workspace.builder.build(recipe, seed=trial.user_attrs["seed"])
            record = self.score(self.workspace.documents.final)
            optuna_study.set_user_attr(key, json.dumps(record, separators=(",", ":")))
            done.append(trial.number)
        return done


def _best_value(optuna_study: optuna.Study) -> Optional[float]:
    values = [t.value for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    return max(values) if values else None
