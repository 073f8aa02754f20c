"""Pruning of task vectors (delta = model - base) before they are combined.

`magnitude` keeps the largest entries (TIES), `bernoulli` keeps a random fraction
(DARE), `magnitude_outliers` drops the smallest and the largest (Model
Breadcrumbs), `della_magprune` keeps each entry with a probability that grows with
its rank in its row (DELLA). With `rescale`, the pruned tensor is scaled back to
the L1 norm of the original, as mergekit does. `top_variance` selects across all
task vectors at once: the entries on which the models disagree most (SCE).
"""

from __future__ import annotations

from typing import Optional, Protocol

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
        **extra: float,
    ) -> torch.Tensor: ...


def _rescaled_(tensor: torch.Tensor, before: Optional[torch.Tensor], eps: float = 1e-7) -> torch.Tensor:
    """The masked tensor scaled back, in place, to the L1 norm `before` masking, as mergekit does
    (not when either norm is about 0); `before` None: no rescaling."""
    if before is None or before < eps:
        return tensor
    after = tensor.abs().sum()
    return tensor if after < eps else tensor.mul_(before / after)


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


# Uniform draws per pass on the CPU: the float32 draws and the keep-mask stay in L1/L2 cache, and
# each pass's kernels run on the calling thread (at most torch's grain size, 32768), so the task
# vectors of several models can be pruned on parallel threads.
DRAW_CHUNK = 1 << 15


def _keep_(tensor: torch.Tensor, probabilities: torch.Tensor | float, generator: Optional[torch.Generator]) -> None:
    """Zero, in place, each entry of a contiguous tensor whose uniform draw is not below its keep probability.

    Comparing uniform draws is 2-3x faster than torch.bernoulli on the CPU. There each element takes
    the next number of the generator's stream, so drawing chunk by chunk into one small buffer gives
    the mask of a single whole-tensor draw without its float32 temporary (4 bytes per element).
    CUDA's stream depends on how the draws are split, so there it is one draw.
    """
    flat = tensor.view(-1)
    bounds = probabilities.reshape(-1) if isinstance(probabilities, torch.Tensor) else probabilities
    count = flat.numel()
    chunk = DRAW_CHUNK if tensor.device.type == "cpu" else max(1, count)
    draws = torch.empty(min(chunk, count), dtype=torch.float32, device=tensor.device)
    keep = torch.empty(draws.shape, dtype=torch.bool, device=tensor.device)
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        torch.rand(size, generator=generator, out=draws[:size])
        bound = bounds[start : start + size] if isinstance(bounds, torch.Tensor) else bounds
        flat[start : start + size].mul_(torch.lt(draws[:size], bound, out=keep[:size]))


def _random_mask_(
    tensor: torch.Tensor, probabilities: torch.Tensor | float, rescale: bool, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """DARE's and DELLA's pruning, in place: keep each entry with its probability, then rescale."""
    before = tensor.abs().sum() if rescale else None
    _keep_(tensor, probabilities, generator)
    return _rescaled_(tensor, before)


def magnitude(
    tensor: torch.Tensor, *, density: float, rescale: bool, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    keep = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.argsort(_sort_key(tensor), descending=True)[:keep]] = 1
    return _mask_(tensor, mask.reshape_as(tensor), rescale)


def magnitude_outliers(
    tensor: torch.Tensor,
    *,
    density: float,
    rescale: bool,
    gamma: float = 0.01,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    if density >= 1:
        return tensor
    count = tensor.numel()
    keep = int(density * count)
    top = int(gamma * count)
    bottom = max(0, count - keep - top)
    order = torch.sort(_sort_key(tensor), descending=False).indices
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
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(work) + 1
    low = ranks.min(dim=1, keepdim=True).values
    high = ranks.max(dim=1, keepdim=True).values
    position = ((ranks - low) / (high - low)).clamp(0, 1)
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
