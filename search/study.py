"""A whole study, start to leaderboard: every method to its budget, then its finalists.

The CLI (`mergetune study run`, `mergetune demo`), the benchmarks and the tests all
run studies through `run_study`; what the user sees while it runs is the caller's
(`StudyProgress`), so this module prints nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, Protocol

from mergetune import interrupts
from mergetune.errors import MergetuneError
from mergetune.search.leaderboard import Leaderboard, build_leaderboard
from mergetune.search.runner import StudyRunner
from mergetune.search.setup import check_stored_definitions
from mergetune.search.storage import open_existing_storage, open_storage
from mergetune.search.study_file import Study
from mergetune.search.workspace import Workspace, open_models

log = logging.getLogger(__name__)


class StudyProgress(Protocol):
    """What a long study reports while it runs, method by method."""

    def start(self, method: str, total: int) -> None:
        """`method`'s trials begin; `total` completed trials are wanted (0: until the timeout)."""

    def update(self, method: str, done: int, best: Optional[float], seconds_left: Optional[float]) -> None:
        """`done` trials of `method` are completed or pruned (by any worker); the best search score so far."""

    def finish(self, method: str) -> None:
        """`method`'s trials are over; its finalists are scored next."""

    def loading(self, done: int, total: int) -> None:
        """`done` of the source models' `total` bytes are loaded (a live backend: minutes for a 70B)."""


class QuietProgress:
    def start(self, method: str, total: int) -> None:
        pass

    def update(self, method: str, done: int, best: Optional[float], seconds_left: Optional[float]) -> None:
        pass

    def finish(self, method: str) -> None:
        pass

    def loading(self, done: int, total: int) -> None:
        pass


def run_study(
    study: Study,
    n_trials: Optional[int] = None,
    timeout: Optional[float] = None,
    say: Callable[[str], None] = log.info,
    progress: StudyProgress = QuietProgress(),
    max_failures: Optional[int] = None,
) -> Leaderboard:
    """Run every method of the study to its budget, then the finalists' held-out evaluation.

    Other workers may run the same study at the same time; the budget counts everyone's trials.
    """
    spec = study.spec
    n_trials = n_trials or spec.budget.n_trials
    timeout = timeout or spec.budget.timeout
    if n_trials is None and timeout is None:  # the first method would never end, and no other would start
        raise MergetuneError(f"{study.path}: budget: give n_trials or timeout (or --n-trials / --timeout)")
    say(f"study {spec.name}: methods {', '.join(spec.methods)}; storage {study.storage_display}")
    # Before loading models: a storage that doesn't answer, or holds a study made from another file
    # or other checkpoints, fails fast; a storage file that doesn't exist yet is created only once
    # they have loaded.
    storage = open_existing_storage(study)
    models = open_models(study)  # headers only
    if storage is not None:
        check_stored_definitions(study, storage, models.fingerprints)
    workspace = Workspace.open(study, say=say, models=models, loading=progress.loading)
    interrupts.check()  # one lost while the tasks loaded: before the storage file is created
    storage = storage or open_storage(study)
    runner = StudyRunner(workspace, storage, max_failures)
    for method in spec.methods:
        progress.start(method, n_trials or 0)
        deadline = None if timeout is None else time.monotonic() + timeout

        def update(name: str, done: int, total: int, best: Optional[float], deadline=deadline) -> None:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            progress.update(name, done, best, left)

        runner.run_method(method, n_trials, timeout, update)
        progress.finish(method)
        runner.finalize(method, say=say)
    return build_leaderboard(study, storage)
