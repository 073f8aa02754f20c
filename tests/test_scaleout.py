"""Many workers on one study: exactly N trials however they race, dead workers' trials retried, no password leaked."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import optuna
import psutil
import pytest
from optuna.trial import TrialState
from typer.testing import CliRunner

from mergetune.cli import app
from mergetune.search.optuna_adapter import storage_of, trial_id
from mergetune.search.workers import DIED, Reaper, Worker, admitted
from mergetune.search.storage import heartbeat, open_storage
from mergetune.search.study_file import load_study

pytest.register_assert_rewrite("scaleout_fixtures")
from scaleout_fixtures import (  # noqa: E402
    COUNTED,
    assert_exactly_n_without_loss_or_duplicate,
    finish,
    postgres_database,
    release,
    start_workers,
    stored_trials,
    write_study,
)

pytest.register_assert_rewrite("race_checks")
from race_checks import assert_races_replay_and_decide_by_the_bar  # noqa: E402

pytest_plugins = ["scaleout_fixtures"]
runner = CliRunner()
N = 9
ESTIMATOR = {"pruning": "estimator", "evaluation": {"first_limit": None, "estimator": {"min_trials": 3, "chunk": 0.25}}}


@contextlib.contextmanager
def shared_storage(kind: str, directory: Path) -> Iterator[str]:
    if kind == "journal":
        yield f"journal://{directory / 'study.log'}"
    else:
        with postgres_database() as url:
            yield url


@dataclass
class SharedRun:
    kind: str
    study: Path
    storage: str
    workers: list[subprocess.Popen]
    results: list[tuple[int, str, str]]
    victim_code: int


@pytest.fixture(scope="module", params=["journal", "postgresql"])
def three_workers(request, tmp_path_factory, family_f32, tiny_tasks) -> Iterator[SharedRun]:
    """Three workers started together on one study of N trials, and a fourth SIGKILLed in its first trial.

    Journal: all on this host, so the others see the victim's process is gone. PostgreSQL: the
    victim claims another host, so only its silent heartbeat gives it away.
    """
    directory = tmp_path_factory.mktemp(f"three-{request.param}")
    barrier = directory / "barrier"
    with shared_storage(request.param, directory) as storage:
        study = write_study(directory, family_f32, tiny_tasks, budget={"n_trials": N})
        host = "" if request.param == "journal" else "elsewhere"
        victim = start_workers(study, storage, barrier, 1, kill_at=1, host=host)
        workers = start_workers(study, storage, barrier, 3, verbose=True, meet=3)
        release(barrier, victim + workers)
        [(victim_code, _, _)] = finish(victim)
        yield SharedRun(request.param, study, storage, workers, finish(workers), victim_code)


def test_three_workers_complete_exactly_the_requested_trials(three_workers):
    for code, out, err in three_workers.results:
        assert code == 0, err[-3000:]
        assert "ranked by held-out score" in out
    trials = stored_trials(three_workers.study, three_workers.storage)
    assert_exactly_n_without_loss_or_duplicate(trials, N)
    doers = {t.user_attrs["worker"]["pid"] for t in trials if t.state in COUNTED}
    idle = [
        (worker.pid, err[-3000:])
        for worker, (_, _, err) in zip(three_workers.workers, three_workers.results)
        if worker.pid not in doers
    ]
    assert not idle  # all three ran trials at once (they meet at their first scoring call) and finished them
    baselines = [t for t in trials if t.state in COUNTED and t.user_attrs.get("baseline")]
    assert len(baselines) == 1  # queued once, though all started at once


def test_a_worker_killed_mid_trial_has_its_trial_finished_by_another(three_workers):
    assert three_workers.victim_code == -9
    trials = stored_trials(three_workers.study, three_workers.storage)
    [killed] = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs["fail_reason"].startswith(DIED)]
    silent = f"{DIED} (no heartbeat for 3 s)"
    assert killed.user_attrs["fail_reason"] == (DIED if three_workers.kind == "journal" else silent)
    [retry] = [t for t in trials if killed.number in t.system_attrs.get("retry_history", [])]
    assert retry.state in COUNTED and retry.params == killed.params
    assert retry.user_attrs["worker"]["pid"] in {worker.pid for worker in three_workers.workers}


def test_workers_share_what_the_estimator_learns_through_the_storage(tmp_path, family_f32, tiny_tasks):
    storage, barrier = f"journal://{tmp_path / 'study.log'}", tmp_path / "barrier"
    # More trials than the other tests: a raced candidate stopped after one chunk takes a fraction of an
    # in-full one, so with 9 trials one worker could race all of them while the other scored its first.
    study = write_study(tmp_path, family_f32, tiny_tasks, budget={"n_trials": 2 * N}, **ESTIMATOR)
    workers = start_workers(study, storage, barrier, 2, meet=2)
    release(barrier, workers)
    for code, _, err in finish(workers):
        assert code == 0, err[-3000:]
    trials = stored_trials(study, storage)
    assert_races_replay_and_decide_by_the_bar(trials)
    by_number = {t.number: t for t in trials}
    raced = [t for t in trials if "race" in t.user_attrs]
    assert raced, "no candidate was raced"
    learned_from_others = [
        t
        for t in raced
        if any(by_number[n].user_attrs["worker"]["pid"] != t.user_attrs["worker"]["pid"] for _, n in t.user_attrs["race"]["basis"])
    ]
    assert learned_from_others, "no worker used a trial another worker completed"


@pytest.mark.parametrize("three_workers", ["postgresql"], indirect=True)
def test_the_storage_password_appears_in_no_output(three_workers, tmp_path):
    """In the workers' output and -vv logs, the leaderboard, report and export, an error message, the database."""
    password = urlparse(three_workers.storage).password
    study, url = str(three_workers.study), three_workers.storage
    outputs = [out + err for _, out, err in three_workers.results]  # three workers' output and -vv logs
    for args in (
        ["leaderboard", study, "--markdown", "--json", str(tmp_path / "b.json"), "--csv", str(tmp_path / "b.csv")],
        ["report", study, str(tmp_path / "report")],
        ["export", study, str(tmp_path / "export")],
    ):
        result = runner.invoke(app, [*args, "--storage", url])
        assert result.exit_code == 0, result.output
        outputs.append(result.output)
    refused = runner.invoke(app, ["study", "run", study, "--storage", url.replace(password, "not-" + password)])
    assert refused.exit_code == 2 and "cannot reach the study storage" in refused.output
    outputs.append(refused.output)
    files = [path.read_bytes().decode("utf-8", "replace") for path in tmp_path.rglob("*") if path.is_file()]
    assert len(files) > 10
    import psycopg

    with psycopg.connect(url) as connection:
        tables = connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
        stored = [repr(connection.execute(f'SELECT * FROM "{table}"').fetchall()) for (table,) in tables]
    for text in outputs + files + stored:
        assert password not in text


