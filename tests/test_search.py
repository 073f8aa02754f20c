"""Studies on tiny models: they run, resume after a kill, export what mergekit reproduces, and rank honestly."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import optuna
import psutil
import pytest
import torch
import yaml
from optuna.trial import TrialState
from typer.testing import CliRunner

from mergetune.cli import app
from mergetune.errors import MergetuneError
from mergetune.demo.tiny import load_state
from mergetune.eval.evidence import summarize
from mergetune.search.leaderboard import build_leaderboard, failure_lines
from mergetune.search.storage import heartbeat
from mergetune.search.runner import StudyRunner
from mergetune.search.trials import (
    claim_final,
    final_claim,
    final_records,
    is_baseline,
    optuna_study_name,
    set_candidate,
    set_final,
    set_worker,
)
from mergetune.search.workers import DIED, FINAL_CLAIM_SECONDS, Reaper, Worker
from mergetune.demo.study import tiny_study
from mergetune.search.study_file import Budget, Evaluation, Study, load_study
from mergetune.demo.skills import HELDOUT_TASKS, SEARCH_TASKS, write_task_dir

pytest.register_assert_rewrite("race_checks")
from race_checks import assert_races_replay_and_decide_by_the_bar  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    return write_task_dir(tmp_path_factory.mktemp("tasks"), docs_per_split=40)


def write_study(directory: Path, family: dict, task_dir: Path, **overrides) -> Path:
    """SLERP and DARE TIES, 4 trials each, 8 search documents per task (pruning rung at 4), 2 finalists on 12."""
    evaluation = {"limit": 8, "first_limit": 4, "final": {"limit": 12, "finalists": 2}, **overrides.pop("evaluation", {})}
    fields = {"methods": ["slerp", "dare_ties"], "space": {"slerp": {"control_points": 3}}, **overrides}
    spec = tiny_study("tiny", family, task_dir, evaluation=evaluation, **fields)
    path = directory / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def optuna_study_of(study: Study, method: str) -> optuna.Study:
    """The stored Optuna study of one method of a loaded study file."""
    return optuna.load_study(study_name=optuna_study_name(study.spec, method), storage=study.storage_url)


def trials(study_path: Path, method: str) -> list[optuna.trial.FrozenTrial]:
    return optuna_study_of(load_study(study_path), method).get_trials()


def scored_docs(trial: optuna.trial.FrozenTrial) -> dict[str, set[int]]:
    """The documents, per lm-eval task, that the trial's stored record has results for."""
    record = json.loads(trial.user_attrs["record"])
    return {leaf: {doc for doc, _ in rows} for task in record["tasks"].values() for leaf, rows in task["docs"].items()}


def counted(trial_list) -> int:
    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trial_list)


@pytest.fixture(scope="module")
def finished_study(tmp_path_factory, family_f32, task_dir) -> Path:
    directory = tmp_path_factory.mktemp("study")
    path = write_study(directory, family_f32, task_dir)
    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    return path


def test_a_study_runs_every_method_to_its_budget_and_keeps_the_evidence(finished_study):
    for method in ("slerp", "dare_ties"):
        trial_list = trials(finished_study, method)
        assert counted(trial_list) == 4
        first = trial_list[0]
        assert first.user_attrs["baseline"] == f"hand-written {method}"  # the baseline is enqueued first
        for trial in trial_list:
            if trial.state == TrialState.COMPLETE:
                assert yaml.safe_load(trial.user_attrs["recipe"])["merge_method"] == method
                record = json.loads(trial.user_attrs["record"])
                assert set(record["tasks"]) == set(SEARCH_TASKS)
                assert trial.user_attrs["docs_scored"] == 16  # 8 per task
                timings = trial.user_attrs["timings"]
                assert set(timings) == {"build", "evaluate", "forward", "forward_tokens", "total"}  # hf counts tokens
                assert 0 < timings["forward"] <= timings["evaluate"] and timings["forward_tokens"] > 0


def test_slerp_baseline_is_the_published_t_curve(finished_study):
    recipe = yaml.safe_load(trials(finished_study, "slerp")[0].user_attrs["recipe"])
    curves = {entry.get("filter"): entry["value"] for entry in recipe["parameters"]["t"]}
    assert curves == {"self_attn": [0.0, 0.3, 1.0], "mlp": [1.0, 0.7, 0.0], None: [0.5, 0.5, 0.5]}  # 5 points → 3


def test_leaderboard_numbers_equal_a_recomputation_from_stored_documents(finished_study):
    study = load_study(finished_study)
    board = build_leaderboard(study)
    for method in ("slerp", "dare_ties"):
        optuna_study = optuna_study_of(study, method)
        finals = final_records(optuna_study)
        for row in (r for r in board.rows if r.method == method):
            trial = optuna_study.trials[row.trial]
            assert row.search.average == pytest.approx(trial.value)
            if row.final is not None:
                record = finals[row.trial]
                per_task = []
                for task in record["tasks"].values():
                    values = [value for rows in task["docs"].values() for _, value in rows]
                    per_task.append(sum(values) / len(values))
                assert row.final.average == pytest.approx(sum(per_task) / len(per_task))
    final_ids = {
        tuple(sorted((leaf, tuple(doc for doc, _ in rows)) for leaf, rows in json.loads(v)["tasks"][t]["docs"].items()))
        for method in ("slerp", "dare_ties")
        for k, v in optuna_study_of(study, method).user_attrs.items()
        if k.startswith("final.")
        for t in SEARCH_TASKS
    }
    assert len(final_ids) == len(SEARCH_TASKS)  # every finalist scored on the same held-out documents


def test_a_hand_written_recipe_that_ranks_first_is_compared_with_the_best_searched_candidate(
    family_f32, task_dir, tmp_path, monkeypatch
):
    """The comparison with the hand-written recipe disappeared when the search lost to it: the news a user needs."""
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 3})
    score_final = StudyRunner.score_final

    def baseline_knows_everything(self, trial):
        record = score_final(self, trial)
        value = 1.0 if is_baseline(trial) else 0.0
        for task in record["tasks"].values():
            task["docs"] = {leaf: [[doc, value] for doc, _ in rows] for leaf, rows in task["docs"].items()}
        return record

    monkeypatch.setattr(StudyRunner, "score_final", baseline_knows_everything)
    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    board = build_leaderboard(load_study(path))
    assert board.rows[0].baseline
    [comparison] = board.comparisons
    assert comparison.label == "best searched slerp − hand-written slerp" and comparison.difference.mean == -1.0
    assert not comparison.b.baseline and comparison.b.final is not None
    assert "best searched slerp − hand-written slerp: -100.00 points" in result.output


def test_final_documents_are_held_out_from_the_search(finished_study):
    trial = next(t for t in trials(finished_study, "slerp") if t.state == TrialState.COMPLETE)
    search = json.loads(trial.user_attrs["record"])
    study = load_study(finished_study)
    optuna_study = optuna_study_of(study, "slerp")
    final = next(iter(final_records(optuna_study).values()))
    for name in SEARCH_TASKS:
        for leaf, rows in final["tasks"][name]["docs"].items():
            seen = {doc for doc, _ in search["tasks"][name]["docs"].get(leaf, [])}
            assert seen.isdisjoint(doc for doc, _ in rows)


def test_finalists_can_be_scored_on_other_tasks_such_as_held_out_facts(family_f32, task_dir, tmp_path):
    final = {"tasks": list(HELDOUT_TASKS), "limit": 10, "finalists": 1}
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 2}, evaluation={"final": final})
    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    for trial in trials(path, "slerp"):
        if trial.state == TrialState.COMPLETE:
            assert set(json.loads(trial.user_attrs["record"])["tasks"]) == set(SEARCH_TASKS)
    study = load_study(path)
    optuna_study = optuna_study_of(study, "slerp")
    finals = final_records(optuna_study)
    assert finals and all(set(record["tasks"]) == set(HELDOUT_TASKS) for record in finals.values())
    for record in finals.values():
        for name in HELDOUT_TASKS:
            assert sum(len(rows) for rows in record["tasks"][name]["docs"].values()) == 10
    best = build_leaderboard(study).best("slerp")
    assert best is not None and set(best.final.tasks) == set(HELDOUT_TASKS)

    (tmp_path / "bad").mkdir()
    bad = write_study(tmp_path / "bad", family_f32, task_dir, evaluation={"final": {"tasks": ["demo_nonexistent"]}})
    result = runner.invoke(app, ["study", "run", str(bad), "--quiet"])
    assert result.exit_code == 2, result.output
    assert f"{bad}: evaluation (tasks, suite or final.tasks): unknown task 'demo_nonexistent'" in result.output
    assert "loading" not in result.output  # refused before any model loads


