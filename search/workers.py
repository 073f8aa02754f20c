"""Worker processes sharing one study: who they are, which of them may run a trial, who notices the dead.

Several workers (processes, GPUs, hosts) may run one study at once through one
storage; they agree through the storage alone:
- a trial runs only if fewer than the requested number of trials are done or under
  way ahead of it in trial-number order (`admitted`), so however workers race, the
  study ends with exactly the requested number of completed (or pruned) trials;
- a worker that dies mid-trial is noticed by the others — by its process id on the
  same host, by its silent heartbeat from elsewhere — and its trial is failed and
  its parameters queued again, once, by whoever noticed first (`Reaper`); a trial
  no worker has named itself for may be one being started elsewhere this moment, so
  it is failed only after the grace period, and a long wait is logged, not silent.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import optuna
import psutil
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from mergetune.search import trials
from mergetune.search.optuna_adapter import experimental, stale_trial_ids, storage_of, trial_id, was_enqueued
from mergetune.search.storage import heartbeat_interval

log = logging.getLogger(__name__)

#: How long a trial may run without a worker's name before the wait is a warning: a healthy worker names itself
#: moments after `ask`, so a trial unnamed for longer is likely one whose worker died as it started.
UNNAMED_WARNING_SECONDS = 10.0

COUNTED = trials.COUNTED
AHEAD = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
DIED = "worker died mid-trial"
#: How long a claim on a finalist's held-out scoring by a worker on another machine holds: no heartbeat tells
#: whether that worker still runs (on this machine its process does), and a held-out scoring takes minutes.
FINAL_CLAIM_SECONDS = 6 * 3600


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
        return cls.of_attr(trials.worker_attr(trial))

    @classmethod
    def of_attr(cls, value: object) -> Optional["Worker"]:
        """The worker a stored `as_attr` names (None if it names none)."""
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

    def holding(self, claim: Optional[dict], now: Optional[float] = None) -> Optional["Worker"]:
        """The other worker whose claim (`trials.final_claim`) still holds, or None: no claim, this worker's own,
        its worker gone from this machine (or the machine restarted since), or, from another machine, older than
        FINAL_CLAIM_SECONDS."""
        holder = None if claim is None else Worker.of_attr(claim.get("worker"))
        if holder is None or holder == self:
            return None
        if holder.host == self.host:
            return None if holder.boot != self.boot or self.died_here(holder) else holder
        age = (time.time() if now is None else now) - float(claim.get("at", 0))
        return holder if age < FINAL_CLAIM_SECONDS else None

    def describe(self, holder: "Worker", claim: dict) -> str:
        """Whose claim this worker waits for, and until when (`holding`)."""
        name = f"worker {holder.host}:{holder.pid}"
        if holder.host == self.host:
            return f"{name} (on this machine; taken over if its process ends)"
        minutes = (time.time() - float(claim.get("at", 0))) / 60
        return f"{name} (claimed {minutes:.0f} min ago; taken over after {FINAL_CLAIM_SECONDS // 3600} h if no score arrives)"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


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
    """Fails the running trials of dead workers — once, whoever notices first — and queues their parameters again (if any).

    A worker is dead when its process is gone from this machine, when its heartbeat
    has been silent past the grace period (RDB storages, any host), or when its trial
    has run that long without naming its worker (it died within moments of starting).
    """

    def __init__(self, grace_period: float):
        self.me = Worker.this()
        self.grace_period = grace_period
        self._unnamed_since: dict[int, float] = {}  # trial id → when first seen running without a worker
        self._warned: set[int] = set()  # trial ids whose long wait has been logged as a warning

    def reap(self, optuna_study: optuna.Study) -> list[int]:
        """Numbers of the trials this call failed; each is logged, saying whether its parameters were queued again.

        A trial without a worker is logged too, with how long it may be waited for: at info level when first seen
        (most often another worker's, asked a moment ago), once as a warning when it stays unnamed past
        UNNAMED_WARNING_SECONDS (or half the grace period, if shorter): otherwise a worker whose last trial to wait
        for is such a one would sit silent the whole grace period.
        """
        running = optuna_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        stale = stale_trial_ids(optuna_study) if heartbeat_interval(storage_of(optuna_study)) else set()
        now = time.monotonic()
        seen = self._unnamed_since
        self._unnamed_since = {trial_id(t): seen.get(trial_id(t), now) for t in running if trials.worker_attr(t) is None}
        self._warned &= self._unnamed_since.keys()
        reaped = []
        for trial in running:
            reason = self._cause_of_death(trial, stale, now)
            if reason is None and trial_id(trial) in self._unnamed_since:
                self._log_unnamed(optuna_study.study_name, trial, first_seen=trial_id(trial) not in seen, now=now)
            elif reason and self._fail(optuna_study, trial, reason):
                queued = self.requeue(optuna_study, trial_id(trial))
                log.warning(
                    "%s: trial %d failed: %s; %s",
                    optuna_study.study_name,
                    trial.number,
                    reason,
                    "its parameters are queued again" if queued else "it had chosen no parameters: a fresh trial takes its place",
                )
                reaped.append(trial.number)
        return reaped

    def _log_unnamed(self, study_name: str, trial: FrozenTrial, first_seen: bool, now: float) -> None:
        """Say that `trial` runs without a worker's name: at info level when first seen, as a warning once it is late."""
        waited = now - self._unnamed_since[trial_id(trial)]
        if first_seen:
            log.info(
                "%s: trial %d has no worker's name yet (most likely another worker asked for it a moment ago); "
                "if none names itself within %g s (storage_options.grace_period), it is failed as a dead worker's",
                study_name,
                trial.number,
                self.grace_period,
            )
        elif waited > min(UNNAMED_WARNING_SECONDS, self.grace_period / 2) and trial_id(trial) not in self._warned:
            self._warned.add(trial_id(trial))
            log.warning(
                "%s: trial %d is running but no worker has named itself for it after %.0f s; if none does within "
                "%g s (storage_options.grace_period), its worker is taken to have died as it started and it is failed",
                study_name,
                trial.number,
                waited,
                self.grace_period,
            )

    def _cause_of_death(self, trial: FrozenTrial, stale: set[int], now: float) -> Optional[str]:
        owner = Worker.of(trial)
        if owner is not None and self.me.died_here(owner):
            return DIED
        if trial_id(trial) in stale:
            return f"{DIED} (no heartbeat for {self.grace_period:g} s)"
        if owner is None and now - self._unnamed_since[trial_id(trial)] > self.grace_period:
            return f"{DIED} (before it named itself)"
        return None

    @staticmethod
    def _fail(optuna_study: optuna.Study, trial: FrozenTrial, reason: str) -> bool:
        """Mark the trial failed; False if another worker did first (or it finished after all)."""
        storage = storage_of(optuna_study)
        try:
            trials.fail_reason_in_storage(storage, trial_id(trial), reason)
            return storage.set_trial_state_values(trial_id(trial), TrialState.FAIL)
        except UpdateFinishedTrialError:
            return False

    @staticmethod
    def requeue(optuna_study: optuna.Study, failed_id: int) -> bool:
        """Queue the failed trial's parameters again; False if it died before choosing any (a new trial takes its place)."""
        failed = storage_of(optuna_study).get_trial(failed_id)
        if not failed.params and not was_enqueued(failed):
            return False
        retry = copy.deepcopy(failed)
        retry.user_attrs = trials.retried_attrs(failed)
        with experimental():
            RetryHeartbeatStaleTrialCallback()(optuna_study, retry)
        return True
