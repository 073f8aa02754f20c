"""Which log-likelihood requests share a prefix: the pure half of shared-prefix scoring.

lm-eval scores every answer choice as its own sequence, so a document's choices
(and documents whose shots coincide) repeat the same leading tokens. A forward
pass over that shared prefix, its key/value cache reused by every continuation
that extends it, gives the same logits for a fraction of the work. This module
decides what to share, from token ids alone: nothing here depends on the weights,
so a plan is made once per document set and reused for every candidate.

Sharing is one level deep: each request belongs to at most one group, and a
group's prefix is computed once. Groups are chosen on the radix tree of the
inputs (built from their sorted order and neighbours' common prefixes) to save
the most forward tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

#: A shared prefix shorter than this goes through lm-eval's path instead: the saving would not pay for
#: copying its cache to every continuation (see also `worth_sharing`).
MIN_SHARED_TOKENS = 8


def model_input(context: Sequence[int], continuation: Sequence[int], max_length: int) -> tuple[int, ...]:
    """The tokens HFLM's causal path feeds the model: the last `max_length + 1` of context + continuation,
    minus the last one (lm-eval truncates from the left)."""
    return (tuple(context) + tuple(continuation))[-(max_length + 1) :][:-1]


@dataclass(frozen=True)
class Row:
    """One distinct model input and the requests it answers (requests with equal inputs share its logits).

    keep: how many final positions' logits are read (the longest continuation among its requests).
    """

    tokens: tuple[int, ...]
    keep: int
    requests: tuple[int, ...]

    @property
    def shareable(self) -> tuple[int, ...]:
        """The leading tokens whose logits are not read: a prefix may cover only these."""
        return self.tokens[: len(self.tokens) - self.keep]


@dataclass(frozen=True)
class PrefixGroup:
    """Rows whose first `prefix_len` tokens are equal: that prefix is run once, each row's rest from its cache."""

    prefix_len: int
    rows: tuple[Row, ...]

    @property
    def forward_tokens(self) -> int:
        return self.prefix_len + sum(len(row.tokens) - self.prefix_len for row in self.rows)


@dataclass(frozen=True)
class PrefixPlan:
    """Groups to score through a cache, and the rows with nothing worth sharing (each scored as one sequence)."""

    groups: tuple[PrefixGroup, ...]
    alone_rows: tuple[Row, ...]

    @property
    def alone(self) -> tuple[int, ...]:
        """The requests (indices) of the rows with nothing worth sharing."""
        return tuple(sorted(i for row in self.alone_rows for i in row.requests))


def distinct_rows(inputs: Sequence[tuple[int, ...]], continuation_lengths: Sequence[int]) -> list[Row]:
    """One row per distinct input, in order of first appearance."""
    requests: dict[tuple[int, ...], list[int]] = {}
    for index, tokens in enumerate(inputs):
        requests.setdefault(tokens, []).append(index)
    return [
        Row(tokens, max(continuation_lengths[i] for i in indices), tuple(indices)) for tokens, indices in requests.items()
    ]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def worth_sharing(prefix_len: int, longest: int, min_shared: int) -> bool:
    """Whether a prefix is worth computing once for inputs of up to `longest` tokens: at least `min_shared` tokens,
    and at least half of every input. A row's rest runs against a cache under a padding mask, which is slower
    per token than lm-eval's plain causal pass; a short prefix before long rests (the first words of
    unrelated documents) would cost more than it saves."""
    return prefix_len >= min_shared and 2 * prefix_len >= longest


def best_groups(
    lcps: Sequence[int], lengths: Sequence[int], lo: int, hi: int, min_shared: int
) -> tuple[int, list[tuple[int, int, int]]]:
    """The most forward tokens saved on sorted keys [lo, hi), and the groups (lo, hi, prefix length) that save them.

    `lcps[i]` is the common prefix length of keys i and i + 1, `lengths[i]` the
    length of input i. The keys of [lo, hi) share `depth = min(lcps[lo:hi-1])`
    tokens: one group over all of them saves `(hi - lo - 1) * depth` if it is
    worth sharing (`worth_sharing`); otherwise, or if it saves more, the interval
    splits where the common prefix is exactly `depth` (the radix tree's children)
    and each part is grouped on its own.
    """
    if hi - lo < 2:
        return 0, []
    depth = min(lcps[lo : hi - 1])
    here = (hi - lo - 1) * depth if worth_sharing(depth, max(lengths[lo:hi]), min_shared) else 0
    split_gain, split_groups, start = 0, [], lo
    for cut in [i + 1 for i in range(lo, hi - 1) if lcps[i] == depth] + [hi]:
        gain, groups = best_groups(lcps, lengths, start, cut, min_shared)
        split_gain, start = split_gain + gain, cut
        split_groups += groups
    if here > 0 and here >= split_gain:
        return here, [(lo, hi, depth)]
    return split_gain, split_groups


def plan_prefixes(
    inputs: Sequence[tuple[int, ...]], continuation_lengths: Sequence[int], min_shared: int = MIN_SHARED_TOKENS
) -> PrefixPlan:
    """Group requests (their model inputs and continuation lengths) by shared prefix, saving the most tokens."""
    rows = distinct_rows(inputs, continuation_lengths)
    rows.sort(key=lambda row: row.shareable)
    lcps = [common_prefix_length(a.shareable, b.shareable) for a, b in zip(rows, rows[1:])]
    _, chosen = best_groups(lcps, [len(row.tokens) for row in rows], 0, len(rows), min_shared)
    grouped = set()
    groups = []
    for lo, hi, depth in chosen:
        groups.append(PrefixGroup(depth, tuple(rows[lo:hi])))
        grouped.update(range(lo, hi))
    alone = tuple(row for position, row in enumerate(rows) if position not in grouped)
    return PrefixPlan(tuple(groups), alone)


def within_window(plan: PrefixPlan, window: int | None) -> PrefixPlan:
    """`plan` with the rows of groups holding an input of `window` tokens or more scored alone: a sliding-window
    cache drops the keys such inputs need, while a whole sequence's pass applies the window itself (None: no window)."""
    if window is None:
        return plan
    fits = [group for group in plan.groups if all(len(row.tokens) < window for row in group.rows)]
    too_long = [row for group in plan.groups if group not in fits for row in group.rows]
    return PrefixPlan(tuple(fits), (*plan.alone_rows, *too_long))
