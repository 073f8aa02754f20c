"""Running a study: sources and evaluator loaded once, then trial after trial in one live model.

Per trial: Optuna proposes parameters → a mergekit recipe → built in memory →
scored rung by rung on growing, nested subsets of the search documents, each
rung's score reported to a successive-halving pruner that stops candidates
trailing the best third (the hand-written baselines always run in full) →
stored. Every finished trial is in the study's storage the moment it ends, so a
crash or Ctrl-C loses at most the trial in flight, and running the command again
continues the same study up to the requested count.
Afterwards the best trials of each method (and the hand-written baselines) are
scored on held-out documents: the finalists' scores the leaderboard ranks by.

Several workers (processes, GPUs, hosts) may run one study at once through one
storage; they agree through the storage alone:
- a trial runs only if fewer than the requested number of trials are done or under
  way ahead of it in trial-number order (`admitted`), so however workers race, the
  study ends with exactly the requested number of completed (or pruned) trials;
- a worker that dies mid-trial is noticed by the others — by its process id on the
  same host, by its silent heartbeat from elsewhere — and its trial is failed and
  its parameters queued again, once, by whoever noticed first (`Reaper`);
- a trial that fails (NaN weights, an evaluator error, out of memory) is stored as
  failed with its reason and the study goes on, until `max_failures` fail in a row.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import random
import socket
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import optuna
import psutil
import torch
import yaml
from optuna.exceptions import DuplicatedStudyError, UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from mergetune.errors import MergetuneError
from mergetune.eval import EvalConfig, Evaluator
from mergetune.merge_ops.inmemory import InMemoryBuilder
from mergetune.merge_ops.plan import DTYPES
from mergetune.merge_ops.recipe import recipe_from_dict
from mergetune.merge_ops.sources import open_source
from mergetune.search.records import Record, combine, record_from_result, summarize
from mergetune.search.space import baseline, recipe_for, suggest
from mergetune.search.storage import heartbeat, open_storage, redact, stale_trial_ids, storage_errors
from mergetune.search.study_file import RUN_SETTINGS, Study, StudySpec

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

DocIds = dict[str, list[int]]
FINAL_PREFIX = "final."
DEFINITION_KEY = "definition"
DEFINITION_HASH_KEY = "definition_hash"
DEFINITION_WAIT_SECONDS = 10.0  # how long a worker waits for the study's creator to store the definition
POLL_SECONDS = 1.0  # how often a worker waiting for the last trials of others looks again
MAX_FAILURES = 5  # failed trials in a row that stop a worker, unless told otherwise
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)
AHEAD = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
DIED = "worker died mid-trial"
NOT_RUN = "not run: the study's {target} trials were already done or under way when this worker asked"
RETRIED_ATTRS = ("baseline",)  # user attributes a retried trial keeps; the rest belong to the attempt


@dataclass(frozen=True)
class Worker:
    """One worker process, identified well enough to tell later whether it is still alive."""

    host: str
    pid: int
    boot: str
    started: float

    @classmethod
    def this(cls) -> "Worker":
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _boot_id(), psutil.Process(pid).create_time())

    @classmethod
    def of(cls, trial: FrozenTrial) -> Optional["Worker"]:
        value = trial.user_attrs.get("worker")
        try:
            return cls(**value) if isinstance(value, dict) else None
        except TypeError:
            return None

    def as_attr(self) -> dict:
        return {"host": self.host, "pid": self.pid, "boot": self.boot, "started": self.started}

    def seed(self, base: int) -> int:
        """A sampler seed for this worker: no two workers propose the same sequence."""
        text = f"{base}:{self.host}:{self.pid}:{self.started}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")

    def died_here(self, other: "Worker") -> bool:
        """Whether `other` ran on this machine (same host, same boot) and its process is gone (or its pid reused)."""
        if (other.host, other.boot) != (self.host, self.boot):
            return False
        try:
            return abs(psutil.Process(other.pid).create_time() - other.started) > 1.0
        except psutil.NoSuchProcess:
            return True


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def optuna_study_name(spec: StudySpec, method: str) -> str:
    return f"{spec.name}.{method}"


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        # constant_liar: workers running in parallel don't all propose the same promising point.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5, constant_liar=True)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """Asynchronous successive halving over document rungs: works the same for one worker or many."""
    rungs = spec.evaluation.rungs()
    if not spec.pruning or not rungs:
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(
        min_resource=rungs[0], reduction_factor=spec.evaluation.reduction_factor, min_early_stopping_rate=0
    )


def open_optuna_study(study: Study, method: str, storage=None) -> optuna.Study:
    """The method's Optuna study, created or continued; refuses one made from a different study file.

    Creating a study succeeds for exactly one worker, even when several start at once;
    that one stores the definition and queues the baseline, and samples with the
    study's seed. Every other worker (and every later run) compares its definition
    with the stored one and samples with a seed of its own.
    """
    spec = study.spec
    storage = storage or open_storage(study)
    name = optuna_study_name(spec, method)
    pruner = make_pruner(spec)
    with storage_errors(study.storage_url), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            sampler = make_sampler(spec.sampler, spec.seed)
            optuna_study = optuna.create_study(
                study_name=name, storage=storage, direction="maximize", sampler=sampler, pruner=pruner
            )
        except DuplicatedStudyError:
            sampler = make_sampler(spec.sampler, Worker.this().seed(spec.seed))
            optuna_study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
            check_definition(optuna_study, spec)
        else:
            store_definition(optuna_study, spec)
            if spec.baselines:
                optuna_study.enqueue_trial(baseline(method, spec), user_attrs={"baseline": f"hand-written {method}"})
    return optuna_study


def store_definition(optuna_study: optuna.Study, spec: StudySpec) -> None:
    optuna_study.set_user_attr(DEFINITION_HASH_KEY, spec.definition_hash())
    optuna_study.set_user_attr(DEFINITION_KEY, spec.definition())


def check_definition(optuna_study: optuna.Study, spec: StudySpec) -> None:
    """Refuse to run trials of a study that was made from a different study file, saying what differs."""
    deadline = time.monotonic() + DEFINITION_WAIT_SECONDS
    stored = optuna_study.user_attrs.get(DEFINITION_HASH_KEY)
    while stored is None and time.monotonic() < deadline:  # its creator is storing it this moment
        time.sleep(0.2)
        stored = optuna_study.user_attrs.get(DEFINITION_HASH_KEY)
    if stored is None:  # its creator died before storing it
        store_definition(optuna_study, spec)
    elif stored != spec.definition_hash():
        difference = describe_difference(optuna_study.user_attrs.get(DEFINITION_KEY, {}), spec.definition())
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


def check_device(device: str) -> None:
    """One clear message for a device this machine doesn't have, before any model is loaded."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise MergetuneError(f"device '{device}': not a device name like cpu, cuda or cuda:1") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise MergetuneError(f"device {device}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise MergetuneError(f"device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