def test_of_two_workers_racing_for_the_last_trial_the_later_one_stands_down(tmp_path):
    journal = optuna.storages.journal.JournalFileBackend(str(tmp_path / "j.log"))
    study = optuna.create_study(storage=optuna.storages.JournalStorage(journal))
    study.tell(study.ask(), 1.0)
    first, second = study.ask(), study.ask()  # both saw 1 of 2 done and nothing running, and asked
    assert admitted(study, first, target=2)
    assert not admitted(study, second, target=2)
    study.tell(second, state=TrialState.FAIL)  # stored as "not run"
    study.tell(first, state=TrialState.FAIL)  # the winner's trial fails: the place is free again
    assert admitted(study, study.ask(), target=2)


def dead_worker(host: str = "") -> Worker:
    """The identity of a worker process that has exited (on this host unless `host` says otherwise)."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.3)"])
    me = Worker.this()
    identity = Worker(host or me.host, process.pid, me.boot, psutil.Process(process.pid).create_time())
    process.wait()
    return identity


def running_trial(tmp_path: Path, worker: Worker) -> optuna.Study:
    """A study (SQLite, heartbeats every second, grace 2 s) with one trial running for `worker`, x already chosen."""
    path = tmp_path / "study.yaml"
    path.write_text(
        "name: t\nmodels: [a, b]\nmethods: [slerp]\nevaluation: {tasks: [x]}\n"
        f"storage: sqlite:///{tmp_path / 't.db'}\nstorage_options: {{heartbeat_interval: 1, grace_period: 2}}\n"
    )
    study = optuna.create_study(storage=open_storage(load_study(path)))
    study.enqueue_trial({"x": 0.25}, user_attrs={"baseline": "hand-written"})
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage")  # heartbeats are recorded by hand here
        trial = study.ask()
    trial.suggest_float("x", 0, 1)
    trial.set_user_attr("worker", worker.as_attr())
    trial.set_user_attr("recipe", "merge_method: slerp")
    return study


def test_a_dead_workers_trial_is_failed_and_queued_again_exactly_once(tmp_path):
    study = running_trial(tmp_path, dead_worker())
    assert Reaper(grace_period=2).reap(study) == [0]
    assert Reaper(grace_period=2).reap(study) == []  # a second worker noticing too changes nothing
    failed, retry = study.get_trials()
    assert failed.state == TrialState.FAIL and failed.user_attrs["fail_reason"] == DIED
    assert retry.state == TrialState.WAITING and retry.params == {"x": 0.25}
    assert retry.user_attrs == {"baseline": "hand-written"}  # what belonged to the dead attempt stays with it
    assert retry.system_attrs["retry_history"] == [0]


def test_a_worker_on_another_host_is_dead_once_its_heartbeat_is_silent_past_the_grace_period(tmp_path):
    study = running_trial(tmp_path, dead_worker(host="elsewhere"))
    with heartbeat(storage_of(study), trial_id(study.trials[0])):
        time.sleep(1.5)  # alive and beating: not dead, though its process isn't on this host
        assert Reaper(grace_period=2).reap(study) == []
    time.sleep(3)
    assert Reaper(grace_period=2).reap(study) == [0]
    assert study.trials[0].user_attrs["fail_reason"] == f"{DIED} (no heartbeat for 2 s)"


def test_a_relative_sqlite_file_is_the_study_folders_from_any_working_directory(tmp_path, monkeypatch):
    """Run from elsewhere, `storage: sqlite:///sub/t.db` still names the study's database, not a new one in the cwd."""
    folder = tmp_path / "study"
    folder.mkdir()
    path = folder / "study.yaml"
    path.write_text("name: t\nmodels: [a, b]\nmethods: [slerp]\nevaluation: {tasks: [x]}\nstorage: sqlite:///sub/t.db\n")
    (folder / "sub").mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    optuna.create_study(storage=open_storage(load_study(path)), study_name="t")
    assert (folder / "sub" / "t.db").is_file()
    assert not list(elsewhere.iterdir())