def test_a_finalist_another_live_worker_is_scoring_is_waited_for_and_one_whose_worker_died_is_taken_over(
    family_f32, task_dir, tmp_path, monkeypatch
):
    """Finalists are scored once each: a worker claims one before scoring it (`final_claim.<number>`)."""
    path = write_study(
        tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 3}, evaluation={"final": {"finalists": 2}}
    )
    with monkeypatch.context() as patched:  # the trials, but no finalist scored yet
        patched.setattr(StudyRunner, "finalize", lambda self, method, say=None: [])
        assert runner.invoke(app, ["study", "run", str(path), "--quiet"]).exit_code == 0
    study = load_study(path)
    optuna_study = optuna_study_of(study, "slerp")
    complete = [t for t in optuna_study.trials if t.state == TrialState.COMPLETE]
    best = sorted(complete, key=lambda t: -t.value)[:2]
    finalists = best + [t for t in complete if is_baseline(t) and t not in best]
    live, dead = finalists[0].number, finalists[1].number
    here = Worker.this()
    parent = psutil.Process(os.getppid())  # alive for the whole test, on this machine
    claim_final(optuna_study, live, {**here.as_attr(), "pid": parent.pid, "started": parent.create_time()})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    claim_final(optuna_study, dead, {**here.as_attr(), "pid": gone.pid, "started": 1.0})
    stored: list = []

    def live_worker_finishes() -> None:  # once the dead worker's finalist is scored, stores that held-out record
        deadline = time.monotonic() + 120
        while dead not in final_records(optuna_study) and time.monotonic() < deadline:
            time.sleep(0.1)
        stored.append(final_records(optuna_study).get(dead))
        set_final(optuna_study, live, stored[0])

    threading.Thread(target=live_worker_finishes, daemon=True).start()

    result = runner.invoke(app, ["study", "run", str(path)])
    assert result.exit_code == 0, result.output
    assert f"waiting for trial {live}'s held-out score from worker {here.host}:{parent.pid}" in result.output
    assert f"final evaluation of trial {live}" not in result.output  # never scored twice
    assert f"final evaluation of trial {dead}" in result.output  # its worker died: taken over
    finals = final_records(optuna_study)
    assert stored[0] is not None and finals[live] == stored[0] and set(finals) == {t.number for t in finalists}
    assert final_claim(optuna_study, dead)["worker"]["pid"] == os.getpid()


def test_a_worker_whose_held_out_scoring_fails_withdraws_its_claim_for_the_next_run(family_f32, task_dir, tmp_path, monkeypatch):
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 2})

    def out_of_memory(self, trial):
        raise MergetuneError("out of memory")

    with monkeypatch.context() as patched:
        patched.setattr(StudyRunner, "score_final", out_of_memory)
        result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 2 and "out of memory" in result.output, result.output
    study = load_study(path)
    optuna_study = optuna_study_of(study, "slerp")
    numbers = [t.number for t in optuna_study.trials if t.state == TrialState.COMPLETE]
    assert [final_claim(optuna_study, n) for n in numbers] == [None] * len(numbers)
    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0 and "waiting for" not in result.output, result.output
    assert final_records(optuna_study)


def test_a_claim_on_a_finalist_from_another_machine_holds_until_it_is_too_old():
    here = Worker.this()
    there = {**here.as_attr(), "host": "elsewhere", "boot": "another boot"}
    now = time.time()
    assert here.holding({"worker": there, "at": now - 60}, now=now) == Worker(**there)
    assert here.holding({"worker": there, "at": now - FINAL_CLAIM_SECONDS - 1}, now=now) is None
    assert here.holding({"worker": here.as_attr(), "at": now}, now=now) is None  # its own, from an interrupted try
    rebooted = {**here.as_attr(), "boot": "before the restart"}
    assert here.holding({"worker": rebooted, "at": now}, now=now) is None
    assert here.holding(None) is None


def test_finalists_left_fewer_documents_than_final_limit_are_scored_on_those_with_a_warning(
    family_f32, task_dir, tmp_path, caplog
):
    path = write_study(
        tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 1}, evaluation={"final": {"limit": 500}}
    )
    with caplog.at_level(logging.WARNING, logger="mergetune.search.documents"):
        result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    warned = [r.getMessage() for r in caplog.records if r.name == "mergetune.search.documents"]
    assert len(warned) == len(SEARCH_TASKS), warned
    for message in warned:
        left, searched, size = map(int, re.search(
            r"only (\d+) documents are left for the finalists, not final.limit 500 \(the search scores (\d+) of its (\d+)\)",
            message,
        ).groups())
        assert searched == 8 and left == size - 8


@pytest.mark.parametrize(
    "limit, first_limit, reduction_factor, rungs",
    [(40, None, 3, [4, 12]), (50, None, 3, [5, 15]), (100, 25, 2, [25, 50]), (8, 4, 3, [4]), (10, None, 3, [1, 3])],
)
def test_pruning_rungs_grow_by_the_reduction_factor_up_to_half_the_limit(limit, first_limit, reduction_factor, rungs):
    evaluation = Evaluation(tasks=["t"], limit=limit, first_limit=first_limit, reduction_factor=reduction_factor)
    assert evaluation.rungs() == rungs


def test_pruned_candidates_stop_at_a_rung_on_nested_documents_and_baselines_run_in_full(family_f32, task_dir, tmp_path):
    rungs = {"limit": 8, "first_limit": 2, "reduction_factor": 2}
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 10}, evaluation=rungs)
    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    trial_list = trials(path, "slerp")
    assert trial_list[0].user_attrs["baseline"] and trial_list[0].state == TrialState.COMPLETE
    assert trial_list[0].intermediate_values == {}
    full = scored_docs(trial_list[0])
    pruned = [t for t in trial_list if t.state == TrialState.PRUNED]
    assert pruned, "successive halving stopped no candidate"
    for trial in trial_list:
        scored = scored_docs(trial)
        assert all(scored[leaf] <= full[leaf] for leaf in scored)
        if trial.state == TrialState.PRUNED:
            assert trial.last_step in (2, 4) and trial.user_attrs["docs_scored"] == 2 * trial.last_step
            assert all(len(docs) == trial.last_step for docs in scored.values())
        else:
            assert trial.user_attrs["docs_scored"] == 16 and set(trial.intermediate_values) <= {2, 4}


ESTIMATOR = {"pruning": "estimator", "evaluation": {"first_limit": None, "estimator": {"min_trials": 3, "chunk": 0.25}}}