@dataclass
class Documents:
    """The fixed documents every candidate of a study is scored on.

    rungs: (documents per task, ids) of the pruning rungs, each nested in the next
    and all in `search`; a candidate is scored rung by rung and may stop at any.
    """

    search: DocIds
    rungs: list[tuple[int, DocIds]]
    final: DocIds

    @staticmethod
    def count(ids: Optional[DocIds]) -> int:
        return sum(len(v) for v in (ids or {}).values())


def final_only_tasks(spec: StudySpec) -> list[str]:
    """Tasks the finalists are scored on that the search never scores."""
    return [name for name in spec.evaluation.final.tasks if name not in spec.evaluation.tasks]


def choose_documents(evaluator: Evaluator, spec: StudySpec) -> Documents:
    """Search documents (seeded), nested subsets of them as pruning rungs, and held-out final documents.

    Final documents are those of `final.tasks` the search did not use: all of a
    final-only task's, the rest of a search task's.
    """
    evaluation = spec.evaluation
    final_only = final_only_tasks(spec)
    missing = [name for name in final_only if name not in evaluator.tasks]
    if missing:
        raise MergetuneError(f"evaluation.final.tasks: {', '.join(missing)} must name tasks or groups (not tags)")
    search_tasks = [name for name in evaluator.tasks if name not in final_only]
    final_tasks = evaluation.final.tasks or search_tasks
    search = evaluator.sample_doc_ids(search_tasks, limit=evaluation.limit, seed=spec.seed)
    rng = random.Random(spec.seed)
    order = {leaf: rng.sample(sorted(ids), len(ids)) for leaf, ids in search.items()}  # rungs are its prefixes
    rungs = []
    for size in evaluation.rungs() if spec.pruning else []:
        prefix = {leaf: sorted(ids[: max(1, math.ceil(len(ids) * size / evaluation.limit))]) for leaf, ids in order.items()}
        rungs.append((size, prefix))
    everything = evaluator.sample_doc_ids(final_tasks, limit=sys.maxsize, seed=spec.seed)
    final_rng = random.Random(evaluation.final.seed)
    final: DocIds = {}
    for name in final_tasks:
        loaded = evaluator.tasks[name]
        remaining = {leaf: sorted(set(everything[leaf]) - set(search.get(leaf, []))) for leaf in loaded.leaves}
        total = sum(len(ids) for ids in remaining.values())
        if total == 0:
            raise MergetuneError(f"task {name}: every document is used by the search; lower evaluation.limit")
        wanted = min(evaluation.final.limit or total, total)
        for leaf, ids in remaining.items():
            share = len(ids) if wanted == total else max(1, round(wanted * len(ids) / total)) if ids else 0
            final[leaf] = sorted(final_rng.sample(ids, min(share, len(ids))))
    return Documents(search=search, rungs=rungs, final=final)


