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
    def __call__(
        self,
        tensor: torch.Tensor,
        *,
        density: float,
        rescale: bool,
        generator: Optional[torch.Generator] = None,
        **extra: float,
    ) -> torch.Tensor: ...


def _masked(tensor: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    masked = tensor * mask
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def _sort_key(tensor: torch.Tensor) -> torch.Tensor:
    """Magnitudes to rank by; sorted in float32 on the CPU, where half types are slow or missing."""
    magnitudes = tensor.abs().reshape(-1)
    return magnitudes.float() if magnitudes.device.type == "cpu" else magnitudes


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float16 arithmetic is slow or missing on the CPU: work in float32 there."""
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


def _keep(probabilities: torch.Tensor | float, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """A Bernoulli keep-mask: uniform draws below the keep probability (2-3x faster than torch.bernoulli on CPU)."""
    draws = torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    return draws < probabilities


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
    return _masked(tensor, mask.reshape_as(tensor), rescale)


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
    return _masked(tensor, mask.reshape_as(tensor), rescale)


def bernoulli(
    tensor: torch.Tensor, *, density: float, rescale: bool, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    if density >= 1:
        return tensor
    work = _work_dtype(tensor)
    return _masked(tensor.to(work), _keep(density, tensor, generator), rescale).to(tensor.dtype)


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
    return _masked(rows.to(work), _keep(probabilities, rows, generator), rescale).to(tensor.dtype).reshape(shape)


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
