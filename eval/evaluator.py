"""The evaluator: one live model, lm-eval's tasks, scored again and again.

Everything that does not depend on the weights is done once: the task index
and datasets when the evaluator is made, prompts and token ids the first time a
(task, documents) pair is scored. Each `score` call then costs forward passes
plus per-document bookkeeping. Nothing computed from the weights is kept
between calls, so a search may rewrite the model's parameters in place
(`param.data.copy_`) between them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from lm_eval.api.metrics import mean, stderr_for_metric
from lm_eval.api.task import Task

from mergetune.errors import MergetuneError
from mergetune.eval.backends import BACKENDS, Backend
from mergetune.eval.requests import PreparedTask, prepare_task
from mergetune.eval.results import DocResult, EvalResult, TaskScore
from mergetune.eval.subsets import sample_doc_ids
from mergetune.eval.tasks import LoadedTask, include_paths, load_task, suite_tasks, task_manager

log = logging.getLogger(__name__)

_FILTER = "none"  # lm-eval's key for unfiltered responses, the only kind scored here


@dataclass(frozen=True)
class EvalConfig:
    """What to score; how (the backend) is chosen separately.

    suite: a name in `mergetune.eval.tasks.SUITES` ("leaderboard"), or None.
    tasks: extra lm-eval task / group / tag names (or the only ones, without a suite).
    include_paths: directories of the user's own lm-eval task YAMLs.
    data_dir: local JSONL copies of the datasets (layout in docs/eval.md); None reads the hub.
    num_fewshot: one few-shot count for every task (a task whose config pins 0 keeps 0).
    limit, seed: default subset size per task (None: all documents) and its seed.
    fewshot_seed: lm-eval's few-shot sampling seed (its default, 1234).
    bootstrap_iters: as lm-eval's; mean-type metrics use a closed form regardless.
    """

    suite: str | None = None
    tasks: tuple[str, ...] = ()
    include_paths: tuple[str | Path, ...] = ()
    data_dir: str | Path | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    seed: int = 0
    fewshot_seed: int = 1234
    bootstrap_iters: int = 100_000


def _leaf_metrics(task: Task, docs: Sequence[DocResult], bootstrap_iters: int) -> dict[str, Any]:
    """A leaf task's aggregate metrics in lm-eval's result format ("acc,none", "acc_stderr,none")."""
    metrics: dict[str, Any] = {"sample_len": len(docs)}
    aggregations = task.aggregation()
    for name in docs[0].metrics:
        values = [doc.metrics[name] for doc in docs]
        aggregate = aggregations.get(name, mean)
        metrics[f"{name},{_FILTER}"] = aggregate(values)
        stderr = stderr_for_metric(aggregate, bootstrap_iters) if bootstrap_iters > 0 else None
        metrics[f"{name}_stderr,{_FILTER}"] = stderr(values) if stderr and len(values) > 1 else "N/A"
    return metrics


def _split_metrics(lm_eval_metrics: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float | None]]:
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


class Evaluator:
    """Scores the current weights of one model on a fixed set of lm-eval tasks.

    Make it once (`from_model` for a live model, `from_dir` for a checkpoint or
    a server), then call `score` for every candidate.
    """

    def __init__(self, backend: Backend, config: EvalConfig = EvalConfig()) -> None:
        self.backend = backend
        self.config = config
        manager = task_manager(include_paths(config.data_dir, config.include_paths))
        self.tasks: dict[str, LoadedTask] = {}
        leaf_owner: dict[str, str] = {}
        for entry in suite_tasks(config.suite, config.tasks, config.data_dir):
            for loaded in load_task(manager, entry, config.num_fewshot):
                for leaf in loaded.leaves:
                    if leaf in leaf_owner:
                        raise MergetuneError(f"task {leaf!r} is part of both {leaf_owner[leaf]!r} and {loaded.name!r}")
                    leaf_owner[leaf] = loaded.name
                self.tasks[loaded.name] = loaded
        self._sizes = {leaf: len(task.eval_docs) for t in self.tasks.values() for leaf, task in t.leaves.items()}
        self._prepared: dict[tuple[str, tuple[int, ...]], PreparedTask] = {}
        log.info("evaluator ready: %s on %s", ", ".join(self.tasks), backend.name)

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        config: EvalConfig = EvalConfig(),
        *,
        backend: str = "hf",
        engine_dir: str | Path | None = None,
        **backend_options: Any,
    ) -> Evaluator:
        """An evaluator of a live transformers model whose weights will change in place.

        backend "hf" scores the model object itself; "vllm" starts an engine from
        `engine_dir` (a checkpoint of the same architecture) and copies the
        model's weights into it before every `score`.
        """
        if backend == "hf":
            from mergetune.eval.backends.hf import HFBackend

            return cls(HFBackend(model, tokenizer, **backend_options), config)
        if backend == "vllm":
            from mergetune.eval.backends.vllm import VLLMBackend

            if engine_dir is None:
                raise MergetuneError("the vllm backend needs engine_dir, a checkpoint to start the engine from")
            return cls(VLLMBackend.launch(engine_dir, source=model, **backend_options), config)
        raise MergetuneError(f"backend {backend!r} cannot score a live model; use 'hf' or 'vllm'")

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, config: EvalConfig = EvalConfig(), *, backend: str = "hf", **backend_options: Any
    ) -> Evaluator:
        """An evaluator of a checkpoint directory (or, for "server", of the model a server serves).

        Options go to the backend: hf (device, dtype, batch_size, max_batch_size),
        vllm (tensor_parallel_size, dtype, gpu_memory_utilization, ...),
        server (base_url, model, num_concurrent, ...; `model_dir` gives the tokenizer).
        """
        model_dir = Path(model_dir).expanduser()
        if not model_dir.is_dir():
            raise MergetuneError(f"model directory {model_dir} does not exist")
        if backend == "hf":
            from mergetune.eval.backends.hf import HFBackend

            return cls(HFBackend.from_dir(model_dir, **backend_options), config)
        if backend == "vllm":
            from mergetune.eval.backends.vllm import VLLMBackend

            return cls(VLLMBackend.launch(model_dir, **backend_options), config)
        if backend == "server":
            from mergetune.eval.backends.server import ServerBackend

            base_url = backend_options.pop("base_url", None)
            if not base_url:
                raise MergetuneError("the server backend needs the server's URL (--base-url)")
            return cls(ServerBackend(base_url, model_dir, **backend_options), config)
        raise MergetuneError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")

    def _select(self, tasks: Sequence[str] | None) -> list[LoadedTask]:
        if tasks is None:
            return list(self.tasks.values())
        unknown = [name for name in tasks if name not in self.tasks]
        if unknown:
            raise MergetuneError(f"not in this evaluator: {', '.join(unknown)} (it has {', '.join(self.tasks)})")
        return [self.tasks[name] for name in tasks]

    def sample_doc_ids(
        self, tasks: Sequence[str] | None = None, *, limit: int | None = None, seed: int | None = None
    ) -> dict[str, list[int]]:
        """Seeded document ids per lm-eval task (stratified within groups); defaults from the config."""
        limit = self.config.limit if limit is None else limit
        seed = self.config.seed if seed is None else seed
        if limit is not None and limit < 1:
            raise MergetuneError(f"limit must be at least 1, not {limit}")
        ids: dict[str, list[int]] = {}
        for entry in self._select(tasks):
            ids.update(sample_doc_ids({leaf: self._sizes[leaf] for leaf in entry.leaves}, limit, seed))
        return ids

    def _prepare(self, task: Task, doc_ids: Sequence[int]) -> PreparedTask:
        key = (task.task_name, tuple(sorted(set(doc_ids))))
        if key not in self._prepared:
            self._prepared[key] = prepare_task(task, key[1], self.config.fewshot_seed, self.backend.encode)
        return self._prepared[key]

    def score(
        self,
        tasks: Sequence[str] | None = None,
        *,
        doc_ids: Mapping[str, Sequence[int]] | None = None,
        limit: int | None = None,
        seed: int | None = None,
    ) -> EvalResult:
        """Score the model's current weights.

        tasks: entry names (default: all). doc_ids: documents per lm-eval task, e.g.
        a previous result's `doc_ids`; without it, `limit` documents per entry
        are sampled with `seed` (defaults from the config).
        """
        start, forward_start = perf_counter(), self.backend.forward_seconds
        selected = self._select(tasks)
        if doc_ids is None:
            doc_ids = self.sample_doc_ids([entry.name for entry in selected], limit=limit, seed=seed)
        else:
            unknown = sorted(set(doc_ids) - {leaf for entry in selected for leaf in entry.leaves})
            if unknown:
                raise MergetuneError(f"doc_ids names tasks not scored here: {', '.join(unknown)}")
        plan = [
            (entry, [(entry.leaves[leaf], self._prepare(entry.leaves[leaf], doc_ids[leaf])) for leaf in entry.leaves if leaf in doc_ids])
            for entry in selected
        ]
        plan = [(entry, leaves) for entry, leaves in plan if leaves]
        if not plan:
            raise MergetuneError("no documents to score")

        self.backend.sync_weights()
        requests = [r for _, leaves in plan for _, prepared in leaves for doc in prepared.docs for r in doc.requests]
        responses = iter(self.backend.loglikelihood(requests))

        scores = {}
        for entry, leaves in plan:
            docs: dict[str, list[DocResult]] = {}
            leaf_metrics = {}
            for task, prepared in leaves:
                docs[task.task_name] = [
                    DocResult(doc.doc_id, {k: float(v) for k, v in task.process_results(doc.doc, [next(responses) for _ in doc.requests]).items()})
                    for doc in prepared.docs
                ]
                leaf_metrics[task.task_name] = _leaf_metrics(task, docs[task.task_name], self.config.bootstrap_iters)
            if entry.group is not None:
                values, stderrs = _split_metrics(entry.group.aggregate(leaf_metrics))
            else:
                values, stderrs = _split_metrics(leaf_metrics[entry.name])
            if entry.metric not in values:
                raise MergetuneError(f"task {entry.name!r} produced no {entry.metric!r} (it has: {', '.join(values)})")
            scores[entry.name] = TaskScore(
                entry.name, entry.metric, values[entry.metric], stderrs[entry.metric], entry.num_fewshot, values, stderrs, docs, entry.proxy
            )

        headline = [score.value for score in scores.values()]
        errors = [score.stderr for score in scores.values()]
        average_stderr = None if None in errors else math.sqrt(sum(e * e for e in errors)) / len(errors)
        return EvalResult(
            tasks=scores,
            average=sum(headline) / len(headline),
            average_stderr=average_stderr,
            seconds=perf_counter() - start,
            forward_seconds=self.backend.forward_seconds - forward_start,
            backend=self.backend.describe(),
        )

    def close(self) -> None:
        self.backend.close()
