"""Per-document evidence: what every score is computed from, in eval and in search alike.

A record keeps, for each suite entry, its headline metric's value on every
document scored: `{"tasks": {name: {"metric", "proxy", "docs": {lm_eval_task: [[doc_id, value], ...]}}}}`.
It is what a study stores with every trial, so scores, standard errors and paired
comparisons can always be re-derived from the storage. Plain Python only: the read
side (leaderboard, report) uses it without loading torch or lm-eval.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from mergetune.eval.results import EvalResult

Record = dict[str, Any]
Rows = Mapping[str, Sequence[Sequence[float]]]  # lm-eval task → [[doc_id, value], ...]


def record_from_result(result: "EvalResult") -> Record:
    """The headline metric of every document an evaluation scored."""
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
    """The union of two records of the same candidate on disjoint documents (a task may be in either or both:
    a racing schedule's first documents need not cover every task)."""
    tasks = {}
    for name in sorted(first["tasks"].keys() | second["tasks"].keys()):
        parts = [record["tasks"][name] for record in (first, second) if name in record["tasks"]]
        docs: dict[str, list] = {}
        for part in parts:
            for leaf, rows in part["docs"].items():
                docs.setdefault(leaf, []).extend(rows)
        tasks[name] = {"metric": parts[0]["metric"], "proxy": parts[0]["proxy"], "docs": docs}
    combined = {"tasks": tasks}
    repeated = repeated_documents(combined)
    if repeated:
        raise ValueError(f"records to combine must be disjoint; both hold {repeated[0]}")
    return combined


def repeated_documents(record: Record) -> list[str]:
    """`leaf document` of each document the record holds more than once (none should: each is scored once)."""
    found = []
    for task in record["tasks"].values():
        for leaf, rows in task["docs"].items():
            seen: set = set()
            for doc, _ in rows:
                if doc in seen:
                    found.append(f"{leaf} document {doc}")
                seen.add(doc)
    return found


def mean_and_stderr(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """The mean of per-document values and its standard error (None for a single document)."""
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def average(values: Sequence[float], stderrs: Sequence[Optional[float]]) -> tuple[float, Optional[float]]:
    """Unweighted mean of the tasks' headline values; its stderr treats the tasks as independent."""
    mean_value = sum(values) / len(values)
    if None in stderrs:
        return mean_value, None
    return mean_value, math.sqrt(sum(s * s for s in stderrs)) / len(stderrs)  # type: ignore[operator]


def paired_differences(a: Rows, b: Rows) -> list[float]:
    """b − a for every document both scored, matched by lm-eval task and document id."""
    diffs = []
    for leaf, rows in a.items():
        by_id = {doc_id: value for doc_id, value in b.get(leaf, ())}
        diffs += [by_id[doc_id] - value for doc_id, value in rows if doc_id in by_id]
    return diffs


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
        mean, stderr = mean_and_stderr(values)
        tasks[name] = TaskSummary(mean, stderr, len(values), task["metric"], task["proxy"])
    mean_value, mean_error = average([t.value for t in tasks.values()], [t.stderr for t in tasks.values()])
    return Summary(tasks, mean_value, mean_error)


@dataclass(frozen=True)
class PairedDifference:
    mean: float  # average over tasks of (b - a)
    low: float
    high: float
    n_docs: int


def _mean_of_means(groups: Iterable[Sequence[float]]) -> float:
    means = [sum(group) / len(group) for group in groups]
    return sum(means) / len(means)


def paired_bootstrap(a: Record, b: Record, iterations: int = 2000, seed: int = 0, level: float = 0.95) -> PairedDifference:
    """Bootstrap CI of the difference in average score, resampling the shared documents of each task."""
    pairs: dict[str, list[float]] = {}
    for name, task_a in a["tasks"].items():
        task_b = b["tasks"].get(name)
        diffs = paired_differences(task_a["docs"], task_b["docs"]) if task_b else []
        if diffs:
            pairs[name] = diffs
    if not pairs:
        raise ValueError("the two records share no documents")
    rng = random.Random(seed)
    estimates = sorted(
        _mean_of_means([rng.choice(diffs) for _ in diffs] for diffs in pairs.values()) for _ in range(iterations)
    )
    tail = (1 - level) / 2
    low = estimates[int(tail * (iterations - 1))]
    high = estimates[int((1 - tail) * (iterations - 1))]
    return PairedDifference(_mean_of_means(pairs.values()), low, high, sum(len(d) for d in pairs.values()))
