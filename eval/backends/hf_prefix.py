"""Scoring a prefix plan (`mergetune.eval.prefix`) on a transformers causal LM, logits only where they are read.

A batch of groups runs its prefixes once (right-padded, no logits but one per
row); then every row's remaining tokens run against its group's cached keys and
values, with a padding mask hiding the other groups' longer prefixes and
position ids continuing its own prefix. Rows with nothing to share run as whole
sequences, as lm-eval runs them (right-padded, no cache). Either way logits are
computed only at the positions read (`logits_to_keep`: with a 50k-token
vocabulary, lm-eval's logits at every position cost more memory than the model
and, on a small model, more time), and log-softmax, the greedy check and the sum
are lm-eval's (`HFLM._loglikelihood_tokens` with HFLM's default dtypes, as the
`hf` backend makes it: log-softmax in the logits' dtype, no autocast), so each
request gets lm-eval's answer up to floating-point summation order.

Batches are sized to a memory budget (on a CPU there is no out-of-memory error
to recover from: the kernel kills the process), from the model's shapes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import TypeVar

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from mergetune.devices import device_memory
from mergetune.errors import MergetuneError
from mergetune.eval.prefix import PrefixGroup, PrefixPlan, Row

log = logging.getLogger(__name__)

#: Architectures whose forward takes position ids and a 2-D padding mask together with a cache as Llama's does
#: (each checked against lm-eval's path in tests/test_eval_prefix.py); any other falls back to lm-eval's path.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma")
#: Share of the free memory a batch may plan to use: the estimate is coarse, and other allocations coexist.
MEMORY_SHARE = 0.5
#: Share of a pass's positions (a batch of prefixes, or of whole rows) that may be padding: a batch closes before a
#: shorter sequence would pad it more. Few-shot prompts differ by hundreds of tokens, so a fixed row count pads
#: them by 10-15%.
MAX_PADDING = 0.05

#: (request index) -> (sum of continuation logprobs, all greedy)
Scores = dict[int, tuple[float, bool]]
T = TypeVar("T")


def unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why the cache path cannot score `model` exactly (None: it can)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        return f"architecture {config.model_type!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    parameters = inspect.signature(model.forward).parameters
    if "logits_to_keep" not in parameters or not ({"cache", "past_key_values"} & set(parameters)):
        return "this transformers version's forward takes no cache and logits_to_keep"
    try:
        if not hasattr(DynamicCache(config=config), "layers"):
            return "this transformers version's DynamicCache has no layers"
    except TypeError as error:
        return f"this transformers version's DynamicCache takes no config ({error})"
    return None


def sliding_window(model: torch.nn.Module) -> int | None:
    """The model's attention window: rows at least this long cannot use the plain cache."""
    return getattr(model.config, "sliding_window", None) or None


@dataclass(frozen=True)
class Footprint:
    """Bytes a forward pass allocates, from the model's shapes (a deliberate over-estimate)."""

    kv: int  # cached keys and values, per token, all layers
    activation: int  # transient hidden states and MLP intermediates, per token, one layer
    attention: int  # attention scores and their softmax, per (query, key) pair, one layer
    logit: int  # logits, log-softmax and greedy check, per kept position

    @classmethod
    def of(cls, model: torch.nn.Module) -> Footprint:
        config = model.config
        size = model.dtype.itemsize
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(
            kv=2 * config.num_hidden_layers * kv_heads * head_dim * size,
            activation=(6 * config.hidden_size + 3 * config.intermediate_size) * size,
            attention=heads * (size + 4),
            logit=config.vocab_size * (2 * size + 4),
        )

    def forward(self, rows: int, new: int, cached: int, kept: int) -> int:
        """Bytes of a pass over `rows` rows of `new` tokens each, after `cached` cached tokens, keeping `kept` logits."""
        total = cached + new
        # Keys and values twice: the copy of the prefix's, then their concatenation with the new tokens'.
        return rows * (2 * total * self.kv + new * self.activation + new * total * self.attention + kept * self.logit)


@dataclass(frozen=True)
class _Entry:
    """One row of a batch: its group's position in the batch, the group's prefix length, the row."""

    group: int
    prefix_len: int
    suffix: tuple[int, ...]
    keep: int
    requests: tuple[int, ...]


