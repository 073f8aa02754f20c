"""Suites and local data: lm-eval's task definitions, fed from JSONL files, with the user's own tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval_fixtures import TOY_GENERATE_TASK, TOY_TASK
from mergetune.errors import MergetuneError
from mergetune.eval import EvalConfig
from mergetune.eval import tasks as task_module
from mergetune.eval.evaluator import load_tasks
from mergetune.eval.local_data import local_task_configs
from mergetune.eval.tasks import SuiteTask, suite_tasks

pytest_plugins = ["eval_fixtures"]  # session fixtures shared by every test_eval_* module

ARC_ROWS = [
    {"id": f"q{i}", "question": f"which is number {i} ?", "choices": {"text": ["one", "two", "three"], "label": ["A", "B", "C"]}, "answerKey": "ABC"[i % 3]}
    for i in range(6)
]


def write_arc_easy(data_dir: Path) -> None:
    """A miniature arc_easy in the hub schema, as --data-dir expects it."""
    folder = data_dir / "arc_easy"
    folder.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ARC_ROWS))


def test_shared_data_feeds_lm_eval_tasks_of_the_same_names(benchmarks_dir):
    names = set(local_task_configs(benchmarks_dir))
    assert {"arc_challenge", "arc_easy", "truthfulqa_mc1", "truthfulqa_mc2", "winogrande", "hellaswag_proxy_llamacpp"} <= names
    assert sum(name.startswith("mmlu_") for name in names) == 57
    assert "hellaswag" not in names  # no real HellaSwag data there


def test_only_datasets_present_in_the_data_dir_become_local_tasks(tmp_path):
    write_arc_easy(tmp_path)
    (tmp_path / "winogrande").mkdir()  # incomplete: no split files
    assert list(local_task_configs(tmp_path)) == ["arc_easy"]


def test_a_local_task_keeps_lm_eval_prompts_and_reads_the_local_rows(tmp_path):
    write_arc_easy(tmp_path)
    (task,) = load_tasks(EvalConfig(tasks=("arc_easy",), data_dir=tmp_path, num_fewshot=1))["arc_easy"].leaves.values()
    assert len(task.eval_docs) == 6
    assert task.doc_to_text(task.eval_docs[2]) == "Question: which is number 2 ?\nAnswer:"  # lm-eval's arc_easy prompt
    assert task.get_config("num_fewshot") == 1


def test_leaderboard_scores_hellaswag_on_its_labelled_proxy_when_only_the_proxy_is_local(benchmarks_dir):
    names = [entry.name for entry in suite_tasks("leaderboard", (), benchmarks_dir)]
    assert names == ["arc_challenge", "hellaswag_proxy_llamacpp", "truthfulqa_mc2", "mmlu", "winogrande"]
    assert [e.name for e in suite_tasks("leaderboard", (), None)][1] == "hellaswag"
    assert suite_tasks("leaderboard", ("arc_easy",), None)[-1] == SuiteTask("arc_easy")


def test_one_fewshot_count_for_all_keeps_tasks_that_pin_zero_at_zero(benchmarks_dir):
    tasks = load_tasks(EvalConfig(tasks=("truthfulqa_mc2", "arc_easy"), data_dir=benchmarks_dir, num_fewshot=3))
    assert tasks["truthfulqa_mc2"].num_fewshot == 0 and tasks["arc_easy"].num_fewshot == 3
    assert tasks["truthfulqa_mc2"].proxy is None


def test_user_task_directories_join_the_suite(toy_task_dir):
    tasks = load_tasks(EvalConfig(tasks=(TOY_TASK,), include_paths=(toy_task_dir,)))
    assert tasks[TOY_TASK].metric == "acc" and len(tasks[TOY_TASK].leaves[TOY_TASK].eval_docs) == 12


@pytest.mark.parametrize(
    ("names", "with_lm_evals_tasks"),
    [
        ((TOY_TASK,), False),  # the user's own task
        (("arc_easy", "winogrande"), False),  # local copies of single tasks
        ((TOY_TASK, "mmlu"), True),  # a group: lm-eval's, over the local subjects
        ((TOY_TASK, "lambada_openai"), True),  # a task only lm-eval has (loading it would need the hub)
    ],
)
def test_lm_evals_task_index_is_built_only_for_names_the_include_paths_do_not_hold_as_tasks(
    names, with_lm_evals_tasks, toy_task_dir, benchmarks_dir, monkeypatch
):
    """Indexing lm-eval's ~15k configs takes seconds in every new process (each study worker); a study of its own
    tasks, or of local copies of single benchmarks, needs none of them (and loads them: the tests above)."""
    full_index, own_index = object(), task_module.task_manager

    def without_lm_evals_index(paths, defaults=True):  # the full index takes seconds; only which one is chosen counts
        return full_index if defaults else own_index(paths, False)

    monkeypatch.setattr(task_module, "task_manager", without_lm_evals_index)
    chosen = task_module.task_manager_for(task_module.include_paths(benchmarks_dir, (toy_task_dir,)), names)
    assert (chosen is full_index) is with_lm_evals_tasks


def test_generation_tasks_are_refused_by_name(toy_task_dir):
    with pytest.raises(MergetuneError, match=f"'{TOY_GENERATE_TASK}' has output type 'generate_until'"):
        load_tasks(EvalConfig(tasks=(TOY_GENERATE_TASK,), include_paths=(toy_task_dir,)))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (EvalConfig(suite="no_such_suite"), "unknown suite 'no_such_suite'"),
        (EvalConfig(), "nothing to score"),
        (EvalConfig(tasks=("arc_easy",), data_dir="/nonexistent/data"), "--data-dir /nonexistent/data does not exist"),
        (EvalConfig(tasks=("arc_easy",), include_paths=("/nonexistent/tasks",)), "/nonexistent/tasks (--include-path) does not exist"),
    ],
)
def test_configuration_errors_name_the_problem(config, message):
    with pytest.raises(MergetuneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_tasks(config)


def test_a_generation_task_of_lm_eval_is_refused_before_its_data_is_fetched(monkeypatch):
    """gsm8k's data is on the hub: offline, fetching it retried for half a minute before the refusal came."""
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(TaskManager, "load", lambda *args, **kwargs: pytest.fail("the task's data was loaded"))
    with pytest.raises(MergetuneError, match="task 'gsm8k' has output type 'generate_until'; mergetune scores log-likelihood"):
        load_tasks(EvalConfig(tasks=("gsm8k",)))


def test_unknown_task_names_are_named(toy_task_dir):
    with pytest.raises(MergetuneError, match="unknown task 'no_such_task'"):
        load_tasks(EvalConfig(tasks=(TOY_TASK, "no_such_task"), include_paths=(toy_task_dir,)))


def test_an_empty_data_dir_lists_the_expected_folders(tmp_path):
    with pytest.raises(MergetuneError, match="holds none of the known datasets.*arc_challenge"):
        load_tasks(EvalConfig(tasks=("arc_easy",), data_dir=tmp_path))
