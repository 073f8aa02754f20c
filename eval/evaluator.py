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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

from lm_eval.api.task import Task

from mergetune import interrupts
from mergetune.errors import MergetuneError
from mergetune.eval.backends import get_backend_class
from mergetune.eval.backends.base import Backend
from mergetune.eval.evidence import average
from mergetune.eval.metrics import entry_metrics
from mergetune.eval.requests import PreparedTask, prepare_task
from mergetune.eval.results import DocResult, EvalResult, TaskScore
from mergetune.eval.subsets import sample_doc_ids
from mergetune.eval.tasks import LoadedTask, Origins, include_paths, load_task, suite_tasks, task_manager_for

log = logging.getLogger(__name__)

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
    origins: where data_dir and include_paths were set, for messages (command-line options by default).
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
    origins: Origins = Origins()


def load_tasks(config: EvalConfig) -> dict[str, LoadedTask]:
    """The configured suite's entries, with lm-eval's task objects and datasets loaded."""
    paths = include_paths(config.data_dir, config.include_paths, config.origins)
    entries = suite_tasks(config.suite, config.tasks, config.data_dir, config.origins)
    manager = task_manager_for(paths, [entry.name for entry in entries])
    tasks: dict[str, LoadedTask] = {}
    owner: dict[str, str] = {}
    for entry in entries:
        for loaded in load_task(manager, entry, config.num_fewshot, config.origins):
            for leaf in loaded.leaves:
                if leaf in owner and owner[leaf] == loaded.name:
                    raise MergetuneError(f"task {leaf!r} is listed twice")
                if leaf in owner:
                    raise MergetuneError(f"task {leaf!r} is part of both {owner[leaf]!r} and {loaded.name!r}")
                owner[leaf] = loaded.name
            tasks[loaded.name] = loaded
        interrupts.check()
    return tasks


def _floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {name: float(value) for name, value in metrics.items()}


