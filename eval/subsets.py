"""Seeded document subsets: N random documents per task, stratified across a group's tasks.

lm-eval's `limit` takes the first N documents, which are not a sample (MMLU's
first N are one subject). Here each leaf task's documents are shuffled by a
generator seeded from (seed, task name), so a subset depends on nothing else,
and a larger N extends a smaller one (successive-halving searches reuse the
documents already scored). A group's N is split across its tasks in proportion
to their sizes (every task gets at least one document when N allows).
"""

from __future__ import annotations

import random
from collections.abc import Mapping


def allocate(sizes: Mapping[str, int], n: int) -> dict[str, int]:
    """Split `n` documents across strata of the given sizes, proportionally.

    Largest-remainder rounding; when n is at least the number of strata, every
    stratum gets one document, taken from the most over-allocated ones.
    """
    total = sum(sizes.values())
    if n >= total:
        return dict(sizes)
    quotas = {name: n * size / total for name, size in sizes.items()}
    counts = {name: int(quota) for name, quota in quotas.items()}
    leftover = n - sum(counts.values())
    for name in sorted(quotas, key=lambda k: (counts[k] - quotas[k], k))[:leftover]:
        counts[name] += 1
    if n >= len(sizes):
        for name in sorted(k for k, count in counts.items() if count == 0):
            donor = max(
                (k for k, count in counts.items() if count > 1),
                key=lambda k: (counts[k] - quotas[k], k),
            )
            counts[donor] -= 1
            counts[name] += 1
    return counts


def shuffled_ids(task: str, size: int, seed: int) -> list[int]:
    """All document ids of one task in a seeded order; a subset of k is its first k."""
    ids = list(range(size))
    random.Random(f"{seed}/{task}").shuffle(ids)
    return ids


def sample_doc_ids(sizes: Mapping[str, int], limit: int | None, seed: int) -> dict[str, list[int]]:
    """Sorted document ids per leaf task: all of them, or `limit` in total, stratified."""
    if limit is None:
        return {task: list(range(size)) for task, size in sizes.items()}
    counts = allocate(sizes, limit)
    return {
        task: sorted(shuffled_ids(task, sizes[task], seed)[:count])
        for task, count in counts.items()
        if count > 0
    }