def test_the_estimator_learns_from_completed_trials_and_stops_candidates_that_cannot_reach_the_bar(
    family_f32, task_dir, tmp_path
):
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 12}, **ESTIMATOR)
    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    trial_list = trials(path, "slerp")
    assert counted(trial_list) == 12
    first = trial_list[:3]  # the baseline and two more, scored in full before the estimator has anything to learn from
    assert all(t.state == TrialState.COMPLETE and "race" not in t.user_attrs for t in first)
    raced = trial_list[3:]
    assert all("race" in t.user_attrs for t in raced)
    for trial in raced:  # one worker: it learned from every trial completed before it started
        done = [t.number for t in trial_list if t.number < trial.number and t.state == TrialState.COMPLETE]
        assert trial.user_attrs["race"]["basis"] == [["slerp", number] for number in done]
    assert any(t.state == TrialState.PRUNED for t in raced), "the estimator stopped no candidate"
    assert_races_replay_and_decide_by_the_bar(trial_list)
    for trial in raced:  # it scores documents in its own order, a quarter at a time
        assert trial.user_attrs["docs_scored"] in (4, 8, 12, 16)

    board = runner.invoke(app, ["leaderboard", str(path), "--markdown"])
    assert board.exit_code == 0, board.output
    stopped = sum(t.state == TrialState.PRUNED for t in raced)
    assert f"slerp: the estimator stopped {stopped} of {len(raced)} raced candidates" in board.output
    through = [t for t in raced if t.state == TrialState.COMPLETE]
    reached = sum(t.value >= t.user_attrs["race"]["bar"] for t in through)
    assert f"{reached} of the {len(through)} it let through reached the bar" in board.output
    assert "estimated (docs)" in board.output
    result = runner.invoke(app, ["report", str(path), str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report" / "slerp-estimates.png").stat().st_size > 1000


def test_a_race_whose_first_chunks_miss_a_task_scores_each_document_once(family_f32, task_dir, tmp_path):
    """A chunk of one document covers one task; the other task's documents, scored later, are added to the record,
    not doubled (they were: such a trial's score counted its first documents of that task twice)."""
    estimator = {"min_trials": 3, "chunk": 1 / 16, "confidence": 0.99}  # 16 search documents: one per chunk
    path = write_study(
        tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 6}, pruning="estimator",
        evaluation={"first_limit": None, "estimator": estimator},
    )
    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    raced = [t for t in trials(path, "slerp") if "race" in t.user_attrs]
    assert any(t.state == TrialState.COMPLETE for t in raced)
    for trial in raced:
        record = json.loads(trial.user_attrs["record"])
        rows = {leaf: [doc for doc, _ in docs] for task in record["tasks"].values() for leaf, docs in task["docs"].items()}
        assert all(len(ids) == len(set(ids)) for ids in rows.values()), rows
        assert sum(map(len, rows.values())) == trial.user_attrs["docs_scored"]
        if trial.state == TrialState.COMPLETE:
            assert {leaf: len(ids) for leaf, ids in rows.items()} == dict.fromkeys(SEARCH_TASKS, 8)
            assert trial.value == pytest.approx(summarize(record).average)


@pytest.mark.parametrize("learn_from", ["study", "method"])
def test_a_method_run_after_another_races_from_the_first_one_s_trials_unless_told_to_learn_alone(
    learn_from, family_f32, task_dir, tmp_path
):
    evaluation = {**ESTIMATOR["evaluation"], "estimator": {**ESTIMATOR["evaluation"]["estimator"], "learn_from": learn_from}}
    path = write_study(tmp_path, family_f32, task_dir, budget={"n_trials": 8}, pruning="estimator", evaluation=evaluation)
    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    slerp, dare = trials(path, "slerp"), trials(path, "dare_ties")
    assert all("race" not in t.user_attrs for t in slerp[:3])  # SLERP ran first: it learned from its own 3 trials
    slerp_done = [["slerp", t.number] for t in slerp if t.state == TrialState.COMPLETE]
    # 2 finalists: DARE TIES's first two trials (the baseline and one more) take a finalist's place whatever they score
    in_full = 2 if learn_from == "study" else 3  # and learning alone, it needs min_trials 3 of its own
    assert all(t.state == TrialState.COMPLETE and "race" not in t.user_attrs for t in dare[:in_full])
    first_raced = dare[in_full].user_attrs["race"]
    own = [["dare_ties", t.number] for t in dare[:in_full]]
    assert first_raced["basis"] == (slerp_done + own if learn_from == "study" else own)
    assert first_raced["bar"] == pytest.approx(sorted(t.value for t in dare[:in_full])[-2])  # its own method's second best
    assert all("race" in t.user_attrs for t in dare[in_full:])
    assert_races_replay_and_decide_by_the_bar(slerp + dare)


def test_a_study_run_again_in_another_process_proposes_the_same_candidates(family_f32, task_dir, tmp_path):
    """A study's only worker samples with the study's seed, whichever process it is: it opens each method's study
    once, for the search and the finalists alike (opened again, Optuna's storage would take it for a second worker,
    which samples with a seed of its own). One study file run twice, by two processes, proposes the same trials."""
    paths, runs = [], []
    for run in ("first", "second"):  # side by side: each in its own directory and storage
        (tmp_path / run).mkdir()
        paths.append(write_study(tmp_path / run, family_f32, task_dir))
        command = [sys.executable, "-c", "from mergetune.cli import app; app()", "study", "run", str(paths[-1]), "--quiet"]
        runs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    for run in runs:
        _, stderr = run.communicate(timeout=600)
        assert run.returncode == 0, stderr[-2000:]
    proposals = [{method: [t.params for t in trials(path, method)] for method in ("slerp", "dare_ties")} for path in paths]
    assert proposals[0] == proposals[1] and all(len(made) == 4 for made in proposals[0].values())


def test_a_study_with_the_estimator_killed_mid_trial_resumes_with_the_same_decisions(family_f32, task_dir, tmp_path):
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 10}, **ESTIMATOR)
    killed = kill_at_scoring_call(path, 9)  # three full trials (one call each), then in a race
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = {t.number: t for t in trials(path, "slerp") if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    after = trials(path, "slerp")
    assert counted(after) == 10
    for number, trial in before.items():  # nothing finished was lost or redecided
        assert after[number].state == trial.state and after[number].user_attrs == trial.user_attrs
    assert_races_replay_and_decide_by_the_bar(after)
    resumed = [t for t in after if t.number > max(before) and "race" in t.user_attrs]
    assert resumed and all(
        {n for n in before if before[n].state == TrialState.COMPLETE} <= {n for _, n in t.user_attrs["race"]["basis"]}
        for t in resumed
    )


def test_leaderboard_outputs_markdown_json_and_csv(finished_study, tmp_path):
    out_json, out_csv = tmp_path / "board.json", tmp_path / "board.csv"
    result = runner.invoke(
        app, ["leaderboard", str(finished_study), "--markdown", "--json", str(out_json), "--csv", str(out_csv)]
    )
    assert result.exit_code == 0, result.output
    assert "| rank | method |" in result.output
    assert "best slerp − best dare_ties" in result.output
    data = json.loads(out_json.read_text())
    assert data["rows"][0]["rank"] == 1 and data["rows"][0]["final"] is not None
    assert all(isinstance(row["seed"], int) and row["device"] == "cpu" for row in data["rows"])  # rebuilds the masks
    [between] = [c for c in data["comparisons"] if c["label"] == "best slerp − best dare_ties"]
    assert (between["of"]["method"], between["minus"]["method"]) == ("slerp", "dare_ties")  # the label's order
    finals = {(row["method"], row["trial"]): row["final"]["average"] for row in data["rows"] if row["final"]}
    of, minus = finals[(between["of"]["method"], between["of"]["trial"])], finals[(between["minus"]["method"], between["minus"]["trial"])]
    assert between["mean"] == pytest.approx(of - minus, abs=1e-6)
    assert out_csv.read_text().startswith("rank,method,trial,origin,scored on")
    searched_only = [row for row in csv.DictReader(io.StringIO(out_csv.read_text())) if row["scored on"] == "search"]
    assert searched_only and all(row["final avg"] == "" for row in searched_only)  # a number column: empty, not a dash
    assert data["missing"] == []


def test_the_leaderboard_warns_of_trials_stored_with_documents_scored_twice(finished_study, tmp_path):
    """Estimator races stored before the fix of 2026-12-02 could hold a task's first documents twice."""
    study = Path(shutil.copytree(finished_study.parent, tmp_path / "study")) / finished_study.name
    with contextlib.closing(sqlite3.connect(study.parent / "tiny.db")) as db, db:
        trial_id, value = db.execute(
            "SELECT a.trial_id, a.value_json FROM trial_user_attributes a JOIN trials t ON a.trial_id = t.trial_id "
            "JOIN studies s ON t.study_id = s.study_id WHERE s.study_name = 'tiny.slerp' AND t.number = 1 AND a.key = 'record'"
        ).fetchone()
        record = json.loads(json.loads(value))
        docs = next(iter(record["tasks"].values()))["docs"]
        leaf = next(iter(docs))
        docs[leaf].append(docs[leaf][0])
        db.execute("UPDATE trial_user_attributes SET value_json = ? WHERE trial_id = ? AND key = 'record'",
                   (json.dumps(json.dumps(record)), trial_id))
    board = build_leaderboard(load_study(study))
    assert board.warnings == [
        "slerp: trial(s) 1 hold documents scored twice (an estimator race stored by mergetune before 2026-12-02), "
        "and their search scores count them twice; rank them with care"
    ]
    assert build_leaderboard(load_study(finished_study)).warnings == []



def test_trials_that_search_better_than_the_scored_finalists_are_named_until_they_are_scored(finished_study, tmp_path):
    """A run that added trials and stopped before its finalists: the board and export say which wait to be scored."""
    extended = Path(shutil.copytree(finished_study.parent, tmp_path / "study")) / finished_study.name
    complete = [t for t in trials(finished_study, "slerp") if t.state == TrialState.COMPLETE]
    best = sorted(complete, key=lambda t: t.value, reverse=True)[0]
    assert not best.user_attrs.get("baseline")  # the baseline keeps its held-out score: the method has some
    with contextlib.closing(sqlite3.connect(extended.parent / "tiny.db")) as db, db:
        db.execute(
            "DELETE FROM study_user_attributes WHERE key = ? "
            "AND study_id = (SELECT study_id FROM studies WHERE study_name = 'tiny.slerp')",
            (f"final.{best.number}",),
        )
    board = build_leaderboard(load_study(extended))
    assert board.pending == {"slerp": [best.number]}
    assert (
        f"slerp: trial(s) {best.number} are now among its best by search score but have no held-out score yet"
    ) in board.missing[0]
    assert build_leaderboard(load_study(finished_study)).pending == {}
    result = runner.invoke(app, ["export", str(extended), str(tmp_path / "out"), "--method", "slerp"])
    assert result.exit_code == 0, result.output
    assert f"slerp trial(s) {best.number} search better but have no held-out score yet" in " ".join(result.output.split())

def test_a_partial_study_says_what_it_lacks_and_export_that_it_picked_by_search_score(finished_study, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(finished_study.parent, partial)
    with contextlib.closing(sqlite3.connect(partial / "tiny.db")) as db, db:  # dare_ties stopped before its finalists
        db.execute(
            "DELETE FROM study_user_attributes WHERE key LIKE 'final.%' "
            "AND study_id = (SELECT study_id FROM studies WHERE study_name = 'tiny.dare_ties')"
        )
    board = runner.invoke(app, ["leaderboard", str(partial / "study.yaml"), "--markdown"])
    assert board.exit_code == 0, board.output
    completed = sum(t.state == TrialState.COMPLETE for t in trials(finished_study, "dare_ties"))
    said = "dare_ties: no held-out scores yet (its finalists are scored once its trials are done, or by the next "
    assert said in board.output and f"so its {completed} completed trial(s) show search scores" in board.output
    rows = [line.split(" | ") for line in board.output.splitlines() if line.startswith("| ") and "rank" not in line]
    assert {(row[1], row[4]) for row in rows} == {("slerp", "held-out"), ("slerp", "search"), ("dare_ties", "search")}

    result = runner.invoke(app, ["export", str(partial / "study.yaml"), str(tmp_path / "out"), "--method", "dare_ties"])
    assert result.exit_code == 0, result.output
    assert "by its search score: no dare_ties trial has a held-out score yet" in result.output
    assert "Scores on search documents" in (tmp_path / "out" / "README.md").read_text()


def test_exported_slerp_recipe_reproduces_in_mergekit_tensor_for_tensor(finished_study, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(finished_study), str(out), "--method", "slerp"])
    assert result.exit_code == 0, result.output
    recipe = out / "mergekit_config.yml"
    assert f"reproduce with `mergetune merge {recipe} OUT` or `mergekit-yaml {recipe} OUT`" in result.output
    card = (out / "README.md").read_text()
    assert "## Evaluation" in card and "demo_arithmetic" in card
    stored = optuna.load_study(study_name="tiny.slerp", storage=load_study(finished_study).storage_url)
    for model, fingerprint in stored.user_attrs["model_fingerprints"].items():
        assert f"- {model}: `{fingerprint}`" in card
    config = MergeConfiguration.model_validate(yaml.safe_load((out / "mergekit_config.yml").read_text()))
    run_merge(config, str(tmp_path / "mergekit"), MergeOptions(copy_tokenizer=False, quiet=True, write_model_card=False))
    ours, theirs = load_state(out), load_state(tmp_path / "mergekit")
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name])


