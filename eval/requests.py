"""Requests built once and reused: prompts and token ids for a task's chosen documents.

Building few-shot prompts and tokenizing them costs as much as scoring a small
model, and none of it depends on the weights. A `PreparedTask` holds, for one
leaf task and one set of document ids, the documents and their tokenized
log-likelihood requests; the evaluator keeps it for every later candidate.
Prompts come from lm-eval's own `build_all_requests`, with the few-shot
generator reseeded first, so they are exactly those of `lm_eval --samples`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lm_eval.api.task import Task

from mergetune.errors import MergetuneError
from mergetune.eval.lm_eval_adapter import no_request_progress

log = logging.getLogger(__name__)

#: (context, continuation) -> (context tokens, continuation tokens)
Encoder = Callable[[str, str], tuple[list[int], list[int]]]


@dataclass(frozen=True)
class TokenRequest:
    """One log-likelihood request: the text pair and its tokens (as a backend encodes them)."""

    args: tuple[str, str]
    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class PreparedDoc:
    """One document and its requests, in the order lm-eval's `process_results` expects."""

    doc_id: int
    doc: dict[str, Any]
    requests: tuple[TokenRequest, ...]


@dataclass(frozen=True)
class PreparedTask:
    name: str
    docs: tuple[PreparedDoc, ...]

    @property
    def doc_ids(self) -> list[int]:
        return [doc.doc_id for doc in self.docs]


def prepare_task(task: Task, doc_ids: Sequence[int], fewshot_seed: int, encode: Encoder) -> PreparedTask:
    """Build and tokenize the requests of `task` for these documents.

    lm-eval walks the selected documents in dataset order and draws each one's
    shots from one seeded generator, so the ids are sorted and the generator
    reset here, as `lm_eval --samples` does on a fresh run.
    """
    ids = sorted(set(doc_ids))
    size = len(task.eval_docs)
    if not ids:
        raise MergetuneError(f"task {task.task_name!r}: no document ids to score")
    if ids[0] < 0 or ids[-1] >= size:
        raise MergetuneError(f"task {task.task_name!r}: document ids must lie in [0, {size - 1}]")
    task.set_fewshot_seed(seed=fewshot_seed)
    with no_request_progress():
        task.build_all_requests(samples=ids, rank=0, world_size=1)
    by_position: dict[int, list] = {}
    for instance in task.instances:
        by_position.setdefault(instance.doc_id, []).append(instance)
    docs = []
    for position, doc_id in enumerate(ids):
        instances = sorted(by_position[position], key=lambda inst: inst.idx)
        requests = []
        for instance in instances:
            if instance.request_type != "loglikelihood":
                raise MergetuneError(
                    f"task {task.task_name!r} asks for {instance.request_type!r}; only loglikelihood is supported"
                )
            context, continuation = instance.args
            context_tokens, continuation_tokens = encode(context, continuation)
            requests.append(TokenRequest((context, continuation), tuple(context_tokens), tuple(continuation_tokens)))
        docs.append(PreparedDoc(doc_id, instances[0].doc, tuple(requests)))
    log.debug("prepared %s: %d docs, %d requests", task.task_name, len(docs), sum(len(d.requests) for d in docs))
    return PreparedTask(task.task_name, tuple(docs))
