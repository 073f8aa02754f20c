"""Pruning of task vectors (delta = model - base) before they are combined.

`magnitude` keeps the largest entries (TIES), `bernoulli` keeps a random fraction
(DARE), `magnitude_outliers` drops the smallest and the largest (Model
Breadcrumbs), `della_magprune` keeps each entry with a probability that grows with
its rank in its row (DELLA). With `rescale`, the pruned tensor is scaled back to
the L1 norm of the original, as mergekit does. `top_variance` selects across all
task vectors at once: the entries on which the models disagree most (SCE).

The rank-based ones first order a task vector's entries by magnitude, which does not
depend on the density: each one's `Pruning.ranking` gives that order, computed once,
so a caller that keeps task vectors between merges (the search's in-memory builder)
keeps it too and passes it back as `ranking`.

Each sparsifier is declared once as a `Pruning` (`MAGNITUDE`, `OUTLIERS`, `DARE`,
`DELLA`): what the merge methods built on it inherit (seeded draws, a ranking, the
ranges a search may propose). A new sparsifier is a function and its `Pruning`;
its own per-model parameters (as `gamma`, `epsilon`) reach it by name.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch


class Sparsifier(Protocol):
    """Prunes a task vector: in place where its dtype allows (the caller's own scratch copy, so no
    tensor-sized copy is made), and returns the pruned tensor."""

    def __call__(
        self,
        tensor: torch.Tensor,
        *,
        density: float,
        rescale: bool,
        generator: Optional[torch.Generator] = None,
        ranking: Optional[torch.Tensor] = None,
        **extra: float,
    ) -> torch.Tensor: ...


RESCALE_EPS = 1e-7  # below this L1 norm (before or after masking) a tensor is not rescaled, as in mergekit


def _rescaled_(tensor: torch.Tensor, before: Optional[torch.Tensor]) -> torch.Tensor:
    """The masked tensor scaled back, in place, to the L1 norm `before` masking, as mergekit does
    (not when either norm is about 0); `before` None: no rescaling."""
    if before is None or before < RESCALE_EPS:
        return tensor
    after = tensor.abs().sum()
    return tensor if after < RESCALE_EPS else tensor.mul_(before / after)


def _mask_(tensor: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    """`tensor` times the mask, in place: no tensor-sized product or rescaled copy."""
    before = tensor.abs().sum() if rescale else None
    return _rescaled_(tensor.mul_(keep), before)


def _sort_key(tensor: torch.Tensor) -> torch.Tensor:
    """Magnitudes to rank by; sorted in float32 on the CPU, where half types are slow or missing."""
    magnitudes = tensor.abs().reshape(-1)
    return magnitudes.float() if magnitudes.device.type == "cpu" else magnitudes


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float16 arithmetic is slow or missing on the CPU: work in float32 there."""
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


# Entries per pass on the CPU: the pass's draws, mask and slice of the task vector stay in cache, and
# a pass is large enough that the Python between its torch calls is negligible.
DRAW_CHUNK = 1 << 18
# The rescaling's L1 norms are float64 sums, in order, of float32 sums over slices of this many entries:
# each slice's sum is one reduction on one thread, so the norm does not depend on the thread count.
NORM_SLICE = 1 << 15  # DRAW_CHUNK is a multiple of it, so the slices are the whole tensor's whatever the passes
DRAW_BITS = 15  # random bits per entry: a keep probability is rounded to a multiple of 2^-15
DRAW_SCALE = 1 << DRAW_BITS
DRAW_MASK = 0x7FFF7FFF  # the low 15 bits of each 16-bit half of a 32-bit draw
# The draw scheme's name, stored with each search trial: a seed gives these masks only under this scheme
# (mergetune before 2026-11-30 drew one float32 per entry and is recorded as no scheme at all).
DRAWS = "int15"


def keep_thresholds(probabilities: torch.Tensor | float) -> torch.Tensor | int:
    """An entry is kept when its 15-bit draw is below its threshold: round(p * 2^15), at most 2^15 - 1
    for a tensor of probabilities (a scalar of 2^15 keeps everything)."""
    if isinstance(probabilities, torch.Tensor):
        return (probabilities.reshape(-1) * DRAW_SCALE).round_().clamp_(0, DRAW_SCALE - 1).to(torch.int16)
    return max(0, min(DRAW_SCALE, round(probabilities * DRAW_SCALE)))


