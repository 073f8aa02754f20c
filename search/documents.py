"""Which documents a study scores: the search documents, the pruning rungs inside them, the held-out finals.

Every candidate of a study is scored on the same documents, so their scores — and
their per-document evidence — compare pairwise. Chosen once per worker from the
study's seed, so every worker of a study chooses the same ones.
"""

from __future__ import annotations

import logging
import math
import random
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from mergetune.errors import MergetuneError
from mergetune.search.study_file import StudySpec

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mergetune.eval import Evaluator

DocIds = dict[str, list[int]]  # lm-eval task → document ids


@dataclass
class Documents:
    """The fixed documents every candidate of a study is scored on.

    rungs: (documents per task, ids) of the pruning rungs, each nested in the next
    and all in `search`; a candidate is scored rung by rung and may stop at any.
    """

    search: DocIds
    rungs: list[tuple[int, DocIds]]
    final: DocIds

    @staticmethod
    def count(ids: Optional[DocIds]) -> int:
        return sum(len(v) for v in (ids or {}).values())


def final_only_tasks(spec: StudySpec) -> list[str]:
    """Tasks the finalists are scored on that the search never scores."""
    return [name for name in spec.evaluation.final.tasks if name not in spec.evaluation.tasks]


def choose_documents(evaluator: "Evaluator", spec: StudySpec) -> Documents:
    """Search documents (seeded), nested subsets of them as pruning rungs, and held-out final documents.

    Final documents are those of `final.tasks` the search did not use: all of a
    final-only task's, the rest of a search task's. The evaluator prepares the search
    documents as one set, so a document's requests are the same whichever part of
    a candidate's scoring (rung, estimator chunk) it falls in.
    """
    evaluation = spec.evaluation
    final_only = final_only_tasks(spec)
    missing = [name for name in final_only if name not in evaluator.tasks]
    if missing:
        raise MergetuneError(f"evaluation.final.tasks: {', '.join(missing)} must name tasks or groups (not tags)")
    search_tasks = [name for name in evaluator.tasks if name not in final_only]
    final_tasks = evaluation.final.tasks or search_tasks
    search = evaluator.sample_doc_ids(search_tasks, limit=evaluation.limit, seed=spec.seed)
    rng = random.Random(spec.seed)
    order = {leaf: rng.sample(sorted(ids), len(ids)) for leaf, ids in search.items()}  # rungs are its prefixes
    rungs = []
    for size in spec.rungs():
        prefix = {leaf: sorted(ids[: max(1, math.ceil(len(ids) * size / evaluation.limit))]) for leaf, ids in order.items()}
        rungs.append((size, prefix))
    everything = evaluator.sample_doc_ids(final_tasks, limit=sys.maxsize, seed=spec.seed)
    final_rng = random.Random(evaluation.final.seed)
    final: DocIds = {}
    for name in final_tasks:
        loaded = evaluator.tasks[name]
        remaining = {leaf: sorted(set(everything[leaf]) - set(search.get(leaf, []))) for leaf in loaded.leaves}
        total = sum(len(ids) for ids in remaining.values())
        if total == 0:
            size = sum(len(everything[leaf]) for leaf in loaded.leaves)
            raise MergetuneError(
                f"evaluation.final: task {name}: the search scores all {size} of its documents (evaluation.limit "
                f"{evaluation.limit}), none is left to score the finalists on; lower evaluation.limit below {size} "
                "or name other tasks in evaluation.final.tasks"
            )
        if evaluation.final.limit is not None and total < evaluation.final.limit:
            size = sum(len(everything[leaf]) for leaf in loaded.leaves)
            log.warning(
                "evaluation.final: task %s: only %d documents are left for the finalists, not final.limit %d (the "
                "search scores %d of its %d): their held-out scores are that much less certain; lower "
                "evaluation.limit or name other tasks in evaluation.final.tasks",
                name, total, evaluation.final.limit, size - total, size,
            )
        wanted = min(evaluation.final.limit or total, total)
        for leaf, ids in remaining.items():
            share = len(ids) if wanted == total else max(1, round(wanted * len(ids) / total)) if ids else 0
            final[leaf] = sorted(final_rng.sample(ids, min(share, len(ids))))
    evaluator.prepare(search)
    return Documents(search=search, rungs=rungs, final=final)


def added(ids: DocIds, previous: DocIds) -> DocIds:
    """The documents of a rung (`ids`) that the rung before it (`previous`, nested in it) lacks."""
    remaining = {leaf: sorted(set(doc_ids) - set(previous.get(leaf, ()))) for leaf, doc_ids in ids.items()}
    return {leaf: doc_ids for leaf, doc_ids in remaining.items() if doc_ids}