def added(ids: DocIds, previous: DocIds) -> DocIds:
    """The documents of a rung (`ids`) that the rung before it (`previous`, nested in it) lacks."""
    remaining = {leaf: sorted(set(doc_ids) - set(previous.get(leaf, ()))) for leaf, doc_ids in ids.items()}
    return {leaf: doc_ids for leaf, doc_ids in remaining.items() if doc_ids}


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
        check_device(spec.device)
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
            tasks=(*evaluation.tasks, *final_only_tasks(spec)),
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
    reason: Optional[str] = None  # why it failed, or why it was not run


@dataclass
class MethodRun:
    method: str
    outcomes: list[TrialOutcome] = field(default_factory=list)


Progress = Callable[[str, int, int, Optional[float]], None]  # (method, done, total, best so far)


def admitted(optuna_study: optuna.Study, trial: optuna.Trial, target: int) -> bool:
    """Whether `trial` may run: fewer than `target` trials ahead of it (by number) are done or under way.

    The storage hands out trial numbers in order, so every trial that could still count
    and has a smaller number exists by the time this is asked: of two workers racing
    for the last place, the one holding the larger number stands down, and the study
    can never end with more than `target` completed trials.
    """
    ahead = optuna_study.get_trials(deepcopy=False, states=AHEAD)
    return sum(other.number < trial.number for other in ahead) < target


