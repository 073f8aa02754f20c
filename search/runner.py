"""Running trials: one candidate at a time, built in the live model, scored, stored; then the finalists.

Per trial: Optuna proposes parameters → the method's mergekit recipe → built in
memory → scored stage by stage on growing, nested subsets of the search documents,
as the study's pruner schedules them (`mergetune.search.samplers`: successive
halving's rungs, or the estimator's most discriminating documents first), and
stopped when the pruner says so (the hand-written baselines always run in full) →
stored (`mergetune.search.trials` lists what). Every finished trial is in the
study's storage the moment it ends, so a crash or Ctrl-C loses at most the trial
in flight, and running again continues the same study up to the requested count.
A trial that fails (NaN weights, an evaluator error, out of memory) is stored as
failed with its reason and the study goes on, until `max_failures` fail in a row.
Afterwards the best trials of each method (and the baselines) are scored on
held-out documents: the finalists' scores the leaderboard ranks by.

Sharing the study with other workers (admission, dead-worker reaping) is
`mergetune.search.workers`; opening it, `mergetune.search.setup`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import optuna
import torch
import yaml
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from mergetune import interrupts
from mergetune.errors import MergetuneError
from mergetune.eval.evidence import Record, combine, record_from_result, summarize
from mergetune.merge_ops.recipe import recipe_from_dict
from mergetune.merge_ops.sparsify import DRAWS
from mergetune.search import trials
from mergetune.search.documents import DocIds, Documents, added
from mergetune.search.methods import SEARCHABLE
from mergetune.search.samplers import PRUNERS, Completed, Race, in_full
from mergetune.search.optuna_adapter import storage_of, trial_id
from mergetune.search.setup import open_optuna_study
from mergetune.search.storage import heartbeat, open_storage, redact, storage_errors
from mergetune.search.workers import COUNTED, Reaper, Worker, admitted
from mergetune.search.workspace import Workspace

log = logging.getLogger(__name__)
optuna.logging.set_verbosity(optuna.logging.WARNING)

POLL_SECONDS = 1.0  # how often a worker waiting for the last trials of others looks again
MAX_FAILURES = 5  # failed trials in a row that stop a worker, unless told otherwise
NOT_RUN = "not run: the study's {target} trials were already done or under way when this worker asked"
DROPPED = "declared dead by another worker (no heartbeat within the grace period); its retry counts instead"


@dataclass
class TrialOutcome:
    number: int
    state: TrialState
    value: Optional[float]
    seconds: float
    docs_scored: int
    reason: Optional[str] = None  # why it failed, or why it was not run

    def describe(self) -> str:
        """How a scored trial ended, for the log: `complete: 62.50, 180 documents, 4.2 s` (`pruned: …`)."""
        score = "" if self.value is None else f" {100 * self.value:.2f},"
        return f"{self.state.name.lower()}:{score} {self.docs_scored} documents, {self.seconds:.1f} s"


@dataclass
class MethodRun:
    method: str
    outcomes: list[TrialOutcome] = field(default_factory=list)


Progress = Callable[[str, int, int, Optional[float]], None]  # (method, done, total, best so far)


def failure_reason(error: Exception) -> str:
    """What the stored trial says about why it failed."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return f"out of memory: {error}"
    if isinstance(error, MergetuneError):
        return str(error)
    return f"{type(error).__name__}: {error}"