def test_an_exported_dare_ties_trial_names_the_command_and_seed_that_rebuild_its_tensors(finished_study, tmp_path):
    """DARE's random masks are mergetune's own draws: `mergekit-yaml` would merge the recipe with other masks."""
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(finished_study), str(out), "--method", "dare_ties"])
    assert result.exit_code == 0, result.output
    command = result.output.split("reproduce with `", 1)[1].split("`", 1)[0].split()
    assert command[:3] == ["mergetune", "merge", str(out / "mergekit_config.yml")] and command[4] == "--seed"
    assert "--seed" in (out / "README.md").read_text() and "masks of its own" in (out / "README.md").read_text()
    again = tmp_path / "again"
    result = runner.invoke(app, [command[1], command[2], str(again), *command[4:]])
    assert result.exit_code == 0, result.output
    ours, rebuilt = load_state(out), load_state(again)
    assert sorted(ours) == sorted(rebuilt) and all(torch.equal(ours[name], rebuilt[name]) for name in ours)


def test_report_draws_pictures_and_a_page(finished_study, tmp_path):
    result = runner.invoke(app, ["report", str(finished_study), str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report" / "index.html").read_text()
    for name in ("slerp-history.png", "slerp-curves.png", "dare_ties-history.png"):
        assert (tmp_path / "report" / name).stat().st_size > 1000
        assert name in page
    assert "no parameter importances for slerp: 4 completed trials, fewer than 10" in page  # said, not silently absent


def test_a_report_drawn_over_an_earlier_one_leaves_none_of_its_figures_and_nothing_else_changed(finished_study, tmp_path):
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "index.html").write_text('<title>old — mergetune report</title><img src="ties-history.png">')
    (folder / "ties-history.png").write_bytes(b"old figure")
    (folder / "notes.png").write_bytes(b"someone's own")
    result = runner.invoke(app, ["report", str(finished_study), str(folder)])
    assert result.exit_code == 0, result.output
    assert not (folder / "ties-history.png").exists()  # the old report's, shown by no page now
    assert (folder / "notes.png").read_bytes() == b"someone's own" and (folder / "slerp-history.png").exists()


def test_the_report_draws_a_curve_for_every_numeric_parameter_and_none_for_flags():
    from mergetune.search.report import curve_settings

    from mergetune.merge_ops.recipe import recipe_from_dict

    recipe = recipe_from_dict({
        "merge_method": "nuslerp",
        "models": [{"model": "m/a", "parameters": {"weight": [0, 1]}}, {"model": "m/b", "parameters": {"weight": "0.5"}}],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    })
    assert [label for label, _ in curve_settings(recipe)] == ["a weight", "b weight"]


def test_parameter_importances_are_drawn_only_from_enough_completed_trials(tmp_path):
    from mergetune.search.report import plot_importances

    def study_of(n_trials: int) -> optuna.Study:
        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
        study.optimize(lambda trial: trial.suggest_float("x", 0, 1) + 0 * trial.suggest_float("y", 0, 1), n_trials=n_trials)
        return study

    skipped = plot_importances(study_of(2), "slerp", tmp_path / "few.png")  # its bars would be noise that looks like a finding
    assert skipped == (
        "no parameter importances for slerp: 2 completed trials, fewer than 10 (with fewer, its bars would be noise "
        "that looks like a finding)"
    )
    assert not (tmp_path / "few.png").exists()
    drawn = plot_importances(study_of(40), "slerp", tmp_path / "many.png")
    assert isinstance(drawn, Path) and drawn.stat().st_size > 1000


def kill_at_scoring_call(path: Path, call: int) -> subprocess.CompletedProcess:
    """`mergetune study run` SIGKILLed as it starts its `call`-th scoring call."""
    killer = (
        "import os, signal, sys\n"
        "import mergetune.search.runner as runner\n"
        "calls = []\n"
        "original = runner.StudyRunner.score\n"
        "def score(self, ids):\n"
        "    calls.append(1)\n"
        f"    if len(calls) == {call}: os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return original(self, ids)\n"
        "runner.StudyRunner.score = score\n"
        "from mergetune.cli import app\n"
        f"sys.argv = ['mergetune', 'study', 'run', {str(path)!r}, '--quiet']\n"
        "app()\n"
    )
    return subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, timeout=600)


def test_a_study_killed_mid_trial_continues_to_the_requested_count(family_f32, task_dir, tmp_path):
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 5})
    killed = kill_at_scoring_call(path, 6)  # inside the 3rd or 4th trial
    assert killed.returncode == -9, killed.stderr[-2000:]
    before = trials(path, "slerp")
    finished_before = {t.number: t.value for t in before if t.state == TrialState.COMPLETE}
    assert any(t.state == TrialState.RUNNING for t in before)

    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    after = trials(path, "slerp")
    assert counted(after) == 5
    assert {t.number: t.value for t in after if t.number in finished_before} == finished_before
    assert not any(t.state == TrialState.RUNNING for t in after)
    assert [t.user_attrs.get("fail_reason") for t in after if t.state == TrialState.FAIL] == ["worker died mid-trial"]