class Reaper:
    """Fails the running trials of dead workers — once, whoever notices first — and queues their parameters again.

    A worker is dead when its process is gone from this machine, when its heartbeat
    has been silent past the grace period (RDB storages, any host), or when its trial
    has run that long without naming its worker (it died within moments of starting).
    """

    def __init__(self, grace_period: float):
        self.me = Worker.this()
        self.grace_period = grace_period
        self._unnamed_since: dict[int, float] = {}  # trial id → when first seen running without a worker

    def reap(self, optuna_study: optuna.Study) -> list[int]:
        """Numbers of the trials this call failed (and queued again when they had parameters)."""
        running = optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        stale = stale_trial_ids(optuna_study)
        now = time.monotonic()
        self._unnamed_since = {
            t._trial_id: self._unnamed_since.get(t._trial_id, now) for t in running if "worker" not in t.user_attrs
        }
        reaped = []
        for trial in running:
            reason = self._cause_of_death(trial, stale, now)
            if reason and self._fail(optuna_study, trial, reason):
                self._requeue(optuna_study, trial._trial_id)
                reaped.append(trial.number)
        return reaped

    def _cause_of_death(self, trial: FrozenTrial, stale: set[int], now: float) -> Optional[str]:
        owner = Worker.of(trial)
        if owner is not None and self.me.died_here(owner):
            return DIED
        if trial._trial_id in stale:
            return f"{DIED} (no heartbeat for {self.grace_period:g} s)"
        if owner is None and now - self._unnamed_since[trial._trial_id] > self.grace_period:
            return f"{DIED} (before it named itself)"
        return None

    @staticmethod
    def _fail(optuna_study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
        """Mark the trial failed; False if another worker did first (or it finished after all)."""
        storage = optuna_study._storage
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
            return storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except UpdateFinishedTrialError:
            return False

    @staticmethod
    def _requeue(optuna_study: optuna.Study, trial_id: int) -> None:
        failed = optuna_study._storage.get_trial(trial_id)
        if not failed.params and "fixed_params" not in failed.system_attrs:
            return  # it died before choosing parameters: nothing to retry, a new trial takes its place
        retry = copy.deepcopy(failed)
        retry.user_attrs = {key: value for key, value in failed.user_attrs.items() if key in RETRIED_ATTRS}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback()(optuna_study, retry)


def failure_reason(error: Exception) -> str:
    """What the stored trial says about why it failed."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return f"out of memory: {error}"
    if isinstance(error, MergetuneError):
        return str(error)
    return f"{type(error).__name__}: {error}"


class StudyRunner:
    def __init__(self, workspace: Workspace, storage=None, max_failures: Optional[int] = None):
        self.workspace = workspace
        self.spec = workspace.study.spec
        self.storage = storage or open_storage(workspace.study)
        self.max_failures = max_failures or MAX_FAILURES
        self.failures_in_a_row = 0
        self.worker = Worker.this()
        self.reaper = Reaper(self.spec.storage_options.grace_period)

    def score(self, doc_ids: DocIds) -> Record:
        return record_from_result(self.workspace.evaluator.score(doc_ids=doc_ids))

    def run_method(
        self, method: str, n_trials: Optional[int], timeout: Optional[float], progress: Optional[Progress]
    ) -> MethodRun:
        """Run trials until the study holds `n_trials` completed ones (whoever ran them) or `timeout` passes."""
        optuna_study = open_optuna_study(self.workspace.study, method, self.storage)
        run = MethodRun(method)
        deadline = None if timeout is None else time.monotonic() + timeout
        with storage_errors(self.workspace.study.storage_url):
            while True:
                reaped = self.reaper.reap(optuna_study)
                if reaped:
                    log.warning("%s: trial(s) %s of dead workers failed and queued again", method, reaped)
                trials = optuna_study.get_trials(deepcopy=False)
                done = sum(trial.state in COUNTED for trial in trials)
                if progress:
                    progress(method, done, n_trials or 0, _best_value(trials))
                if (n_trials is not None and done >= n_trials) or (deadline is not None and time.monotonic() >= deadline):
                    return run
                running = sum(trial.state == TrialState.RUNNING for trial in trials)
                if n_trials is not None and done + running >= n_trials:
                    # The last trials run elsewhere; if their worker dies, they come back to this loop.
                    time.sleep(POLL_SECONDS)
                    continue
                run.outcomes.append(self.run_trial(optuna_study, method, n_trials))

    def run_trial(self, optuna_study: optuna.Study, method: str, target: Optional[int] = None) -> TrialOutcome:
        """One trial, start to stored end; a failure is stored with its reason and counted, not raised."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Heartbeat of storage")  # we record heartbeats ourselves
            trial = optuna_study.ask()
        started = time.perf_counter()
        with heartbeat(optuna_study._storage, trial._trial_id):
            trial.set_user_attr("worker", self.worker.as_attr())
            if target is not None and not admitted(optuna_study, trial, target):
                reason = NOT_RUN.format(target=target)
                self._finish(optuna_study, trial, TrialState.FAIL, reason=reason)
                return TrialOutcome(trial.number, TrialState.FAIL, None, 0.0, 0, reason)
            try:
                state, value, docs_scored = self._evaluate(trial, method)
            except KeyboardInterrupt:
                self._finish(optuna_study, trial, TrialState.FAIL, reason="interrupted")
                raise
            except UpdateFinishedTrialError:  # declared dead meanwhile: its retry runs elsewhere
                return self._dropped(trial, started)
            except Exception as error:
                if isinstance(error, torch.OutOfMemoryError) and torch.cuda.is_available():
                    torch.cuda.empty_cache()
                reason = redact(failure_reason(error), self.workspace.study.storage_url)
                if not self._finish(optuna_study, trial, TrialState.FAIL, reason=reason):
                    return self._dropped(trial, started)
                self._count_failure(trial.number, reason)
                return TrialOutcome(trial.number, TrialState.FAIL, None, time.perf_counter() - started, 0, reason)
            if not self._finish(optuna_study, trial, state, value):
                return self._dropped(trial, started)
        self.failures_in_a_row = 0
        return TrialOutcome(trial.number, state, value, time.perf_counter() - started, docs_scored)

    def _evaluate(self, trial: optuna.Trial, method: str) -> tuple[TrialState, Optional[float], int]:
        """Build the trial's candidate and score it: (PRUNED or COMPLETE, score, documents scored)."""
        started = time.perf_counter()
        documents = self.workspace.documents
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
        record: Optional[Record] = None
        docs_scored = 0
        previous: DocIds = {}
        for size, ids in [*documents.rungs, (None, documents.search)]:
            new, previous = added(ids, previous), ids
            if new:
                more = self.score(new)
                record = more if record is None else combine(record, more)
                docs_scored += Documents.count(new)
            if size is not None and "baseline" not in trial.user_attrs:
                trial.report(summarize(record).average, step=size)
                if trial.should_prune():
                    self._store(trial, record, docs_scored, build_seconds, time.perf_counter() - eval_start, started)
                    return TrialState.PRUNED, None, docs_scored
        value = summarize(record).average
        if not math.isfinite(value):
            raise MergetuneError(f"the score is {value}")
        self._store(trial, record, docs_scored, build_seconds, time.perf_counter() - eval_start, started)
        return TrialState.COMPLETE, value, docs_scored

    def _finish(
        self,
        optuna_study: optuna.Study,
        trial: optuna.Trial,
        state: TrialState,
        value: Optional[float] = None,
        reason: Optional[str] = None,
    ) -> bool:
        """Store how the trial ended; False if another worker had declared it dead first (its retry counts instead)."""
        try:
            if reason is not None:
                trial.set_user_attr("fail_reason", reason[:2000])
            stored = optuna_study.tell(trial, value, state=state, skip_if_finished=True)
        except UpdateFinishedTrialError:
            return False
        return stored.state == state

    def _dropped(self, trial: optuna.Trial, started: float) -> TrialOutcome:
        reason = "declared dead by another worker (no heartbeat within the grace period); its retry counts instead"
        log.warning("trial %d was %s", trial.number, reason)
        return TrialOutcome(trial.number, TrialState.FAIL, None, time.perf_counter() - started, 0, reason)

    def _count_failure(self, number: int, reason: str) -> None:
        self.failures_in_a_row += 1
        log.warning("trial %d failed: %s", number, reason)
        if self.failures_in_a_row >= self.max_failures:
            raise MergetuneError(
                f"stopped after {self.failures_in_a_row} failed trials in a row; the last, trial {number}: {reason}. "
                "Finished trials are kept: fix the cause and run the study again"
            )

    def _store(self, trial, record: Record, docs: int, build: float, evaluate: float, started: float) -> None:
        trial.set_user_attr("record", json.dumps(record, separators=(",", ":")))
        trial.set_user_attr("docs_scored", docs)
        trial.set_user_attr("timings", {"build": build, "evaluate": evaluate, "total": time.perf_counter() - started})

    def score_final(self, trial: FrozenTrial) -> Record:
        """The trial's candidate, rebuilt from its stored recipe and seed, scored on the final documents."""
        recipe = recipe_from_dict(yaml.safe_load(trial.user_attrs["recipe"]))
        self.workspace.builder.build(recipe, seed=trial.user_attrs["seed"])
        return self.score(self.workspace.documents.final)

    def finalize(self, method: str, say: Callable[[str], None] = log.info) -> list[int]:
        """Score the best trials and the baseline on the held-out documents (once each, whichever worker does it)."""
        optuna_study = open_optuna_study(self.workspace.study, method, self.storage)
        with storage_errors(self.workspace.study.storage_url):
            complete = optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            ranked = sorted(complete, key=lambda t: t.value, reverse=True)[: self.spec.evaluation.final.finalists]
            chosen = ranked + [t for t in complete if t.user_attrs.get("baseline") and t not in ranked]
            if chosen:  # workers finishing together start at different finalists
                offset = self.worker.pid % len(chosen)
                chosen = chosen[offset:] + chosen[:offset]
            done = []
            for trial in chosen:
                key = f"{FINAL_PREFIX}{trial.number}"
                if key in optuna_study.user_attrs:
                    continue
                say(f"{method}: final evaluation of trial {trial.number}")
                record = self.score_final(trial)
                optuna_study.set_user_attr(key, json.dumps(record, separators=(",", ":")))
                done.append(trial.number)
        return done


def _best_value(trials: list[FrozenTrial]) -> Optional[float]:
    values = [t.value for t in trials if t.state == TrialState.COMPLETE]
    return max(values) if values else None