class StudyRunner:
    """Runs one method's trials to the study's budget, then its finalists, in one workspace."""

    def __init__(self, workspace: Workspace, storage: Optional[BaseStorage] = None, max_failures: Optional[int] = None):
        self.workspace = workspace
        self.spec = workspace.study.spec
        self.storage = storage or open_storage(workspace.study)
        self.max_failures = max_failures or MAX_FAILURES
        self._studies: dict[str, optuna.Study] = {}
        self.failures_in_a_row = 0
        self.worker = Worker.this()
        self.reaper = Reaper(self.spec.storage_options.grace_period)

    def score(self, doc_ids: DocIds) -> Record:
        return record_from_result(self.workspace.evaluator.score(doc_ids=doc_ids))

    def optuna_study(self, method: str) -> optuna.Study:
        """The method's Optuna study, opened once per runner: whoever opens it again is another worker to
        Optuna's storage, and samples with a seed of its own instead of the study's (`search.setup`)."""
        if method not in self._studies:
            self._studies[method] = open_optuna_study(
                self.workspace.study, method, self.storage, self.workspace.fingerprints
            )
        return self._studies[method]

    def run_method(
        self, method: str, n_trials: Optional[int], timeout: Optional[float], progress: Optional[Progress]
    ) -> MethodRun:
        """Run trials until the study holds `n_trials` completed ones (whoever ran them) or `timeout` passes."""
        optuna_study = self.optuna_study(method)
        run = MethodRun(method)
        deadline = None if timeout is None else time.monotonic() + timeout
        with storage_errors(self.workspace.study.storage_url):
            while True:
                interrupts.check()
                self.reaper.reap(optuna_study)  # says what it failed, and what it waits for
                stored = optuna_study.get_trials(deepcopy=False)
                done = sum(trial.state in COUNTED for trial in stored)
                if progress:
                    progress(method, done, n_trials or 0, _best_value(stored))
                if (n_trials is not None and done >= n_trials) or (deadline is not None and time.monotonic() >= deadline):
                    return run
                running = sum(trial.state == TrialState.RUNNING for trial in stored)
                if n_trials is not None and done + running >= n_trials:
                    # The last trials run elsewhere; if their worker dies, they come back to this loop.
                    time.sleep(POLL_SECONDS)
                    continue
                run.outcomes.append(self.run_trial(optuna_study, method, n_trials))

    def run_trial(self, optuna_study: optuna.Study, method: str, target: Optional[int] = None) -> TrialOutcome:
        """One trial, start to stored end; a failure is stored with its reason and counted, not raised.

        A Ctrl-C (or SIGTERM) at any moment after `ask` created the trial fails it as interrupted (terminated;
        one that already ended keeps its end): left RUNNING without a worker, the next run would wait out the
        grace period for it.
        Its parameters are queued again, as a dead worker's are, so the next run scores them (a baseline included).
        One during `ask` itself, between creating the trial and returning it, is held until `ask` returns.
        """
        with warnings.catch_warnings(), interrupts.held() as interrupt:
            warnings.filterwarnings("ignore", message="Heartbeat of storage")  # we record heartbeats ourselves
            trial = optuna_study.ask()
        try:
            interrupt.raise_if_received()
            outcome = self._run_asked(optuna_study, trial, method, target)
        except KeyboardInterrupt as stop:
            if self._finish(optuna_study, trial, TrialState.FAIL, reason=interrupts.describe(stop)):
                Reaper.requeue(optuna_study, trial_id(trial))
            raise
        if outcome.state != TrialState.FAIL:  # a failure is logged, as a warning, where it is stored
            log.info("%s: trial %d %s", method, outcome.number, outcome.describe())
        return outcome

    def _run_asked(self, optuna_study: optuna.Study, trial: optuna.Trial, method: str, target: Optional[int]) -> TrialOutcome:
        """`run_trial` once the trial exists: claimed by this worker, admitted or stood down, evaluated, stored."""
        started = time.perf_counter()
        with heartbeat(storage_of(optuna_study), trial_id(trial)):
            trials.set_worker(trial, self.worker.as_attr())
            if target is not None and not admitted(optuna_study, trial, target):
                reason = NOT_RUN.format(target=target)
                self._finish(optuna_study, trial, TrialState.FAIL, reason=reason)
                return TrialOutcome(trial.number, TrialState.FAIL, None, 0.0, 0, reason)
            log.info("%s: trial %d started", method, trial.number)
            try:
                state, value, docs_scored = self._evaluate(optuna_study, trial, method)
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

    def _evaluate(
        self, optuna_study: optuna.Study, trial: optuna.Trial, method: str
    ) -> tuple[TrialState, Optional[float], int]:
        """Build the trial's candidate and score it: (PRUNED or COMPLETE, score, documents scored)."""
        started = time.perf_counter()
        searchable = SEARCHABLE.get(method)
        recipe_dict = searchable.recipe(searchable.suggest(trial, self.spec), self.spec, self.workspace.study.resolve)
        seed = self.spec.seed * 100_003 + trial.number
        build_start = time.perf_counter()
        self.workspace.builder.build(recipe_from_dict(recipe_dict), seed=seed)
        build_seconds = time.perf_counter() - build_start
        recipe_yaml = yaml.safe_dump(recipe_dict, sort_keys=False)
        trials.set_candidate(trial, method, recipe_yaml, seed, self.workspace.builder.device_type, DRAWS)
        eval_start, forward_start = time.perf_counter(), self._forward()
        race = self._race(optuna_study, trial, method)
        record: Optional[Record] = None
        docs_scored = 0
        previous: DocIds = {}
        for stage, ids in enumerate(race.stages):
            new, previous = added(ids, previous), ids
            if new:
                more = self.score(new)
                record = more if record is None else combine(record, more)
                docs_scored += Documents.count(new)
            if stage < len(race.stages) - 1 and race.stop(trial, stage, record):
                self._store(trial, race, record, docs_scored, self._timings(started, build_seconds, eval_start, forward_start))
                return TrialState.PRUNED, None, docs_scored
        value = summarize(record).average
        if not math.isfinite(value):
            raise MergetuneError(f"the score is {value}")
        self._store(trial, race, record, docs_scored, self._timings(started, build_seconds, eval_start, forward_start))
        return TrialState.COMPLETE, value, docs_scored

    def _forward(self) -> tuple[float, Optional[int]]:
        """The evaluator's forward-pass counters: seconds, and token positions where its backend counts them."""
        backend = self.workspace.evaluator.backend
        return backend.forward_seconds, backend.forward_tokens

    def _timings(
        self, started: float, build: float, eval_start: float, forward_start: tuple[float, Optional[int]]
    ) -> dict[str, float]:
        """The trial's stored `timings` (search/trials.py)."""
        now, (seconds, tokens) = time.perf_counter(), self._forward()
        timings = {"build": build, "evaluate": now - eval_start, "forward": seconds - forward_start[0]}
        if tokens is not None:  # the same backend: counted then too
            timings["forward_tokens"] = tokens - forward_start[1]
        return {**timings, "total": now - started}

    def _race(self, optuna_study: optuna.Study, trial: optuna.Trial, method: str) -> Race:
        """The trial's scoring schedule: the study's pruner's, or every search document at once for a baseline."""
        documents = self.workspace.documents
        if trials.is_baseline(trial):
            return in_full(documents)

        def basis(every_method: bool) -> list[Completed]:
            """Completed trials, read from the storage when the pruner asks (only the estimator does)."""
            found = []
            for name in self.spec.methods if every_method else [method]:
                of_method = optuna_study if name == method else trials.load_optuna_study(self.workspace.study, name, self.storage)
                complete = [] if of_method is None else of_method.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                stored = [trials.StoredTrial.of(t) for t in sorted(complete, key=lambda t: t.number)]
                found += [Completed(name, t.number, t.record) for t in stored if t.record is not None]
            return found

        return PRUNERS.get(self.spec.pruning).race(documents, self.spec.evaluation, method, basis)

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
                trials.set_fail_reason(trial, reason)
            stored = optuna_study.tell(trial, value, state=state, skip_if_finished=True)
        except UpdateFinishedTrialError:
            return False
        return stored.state == state

    def _dropped(self, trial: optuna.Trial, started: float) -> TrialOutcome:
        log.warning("trial %d was %s", trial.number, DROPPED)
        return TrialOutcome(trial.number, TrialState.FAIL, None, time.perf_counter() - started, 0, DROPPED)

    def _count_failure(self, number: int, reason: str) -> None:
        self.failures_in_a_row += 1
        log.warning("trial %d failed: %s", number, reason)
        if self.failures_in_a_row >= self.max_failures:
            raise MergetuneError(
                f"stopped after {self.failures_in_a_row} failed trials in a row; the last, trial {number}: {reason}. "
                "Finished trials are kept: fix the cause and run the study again"
            )

    def _store(self, trial, race: Race, record: Record, docs: int, timings: dict[str, float]) -> None:
        trials.set_evidence(trial, record, docs, timings)
        notes = race.notes()
        if notes is not None:
            trials.set_race(trial, notes)

    def score_final(self, trial: FrozenTrial) -> Record:
        """The trial's candidate, rebuilt from its stored recipe and seed, scored on the final documents."""
        stored = trials.StoredTrial.of(trial)
        self.workspace.builder.build(recipe_from_dict(yaml.safe_load(stored.recipe)), seed=stored.seed)
        return self.score(self.workspace.documents.final)

    def finalize(self, method: str, say: Callable[[str], None] = log.info) -> list[int]:
        """Score the best trials and the baseline on the held-out documents (once each, whichever worker does it:
        a worker claims a finalist before scoring it, and the others wait for its result)."""
        optuna_study = self.optuna_study(method)
        with storage_errors(self.workspace.study.storage_url):
            complete = optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            ranked = trials.best_by_search(complete, self.spec.evaluation.final.finalists)
            chosen = ranked + [t for t in complete if trials.is_baseline(t) and t not in ranked]
            if chosen:  # workers finishing together start at different finalists
                offset = self.worker.pid % len(chosen)
                chosen = chosen[offset:] + chosen[:offset]
            done, waiting = [], []
            for trial in chosen:  # those no other worker is scoring
                interrupts.check()
                if trials.has_final(optuna_study, trial.number):
                    continue
                held = self.worker.holding(trials.final_claim(optuna_study, trial.number))
                if held is None and self._claim_and_score_final(optuna_study, method, trial, say):
                    done.append(trial.number)
                else:
                    waiting.append(trial)
            for trial in waiting:  # then another worker's result, or the trial itself once that worker is gone
                announced: Optional[Worker] = None
                while not trials.has_final(optuna_study, trial.number):
                    interrupts.check()
                    claim = trials.final_claim(optuna_study, trial.number)
                    holder = self.worker.holding(claim)
                    if holder is None:
                        if self._claim_and_score_final(optuna_study, method, trial, say):
                            done.append(trial.number)
                            break
                    elif holder != announced:
                        say(f"{method}: waiting for trial {trial.number}'s held-out score from {self.worker.describe(holder, claim)}")
                        announced = holder
                    time.sleep(POLL_SECONDS)
        return done

    def _claim_and_score_final(
        self, optuna_study: optuna.Study, method: str, trial: FrozenTrial, say: Callable[[str], None]
    ) -> bool:
        """Claim `trial` and score it on the held-out documents; False if another worker's claim, written at the same
        moment, stands instead, or its score was stored meanwhile."""
        if not trials.claim_final(optuna_study, trial.number, self.worker.as_attr()):
            return False
        if trials.has_final(optuna_study, trial.number):  # stored by a worker that claimed it before this one read
            return False
        say(f"{method}: final evaluation of trial {trial.number}")
        try:
            trials.set_final(optuna_study, trial.number, self.score_final(trial))
        except BaseException:  # out of memory, a refusal, Ctrl-C: the others need not wait for this worker
            trials.release_final(optuna_study, trial.number)
            raise
        return True


def _best_value(stored: list[FrozenTrial]) -> Optional[float]:
    values = [t.value for t in stored if t.state == TrialState.COMPLETE]
    return max(values) if values else None
