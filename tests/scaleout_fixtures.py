"""Tiny studies, worker processes and PostgreSQL databases for the scale-out and hostile-input tests."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import optuna
import pytest
import yaml
from optuna.trial import FrozenTrial, TrialState

from mergetune.demo.postgres import scratch_postgres_database
from mergetune.search.storage import open_storage
from mergetune.search.trials import COUNTED, optuna_study_name
from mergetune.search.workers import DIED
from mergetune.search.study_file import load_study
from mergetune.demo.study import tiny_study
from mergetune.demo.skills import write_task_dir

POSTGRES_ENV = "MERGETUNE_TEST_POSTGRES_URL"

# A worker process: `mergetune ARGS…`, held at a barrier until every worker has loaded its models
# (so they really race), optionally SIGKILLed at its Nth scoring call (mid-trial), optionally
# claiming another host name (so only its heartbeat can tell the others that it died), and
# optionally held at its first scoring call until MEET workers are there (each then has a trial
# under way at once: the tiny study's trials take a fraction of a second, so otherwise a worker
# held back a second, by the machine's load or by Optuna's journal lock, which backs off up to a
# second a try, may find none left).
WORKER = """
import os, signal, socket, sys, time
from pathlib import Path
import mergetune.search.runner as runner

barrier, kill_at, host, meet, args = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5:]
if host:
    socket.gethostname = lambda: host
run_method = runner.StudyRunner.run_method
def held_run_method(self, *a, **k):
    (barrier / f"ready-{os.getpid()}").touch()
    while not (barrier / "go").exists():
        time.sleep(0.05)
    return run_method(self, *a, **k)
runner.StudyRunner.run_method = held_run_method
if kill_at:
    score, calls = runner.StudyRunner.score, []
    def killing_score(self, ids):
        calls.append(1)
        if len(calls) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return score(self, ids)
    runner.StudyRunner.score = killing_score
if meet:
    score, met = runner.StudyRunner.score, []
    def meeting_score(self, ids):
        if not met:
            met.append(1)
            (barrier / f"scoring-{os.getpid()}").touch()
            deadline = time.monotonic() + 120  # past it, go on: the test then says who did no trial
            while len(list(barrier.glob("scoring-*"))) < meet and time.monotonic() < deadline:
                time.sleep(0.05)
        return score(self, ids)
    runner.StudyRunner.score = meeting_score
from mergetune.cli import app
sys.argv = ["mergetune", *args]
app()
"""


@pytest.fixture(scope="session")
def tiny_tasks(tmp_path_factory) -> Path:
    return write_task_dir(tmp_path_factory.mktemp("scaleout-tasks"), docs_per_split=40)


def write_study(directory: Path, family: dict, tasks: Path, **overrides) -> Path:
    """A SLERP study of two tiny models on two tiny tasks, with a fast heartbeat: about half a second a trial."""
    options = {"heartbeat_interval": 1, "grace_period": 3, "connect_timeout": 3}
    models = {"model_a": family["model_a"], "model_b": family["model_b"]}
    spec = tiny_study("tiny", models, tasks, storage_options=options, evaluation=overrides.pop("evaluation", {}))
    spec.update(overrides)
    path = directory / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def stored_trials(study_path: Path, storage: Optional[str] = None, method: str = "slerp") -> list[FrozenTrial]:
    study = load_study(study_path)
    if storage:
        study = study.model_copy(update={"spec": study.spec.model_copy(update={"storage": storage})})
    name = optuna_study_name(study.spec, method)
    return optuna.load_study(study_name=name, storage=open_storage(study)).get_trials()


def start_workers(
    study_path: Path,
    storage: str,
    barrier: Path,
    count: int,
    kill_at: int = 0,
    host: str = "",
    verbose: bool = False,
    meet: int = 0,
) -> list:
    barrier.mkdir(exist_ok=True)
    command = [sys.executable, "-c", WORKER, str(barrier), str(kill_at), host, str(meet)]
    args = [*(["-vv"] if verbose else []), "study", "run", str(study_path), "--storage", storage, "--quiet"]
    return [
        subprocess.Popen(command + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]


def release(barrier: Path, workers: list, timeout: float = 300) -> None:
    """Let the workers go once all of them have loaded their models (or fail if one died first)."""
    deadline = time.monotonic() + timeout
    while len(list(barrier.glob("ready-*"))) < len(workers):
        crashed = [worker for worker in workers if worker.poll() is not None]
        assert not crashed, crashed[0].communicate()[1][-3000:]
        assert time.monotonic() < deadline, "workers did not load in time"
        time.sleep(0.1)
    (barrier / "go").touch()


def finish(workers: list, timeout: float = 300) -> list[tuple[int, str, str]]:
    results = []
    for worker in workers:
        out, err = worker.communicate(timeout=timeout)
        results.append((worker.returncode, out, err))
    return results


def assert_exactly_n_without_loss_or_duplicate(trials: list[FrozenTrial], n: int) -> None:
    """N completed (or pruned) trials; nothing left running or queued; no candidate scored twice;
    every failure says why; every trial of a dead worker was retried with its parameters and finished."""
    counted = [t for t in trials if t.state in COUNTED]
    assert len(counted) == n, [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    candidates = [tuple(sorted(t.params.items())) for t in counted]
    assert len(set(candidates)) == len(candidates), "a candidate was scored twice"
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert all(t.user_attrs.get("fail_reason") for t in failed)
    for dead in (t for t in failed if t.user_attrs["fail_reason"].startswith(DIED) and t.params):
        retries = [t for t in counted if dead.number in t.system_attrs.get("retry_history", [])]
        assert len(retries) == 1 and retries[0].params == dead.params, f"trial {dead.number} was not retried"


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh database on the test server (MERGETUNE_TEST_POSTGRES_URL), dropped afterwards."""
    base = os.environ.get(POSTGRES_ENV)
    if not base:
        pytest.skip(f"{POSTGRES_ENV} is not set: no PostgreSQL server to test against (.ci/run starts one)")
    with scratch_postgres_database(base, "mergetune_test") as url:
        yield url
