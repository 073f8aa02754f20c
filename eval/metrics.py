"""Aggregation: per-document values -> task and group metrics with standard errors, as lm-eval computes them.

Task metrics use the task's own aggregation functions and lm-eval's stderr
functions; groups (MMLU) use lm-eval's `Group.aggregate`. The values therefore
equal those `lm_eval` reports for the same documents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lm_eval.api.metrics import mean, mean_stderr, stderr_for_metric
from lm_eval.api.task import Task

from mergetune.eval.quiet import quieted
from mergetune.eval.results import DocResult
from mergetune.eval.tasks import LoadedTask

_FILTER = "none"  # lm-eval's key for unfiltered responses, the only kind scored here

Metrics = dict[str, float]
Stderrs = dict[str, float | None]


def task_metrics(task: Task, docs: Sequence[DocResult], bootstrap_iters: int) -> dict[str, Any]:
    """One task's aggregates in lm-eval's result format ("acc,none", "acc_stderr,none", "sample_len")."""
    metrics: dict[str, Any] = {"sample_len": len(docs)}
    aggregations = task.aggregation()
    for name in docs[0].metrics:
        values = [doc.metrics[name] for doc in docs]
        aggregate = aggregations.get(name, mean)
        metrics[f"{name},{_FILTER}"] = aggregate(values)
        stderr = stderr_for_metric(aggregate, bootstrap_iters) if bootstrap_iters > 0 else None
        metrics[f"{name}_stderr,{_FILTER}"] = stderr(values) if stderr and len(values) > 1 else "N/A"
    return metrics


def _split(lm_eval_metrics: Mapping[str, Any]) -> tuple[Metrics, Stderrs]:
    """lm-eval's flat "metric,filter" keys -> ({metric: value}, {metric: stderr or None})."""
    values, stderrs = {}, {}
    for key, value in lm_eval_metrics.items():
        name, _, filter_key = key.partition(",")
        if filter_key != _FILTER:
            continue
        if name.endswith("_stderr"):
            stderrs[name.removesuffix("_stderr")] = None if value == "N/A" else float(value)
        else:
            values[name] = float(value)
    return values, {name: stderrs.get(name) for name in values}


def entry_metrics(entry: LoadedTask, docs: Mapping[str, Sequence[DocResult]], bootstrap_iters: int) -> tuple[Metrics, Stderrs]:
    """Metrics and stderrs of a suite entry: its task's, or its group's aggregate over the scored subtasks.

    lm-eval pools a group's subtask stderrs and reports none when any subtask has
    a single document, the usual case for a small stratified MMLU sample. For a
    size-weighted group metric, the group value is the mean over all the group's
    documents, so the standard error of that mean stands in.
    """
    per_task = {name: task_metrics(entry.leaves[name], task_docs, bootstrap_iters) for name, task_docs in docs.items()}
    if entry.group is None:
        return _split(per_task[entry.name])
    # lm-eval warns about subtasks without results: unsampled subjects are expected here.
    with quieted("lm_eval.api.group"):
        values, stderrs = _split(entry.group.aggregate(per_task))
    for config in entry.group.aggregate_metric_list:
        if config.weight_by_size and config.metric in values and stderrs[config.metric] is None:
            pooled = [doc.metrics[config.metric] for task_docs in docs.values() for doc in task_docs]
            stderrs[config.metric] = mean_stderr(pooled) if len(pooled) > 1 else None
    return values, stderrs