class Evaluator:
    """Scores the current weights of one model on a fixed set of lm-eval tasks.

    Make it once (`from_model` for a live model, `from_dir` for a checkpoint or
    a server), then call `score` for every candidate.
    """

    def __init__(
        self, backend: Backend, config: EvalConfig = EvalConfig(), tasks: dict[str, LoadedTask] | None = None
    ) -> None:
        """`tasks`: the result of `load_tasks(config)`, when already loaded."""
        self.backend = backend
        self.config = config
        self.tasks = load_tasks(config) if tasks is None else tasks
        self._sizes = {leaf: len(task.eval_docs) for t in self.tasks.values() for leaf, task in t.leaves.items()}
        self._prepared: dict[tuple, PreparedTask] = {}  # (task, ids, the declared set they come from)
        self._sets: dict[str, PreparedTask] = {}  # lm-eval task → the document set declared with `prepare`
        log.info("evaluator ready: %s on %s", ", ".join(self.tasks), backend.name)

    @classmethod
    def from_model(
        cls,
        model: Any,
        tokenizer: Any,
        config: EvalConfig = EvalConfig(),
        *,
        backend: str = "hf",
        checkpoint_dir: str | Path | None = None,
        tasks: dict[str, LoadedTask] | None = None,
        **backend_options: Any,
    ) -> Evaluator:
        """An evaluator of a live transformers model whose weights will change in place.

        `backend`: one of `live_backend_names()`. "hf" scores the model object
        itself (and ignores `checkpoint_dir`); "vllm" starts an engine from
        `checkpoint_dir` (a checkpoint of the same architecture) and copies the
        model's weights into it before every `score`.
        """
        backend_class = get_backend_class(backend)
        backend_class.check_live(checkpoint_dir)
        tasks = load_tasks(config) if tasks is None else tasks  # before any engine starts: configuration errors first
        return cls(backend_class.for_live_model(model, tokenizer, checkpoint_dir, **backend_options), config, tasks)

    @classmethod
    def for_candidates(
        cls,
        skeleton_dir: str | Path,
        sources: Sequence[str],
        dtype: str,
        config: EvalConfig = EvalConfig(),
        *,
        backend: str,
        tasks: dict[str, LoadedTask] | None = None,
        **backend_options: Any,
    ) -> Evaluator:
        """An evaluator whose backend's engine merges each candidate: `evaluator.backend.build(recipe, seed)`.

        `skeleton_dir`: the merged model's config and tokenizer; `sources`: the
        checkpoints the recipes use, loaded by the engine once; `dtype`: the study's.
        """
        backend_class = get_backend_class(backend)
        tasks = load_tasks(config) if tasks is None else tasks  # before any engine starts: configuration errors first
        return cls(backend_class.for_candidates(skeleton_dir, list(sources), dtype, **backend_options), config, tasks)

    @classmethod
    def from_dir(
        cls, model_dir: str | Path, config: EvalConfig = EvalConfig(), *, backend: str = "hf", **backend_options: Any
    ) -> Evaluator:
        """An evaluator of a checkpoint directory (or, for "server", of the model a server serves).

        Options go to the backend's `for_directory`: hf (device, dtype, batch_size, max_batch_size),
        vllm (tensor_parallel_size, dtype, gpu_memory_utilization, ...),
        server (base_url, model, num_concurrent, ...; `model_dir` gives the tokenizer).
        """
        model_dir = Path(model_dir).expanduser()
        if not model_dir.is_dir():
            raise MergetuneError(f"model directory {model_dir} does not exist")
        backend_class = get_backend_class(backend)
        backend_class.check_directory(model_dir, **backend_options)
        tasks = load_tasks(config)  # before the model loads: configuration errors come first
        return cls(backend_class.for_directory(model_dir, **backend_options), config, tasks)

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

    def prepare(self, doc_ids: Mapping[str, Sequence[int]]) -> None:
        """Build the requests of these documents as one set, as `lm_eval --samples` would for exactly them.

        A later score of any subset reuses them: lm-eval draws few-shot examples
        along the document set, so without this a document scored in a subset could
        get other shots than in the full set, and a study scoring each candidate's
        documents in its own order would compare different requests.
        """
        for entry in self.tasks.values():
            for leaf, task in entry.leaves.items():
                if leaf in doc_ids:
                    self._sets[leaf] = self._prepare(task, doc_ids[leaf])

    def _prepare(self, task: Task, doc_ids: Sequence[int]) -> PreparedTask:
        ids = tuple(sorted(set(doc_ids)))
        declared = self._sets.get(task.task_name)
        if declared is None or not set(ids) <= set(declared.doc_ids):
            declared = None
        key = (task.task_name, ids, None if declared is None else id(declared))  # declared sets stay cached
        if key not in self._prepared:
            if declared is not None:
                wanted = set(ids)
                self._prepared[key] = PreparedTask(task.task_name, tuple(d for d in declared.docs if d.doc_id in wanted))
            else:
                self._prepared[key] = prepare_task(task, ids, self.config.fewshot_seed, self.backend.encode)
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
            (entry, [self._prepare(task, doc_ids[leaf]) for leaf, task in entry.leaves.items() if leaf in doc_ids])
            for entry in selected
        ]
        plan = [(entry, leaves) for entry, leaves in plan if leaves]
        if not plan:
            raise MergetuneError("no documents to score")

        self.backend.sync_weights()
        requests = [r for _, leaves in plan for prepared in leaves for doc in prepared.docs for r in doc.requests]
        responses = iter(self.backend.loglikelihood(requests))
        scores = {entry.name: self._task_score(entry, leaves, responses) for entry, leaves in plan}

        mean_value, mean_stderr = average([s.value for s in scores.values()], [s.stderr for s in scores.values()])
        return EvalResult(
            tasks=scores,
            average=mean_value,
            average_stderr=mean_stderr,
            seconds=perf_counter() - start,
            forward_seconds=self.backend.forward_seconds - forward_start,
            backend=self.backend.describe(),
        )

    def _task_score(
        self, entry: LoadedTask, prepared: Sequence[PreparedTask], responses: Iterator[tuple[float, bool]]
    ) -> TaskScore:
        """Per-document metrics from lm-eval's `process_results`, then the entry's aggregates."""
        docs: dict[str, list[DocResult]] = {}
        for leaf in prepared:
            task = entry.leaves[leaf.name]
            docs[leaf.name] = [
                DocResult(doc.doc_id, _floats(task.process_results(doc.doc, [next(responses) for _ in doc.requests])))
                for doc in leaf.docs
            ]
        values, stderrs = entry_metrics(entry, docs, self.config.bootstrap_iters)
        if entry.metric not in values:
            raise MergetuneError(f"task {entry.name!r} produced no {entry.metric!r} (it has: {', '.join(values)})")
        return TaskScore(
            entry.name, entry.metric, values[entry.metric], stderrs[entry.metric], entry.num_fewshot,
            values, stderrs, docs, entry.proxy,
        )

    def close(self) -> None:
        self.backend.close()
