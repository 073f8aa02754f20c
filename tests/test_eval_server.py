"""The `server` backend end to end: lm-eval's local-completions against a real HTTP server on loopback."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from eval_fixtures import TOY_TASK
from mergetune.cli import app
from mergetune.errors import MergetuneError
from mergetune.eval import EvalConfig, Evaluator, EvalResult
from mergetune.eval.backends.server import completions_url

pytest_plugins = ["eval_fixtures"]  # session fixtures shared by every test_eval_* module


@pytest.fixture(scope="module")
def hf_reference(eval_models, toy_task_dir) -> Evaluator:
    return Evaluator.from_dir(eval_models["base"], EvalConfig(tasks=(TOY_TASK,), include_paths=(toy_task_dir,)), batch_size=1)


def test_served_scores_equal_in_process_scores(completions_server, hf_reference, eval_models, toy_task_dir):
    url, handler = completions_server
    served = Evaluator.from_dir(
        eval_models["base"],
        EvalConfig(tasks=(TOY_TASK,), include_paths=(toy_task_dir,)),
        backend="server",
        base_url=url,
        num_concurrent=4,
    )
    result = served.score()
    reference = hf_reference.score(doc_ids=result.doc_ids)
    assert result.doc_ids == reference.doc_ids and result.tasks[TOY_TASK].n_docs == 12
    assert result.tasks[TOY_TASK].metrics == reference.tasks[TOY_TASK].metrics
    assert handler.requests_served == sum(len(d.requests) for p in served._prepared.values() for d in p.docs)

    requests = [r for p in served._prepared.values() for d in p.docs for r in d.requests]
    for (ours, greedy), (theirs, their_greedy) in zip(
        served.backend.loglikelihood(requests), hf_reference.backend.loglikelihood(requests), strict=True
    ):
        assert ours == pytest.approx(theirs, abs=1e-4) and greedy == their_greedy
    assert result.backend == {"backend": "server", "url": url + "/completions", "model": str(eval_models["base"])}


def test_cli_scores_a_served_model_and_writes_json(completions_server, eval_models, toy_task_dir, tmp_path):
    url, _ = completions_server
    out = tmp_path / "served.json"
    result = CliRunner().invoke(
        app,
        ["eval", str(eval_models["base"]), "--tasks", TOY_TASK, "--include-path", str(toy_task_dir),
         "--backend", "server", "--base-url", url, "--limit", "4", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    assert TOY_TASK in result.output
    assert EvalResult.read_json(out).tasks[TOY_TASK].n_docs == 4


def test_unreachable_server_is_a_clear_error(eval_models, toy_task_dir):
    served = Evaluator.from_dir(
        eval_models["base"],
        EvalConfig(tasks=(TOY_TASK,), include_paths=(toy_task_dir,), limit=1),
        backend="server",
        base_url="http://127.0.0.1:9",  # discard port: nothing listens
        max_retries=1,
    )
    with pytest.raises(MergetuneError, match="127.0.0.1:9/v1/completions"):
        served.score()


def test_an_unreachable_server_is_one_line_not_a_log_of_every_retry(eval_models, toy_task_dir, caplog):
    """Every concurrent request fails and is retried: lm-eval logged each attempt and asyncio each failed task's
    traceback (1,300 lines for 5 documents), burying the error."""
    args = ["eval", str(eval_models["base"]), "--backend", "server", "--base-url", "http://127.0.0.1:9"]
    with caplog.at_level(logging.WARNING):
        result = CliRunner().invoke(app, [*args, "--tasks", TOY_TASK, "--include-path", str(toy_task_dir), "--limit", "2"])
    assert result.exit_code == 2, result.output
    assert result.output.count("error: completions server http://127.0.0.1:9/v1/completions failed: ") == 1
    assert "Traceback" not in result.output
    assert [r.name for r in caplog.records if r.name == "asyncio" or r.name.startswith("lm_eval.models")] == []


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://h:8000", "http://h:8000/v1/completions"),
        ("http://h:8000/v1/", "http://h:8000/v1/completions"),
        ("https://h/v1/completions", "https://h/v1/completions"),
    ],
)
def test_completions_url_accepts_a_root_a_v1_base_or_the_full_url(given, expected):
    assert completions_url(given) == expected


def test_the_server_truncates_at_the_models_window_as_the_hf_backend_does(completions_server, hf_reference, eval_models):
    url, _ = completions_server
    served = Evaluator.from_dir(
        eval_models["base"], hf_reference.config, backend="server", base_url=url
    )
    # The model's own window (512 here, not a fixed 2048); lm-eval's API models keep one position for a
    # generated token, as the server needs it.
    assert served.backend.lm.max_length == hf_reference.backend.lm.max_length - 1 == 511