def test_a_different_study_definition_under_the_same_name_is_refused(finished_study, tmp_path):
    spec = yaml.safe_load(finished_study.read_text())
    spec["space"] = {"slerp": {"control_points": 4}}
    spec["storage"] = load_study(finished_study).storage_url
    other = tmp_path / "study.yaml"
    other.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["study", "run", str(other), "--quiet"])
    assert result.exit_code == 2
    assert "different study file" in result.output and "space.slerp.control_points: stored 3, this file 4" in result.output
    assert "model(s)" not in result.output  # refused before any model loads


def test_the_same_study_with_its_paths_written_another_way_is_the_same_study(finished_study, tmp_path):
    spec = yaml.safe_load(finished_study.read_text())
    spec["models"] = [f"{Path(model).parent}/./{Path(model).name}/" for model in spec["models"]]
    spec["storage"] = load_study(finished_study).storage_url
    other = tmp_path / "study.yaml"
    other.write_text(yaml.safe_dump(spec))
    result = runner.invoke(app, ["study", "run", str(other), "--quiet"])
    assert result.exit_code == 0 and "different study file" not in result.output, result.output


def test_a_worker_whose_checkpoint_under_a_model_s_name_holds_other_weights_is_refused(family_f32, task_dir, tmp_path):
    models = {name: shutil.copytree(family_f32[name], tmp_path / "models" / name) for name in ("base", "model_a", "model_b")}
    path = write_study(tmp_path, models, task_dir, methods=["slerp"], budget={"n_trials": 1})
    assert runner.invoke(app, ["study", "run", str(path), "--quiet"]).exit_code == 0
    study = load_study(path)
    stored = optuna.load_study(study_name="tiny.slerp", storage=study.storage_url).user_attrs["model_fingerprints"]
    assert sorted(stored) == sorted(map(str, models.values()))

    shutil.rmtree(models["model_a"])  # model_a re-trained: the same shapes, other weights
    shutil.copytree(family_f32["model_c"], models["model_a"])
    result = runner.invoke(app, ["study", "run", str(path), "--quiet", "--n-trials", "2"])
    assert result.exit_code == 2
    assert f"model {models['model_a']}: its weights here (fingerprint " in result.output
    assert f"are not those study 'tiny.slerp' was started with (fingerprint {stored[str(models['model_a'])]})" in result.output
    assert "model(s)" not in result.output  # refused before any model loads
    assert counted(trials(path, "slerp")) == 1
    exported = runner.invoke(app, ["export", str(path), str(tmp_path / "out")])
    assert exported.exit_code == 2
    assert f"model {models['model_a']}: its weights here (fingerprint " in exported.output
    assert "are not those the study scored" in exported.output and not (tmp_path / "out").exists()

    shutil.rmtree(models["model_a"])
    shutil.copytree(family_f32["model_a"], models["model_a"], dirs_exist_ok=True)
    with contextlib.closing(sqlite3.connect(tmp_path / "tiny.db")) as db, db:  # as an older mergetune stored it
        db.execute("DELETE FROM study_user_attributes WHERE key = 'model_fingerprints'")
    result = runner.invoke(app, ["study", "run", str(path), "--quiet", "--n-trials", "2"])
    assert result.exit_code == 0, result.output
    assert optuna.load_study(study_name="tiny.slerp", storage=study.storage_url).user_attrs["model_fingerprints"] == stored


def test_a_study_reports_its_models_loading_byte_by_byte_until_all_are_resident(family_f32, task_dir, tmp_path):
    from mergetune.merge_ops.sources import open_source, resident_bytes
    from mergetune.search.study import QuietProgress, run_study

    class Recorder(QuietProgress):
        def __init__(self) -> None:
            self.calls: list[tuple[int, int]] = []

        def loading(self, done: int, total: int) -> None:
            self.calls.append((done, total))

    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 1})
    recorder = Recorder()
    run_study(load_study(path), progress=recorder)
    everything = sum(resident_bytes(open_source(str(family_f32[name]))) for name in ("base", "model_a", "model_b"))
    done = [d for d, _ in recorder.calls]
    assert {total for _, total in recorder.calls} == {everything}
    assert done == sorted(done) and done[-1] == everything and len(done) > 3