class PrefixScorer:
    """Scores prefix groups with `model`; `max_rows` bounds every batch (the backend's batch size)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        max_rows: int,
        memory_budget: int | None = None,
    ) -> None:
        """`memory_budget`: bytes a batch may use (default: a share of what is free when it starts)."""
        self.model = model
        self.max_rows = max_rows
        self.memory_budget = memory_budget
        self.footprint = Footprint.of(model)
        self.cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.forward_tokens = 0
        self.forward_seconds = 0.0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _budget(self) -> int:
        if self.memory_budget is not None:
            return self.memory_budget
        return int(device_memory(self.device)[0] * MEMORY_SHARE)

    def score(self, plan: PrefixPlan, continuations: Sequence[tuple[int, ...]]) -> Scores:
        """(logprob sum, greedy) for every request of `plan`; `continuations`: every request's tokens, by index."""
        scores: Scores = {}
        budget = self._budget()
        ordered = sorted(plan.groups, key=lambda g: -g.prefix_len)  # like lm-eval: longest first, little padding
        for batch in self._batches(ordered, budget):
            self._score_batch(batch, continuations, budget, scores)
        for rows in self._row_batches(sorted(plan.alone_rows, key=lambda row: -len(row.tokens)), budget):
            self._score_rows(rows, continuations, scores)
        return scores

    def _needs(self, groups: Sequence[PrefixGroup]) -> tuple[int, int, int]:
        """Bytes of the groups' prefix pass, of their cache held meanwhile, and of one row's suffix pass."""
        prefix_len = max(group.prefix_len for group in groups)
        suffix_len = max(len(row.tokens) - group.prefix_len for group in groups for row in group.rows)
        return (
            self.footprint.forward(len(groups), prefix_len, 0, 1),
            len(groups) * prefix_len * self.footprint.kv,
            self.footprint.forward(1, suffix_len, prefix_len, suffix_len),
        )

    def _suffix_rows(self, groups: Sequence[PrefixGroup], budget: int) -> int:
        """How many suffix rows one pass may take next to the groups' held cache (0: not even one)."""
        prefix_pass, held, per_row = self._needs(groups)
        if prefix_pass > budget:
            return 0
        return min(self.max_rows, max(budget - held, 0) // per_row)

    def _consecutive(
        self,
        items: Sequence[T],
        length: Callable[[T], int],
        fits: Callable[[list[T]], bool],
        too_large: Callable[[T], MergetuneError],
    ) -> Iterator[list[T]]:
        """Consecutive items (longest first), at most `max_rows`, that `fit` together in one pass padded by at most
        `MAX_PADDING`; `too_large(item)` for an item that does not fit alone."""
        batch: list[T] = []
        for item in items:
            if batch and (
                len(batch) == self.max_rows
                or _padding([length(i) for i in batch + [item]]) > MAX_PADDING
                or not fits(batch + [item])
            ):
                yield batch
                batch = []
            if not batch and not fits([item]):
                raise too_large(item)
            batch.append(item)
        if batch:
            yield batch

    def _batches(self, groups: Sequence[PrefixGroup], budget: int) -> Iterator[list[PrefixGroup]]:
        """Batches of groups whose prefix pass and a suffix row fit the budget together."""
        return self._consecutive(
            groups,
            lambda group: group.prefix_len,
            lambda batch: self._suffix_rows(batch, budget) > 0,
            lambda group: self._cannot_fit(max(len(row.tokens) for row in group.rows), sum(self._needs([group])), budget),
        )

    def _row_pass(self, rows: Sequence[Row]) -> int:
        """Bytes of one pass over whole rows (right-padded), keeping the logits from the first position read."""
        length = max(len(row.tokens) for row in rows)
        kept = length - min(len(row.tokens) - row.keep for row in rows)
        return self.footprint.forward(len(rows), length, 0, kept)

    def _row_batches(self, rows: Sequence[Row], budget: int) -> Iterator[list[Row]]:
        """Batches of whole rows whose pass fits the budget."""
        return self._consecutive(
            rows,
            lambda row: len(row.tokens),
            lambda batch: self._row_pass(batch) <= budget,
            lambda row: self._cannot_fit(len(row.tokens), self._row_pass([row]), budget),
        )

    def _cannot_fit(self, longest: int, need: int, budget: int) -> MergetuneError:
        return MergetuneError(
            f"scoring a request of {longest} tokens needs about {need / 2**30:.2f} GiB; "
            f"only {budget / 2**30:.2f} GiB are available to it on {self.device}"
        )

    def _forward(self, input_ids: torch.Tensor, cache: DynamicCache | None, **kwargs: object) -> object:
        """The model's forward pass (with `cache`, or none kept), timed and its positions counted."""
        start = perf_counter()
        cached = {"use_cache": True, self.cache_name: cache} if cache is not None else {"use_cache": False}
        with torch.no_grad():
            output = self.model(input_ids=input_ids, **cached, **kwargs)
        if input_ids.is_cuda:
            torch.cuda.synchronize(input_ids.device)
        self.forward_seconds += perf_counter() - start
        self.forward_tokens += input_ids.numel()
        return output

    def _new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.model.config)

    def _score_batch(
        self, batch: list[PrefixGroup], continuations: Sequence[tuple[int, ...]], budget: int, scores: Scores
    ) -> None:
        """Run the batch's prefixes once, then its rows' suffixes in chunks that fit, against their cache."""
        device = self.device
        prefix_len = max(group.prefix_len for group in batch)
        prefixes = [group.rows[0].tokens[: group.prefix_len] for group in batch]
        output = self._forward(_padded(prefixes, prefix_len, device), self._new_cache(), logits_to_keep=1)
        states = [(layer.keys, layer.values) for layer in getattr(output, self.cache_name).layers]
        del output
        entries = sorted(
            (
                _Entry(index, group.prefix_len, row.tokens[group.prefix_len :], row.keep, row.requests)
                for index, group in enumerate(batch)
                for row in group.rows
            ),
            key=lambda entry: -len(entry.suffix),
        )
        rows = self._suffix_rows(batch, budget)
        for start in range(0, len(entries), rows):
            self._score_suffixes(entries[start : start + rows], states, prefix_len, continuations, scores)

    def _score_suffixes(
        self,
        chunk: list[_Entry],
        states: list[tuple[torch.Tensor, torch.Tensor]],
        prefix_len: int,
        continuations: Sequence[tuple[int, ...]],
        scores: Scores,
    ) -> None:
        device = states[0][0].device
        suffix_len = max(len(entry.suffix) for entry in chunk)
        groups = torch.tensor([entry.group for entry in chunk], device=device)
        own = torch.tensor([entry.prefix_len for entry in chunk], device=device)
        cache = self._new_cache()
        for layer, (keys, values) in enumerate(states):
            cache.update(keys[groups], values[groups], layer)
        # Keys of another group's longer prefix (padding here) are masked; the suffix follows the row's own prefix.
        mask = torch.cat(
            [
                torch.arange(prefix_len, device=device)[None, :] < own[:, None],
                torch.ones(len(chunk), suffix_len, dtype=torch.bool, device=device),
            ],
            dim=1,
        ).long()
        positions = own[:, None] + torch.arange(suffix_len, device=device)[None, :]
        first_read = min(len(entry.suffix) - entry.keep for entry in chunk)
        output = self._forward(
            _padded([entry.suffix for entry in chunk], suffix_len, device),
            cache,
            attention_mask=mask,
            position_ids=positions,
            logits_to_keep=suffix_len - first_read,
        )
        logprobs = F.log_softmax(output.logits, dim=-1)
        for row, entry in zip(logprobs, chunk):
            _read(row[: len(entry.suffix) - first_read], entry.requests, continuations, scores)

    def _score_rows(self, rows: list[Row], continuations: Sequence[tuple[int, ...]], scores: Scores) -> None:
        """One pass over whole rows, as lm-eval makes it (right-padded, causal, no mask), logits from the first read."""
        length = max(len(row.tokens) for row in rows)
        first_read = min(len(row.tokens) - row.keep for row in rows)
        padded = _padded([row.tokens for row in rows], length, self.device)
        output = self._forward(padded, None, logits_to_keep=length - first_read)
        logprobs = F.log_softmax(output.logits, dim=-1)
        for row_logprobs, row in zip(logprobs, rows):
            _read(row_logprobs[: len(row.tokens) - first_read], row.requests, continuations, scores)


def _read(logprobs: torch.Tensor, requests: Sequence[int], continuations: Sequence[tuple[int, ...]], scores: Scores) -> None:
    """Each request's (logprob sum, greedy) from one row's log-probabilities, whose last position is its last token."""
    greedy = logprobs.argmax(dim=-1)
    for index in requests:
        tokens = torch.tensor(continuations[index], dtype=torch.long, device=logprobs.device)
        logprob = torch.gather(logprobs[-len(tokens) :], 1, tokens[:, None]).squeeze(-1)
        scores[index] = (float(logprob.sum()), bool((greedy[-len(tokens) :] == tokens).all()))


def _padding(lengths: Sequence[int]) -> float:
    """The share of padding in a pass over sequences of these lengths, each padded to the longest."""
    return 1 - sum(lengths) / (max(lengths) * len(lengths))


def _padded(sequences: Sequence[Sequence[int]], length: int, device: torch.device) -> torch.Tensor:
    """Right-padded with token 0, as lm-eval pads: causal attention never lets a real token see the padding."""
    batch = torch.zeros(len(sequences), length, dtype=torch.long)
    for index, tokens in enumerate(sequences):
        batch[index, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return batch.to(device)