def _keep_(
    tensor: torch.Tensor, thresholds: torch.Tensor | int, generator: Optional[torch.Generator], rescale: bool
) -> tuple[float, float]:
    """Zero, in place, each entry of a contiguous tensor whose draw is not below its keep threshold; return
    the L1 norms before and after (`NORM_SLICE`; 0.0 without `rescale`).

    The draws are uniform 15-bit integers, two per 32-bit number of the generator's stream (its
    costly part: half the numbers a float draw per entry takes); the 32-bit numbers have 31 random
    bits, so each 16-bit half keeps its low 15. On the CPU they are taken slice by slice into one
    small buffer, in stream order, so the mask is that of a single whole-tensor draw whatever the
    slicing, with no tensor-sized temporary, and the norms are summed while each pass is in cache.
    CUDA's stream depends on how the draws are split, so there it is one pass. The mask is a
    bitwise AND: a draw below its threshold, minus the threshold, is negative, so shifted right it
    is all ones (kept); a dropped entry keeps its sign bit only, the ±0 that multiplying by a 0/1
    mask gives.
    """
    flat = tensor.view(-1)
    bits = flat.view(torch.int16 if flat.element_size() == 2 else torch.int32)
    sign = torch.iinfo(bits.dtype).min
    count = flat.numel()
    chunk = DRAW_CHUNK if tensor.device.type == "cpu" else max(2, count + count % 2)
    draws = torch.empty(min(chunk, count + count % 2), dtype=torch.int16, device=tensor.device)
    wide = draws if bits.dtype == torch.int16 else torch.empty(draws.shape, dtype=bits.dtype, device=tensor.device)
    magnitudes = torch.empty(draws.shape, dtype=flat.dtype, device=tensor.device)
    bounds = thresholds.split(chunk) if isinstance(thresholds, torch.Tensor) else itertools.repeat(thresholds)
    before = after = 0.0
    for values, values_bits, bound in zip(flat.split(chunk), bits.split(chunk), bounds):  # views made in one call
        size = values.numel()
        mask, numbers = (draws, draws.view(torch.int32)) if size == len(draws) else _prefix(draws, size)
        numbers.random_(generator=generator).bitwise_and_(DRAW_MASK)
        mask.sub_(bound).bitwise_right_shift_(DRAW_BITS)  # -1 (keep) or 0
        if wide is not draws:
            mask = wide[:size].copy_(mask)
        mask.bitwise_or_(sign)
        if rescale:
            before = _add_norm(before, torch.abs(values, out=magnitudes[:size]))
        values_bits.bitwise_and_(mask)
        if rescale:
            after = _add_norm(after, torch.abs(values, out=magnitudes[:size]))
    return before, after


def _add_norm(total: float, magnitudes: torch.Tensor) -> float:
    """`total` plus the float32 sums of `magnitudes`' `NORM_SLICE`-entry slices, added in order."""
    whole = magnitudes.numel() - magnitudes.numel() % NORM_SLICE
    for value in magnitudes[:whole].view(-1, NORM_SLICE).sum(dim=1, dtype=torch.float32).tolist():
        total += value
    if whole < magnitudes.numel():
        total += float(magnitudes[whole:].sum(dtype=torch.float32))
    return total