def test_a_checkpoint_s_fingerprint_follows_its_weights_not_its_sharding(family_f32, tmp_path):
    from mergetune.merge_ops.sources import open_source
    from safetensors.torch import save_file

    state = load_state(family_f32["model_a"])
    whole = shutil.copytree(family_f32["model_a"], tmp_path / "whole", ignore=shutil.ignore_patterns("*.safetensors*"))
    save_file(state, str(whole / "model.safetensors"))
    fingerprint = open_source(str(family_f32["model_a"])).fingerprint()
    assert len(list(family_f32["model_a"].glob("*.safetensors"))) > 1  # sharded there, one file here
    assert open_source(str(whole)).fingerprint() == fingerprint
    name = "model.layers.1.mlp.up_proj.weight"
    state[name] = state[name].clone()
    state[name].view(-1)[state[name].numel() // 2] += 1e-3  # one weight, at a place the fingerprint reads
    save_file(state, str(whole / "model.safetensors"))
    assert open_source(str(whole)).fingerprint() != fingerprint
    assert open_source(str(family_f32["model_b"])).fingerprint() != fingerprint


@pytest.mark.parametrize(
    "change, message",
    [
        ({"methods": ["slerp"], "models": ["a", "b", "c"]}, "slerp merges exactly 2 models"),
        ({"base_model": None}, "dare_ties need a base_model"),
        ({"sampler": "annealing"}, "unknown sampler 'annealing'; known: tpe, cmaes, gp, random"),
        ({"methods": ["slerp", "frankenmerge"]}, "unknown searchable method 'frankenmerge'; known: slerp, dare_ties"),
        ({"pruning": "hyperband"}, "unknown pruner 'hyperband'; known: successive_halving, estimator, none"),
        ({"backend": "server"}, "backend 'server' cannot score candidates built in memory"),
        ({"budget": {"n_trials": 0}}, "budget.n_trials: Input should be greater than or equal to 1"),
        ({"budget": {"n_trials": None}}, "budget: give n_trials or timeout"),
        ({"methods": ["slerp", "dare_ties", "slerp"]}, "methods: listed more than once: slerp"),
        ({"evaluation": {"tasks": ["demo_capitals", "demo_capitals"]}}, "evaluation.tasks: listed more than once: demo_capitals"),
        ({"evaulation": {}}, "evaulation: unknown field"),
        ({"space": {"dare_ties": {"density": {"low": 0.0, "high": 1.0}}}}, "density must lie in (0, 1]"),
        ({"evaluation": {"first_limit": 5}}, "first_limit (5) must be at most half of limit (8)"),
        (
            {"pruning": False, "evaluation": {"first_limit": None, "reduction_factor": 2}},
            "evaluation.reduction_factor only makes sense with pruning: successive_halving (this study has pruning: none)",
        ),
        (
            {"pruning": "estimator", "evaluation": {"first_limit": 2}},
            "evaluation.first_limit only makes sense with pruning: successive_halving (this study has pruning: estimator)",
        ),
        (
            {"evaluation": {"first_limit": None, "estimator": {"confidence": 0.9}}},
            "evaluation.estimator only makes sense with pruning: estimator (this study has pruning: successive_halving)",
        ),
        ({"pruning": "estimator", "evaluation": {"estimator": {"chunk": 0}}}, "evaluation.estimator.chunk: Input should be greater than 0"),
        ({"space": {"slerp": {"filters": ["rest", "mlp"]}}}, "space.slerp.filters: 'rest' names the tensors no filter matches"),
        ({"space": {"slerp": {"filters": ["mlp", "mlp"]}}}, "space.slerp.filters: listed more than once: mlp"),
        # A range from NaN reached Optuna and failed every trial, and was stored with the study's definition.
        ({"space": {"dare_ties": {"density": {"low": float("nan"), "high": 1.0}}}}, "space.dare_ties.density.low: Input should be a finite number"),
        ({"space": {"dare_ties": {"weight": {"low": 0.0, "high": float("inf")}}}}, "space.dare_ties.weight.high: Input should be a finite number"),
        ({"seed": -1}, "seed: Input should be greater than or equal to 0"),  # numpy's seeds: a traceback after loading
        (
            {"pruning": False, "evaluation": {"limit": 40, "first_limit": None, "final": {"tasks": [], "finalists": 2}}},
            "the search scores all 40 of its documents",
        ),
    ],
)
def test_bad_study_files_get_one_clear_message(change, message, family_f32, task_dir, tmp_path):
    path = write_study(tmp_path, family_f32, task_dir, **change)
    result = runner.invoke(app, ["study", "run", str(path)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert [p.name for p in tmp_path.iterdir()] == ["study.yaml"]  # no storage made for a study that cannot run


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted([*(REPO / "studies").glob("*.yaml"), *(REPO / "bench" / "studies").glob("*.yaml")]))
def test_shipped_study_files_are_valid(path):
    study = load_study(path)
    assert study.spec.methods and study.spec.evaluation.limit > 0


@pytest.mark.parametrize(
    "budget, n_trials",
    [({}, 30), ({"n_trials": 5}, 5), ({"timeout": 20}, None), ({"timeout": 20, "n_trials": 30}, 30)],
)
def test_a_budget_of_a_timeout_alone_runs_until_the_timeout(budget, n_trials):
    """The default of 30 trials applies only where no timeout is given: `timeout: 20` alone ran 30 trials in 10 s."""
    assert Budget.model_validate(budget).n_trials == n_trials


def test_study_paths_resolve_against_the_study_folder_and_the_home_directory(tmp_path, monkeypatch):
    home, folder = tmp_path / "home", tmp_path / "studies"
    (home / "models" / "a").mkdir(parents=True)
    (folder / "data").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    study = load_study(write_study(folder, {"base": "b", "model_a": "m1", "model_b": "m2"}, Path("data")))
    assert study.resolve("~/models/a") == str(home / "models" / "a")
    assert study.resolve("data") == str(folder / "data")
    assert study.resolve("org/model") == "org/model"  # not a path here: a hub id, unchanged


def test_a_study_stored_by_an_older_mergetune_continues_and_a_different_one_is_still_refused():
    from mergetune.demo.study import DEMO_STUDY
    from mergetune.search.study_file import StudySpec

    spec = StudySpec.model_validate({**DEMO_STUDY, "models": ["a", "b"], "base_model": "c"})
    older = spec.definition()
    older["pruning"] = True  # before pruners had names
    del older["sampler"]  # a field added since, at its default
    assert spec.has_definition("hash-of-the-older-release", older)
    assert not spec.model_copy(update={"pruning": "none"}).has_definition("hash-of-the-older-release", older)
    assert not spec.model_copy(update={"sampler": "random"}).has_definition("hash-of-the-older-release", older)
    changed = {**older, "evaluation": {**older["evaluation"], "limit": 30}}
    assert not spec.has_definition("hash-of-the-older-release", changed)
    # Settings only another pruner reads define nothing: stored or not, at any value.
    with_estimator = {**older, "evaluation": {**older["evaluation"], "estimator": {"confidence": 0.95}}}
    assert spec.has_definition("hash-of-the-older-release", with_estimator)
    evaluation = spec.evaluation.model_copy(update={"estimator": spec.evaluation.estimator.model_copy(update={"chunk": 0.2})})
    assert spec.model_copy(update={"evaluation": evaluation}).definition_hash() == spec.definition_hash()
    # An estimator study stored before `learn_from` existed continues (its new trials learn from the study).
    estimating = spec.model_copy(update={"pruning": "estimator"})
    before_learn_from = estimating.definition()
    del before_learn_from["evaluation"]["estimator"]["learn_from"]
    assert estimating.has_definition("hash-of-the-older-release", before_learn_from)
    alone = {**before_learn_from, "evaluation": {**before_learn_from["evaluation"], "estimator": {
        **before_learn_from["evaluation"]["estimator"], "learn_from": "method"}}}
    assert not estimating.has_definition("hash-of-the-older-release", alone)


@pytest.mark.parametrize(
    "built_on, requested, cuda, randomized, device, warns",
    [
        ("cuda", None, True, True, "cuda", False),  # re-merged where it was scored
        ("cuda", None, False, True, "cpu", True),  # no CUDA here: other masks, said so
        ("cuda", None, False, False, "cpu", False),  # deterministic recipes agree up to rounding
        ("cpu", "cuda:1", True, True, "cuda:1", True),  # asked for another device type
        (None, None, False, True, "cpu", False),  # stored before devices were recorded
    ],
)
def test_export_re_merges_on_the_device_type_the_trial_was_built_on(built_on, requested, cuda, randomized, device, warns):
    from mergetune.search.export import export_device

    chosen, note = export_device(built_on, requested, cuda, randomized)
    assert chosen == device and (note is not None) == warns
    if warns:
        assert f"built on {built_on}" in note and "masks differ" in note


def test_every_trial_records_the_device_type_it_was_built_on(finished_study):
    assert {t.user_attrs["device"] for t in trials(finished_study, "slerp") if t.state == TrialState.COMPLETE} == {"cpu"}


def test_every_trial_records_the_draw_scheme_of_its_masks(finished_study):
    from mergetune.merge_ops.sparsify import DRAWS

    complete = [t for t in trials(finished_study, "slerp") if t.state == TrialState.COMPLETE]
    assert complete and {t.user_attrs["draws"] for t in complete} == {DRAWS}


@pytest.mark.parametrize(
    "stored, randomized, warns",
    [
        ("int15", True, False),  # drawn as this mergetune draws
        (None, True, True),  # stored by a mergetune that drew one float32 per entry
        ("float64", True, True),  # some other scheme
        (None, False, False),  # deterministic recipes have no masks
    ],
)
def test_export_says_when_the_trial_was_drawn_under_another_scheme(stored, randomized, warns):
    from mergetune.search.export import draws_note

    note = draws_note(stored, "int15", randomized)
    assert (note is not None) == warns
    if warns:
        assert "int15" in note and "differs from the one scored" in note


def test_a_study_keeps_task_vectors_between_candidates_only_for_methods_that_merge_them(family_f32, task_dir, tmp_path):
    from mergetune.search.workspace import Workspace

    dare = load_study(write_study(tmp_path, family_f32, task_dir, methods=["dare_ties"]))
    assert Workspace.open(dare).builder.cache_task_vectors  # a CPU holds a tiny model's task vectors
    (tmp_path / "slerp").mkdir()
    slerp = load_study(write_study(tmp_path / "slerp", family_f32, task_dir, methods=["slerp"]))
    assert not Workspace.open(slerp).builder.cache_task_vectors


def test_a_study_computing_in_a_dtype_the_cpu_emulates_is_told_that_float32_scores_faster(
    family_f32, task_dir, tmp_path, monkeypatch, caplog
):
    from mergetune.search import workspace

    monkeypatch.setattr(workspace, "linear_slowdown", lambda dtype: 7.6)  # this project's AVX2 CPU, bfloat16
    study = load_study(write_study(tmp_path, family_f32, task_dir, methods=["slerp"], dtype="bfloat16"))
    with caplog.at_level(logging.WARNING, logger="mergetune.search.workspace"):
        workspace.Workspace.open(study)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "dtype bfloat16" in warning and "8x slower" in warning and "`dtype: float32`" in warning


def test_no_dtype_warning_where_the_dtype_is_native_or_float32_or_the_device_a_gpu():
    from mergetune.search.workspace import slow_dtype_warning

    def not_measured(dtype):
        raise AssertionError("measured although nothing could be said")

    assert slow_dtype_warning("cpu", "bfloat16", lambda dtype: 1.2) is None  # AVX-512 BF16 or AMX
    assert slow_dtype_warning("cpu", "float32", not_measured) is None
    assert slow_dtype_warning("cuda:0", "bfloat16", not_measured) is None


def test_the_dtype_probe_measures_this_cpu():
    from mergetune.devices import linear_slowdown

    for dtype in (torch.float32, torch.bfloat16):
        assert 0 < linear_slowdown(dtype) < math.inf


def test_any_mergekit_method_is_searched_from_its_declaration(family_f32, task_dir, tmp_path):
    """della and multislerp have no hand-written space: their declared parameters are the space."""
    path = write_study(
        tmp_path, family_f32, task_dir, methods=["della", "multislerp"], base_model=str(family_f32["base"]),
        budget={"n_trials": 3}, space={"della": {"filters": ["mlp"], "fixed": {"epsilon": 0.05}}},
    )
    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    board = build_leaderboard(load_study(path))
    assert {row.method for row in board.rows} == {"della", "multislerp"}
    # Any two methods are compared, the study's first against the other (not only slerp against dare_ties).
    assert [c.label for c in board.comparisons if "hand-written" not in c.label] == ["best della − best multislerp"]
    della = [yaml.safe_load(t.user_attrs["recipe"]) for t in trials(path, "della") if t.state == TrialState.COMPLETE]
    assert len({yaml.safe_dump(recipe) for recipe in della}) == len(della)  # each trial a different candidate
    merged = della[-1]["models"][1]["parameters"]
    assert [entry.get("filter") for entry in merged["density"]] == ["mlp", None] and merged["epsilon"] == 0.05


def test_della_s_default_space_proposes_only_candidates_it_can_merge(family_f32, task_dir, tmp_path):
    """DELLA merges only where density ± epsilon stays inside (0, 1); its declared ranges, searched
    independently, mostly did not (every trial failed)."""
    path = write_study(
        tmp_path, family_f32, task_dir, methods=["della"], base_model=str(family_f32["base"]), budget={"n_trials": 6},
    )
    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    stored = trials(path, "della")
    assert not [t.user_attrs.get("fail_reason") for t in stored if t.state == TrialState.FAIL]
    for trial in stored[1:]:  # after the hand-written baseline
        for model in yaml.safe_load(trial.user_attrs["recipe"])["models"][1:]:
            density, epsilon = model["parameters"]["density"], model["parameters"]["epsilon"]
            assert 0 < density - epsilon and density + epsilon < 1


@pytest.mark.parametrize(
    "space, message",
    [
        ({"della": {"parameters": {"lambda_": {"low": 0, "high": 1}}}}, "space.della.parameters: della has no parameter lambda_"),
        ({"della": {"parameters": {"density": {"low": 0.5, "high": 1.5}}}}, "density: [0.5, 1.5] is outside della's declared range (0.0, 1.0]"),
        ({"karcher": {}}, "karcher declares no numeric parameter with a range, so every candidate would be the same; give tol a range"),
        ({"model_stock": {}}, "model_stock declares no numeric parameter with a range, so every candidate would be the same; it has nothing to search"),
        (
            {"della": {"parameters": {"density": {"low": 0.3, "high": 0.8}, "epsilon": {"low": 0.01, "high": 0.5}}}},
            "space.della: density 0.3…0.8 with epsilon up to 0.5 gives density ± epsilon outside (0, 1)",
        ),
        (
            {"della_linear": {"parameters": {"density": {"low": 0.1, "high": 1.0}}, "fixed": {"epsilon": 0.05}}},
            "space.della_linear: density 0.1…1.0 with epsilon up to 0.05 gives density ± epsilon outside (0, 1)",
        ),
    ],
)
def test_a_declared_space_the_declaration_contradicts_is_refused_before_models_load(
    space, message, family_f32, task_dir, tmp_path
):
    methods = [next(iter(space))]
    path = write_study(tmp_path, family_f32, task_dir, methods=methods, base_model=str(family_f32["base"]), space=space)
    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 2 and message in result.output, result.output


def interrupted_then_run_again(
    path: Path, target: str, ctrl_c: Callable, monkeypatch, caplog, stopped_as: tuple[int, str] = (130, "interrupted")
) -> tuple[list[optuna.trial.FrozenTrial], list[optuna.trial.FrozenTrial]]:
    """The study run with `target` replaced by `ctrl_c` (which raises KeyboardInterrupt or sends a signal), exiting
    with `stopped_as` (exit code, last line), then run again to its end: the stored trials after each; on the second
    run the reaper says nothing (no trial left to wait for or fail)."""
    with monkeypatch.context() as patch:
        patch.setattr(target, ctrl_c)
        result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    code, line = stopped_as
    assert result.exit_code == code and result.output.strip().splitlines()[-1] == line, result.output
    assert "Traceback" not in result.output, result.output
    interrupted = trials(path, "slerp")
    with caplog.at_level(logging.WARNING, logger="mergetune.search.workers"):
        result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    assert [r.getMessage() for r in caplog.records if r.name == "mergetune.search.workers"] == []
    return interrupted, trials(path, "slerp")


def ctrl_c_as_trial_starts(number: int) -> Callable[[optuna.Trial, dict], None]:
    """A `set_worker` that raises KeyboardInterrupt for trial `number`: Ctrl-C right after `ask` created it."""

    def set_worker_or_ctrl_c(trial: optuna.Trial, worker: dict) -> None:
        if trial.number == number:
            raise KeyboardInterrupt
        set_worker(trial, worker)

    return set_worker_or_ctrl_c


def test_a_ctrl_c_as_a_trial_starts_fails_it_as_interrupted_and_the_next_run_goes_straight_on(
    family_f32, task_dir, tmp_path, monkeypatch, caplog
):
    """Ctrl-C right after `ask` created trial 2, before its worker named itself: left RUNNING and unnamed, the next
    run would wait out the grace period for it, then fail it as a dead worker's."""
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 4})
    before, after = interrupted_then_run_again(path, "mergetune.search.trials.set_worker", ctrl_c_as_trial_starts(2), monkeypatch, caplog)
    assert len(before) == 3 and before[2].state == TrialState.FAIL and before[2].user_attrs == {"fail_reason": "interrupted"}
    assert counted(after) == 4 and [(t.number, t.user_attrs.get("fail_reason")) for t in after if t.state == TrialState.FAIL] == [
        (2, "interrupted")
    ]
    assert [t.user_attrs for t in after[:2]] == [t.user_attrs for t in before[:2]]


