"""mergetune's scores are lm-eval's: the same documents through `lm_eval` (CLI, subprocess) agree exactly."""

from __future__ import annotations

import pytest

from eval_fixtures import LM_EVAL_BATCH_SIZE as BATCH_SIZE
from mergetune.eval import EvalConfig, Evaluator

pytest_plugins = ["eval_fixtures"]  # session fixtures shared by every test_eval_* module

SHOTS = 2
TASKS = ("arc_challenge", "winogrande", "truthfulqa_mc2", "hellaswag_proxy_llamacpp", "mmlu")


@pytest.fixture(scope="module")
def both(eval_models, benchmarks_dir, lm_eval_cli):
    """mergetune's result and lm_eval's on the same documents: 5 per task, one per MMLU subject.

    On lm-eval's own scoring path, which must agree bit for bit; the shared-prefix path sums in another
    order and agrees within 1e-4 (tests/test_eval_prefix.py).
    """
    evaluator = Evaluator.from_dir(
        eval_models["base"],
        EvalConfig(tasks=TASKS, data_dir=benchmarks_dir, num_fewshot=SHOTS),
        batch_size=BATCH_SIZE,
        shared_prefix=False,
    )
    doc_ids = evaluator.sample_doc_ids(TASKS[:-1], limit=5, seed=3) | evaluator.sample_doc_ids(["mmlu"], limit=57)
    ours = evaluator.score(doc_ids=doc_ids)
    theirs = lm_eval_cli(eval_models["base"], benchmarks_dir, TASKS, ours.doc_ids, SHOTS)
    return ours, theirs


def test_task_metrics_and_stderrs_equal_lm_eval_cli_exactly(both):
    ours, theirs = both
    for name in TASKS[:-1]:
        score, reference = ours.tasks[name], theirs["results"][name]
        assert reference["sample_len"] == score.n_docs == 5
        for metric, value in score.metrics.items():
            assert value == reference[f"{metric},none"], (name, metric)
            assert score.stderrs[metric] == reference[f"{metric}_stderr,none"], (name, metric)


def test_per_document_values_equal_lm_eval_samples(both):
    ours, theirs = both
    for score in ours.tasks.values():
        for task, docs in score.docs.items():
            logged = {row["doc_id"]: row for row in theirs["samples"][task]}
            assert sorted(logged) == [doc.doc_id for doc in docs], task
            for doc in docs:
                for metric, value in doc.metrics.items():
                    assert value == logged[doc.doc_id][metric], (task, doc.doc_id, metric)


def test_mmlu_is_aggregated_as_lm_eval_aggregates_its_group(both):
    ours, theirs = both
    mmlu, reference = ours.tasks["mmlu"], theirs["results"]["mmlu"]
    assert len(mmlu.docs) == 57 and mmlu.n_docs == 57  # stratified: one document per subject
    assert mmlu.value == reference["acc,none"]
    # lm-eval has no group stderr when a subject has one document; mergetune reports
    # the standard error over the group's documents instead (docs/eval.md).
    assert reference["acc_stderr,none"] == "N/A"
    values = [doc.metrics["acc"] for docs in mmlu.docs.values() for doc in docs]
    mean = sum(values) / len(values)
    assert mmlu.stderr == pytest.approx((sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5)
