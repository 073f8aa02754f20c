"""Per-document evidence stored with every trial, and the scores recomputed from it.

A record keeps, for each suite entry, its headline metric's value on every
document scored: `{"tasks": {name: {"metric", "proxy", "docs": {lm_eval_task: [[doc_id, value], ...]}}}}`.
Scores, standard errors and paired comparisons are all computed from records, so
a leaderboard can always be re-derived from what is in the study's storage.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Optional

from mergetune.eval import EvalResult

Record = dict[str, Any]


def record_from_result(result: EvalResult) -> Record:
    tasks = {}
    for name, score in result.tasks.items():
        tasks[name] = {
            "metric": score.metric,
            "proxy": score.proxy,
            "docs": {
                leaf: [[doc.doc_id, doc.metrics[score.metric]] for doc in docs] for leaf, docs in score.docs.items()
            },
        }
    return {"tasks": tasks}


def combine(first: Record, second: Record) -> Record:
    """The union of two records of the same candidate on disjoint documents."""
    tasks = {}
    for name in first["tasks"].keys() | second["tasks"].keys():
        a = first["tasks"].get(name) or second["tasks"][name]
        b = second["tasks"].get(name, {"docs": {}})
        docs = {leaf: list(rows) for leaf, rows in a["docs"].items()}
        for leaf, rows in b["docs"].items():
            docs.setdefault(leaf, []).extend(rows)
        tasks[name] = {"metric": a["metric"], "proxy": a["proxy"], "docs": docs}
    return {"tasks": tasks}


@dataclass(frozen=True)
class TaskSummary:
    value: float
    stderr: Optional[float]
    n: int
    metric: str
    proxy: Optional[str]


@dataclass(frozen=True)
class Summary:
    tasks: dict[str, TaskSummary]
    average: float
    average_stderr: Optional[float]


def _values(task: dict) -> list[float]:
    return [value for rows in task["docs"].values() for _, value in rows]


def summarize(record: Record) -> Summary:
    """Each entry's mean over its documents (lm-eval's size-weighted group mean for MMLU), and the average."""
    tasks = {}
    for name, task in sorted(record["tasks"].items()):
        values = _values(task)
        n = len(values)
        mean = sum(values) / n
        stderr = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None
        tasks[name] = TaskSummary(mean, stderr, n, task["metric"], task["proxy"])
    errors = [task.stderr for task in tasks.values()]
    average_stderr = None if None in errors else math.sqrt(sum(e * e for e in errors)) / len(errors)
    return Summary(tasks, sum(task.value for task in tasks.values()) / len(tasks), average_stderr)


@dataclass(frozen=True)
class PairedDifference:
    mean: float  # average over tasks of (b - a)
    low: float
    high: float
    n_docs: int


def paired_bootstrap(a: Record, b: Record, iterations: int = 2000, seed: int = 0, level: float = 0.95) -> PairedDifference:
    """Bootstrap CI of the difference in average score, resampling the shared documents of each task."""
    pairs: dict[str, list[float]] = {}
    for name, task_a in a["tasks"].items():
        task_b = b["tasks"].get(name)
        if task_b is None:
            continue
        diffs = []
        for leaf, rows in task_a["docs"].items():
            by_id = {doc_id: value for doc_id, value in task_b["docs"].get(leaf, [])}
            diffs += [by_id[doc_id] - value for doc_id, value in rows if doc_id in by_id]
        if diffs:
            pairs[name] = diffs
    if not pairs:
        raise ValueError("the two records share no documents")
    rng = random.Random(seed)

    def average(sample: dict[str, list[float]]) -> float:
        return sum(sum(d) / len(d) for d in sample.values()) / len(sample)

    estimates = sorted(
        average({name: [rng.choice(diffs) for _ in diffs] for name, diffs in pairs.items()}) for _ in range(iterations)
    )
    tail = (1 - level) / 2
    low = estimates[int(tail * (iterations - 1))]
    high = estimates[int((1 - tail) * (iterations - 1))]
    return PairedDifference(average(pairs), low, high, sum(len(d) for d in pairs.values()))
