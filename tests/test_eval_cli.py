"""`mergetune eval` from a user's seat: a table, JSON with metrics, stderrs and document ids, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from eval_fixtures import TOY_TASK
import mergetune.eval.tasks as tasks
from mergetune.cli import app

pytest_plugins = ["eval_fixtures"]  # session fixtures shared by every test_eval_* module

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["eval", *map(str, args)], env={"COLUMNS": "200"})  # a table row per line


def test_table_and_json_report_metrics_stderrs_and_document_ids(eval_models, toy_task_dir, tmp_path):
    out = tmp_path / "scores.json"
    result = run(eval_models["base"], "--tasks", TOY_TASK, "--include-path", toy_task_dir, "--limit", "5", "--seed", "4", "--json", out)
    assert result.exit_code == 0, result.output
    assert TOY_TASK in result.output and "± stderr" in result.output

    data = json.loads(out.read_text())
    task = data["tasks"][TOY_TASK]
    assert task["metric"] == "acc" and set(task["metrics"]) == set(task["stderrs"]) == {"acc", "acc_norm"}
    assert len(task["doc_ids"][TOY_TASK]) == task["n_docs"] == 5
    assert [row["doc_id"] for row in task["docs"][TOY_TASK]] == task["doc_ids"][TOY_TASK]
    assert task["value"] == sum(row["acc"] for row in task["docs"][TOY_TASK]) / 5
    assert data["backend"]["backend"] == "hf" and data["timing"]["forward_seconds"] > 0

    # A later run repeats the same documents from the JSON, whatever its --limit and --seed.
    again = tmp_path / "again.json"
    result = run(eval_models["other"], "--tasks", TOY_TASK, "--include-path", toy_task_dir, "--doc-ids", out, "--json", again)
    assert result.exit_code == 0, result.output
    assert json.loads(again.read_text())["tasks"][TOY_TASK]["doc_ids"] == task["doc_ids"]

    # A task the file has no ids for is refused, not left out of the table.
    elsewhere = tmp_path / "other_ids.json"
    elsewhere.write_text(json.dumps({"arc_easy": [0, 1]}))
    result = run(eval_models["other"], "--tasks", TOY_TASK, "--include-path", toy_task_dir, "--doc-ids", elsewhere)
    assert result.exit_code == 2 and f"--doc-ids {elsewhere} has no document ids for {TOY_TASK}, which this run scores" in result.output


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_model_is_scored_in_the_dtype_asked_for(dtype, eval_models, toy_task_dir, tmp_path):
    out = tmp_path / "scores.json"
    result = run(eval_models["base"], "--tasks", TOY_TASK, "--include-path", toy_task_dir, "--limit", "3", "--dtype", dtype, "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["backend"]["dtype"] == dtype


def test_leaderboard_suite_on_local_data_uses_its_fewshot_counts_and_labels_the_proxy(eval_models, benchmarks_dir, tmp_path):
    out = tmp_path / "leaderboard.json"
    result = run(eval_models["base"], "--suite", "leaderboard", "--data-dir", benchmarks_dir, "--limit", "2", "--batch-size", "8", "--json", out)
    assert result.exit_code == 0, result.output
    assert "hellaswag_proxy_llamacpp (proxy)" in result.output and "average (includes proxy)" in result.output
    data = json.loads(out.read_text())
    shots = {name: task["num_fewshot"] for name, task in data["tasks"].items()}
    assert shots == {"arc_challenge": 25, "hellaswag_proxy_llamacpp": 10, "truthfulqa_mc2": 0, "mmlu": 5, "winogrande": 5}
    assert {name: task["metric"] for name, task in data["tasks"].items()} == {
        "arc_challenge": "acc_norm", "hellaswag_proxy_llamacpp": "acc_norm", "truthfulqa_mc2": "acc", "mmlu": "acc", "winogrande": "acc"
    }
    assert data["tasks"]["hellaswag_proxy_llamacpp"]["proxy"] and data["average"]["includes_proxy"]
    assert data["average"]["value"] == pytest.approx(sum(t["value"] for t in data["tasks"].values()) / 5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tasks", "no_such_task"], "unknown task 'no_such_task'"),
        (["--tasks", TOY_TASK, "--data-dir", "/nonexistent/data"], "--data-dir /nonexistent/data does not exist"),
        ([], "give --suite leaderboard or --tasks"),
        (["--tasks", TOY_TASK, "--backend", "tpu"], "unknown --backend 'tpu'"),
        (["--tasks", TOY_TASK, "--backend", "server"], "needs the server's URL (--base-url)"),
        (["--tasks", TOY_TASK, "--batch-size", "big"], "--batch-size must be an integer or 'auto'"),
        (["--tasks", TOY_TASK, "--doc-ids", "/nonexistent/ids.json"], "--doc-ids /nonexistent/ids.json: not a mergetune --json output"),
        (["--tasks", TOY_TASK, "--doc-ids", "/nonexistent/ids.json", "--limit", "3"], "--limit and --doc-ids: give one"),
        (["--tasks", TOY_TASK, "--doc-ids", "/nonexistent/ids.json", "--seed", "3"], "--seed and --doc-ids: give one"),
        (["--tasks", TOY_TASK, "--dtype", "half"], "--dtype 'half': use one of auto, float32, bfloat16, float16"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(eval_models, toy_task_dir, args, message):
    result = run(eval_models["base"], "--include-path", toy_task_dir, *args)
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"tasks": {TOY_TASK: {"doc_ids": {TOY_TASK: [1.5, 2]}}}}, "1.5 is not a document id"),  # was a KeyError traceback
        ({TOY_TASK: ["7", 2]}, '"7" is not a document id'),
        ({TOY_TASK: [True, 2]}, "true is not a document id"),  # was scored as document 1
        ({TOY_TASK: None}, "expected a list of document ids, got null"),
        ({TOY_TASK: [3, 3]}, "document id(s) 3 listed more than once"),  # was scored once, silently
    ],
)
def test_document_ids_that_are_not_distinct_whole_numbers_are_refused(eval_models, toy_task_dir, tmp_path, content, message):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps(content))
    result = run(eval_models["base"], "--include-path", toy_task_dir, "--tasks", TOY_TASK, "--doc-ids", ids)
    assert result.exit_code == 2 and f"--doc-ids {ids}: task {TOY_TASK}: {message}" in result.output, result.output


def test_missing_model_directory_is_named(tmp_path, toy_task_dir):
    result = run(tmp_path / "nowhere", "--tasks", TOY_TASK, "--include-path", toy_task_dir)
    assert result.exit_code == 2 and f"model directory {tmp_path / 'nowhere'} does not exist" in result.output


def test_a_checkpoint_without_weights_is_refused_before_the_task_index(eval_models, toy_task_dir, tmp_path, monkeypatch):
    weightless = shutil.copytree(eval_models["base"], tmp_path / "weightless", ignore=shutil.ignore_patterns("*.safetensors*"))
    monkeypatch.setattr(tasks, "task_manager", lambda *args, **kwargs: pytest.fail("the task index was built first"))
    result = run(weightless, "--tasks", TOY_TASK, "--include-path", toy_task_dir)
    assert result.exit_code == 2 and f"model directory {weightless} has no weights" in result.output


def test_a_data_dir_missing_a_split_file_names_the_task_the_file_and_the_option(eval_models, tmp_path):
    folder = tmp_path / "data" / "arc_easy"
    folder.mkdir(parents=True)
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text("{}\n")
    result = run(eval_models["base"], "--tasks", "arc_easy", "--data-dir", tmp_path / "data")
    assert result.exit_code == 2
    assert f"--data-dir {tmp_path / 'data'}: task 'arc_easy' needs its 'validation' split, {folder / 'validation.jsonl'}" in result.output
    # Another task is told what it lacks itself, not arc_easy's missing file.
    result = run(eval_models["base"], "--tasks", "winogrande", "--data-dir", tmp_path / "data")
    assert result.exit_code == 2
    assert f"--data-dir {tmp_path / 'data'}: has no data for task 'winogrande' (a folder {tmp_path / 'data' / 'winogrande'}" in result.output