def _prefix(draws: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `size` draws of the buffer, and the 32-bit numbers that fill them (one more half for an odd size)."""
    return draws[:size], draws[: size + size % 2].view(torch.int32)


def _random_mask_(
    tensor: torch.Tensor, probabilities: torch.Tensor | float, rescale: bool, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """DARE's and DELLA's pruning, in place: keep each entry with its probability, then rescale to the
    L1 norm before (not when either norm is about 0, as in mergekit)."""
    thresholds = keep_thresholds(probabilities)
    if isinstance(thresholds, int) and thresholds >= DRAW_SCALE:
        return tensor  # rounds to keeping every entry
    before, after = _keep_(tensor, thresholds, generator, rescale)
    if rescale and before >= RESCALE_EPS and after >= RESCALE_EPS:
        tensor.mul_(before / after)
    return tensor


def largest_first(tensor: torch.Tensor) -> torch.Tensor:
    """TIES' ranking: flat entry indices, largest magnitude first (mergekit's argsort, ties included)."""
    return torch.argsort(_sort_key(tensor), descending=True)


def smallest_first(tensor: torch.Tensor) -> torch.Tensor:
    """Model Breadcrumbs' ranking: flat entry indices, smallest magnitude first (mergekit's sort)."""
    return torch.sort(_sort_key(tensor), descending=False).indices


def row_positions(tensor: torch.Tensor) -> torch.Tensor:
    """DELLA's ranking: each entry's magnitude rank within its row, scaled to [0, 1] (rows: the last
    dimension; a vector is one row), in the work dtype."""
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(_work_dtype(tensor)) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    return ((ranks - low) / (high - low)).clamp(0, 1)


def magnitude(
    tensor: torch.Tensor,
    *,
    density: float,
    rescale: bool,
    generator: Optional[torch.Generator] = None,
    ranking: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    keep = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[(largest_first(tensor) if ranking is None else ranking)[:keep]] = 1
    return _mask_(tensor, mask.reshape_as(tensor), rescale)


def magnitude_outliers(
    tensor: torch.Tensor,
    *,
    density: float,
    rescale: bool,
    gamma: float = 0.01,
    generator: Optional[torch.Generator] = None,
    ranking: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if density >= 1:
        return tensor
    count = tensor.numel()
    keep = int(density * count)
    top = int(gamma * count)
    bottom = max(0, count - keep - top)
    order = smallest_first(tensor) if ranking is None else ranking
    mask = torch.zeros(count, dtype=tensor.dtype, device=tensor.device)
    mask[order[bottom : bottom + keep]] = 1
    return _mask_(tensor, mask.reshape_as(tensor), rescale)


def bernoulli(
    tensor: torch.Tensor, *, density: float, rescale: bool, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    if density >= 1:
        return tensor
    return _random_mask_(tensor.to(_work_dtype(tensor)), density, rescale, generator).to(tensor.dtype)


def della_magprune(
    tensor: torch.Tensor,
    *,
    density: float,
    rescale: bool,
    epsilon: float = 0.15,
    generator: Optional[torch.Generator] = None,
    ranking: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise ValueError(f"DELLA needs density ± epsilon inside (0, 1); got density={density}, epsilon={epsilon}")
    shape = tensor.shape
    work = _work_dtype(tensor)
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    position = row_positions(tensor) if ranking is None else ranking
    probabilities = (density - epsilon) + position * 2 * epsilon
    kept = _random_mask_(rows.to(work), probabilities, rescale, generator)
    return kept.to(tensor.dtype).reshape(shape)


def top_variance(task_vectors: torch.Tensor, density: float, dtype: torch.dtype) -> torch.Tensor:
    """SCE's selection: a mask of the `density` fraction of entries whose values vary most across models.

    The fraction is of the entries that vary at all; the mask covers one task vector's shape.
    """
    if density <= 0:
        return torch.zeros_like(task_vectors[0], dtype=dtype)
    if density >= 1:
        return torch.ones_like(task_vectors[0], dtype=dtype)
    variance = torch.var(task_vectors, dim=0, unbiased=False)
    keep = int(torch.count_nonzero(variance) * density)  # a tensor product, rounded as mergekit rounds it
    mask = torch.zeros_like(variance, dtype=dtype)
    if keep:
        mask.view(-1)[torch.topk(variance.abs().view(-1), k=keep, largest=True).indices] = 1
    return mask


def compact(ranking: torch.Tensor) -> torch.Tensor:
    """A ranking to keep: int64 indices as int32 where they fit (half the memory, the same entries)."""
    if ranking.dtype == torch.int64 and ranking.numel() < 2**31:
        return ranking.to(torch.int32)
    return ranking


# Every density in [0.1, 0.9] with every epsilon in [0, 0.09] keeps density ± epsilon inside (0, 1).
DELLA_SEARCH_RANGES = {"density": (0.1, 0.9), "epsilon": (0.0, 0.09)}


def della_ranges_problem(ranges: dict[str, tuple[float, float]]) -> Optional[str]:
    """Why some density and epsilon of these ranges would fail `della_magprune`'s check (a density of 1 or
    more, or 0 or less, needs none), or None."""
    (low, high), top = ranges["density"], ranges["epsilon"][1]
    inside = (max(low, 0.0), min(high, 1.0))  # the densities that are checked lie strictly between
    if top <= 0 or inside[0] >= 1 or inside[1] <= 0:
        return None
    if inside[1] + top < 1 and inside[0] - top > 0:
        return None
    return (
        f"density {low}…{high} with epsilon up to {top} gives density ± epsilon outside (0, 1), which DELLA "
        "cannot merge (nor can mergekit); keep epsilon below the lowest density and below 1 − the highest "
        f"(density below 1), e.g. density {list(DELLA_SEARCH_RANGES['density'])} with epsilon "
        f"{list(DELLA_SEARCH_RANGES['epsilon'])}"
    )



@dataclass(frozen=True)
class Pruning:
    """A sparsifier (none: plain task arithmetic) and what every merge method built on it inherits from it."""

    prune: Optional[Sparsifier] = None
    randomized: bool = False  # masks drawn from the seeded generator: a recipe needs its seed to reproduce
    ranking: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # its order of entries, density-free
    # A density is a keep probability per entry, so a negative one is refused (not read as "keep none").
    density_is_probability: bool = False
    # Ranges a search proposes by default where some values of the parameters' own ranges cannot merge.
    search_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    check_ranges: Optional[Callable[[dict[str, tuple[float, float]]], Optional[str]]] = None


NO_PRUNING = Pruning()  # task arithmetic
MAGNITUDE = Pruning(magnitude, ranking=largest_first)  # TIES
OUTLIERS = Pruning(magnitude_outliers, ranking=smallest_first)  # Model Breadcrumbs
DARE = Pruning(bernoulli, randomized=True, density_is_probability=True)
DELLA = Pruning(
    della_magprune, randomized=True, ranking=row_positions, search_ranges=DELLA_SEARCH_RANGES,
    check_ranges=della_ranges_problem,
)
