"""Scores with their evidence: per-task metrics, standard errors, document ids, per-document results.

Every score carries the ids of the documents it was computed on, so another
candidate can be scored on the same documents (`EvalResult.doc_ids` is the
`doc_ids` argument of `Evaluator.score`, and the `--samples` argument of
`lm_eval`), and the per-document values, so candidates can be compared pairwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mergetune.errors import MergetuneError
from mergetune.eval.evidence import mean_and_stderr, paired_differences

FORMAT_VERSION = 1


@dataclass(frozen=True)
class DocResult:
    """One document's metric values (1.0 / 0.0 for accuracies; truthfulqa_mc2's is a probability)."""

    doc_id: int
    metrics: dict[str, float]


@dataclass
class TaskScore:
    """One suite entry: its headline metric and every metric lm-eval reports for it.

    For a group (MMLU) the values are lm-eval's group aggregate and `docs` holds
    each subtask's documents.
    """

    name: str
    metric: str
    value: float
    stderr: float | None
    num_fewshot: int | None
    metrics: dict[str, float]
    stderrs: dict[str, float | None]
    docs: dict[str, list[DocResult]]
    #: why the score is only an approximation (stand-in data), else None
    proxy: str | None = None

    @property
    def doc_ids(self) -> dict[str, list[int]]:
        return {task: [doc.doc_id for doc in docs] for task, docs in self.docs.items()}

    def rows(self, metric: str) -> dict[str, list[tuple[int, float]]]:
        """(doc_id, value of `metric`) per lm-eval task: the shape `mergetune.eval.evidence` pairs on."""
        return {task: [(doc.doc_id, doc.metrics[metric]) for doc in docs] for task, docs in self.docs.items()}

    @property
    def n_docs(self) -> int:
        return sum(len(docs) for docs in self.docs.values())

    @property
    def label(self) -> str:
        return f"{self.name} (proxy)" if self.proxy else self.name


@dataclass
class EvalResult:
    tasks: dict[str, TaskScore]
    #: unweighted mean of the tasks' headline values, and its standard error
    average: float | None
    average_stderr: float | None
    seconds: float
    forward_seconds: float
    backend: dict[str, Any] = field(default_factory=dict)

    @property
    def doc_ids(self) -> dict[str, list[int]]:
        """Document ids per lm-eval task: pass to `score(doc_ids=...)` or `lm_eval --samples`."""
        return {task: ids for score in self.tasks.values() for task, ids in score.doc_ids.items()}

    @property
    def includes_proxy(self) -> bool:
        return any(score.proxy for score in self.tasks.values())

    def to_dict(self) -> dict[str, Any]:
        tasks = {}
        for name, score in self.tasks.items():
            entry = asdict(score)
            entry["docs"] = {
                task: [{"doc_id": d.doc_id, **d.metrics} for d in docs] for task, docs in score.docs.items()
            }
            entry["doc_ids"] = score.doc_ids
            entry["n_docs"] = score.n_docs
            tasks[name] = entry
        return {
            "format": FORMAT_VERSION,
            "backend": self.backend,
            "tasks": tasks,
            "average": {"value": self.average, "stderr": self.average_stderr, "includes_proxy": self.includes_proxy},
            "timing": {"seconds": self.seconds, "forward_seconds": self.forward_seconds},
        }

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalResult:
        tasks = {}
        for name, entry in data["tasks"].items():
            docs = {
                task: [DocResult(row["doc_id"], {k: v for k, v in row.items() if k != "doc_id"}) for row in rows]
                for task, rows in entry["docs"].items()
            }
            fields = {k: entry[k] for k in ("name", "metric", "value", "stderr", "num_fewshot", "metrics", "stderrs", "proxy")}
            tasks[name] = TaskScore(docs=docs, **fields)
        average = data["average"]
        timing = data["timing"]
        return cls(tasks, average["value"], average["stderr"], timing["seconds"], timing["forward_seconds"], data["backend"])

    @classmethod
    def read_json(cls, path: str | Path) -> EvalResult:
        return cls.from_dict(json.loads(Path(path).read_text()))


def paired_difference(a: TaskScore, b: TaskScore, metric: str | None = None) -> tuple[float, float | None, int]:
    """Mean of (b - a) per document over the documents both scored, its standard error, and n.

    Pairing removes the documents' own difficulty from the comparison, so it
    separates two candidates with far fewer documents than their two stderrs.
    """
    metric = metric or a.metric
    diffs = paired_differences(a.rows(metric), b.rows(metric))
    if not diffs:
        raise MergetuneError(f"{a.name} and {b.name} share no scored documents")
    mean, stderr = mean_and_stderr(diffs)
    return mean, stderr, len(diffs)