def test_a_baseline_interrupted_by_ctrl_c_is_run_again_on_the_next_run(family_f32, task_dir, tmp_path, monkeypatch, caplog):
    """As a dead worker's trial: failed as interrupted, its parameters queued again (a baseline keeps its mark)."""
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 3})
    before, after = interrupted_then_run_again(path, "mergetune.search.trials.set_worker", ctrl_c_as_trial_starts(0), monkeypatch, caplog)
    assert is_baseline(before[0]) and before[0].user_attrs["fail_reason"] == "interrupted"
    [baseline] = [t for t in after if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and is_baseline(t)]
    assert baseline.params == before[0].system_attrs["fixed_params"] and baseline.system_attrs["retry_history"] == [0]
    assert counted(after) == 3
    board = build_leaderboard(load_study(path))
    assert failure_lines(board.failures) == [f"slerp: 1 failed trial, not ranked (trial 0 (run again as trial {baseline.number}): interrupted)"]


@pytest.fixture
def at_a_terminal():
    """SIGINT raises KeyboardInterrupt, as in a terminal, whatever pytest inherited: a shell's background job
    (`pytest &` in a script) starts with SIGINT ignored, and mergetune then leaves Ctrl-C alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


ASK = optuna.Study.ask


def signal_at_trial_2(original: Callable, signum: int = signal.SIGINT) -> Callable:
    """`original` (Optuna's `ask`, or a step of a trial) with `signum` delivered to this process while it handles
    trial 2: for `ask`, when it has created the trial but not yet returned it."""

    def with_signal(*args, **kwargs):
        result = original(*args, **kwargs)
        trial = result if isinstance(result, optuna.Trial) else args[0]
        if trial.number == 2:
            os.kill(os.getpid(), signum)
            time.sleep(0.2)  # the signal is handled here, inside the call
        return result

    return with_signal


ask_with_ctrl_c_at_trial_2 = signal_at_trial_2(ASK)


def test_a_ctrl_c_inside_ask_is_held_until_the_trial_exists_and_then_fails_it_as_interrupted(
    family_f32, task_dir, tmp_path, monkeypatch, caplog, at_a_terminal
):
    """SIGINT while Optuna's `ask` has created trial 2 but not yet returned it: raised there, it would leave the
    trial RUNNING and unnamed, for the next run to wait out the grace period."""
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 4})
    before, after = interrupted_then_run_again(path, "optuna.Study.ask", ask_with_ctrl_c_at_trial_2, monkeypatch, caplog)
    assert len(before) == 3 and before[2].state == TrialState.FAIL and before[2].user_attrs == {"fail_reason": "interrupted"}
    assert counted(after) == 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back as it was


def test_with_verbose_logging_each_trial_says_when_it_starts_and_how_it_ended(family_f32, task_dir, tmp_path, caplog):
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 3})
    with caplog.at_level(logging.INFO, logger="mergetune.search.runner"):
        assert runner.invoke(app, ["study", "run", str(path), "--quiet"]).exit_code == 0
    said = [r.getMessage() for r in caplog.records if r.name == "mergetune.search.runner" and ": trial " in r.getMessage()]
    stored = trials(path, "slerp")
    assert len(said) == 2 * len(stored) == 6
    for trial, (started, ended) in zip(stored, zip(said[::2], said[1::2])):
        assert started == f"slerp: trial {trial.number} started"
        score = f"complete: {100 * trial.value:.2f}," if trial.state == TrialState.COMPLETE else "pruned:"
        assert re.fullmatch(rf"slerp: trial {trial.number} {score} \d+ documents, [\d.]+ s", ended), ended


def test_a_sigterm_mid_trial_stops_the_study_as_a_ctrl_c_does_and_names_the_trial_terminated(
    family_f32, task_dir, tmp_path, monkeypatch, caplog, as_a_scheduled_job
):
    """A scheduler's preemption, `kill` or `timeout` sends SIGTERM, which used to end the process on the spot: the
    running trial then stayed RUNNING until the reaper's grace period ran out. Now it is stored as failed at once and
    its parameters queued again, and the command exits 143 without a traceback."""
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 4})
    sigterm_as_trial_2_is_built = signal_at_trial_2(set_candidate, signal.SIGTERM)
    before, after = interrupted_then_run_again(
        path, "mergetune.search.trials.set_candidate", sigterm_as_trial_2_is_built, monkeypatch, caplog, (143, "terminated")
    )
    assert before[2].state == TrialState.FAIL and before[2].user_attrs["fail_reason"] == "terminated"
    assert [t.state for t in before[3:]] == [TrialState.WAITING]  # its parameters, queued again
    [retry] = [t for t in after if t.system_attrs.get("retry_history") == [2]]
    assert retry.params == before[2].params and counted(after) == 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back as it was


def test_a_second_sigterm_while_the_first_one_stores_the_trial_does_not_cut_that_short(
    family_f32, task_dir, tmp_path, monkeypatch, caplog, as_a_scheduled_job
):
    """Schedulers and `timeout` may signal again, people press Ctrl-C twice: raised in the middle of storing the stopped
    trial, the second signal lost its queued parameters (or left it RUNNING for the reaper)."""
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 4})
    requeue = Reaper.requeue

    def signalled_again_as_it_queues(optuna_study, failed_id):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)  # handled here
        return requeue(optuna_study, failed_id)

    monkeypatch.setattr("mergetune.search.runner.Reaper.requeue", signalled_again_as_it_queues)
    before, after = interrupted_then_run_again(
        path, "mergetune.search.trials.set_candidate", signal_at_trial_2(set_candidate, signal.SIGTERM), monkeypatch, caplog,
        (143, "terminated"),
    )
    assert before[2].user_attrs["fail_reason"] == "terminated" and [t.state for t in before[3:]] == [TrialState.WAITING]
    [retry] = [t for t in after if t.system_attrs.get("retry_history") == [2]]
    assert retry.params == before[2].params


def test_a_sigterm_inside_ask_is_held_until_the_trial_exists(
    family_f32, task_dir, tmp_path, monkeypatch, caplog, as_a_scheduled_job
):
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 4})
    before, _ = interrupted_then_run_again(
        path, "optuna.Study.ask", signal_at_trial_2(ASK, signal.SIGTERM), monkeypatch, caplog, (143, "terminated")
    )
    assert len(before) == 3 and before[2].user_attrs == {"fail_reason": "terminated"}


def test_a_study_started_as_a_background_job_with_ctrl_c_ignored_leaves_it_ignored_and_runs_on(
    family_f32, task_dir, tmp_path, monkeypatch
):
    """A shell starts `mergetune study run … &` with SIGINT ignored so that a Ctrl-C at the terminal stops only the
    foreground; taking SIGINT over would let that Ctrl-C stop the study too."""
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 4})
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        monkeypatch.setattr(optuna.Study, "ask", ask_with_ctrl_c_at_trial_2)
        result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.exit_code == 0, result.output
    stored = trials(path, "slerp")
    assert counted(stored) == 4 and TrialState.FAIL not in {t.state for t in stored}


def test_a_ctrl_c_that_python_drops_in_a_finalizer_while_tasks_load_still_stops_the_study(
    family_f32, task_dir, tmp_path, monkeypatch, at_a_terminal
):
    """Python prints a KeyboardInterrupt raised inside a `__del__` or weakref callback (garbage collected in datasets
    or lm-eval as the tasks load) as "Exception ignored" and goes on: the study ran to its budget and exited 0."""
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 4})
    from mergetune.eval import evaluator

    load_task = evaluator.load_task

    class Collected:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.2)  # the signal is handled here, inside __del__, where Python drops the KeyboardInterrupt

    def load_task_then_collect(*args, **kwargs):
        loaded = list(load_task(*args, **kwargs))
        Collected()  # collected at once
        return loaded

    monkeypatch.setattr(evaluator, "load_task", load_task_then_collect)
    hook = sys.unraisablehook
    result = runner.invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 130 and result.output.strip().splitlines()[-1] == "interrupted", result.output
    assert "Traceback" not in result.output and "Exception ignored" not in result.output, result.output
    assert not (tmp_path / "tiny.db").exists()  # stopped before the storage file was created
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler and sys.unraisablehook is hook


def test_a_ctrl_c_just_after_a_trial_was_stored_keeps_it_as_it_ended(family_f32, task_dir, tmp_path, monkeypatch, caplog):
    path = write_study(tmp_path, family_f32, task_dir, methods=["slerp"], budget={"n_trials": 4})

    @contextlib.contextmanager
    def ctrl_c_as_trial_2_ends(storage, trial_id: int):
        with heartbeat(storage, trial_id):
            yield
        if storage.get_trial(trial_id).number == 2:
            raise KeyboardInterrupt

    before, after = interrupted_then_run_again(path, "mergetune.search.runner.heartbeat", ctrl_c_as_trial_2_ends, monkeypatch, caplog)
    assert len(before) == 3 and before[2].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert "fail_reason" not in before[2].user_attrs
    assert counted(after) == 4 and not [t for t in after if t.state == TrialState.FAIL]
    assert after[2].user_attrs == before[2].user_attrs and after[2].value == before[2].value  # not scored again


@pytest.mark.parametrize(
    "chose_parameters, then", [(False, "it had chosen no parameters: a fresh trial takes its place"), (True, "its parameters are queued again")]
)
def test_a_trial_no_worker_named_itself_for_is_failed_after_the_grace_period_and_a_late_one_is_warned_of_once(
    chose_parameters, then, caplog
):
    """Such a trial may be another worker's, asked a moment ago (not to be stolen), or one whose worker died as it
    started; the reaper cannot tell until the grace period has passed, and says so instead of waiting silently: at
    info level when it first sees the trial (the usual case, not a warning), as a warning once the wait is long."""
    study = optuna.create_study()
    trial = study.ask()
    if chose_parameters:
        trial.suggest_float("x", 0, 1)
    reaper = Reaper(grace_period=0.8)
    with caplog.at_level(logging.INFO, logger="mergetune.search.workers"):
        assert reaper.reap(study) == [] and reaper.reap(study) == []
        time.sleep(0.5)  # past half the grace period
        assert reaper.reap(study) == [] and reaper.reap(study) == []
        time.sleep(0.4)
        assert reaper.reap(study) == [0]
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "mergetune.search.workers"]
    assert [level for level, _ in said] == [logging.INFO, logging.WARNING, logging.WARNING]
    (_, first_seen), (_, late), (_, reaped) = said
    assert "trial 0 has no worker's name yet (most likely another worker asked for it a moment ago)" in first_seen
    assert re.search(r"trial 0 is running but no worker has named itself for it after \d s; if none does within 0.8 s", late)
    assert reaped.endswith(f"trial 0 failed: {DIED} (before it named itself); {then}")
    assert [t.state for t in study.trials] == [TrialState.FAIL] + [TrialState.WAITING] * chose_parameters
