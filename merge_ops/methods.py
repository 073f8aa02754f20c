"""Merge methods: small pure functions over tensors, and the registry that names them.

Semantics and defaults follow mergekit 0.1.5, so a recipe gives the same tensors
here and there: the precision each method computes in, SLERP's fallback to linear
interpolation for near-colinear weights, DARE's rescaling, TIES' sign consensus.
Random methods draw from an explicit `torch.Generator`, seeded per tensor and
per model, so the same recipe and seed give bit-identical output whatever order
the tensors are built in.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from mergetune.merge_ops import sparsify
from mergetune.merge_ops.sparsify import Pruning, Sparsifier
from mergetune.registry import Registry

REQUIRED = object()


class Scope(enum.Enum):
    SHARED = "shared"  # one value per tensor
    INPUT = "input"  # one value per input model
    NON_BASE = "non_base"  # one value per input model other than the base


class BasePolicy(enum.Enum):
    REQUIRED = "required"
    OPTIONAL = "optional"
    IGNORED = "ignored"


@dataclass(frozen=True)
class ParamSpec:
    name: str
    value_type: Any
    scope: Scope
    default: Any = REQUIRED
    # The interval the parameter means something in: search spaces must lie inside it. mergekit merges
    # values outside it all the same, so a recipe may hold them (merged alike, with a warning), except
    # below `refuse_below`, where mergekit fails and so is a recipe refused.
    low: Optional[float] = None
    high: Optional[float] = None
    low_inclusive: bool = True
    refuse_below: Optional[float] = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def out_of_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return True
        return self.high is not None and value > self.high

    def range_text(self) -> str:
        """`[0.0, 1.0]`, `(0.0, 1.0]`, `[0, ∞)` where there is no upper end."""
        opening = "[" if self.low_inclusive else "("
        return f"{opening}{self.low}, ∞)" if self.high is None else f"{opening}{self.low}, {self.high}]"


class Scratch:
    """Working memory kept between merges: on the CPU a tensor-sized buffer allocated afresh for every
    tensor of every candidate is mapped from the OS and page-faulted in each time (a fifth of a
    SmolLM2-135M DARE TIES build in a virtual machine)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def get(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of `shape`: a view of one buffer per dtype and device, grown as needed
        (so valid until the next `get` of that dtype and device)."""
        count = math.prod(shape)
        buffer = self._buffers.get((dtype, device))
        if buffer is None or buffer.numel() < count:
            buffer = self._buffers[(dtype, device)] = torch.empty(count, dtype=dtype, device=device)
        return buffer[:count].view(shape)


@dataclass
class Reuse:
    """What a caller that merges again and again (the in-memory builder) hands a method instead of
    recomputing or allocating it; each part optional, and used only by the methods that can."""

    # Task-arithmetic methods: each input's task vector (input − base, flat, compute dtype) where the caller
    # already has it (an in-memory builder's cache), None where it must be computed; never modified.
    task_vectors: Optional[list[Optional[torch.Tensor]]] = None
    # Rank-based pruning: each input's ranking of its task vector (the method's `ranking`), where the caller
    # keeps it with the task vector, None where it must be computed; never modified.
    rankings: Optional[list[Optional[torch.Tensor]]] = None
    # What the method's `measure` gives for these inputs (SLERP: the pair's angle), where the caller keeps it.
    measured: Optional[object] = None
    # Where to write the result, if its shape and dtype are the result's (the live model's parameter).
    out: Optional[torch.Tensor] = None
    scratch: Optional[Scratch] = None


@dataclass
class MergeInputs:
    """One output tensor's inputs, in recipe order, already in the compute dtype."""

    tensors: list[torch.Tensor]
    base_index: Optional[int]
    # Per-input parameter values aligned with `tensors` (None where not applicable).
    per_input: dict[str, list[Any]] = field(default_factory=dict)
    generators: Optional[list[Optional[torch.Generator]]] = None
    reuse: Reuse = field(default_factory=Reuse)

    @property
    def base(self) -> Optional[torch.Tensor]:
        return None if self.base_index is None else self.tensors[self.base_index]

    @property
    def non_base(self) -> list[int]:
        return [index for index in range(len(self.tensors)) if index != self.base_index]


MergeFunction = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    pretty_name: str
    merge: MergeFunction  # merge(inputs: MergeInputs, **shared_parameters) -> Tensor
    params: tuple[ParamSpec, ...]
    base: BasePolicy = BasePolicy.IGNORED
    min_inputs: int = 1
    max_inputs: Optional[int] = None
    # Models besides the base, when the method needs a number of them (mergekit's min/max_non_base).
    min_non_base: Optional[int] = None
    max_non_base: Optional[int] = None
    randomized: bool = False
    reference: str = ""
    # check(shared, per_input) -> why one tensor's resolved parameters would give NaN or inf, or None.
    check: Optional[Callable[[dict[str, Any], dict[str, list[Any]]], Optional[str]]] = None
    # The least dtype the method returns: mergekit writes a kernel's result as it comes when no out_dtype is
    # set, and some kernels multiply by a float32 mask, so their half-precision merges are stored as float32.
    least_result_dtype: Optional[torch.dtype] = None
    # Merges task vectors (input − base) and accepts them precomputed in `Reuse.task_vectors`.
    uses_task_vectors: bool = False
    # Prunes by magnitude rank: how it ranks a task vector's entries (`sparsify.RANKINGS`), which does not
    # depend on the density; it accepts the rankings precomputed in `Reuse.rankings`.
    ranking: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    # What the merge needs of its inputs alone, whatever its parameters (SLERP: the angle between the pair),
    # from (tensors in the compute dtype, base index); it accepts the value precomputed in `Reuse.measured`.
    measure: Optional[Callable[[list[torch.Tensor], Optional[int]], object]] = None
    # For a search over parameter ranges, where values inside the declared ranges fail together (DELLA's
    # density ± epsilon): the ranges searched unless a study says otherwise, and why a box of ranges
    # (name → (low, high); a fixed value is (v, v)) holds a combination that cannot merge, or None.
    search_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    check_ranges: Optional[Callable[[dict[str, tuple[float, float]]], Optional[str]]] = None

    def param(self, name: str) -> Optional[ParamSpec]:
        return next((spec for spec in self.params if spec.name == name), None)

    def result_dtype(self, compute: torch.dtype) -> torch.dtype:
        """The dtype of the merged tensor when the recipe sets no out_dtype."""
        return compute if self.least_result_dtype is None else torch.promote_types(compute, self.least_result_dtype)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- linear


def linear(inputs: MergeInputs, normalize: bool = True) -> torch.Tensor:
    """Weighted average (or weighted sum without `normalize`) in float32."""
    first = inputs.tensors[0]
    weights = inputs.per_input["weight"]
    result = torch.zeros_like(first, dtype=_compute_dtype(first))
    for tensor, weight in zip(inputs.tensors, weights):
        result.add_(tensor, alpha=weight)
    if normalize:
        result.div_(sum(weights))
    return result.to(first.dtype)


ZERO_SUM = 1e-8  # as the task-arithmetic family's divisor: a smaller sum only magnifies rounding


def linear_check(shared: dict[str, Any], per_input: dict[str, list[Any]]) -> Optional[str]:
    """Normalizing by weights that sum to 0 would divide by 0."""
    weights = per_input["weight"]
    if shared["normalize"] and abs(sum(weights)) < ZERO_SUM:
        return f"parameter 'weight': the weights {weights} sum to 0 and normalize divides by their sum; change a weight or set normalize: false"
    return None


# ---------------------------------------------------------------------------- slerp

DOT_THRESHOLD = 0.9995
# Work in slices of ~1M elements so the float32 copies stay in cache: SLERP is
# memory-bound, and whole-tensor temporaries would triple the traffic.
CHUNK_ELEMENTS = 1 << 20


def _chunks(count: int) -> range:
    return range(0, count, CHUNK_ELEMENTS)


@dataclass(frozen=True)
class SlerpGeometry:
    """What SLERP needs from a tensor pair besides `t`: computed once, reused per candidate."""

    dot: float
    theta: float
    colinear: bool


def slerp_geometry(base: torch.Tensor, other: torch.Tensor, eps: float = 1e-8) -> SlerpGeometry:
    """Cosine of the angle between the two flattened tensors, accumulated chunk by chunk in float32."""
    dtype = _compute_dtype(base)
    a, b = base.reshape(-1), other.reshape(-1)
    square_a = square_b = product = 0.0
    for start in _chunks(a.numel()):
        x = a[start : start + CHUNK_ELEMENTS].to(dtype)
        y = b[start : start + CHUNK_ELEMENTS].to(dtype)
        square_a += float(torch.dot(x, x))
        square_b += float(torch.dot(y, y))
        product += float(torch.dot(x, y))
    norm_a, norm_b = math.sqrt(square_a), math.sqrt(square_b)
    norm_a = norm_a if norm_a > eps else 1.0
    norm_b = norm_b if norm_b > eps else 1.0
    dot = max(-1.0, min(1.0, product / (norm_a * norm_b)))
    colinear = abs(dot) > DOT_THRESHOLD
    return SlerpGeometry(dot=dot, theta=0.0 if colinear else math.acos(dot), colinear=colinear)


def slerp_coefficients(t: float, geometry: SlerpGeometry) -> tuple[float, float]:
    if geometry.colinear:
        return 1 - t, t
    sin_theta = math.sin(geometry.theta)
    return math.sin((1 - t) * geometry.theta) / sin_theta, math.sin(t * geometry.theta) / sin_theta


def slerp_into(base: torch.Tensor, other: torch.Tensor, coefficients: tuple[float, float], out: torch.Tensor) -> torch.Tensor:
    """out = coef_base * base + coef_other * other, computed in float32 chunk by chunk.

    `out` may be a live model's parameter: the disk merge and the in-memory build
    share this arithmetic, so both give bit-identical weights.
    """
    coef_base, coef_other = coefficients
    dtype = _compute_dtype(base)
    a, b, target = base.reshape(-1), other.reshape(-1), out.view(-1)
    for start in _chunks(a.numel()):
        chunk = a[start : start + CHUNK_ELEMENTS].to(dtype, copy=True)
        chunk.mul_(coef_base).add_(b[start : start + CHUNK_ELEMENTS], alpha=coef_other)
        target[start : start + CHUNK_ELEMENTS].copy_(chunk)
    return out


def slerp_measure(tensors: list[torch.Tensor], base_index: Optional[int]) -> SlerpGeometry:
    """The pair's geometry: all of SLERP's work that does not depend on `t`."""
    assert base_index is not None
    return slerp_geometry(tensors[base_index], tensors[1 - base_index])


def slerp(inputs: MergeInputs, t: float) -> torch.Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1)."""
    if not inputs.tensors[0].is_floating_point():
        raise TypeError("SLERP requires floating-point tensors")
    base = inputs.tensors[inputs.base_index]
    other = inputs.tensors[1 - inputs.base_index]
    geometry = inputs.reuse.measured
    if geometry is None:
        geometry = slerp_measure(inputs.tensors, inputs.base_index)
    out = inputs.reuse.out
    fits = out is not None and out.shape == base.shape and out.dtype == base.dtype and out.is_contiguous()
    return slerp_into(base, other, slerp_coefficients(t, geometry), out if fits else torch.empty_like(base))


# -------------------------------------------------------------------------- nuslerp


def _nuslerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool, eps: float = 1e-8):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos_theta = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos_theta.square()) <= eps**2
    theta = torch.acos(torch.where(colinear, 0, cos_theta))
    spherical = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, spherical)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def nuslerp(inputs: MergeInputs, nuslerp_row_wise: bool = False, nuslerp_flatten: bool = True) -> torch.Tensor:
    """SLERP of two models by relative weight; with a base, of their task vectors."""
    first, second = inputs.non_base
    weight_first = inputs.per_input["weight"][first]
    weight_second = inputs.per_input["weight"][second]
    total = weight_first + weight_second
    t = 0.5 if abs(total) < 1e-6 else weight_second / total
    a, b = inputs.tensors[first], inputs.tensors[second]
    base = inputs.base
    if base is None:
        return _nuslerp_pair(t, a, b, nuslerp_row_wise, nuslerp_flatten)
    return base + _nuslerp_pair(t, a - base, b - base, nuslerp_row_wise, nuslerp_flatten)


# ------------------------------------------------------------- task-arithmetic family


def _majority_mask(deltas: torch.Tensor, int8_mask: bool) -> torch.Tensor:
    """TIES sign election: keep the entries whose sign agrees with the summed delta."""
    mask_dtype = torch.int8 if int8_mask else deltas.dtype
    sign = deltas.sign().to(mask_dtype)
    majority = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    return sign == majority


# Entries per pass when the pruned task vectors are combined: every model's slice and the pass's
# float32 temporaries stay in cache instead of streaming tensor-sized temporaries through memory
# (measured on 2 cores: 2x faster than 2^14, no faster beyond).
COMBINE_CHUNK = 1 << 17
# Per-model parameters the task-arithmetic family reads itself; any other is its sparsifier's (gamma, epsilon).
TASK_VECTOR_INPUTS = ("weight", "density")


def _combine(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    base: torch.Tensor,
    out: torch.Tensor,
    consensus: bool,
    normalize: bool,
    lam: float,
) -> None:
    """out = base + lam * (weighted, sign-elected, normalized sum of `deltas`), for one slice of entries.

    Every step is elementwise or a sum across models, so slice by slice gives the whole tensor's
    values. Half-precision sums accumulate in float32 and round once, as torch's own sums do; the
    sign election is arithmetic in that precision too (bool masks convert slowly on the CPU).
    """
    deltas.mul_(weights)
    wide = deltas.to(torch.promote_types(deltas.dtype, torch.float32))  # may be `deltas` itself: scratch either way
    if consensus:
        majority = torch.copysign(torch.ones((), dtype=wide.dtype), wide.sum(dim=0))
        agree = (wide * majority).gt_(0)  # 1 where a model's sign is the majority's, else 0
        mixed = wide.mul_(agree).sum(dim=0).to(deltas.dtype)
        if normalize:
            divisor = (weights * agree).sum(dim=0).to(deltas.dtype)
            divisor[divisor == 0] = 1
            mixed /= divisor
    else:
        mixed = wide.sum(dim=0).to(deltas.dtype)
        if normalize:
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
            mixed /= divisor
    if lam != 1:
        mixed *= lam
    torch.add(base, mixed, out=out)


def task_arithmetic_family(
    sparsifier: Optional[Sparsifier], consensus: bool
) -> MergeFunction:
    """Build one of task_arithmetic / ties / dare_* / breadcrumbs* / della*.

    They differ only in how each task vector is pruned and whether signs are elected.
    Each task vector is pruned whole (magnitude ranks and DARE's rescaling are
    tensor-wide); they are then combined slice by slice (`COMBINE_CHUNK`).
    """

    def merge(
        inputs: MergeInputs,
        int8_mask: bool,  # mergekit's saving on its tensor-sized sign mask; a slice's mask is small, the same values
        normalize: bool,
        rescale: bool,
        **shared: Any,
    ) -> torch.Tensor:
        lam = shared["lambda"]
        base = inputs.base
        others = inputs.non_base
        if not others:
            return base
        flat_base = base.reshape(-1)
        reuse = inputs.reuse
        shape = (len(others), flat_base.numel())
        deltas = reuse.scratch.get(shape, base.dtype, base.device) if reuse.scratch else base.new_empty(shape)

        # One model after the other, each pass's ops on torch's own threads: the seeded draws are serial
        # per model anyway, and a thread per model paid for it in interpreter-lock handoffs and, on a
        # CPU shared with other work, in threads waiting for each other (docs/benchmarks.md).
        for row, index in enumerate(others):
            cached = reuse.task_vectors[index] if reuse.task_vectors else None
            if cached is not None:  # the same values torch.sub gives: pruning then works on a copy
                deltas[row].copy_(cached)
            else:
                torch.sub(inputs.tensors[index].reshape(-1), flat_base, out=deltas[row])
            if sparsifier is not None:
                generator = inputs.generators[index] if inputs.generators else None
                # The sparsifier's own per-model parameters (gamma, epsilon), by name.
                extra = {key: values[index] for key, values in inputs.per_input.items() if key not in TASK_VECTOR_INPUTS}
                ranking = reuse.rankings[index] if reuse.rankings else None
                if ranking is not None:
                    extra["ranking"] = ranking
                pruned = sparsifier(
                    deltas[row].view(base.shape),
                    density=inputs.per_input["density"][index],
                    rescale=rescale,
                    generator=generator,
                    **extra,
                )
                if pruned.data_ptr() != deltas[row].data_ptr():  # pruned in place: already there
                    deltas[row] = pruned.reshape(-1)
        weights = torch.tensor(
            [inputs.per_input["weight"][index] for index in others], dtype=deltas.dtype, device=deltas.device
        ).reshape(-1, 1)
        out = reuse.out
        fits = out is not None and out.shape == base.shape and out.dtype == base.dtype and out.is_contiguous()
        merged = out if fits else torch.empty(base.shape, dtype=base.dtype, device=base.device)
        flat_merged = merged.view(-1)
        for start in range(0, flat_base.numel(), COMBINE_CHUNK):
            end = start + COMBINE_CHUNK
            _combine(
                deltas[:, start:end], weights, flat_base[start:end], flat_merged[start:end], consensus, normalize, lam
            )
        return merged

    return merge


# ----------------------------------------------------------------------- model stock


def model_stock(inputs: MergeInputs, filter_wise: bool = False) -> torch.Tensor:
    """Interpolate between the base and the models' average by their mutual angle."""
    base = inputs.base
    models = [inputs.tensors[index] for index in inputs.non_base]
    shape = base.shape
    if filter_wise:
        if base.dim() == 1:
            base = base.unsqueeze(0)
            models = [model.unsqueeze(0) for model in models]
    else:
        base = base.reshape(-1)
        models = [model.reshape(-1) for model in models]
    offsets = [model - base for model in models]
    cosines = []
    for position, first in enumerate(offsets):
        for second in offsets[position + 1 :]:
            norms = torch.norm(first, dim=-1) * torch.norm(second, dim=-1)
            cosines.append(((first * second).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(models)
    denominator = 1 + (count - 1) * cos_theta
    singular = denominator.abs() < 1e-6
    ratio = torch.where(
        singular,
        torch.zeros_like(cos_theta),
        (count * cos_theta) / torch.where(singular, torch.ones_like(denominator), denominator),
    )
    average = sum(models) / count
    return (ratio * average + (1 - ratio) * base).reshape(shape)


# ----------------------------------------------------------------------- passthrough


def passthrough(inputs: MergeInputs) -> torch.Tensor:
    """The single input unchanged (layer stacks), optionally scaled."""
    tensor = inputs.tensors[0]
    scale = inputs.per_input["scale"][0]
    return tensor if scale is None else tensor * scale


# ------------------------------------------------------------------------ multislerp


def multislerp(inputs: MergeInputs, normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Weighted mean of any number of models on the hypersphere (of task vectors, given a base).

    The unit vectors are averaged, projected onto the tangent space at that mean,
    mapped back with the exponential map and scaled by the weighted mean norm.
    """
    others = inputs.non_base
    if len(others) == 1:
        return inputs.tensors[others[0]]
    base = inputs.base
    tensors = torch.stack([inputs.tensors[index] for index in others])
    if base is not None:
        tensors -= base
    flat = tensors.view(len(others), -1)
    weights = torch.tensor(
        [inputs.per_input["weight"][index] for index in others], dtype=tensors.dtype, device=tensors.device
    )
    if normalize_weights:
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if len(others) != 2:
            raise ValueError(
                "the weighted sum of the unit task vectors is zero (antipodal inputs with balancing weights); "
                "change the weights"
            )
        result = tensors[0] * weights[0] + tensors[1] * weights[1]  # two antipodes: linear interpolation
    else:
        mean = mean / mean_norm
        tangents = units - (units * mean).sum(-1, keepdim=True) * mean
        tangent = (tangents * weights.view(-1, 1)).sum(0)
        tangent_norm = torch.norm(tangent) + eps
        on_sphere = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
        result = (on_sphere * (norms.squeeze(-1) * weights).sum()).view(tensors.shape[1:])
    return result if base is None else result + base


# --------------------------------------------------------------------------- karcher


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """Weighted Karcher (Riemannian) mean of the tensors' directions, scaled by their weighted mean norm.

    Norms and angles' stopping tests are taken in float32 (float64 for float64
    inputs); the iterate itself stays in the inputs' dtype, as mergekit's does.
    """
    if len(tensors) == 1:
        return tensors[0]
    dtype = _compute_dtype(tensors[0])
    norms = [torch.linalg.vector_norm(tensor.to(dtype)) for tensor in tensors]
    units = [
        torch.zeros_like(tensor) if norm.item() == 0.0 else (tensor / norm).to(tensor.dtype)
        for tensor, norm in zip(tensors, norms)
    ]
    valid = [index for index, norm in enumerate(norms) if norm.item() > tol]
    if not valid:
        return sum(tensor * 0 for tensor in tensors)
    total = sum(alphas[index] for index in valid)
    weights = [alphas[index] / total for index in valid]
    valid_units = [units[index] for index in valid]
    mean = torch.zeros_like(valid_units[0])
    for weight, unit in zip(weights, valid_units):
        mean += weight * unit
    mean_norm = torch.linalg.vector_norm(mean.to(dtype))
    mean = valid_units[0].clone() if mean_norm.item() < tol else (mean / mean_norm).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for weight, unit in zip(weights, valid_units):
            dot = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += weight * (theta / torch.sin(theta)) * (unit - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent.to(dtype))
        if tangent_norm.item() < tol:
            break
        mean = (torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)).to(mean.dtype)
        unit_norm = torch.linalg.vector_norm(mean.to(dtype))
        if unit_norm.item() > tol:
            mean = (mean / unit_norm).to(mean.dtype)
    return sum(alpha * norm for alpha, norm in zip(alphas, norms)) * mean


def karcher(inputs: MergeInputs, max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """The equally weighted Karcher mean of every input (a listed base is one more input)."""
    count = len(inputs.tensors)
    return karcher_mean(inputs.tensors, [1.0 / count] * count, max_iter, tol)


# ------------------------------------------------------------------------------ sce


def _sce_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """Each task vector's share of the total mean square: larger updates weigh more."""
    weights = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = torch.sum(weights).item()
    if abs(total) < 1e-6:
        return torch.ones_like(weights) / weights.shape[0]
    return weights / total


def sce(inputs: MergeInputs, int8_mask: bool = False, select_topk: float = 1.0) -> torch.Tensor:
    """Select (the entries that vary most across models), calculate (weights), erase (minority signs)."""
    base = inputs.base
    others = inputs.non_base
    if not others:
        return base
    task_vectors = torch.stack([inputs.tensors[index] - base for index in others])
    if select_topk < 1:
        mask_dtype = torch.int8 if int8_mask else base.dtype
        task_vectors = task_vectors * sparsify.top_variance(task_vectors, select_topk, mask_dtype).unsqueeze(0)
    erase = _majority_mask(task_vectors, int8_mask)
    weights = _sce_weights(task_vectors).reshape(-1, *([1] * base.dim()))
    erased = weights * erase
    merged = (task_vectors * erased).sum(dim=0)
    return base + merged / torch.sum(erased, dim=0).clamp(min=1e-6)


# ------------------------------------------------------------------------- nearswap


def nearswap(inputs: MergeInputs, t: float) -> torch.Tensor:
    """Take the other model's value where it is within `t` of the base's, blend in proportion beyond."""
    base = inputs.base
    other = inputs.tensors[inputs.non_base[0]]
    weight = (t / torch.abs(base - other).clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


# --------------------------------------------------------------------- arcee fusion

QUANTILE_SAMPLE = 1_000_000  # larger tensors' quantiles are estimated from this many draws


def _fusion_importance(tensor: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|change| times the KL divergence of the rows' softmax: large changes where the rows moved most."""
    eps = 1e-8
    p = torch.softmax(tensor, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    return (tensor - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)


def _approximate_quantiles(
    values: torch.Tensor, quantiles: torch.Tensor, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """Quantiles by sorting, from a sample (with replacement) when the tensor is large."""
    flat = values.reshape(-1)
    if flat.numel() > QUANTILE_SAMPLE:
        flat = flat[torch.randint(flat.numel(), (QUANTILE_SAMPLE,), generator=generator, device=flat.device)]
    ordered = torch.sort(flat).values
    return ordered[(quantiles.to(ordered.device) * (ordered.numel() - 1)).long()]


def arcee_fusion(inputs: MergeInputs) -> torch.Tensor:
    """Keep the other model's changes only where their importance is an upper outlier (Tukey's fence)."""
    base = inputs.base
    index = inputs.non_base[0]
    other = inputs.tensors[index]
    importance = _fusion_importance(other, base)
    generator = inputs.generators[index] if inputs.generators else None
    q1, median, q3 = _approximate_quantiles(importance, torch.tensor([0.25, 0.5, 0.75]), generator)
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (other - base) * mask


# ------------------------------------------------------------------------------ ram


@dataclass(frozen=True)
class RamMasks:
    """Which models change each entry by more than epsilon: their task vectors and the overlap counts."""

    task_vectors: torch.Tensor  # [models, entries], zero where a model's change is within epsilon
    changed: torch.Tensor  # [models, entries] bool
    counts: torch.Tensor  # [1, entries]: how many models change the entry
    overlap: torch.Tensor  # [1, entries]: changed by more than one model
    unique: torch.Tensor  # [1, entries]: changed by exactly one model


def ram_masks(inputs: MergeInputs, epsilon: float) -> RamMasks:
    """What RAM and RAM+ share: each model's task vector, flattened, and who changed each entry."""
    base = inputs.base
    others = inputs.non_base
    flat = torch.stack([inputs.tensors[index] - base for index in others]).view(len(others), -1)
    changed = flat.abs() > epsilon
    counts = changed.sum(dim=0, keepdim=True)
    return RamMasks(flat * changed, changed, counts, counts > 1, counts == 1)


def ram(inputs: MergeInputs, epsilon: float = 1e-5) -> torch.Tensor:
    """Entries one model changed take its change whole; entries several changed take their mean change."""
    base = inputs.base
    if not inputs.non_base:
        return base
    masks = ram_masks(inputs, epsilon)
    vectors = masks.task_vectors
    merged = ((vectors * masks.unique) + (vectors * masks.overlap / masks.counts.clamp(min=1))).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


def ramplus_tl(inputs: MergeInputs, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM, with each model's unique changes amplified by how much of its change the others share."""
    base = inputs.base
    if not inputs.non_base:
        return base
    masks = ram_masks(inputs, epsilon)
    shared = (masks.changed & masks.overlap).sum(dim=1)
    unique = (masks.changed & masks.unique).sum(dim=1)
    scale = 1 + r * (shared / unique.clamp(min=epsilon)).clamp(min=0, max=alpha)
    vectors = masks.task_vectors
    merged = (
        (vectors * masks.unique * scale.unsqueeze(-1)) + (vectors * masks.overlap / masks.counts.clamp(min=1))
    ).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


# -------------------------------------------------------------------------- registry


def _task_arithmetic_params(
    normalize: bool, rescale: bool, extra: tuple[ParamSpec, ...] = (), density_is_probability: bool = False
) -> tuple[ParamSpec, ...]:
    return (
        ParamSpec("int8_mask", bool, Scope.SHARED, False),
        ParamSpec("normalize", bool, Scope.SHARED, normalize),
        ParamSpec("rescale", bool, Scope.SHARED, rescale),
        ParamSpec("lambda", float, Scope.SHARED, 1.0),
        ParamSpec("weight", float, Scope.NON_BASE),
        # A random mask draws each entry with probability `density`: a negative one is no probability.
        ParamSpec(
            "density", float, Scope.NON_BASE, 1.0, low=0.0, high=1.0, low_inclusive=False,
            refuse_below=0.0 if density_is_probability else None,
        ),
        *extra,
    )


def _task_arithmetic_method(
    name: str,
    pretty: str,
    pruning: Pruning,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    reference: str,
    extra: tuple[ParamSpec, ...] = (),
) -> MethodSpec:
    """A task-arithmetic method: `pruning` declares what it inherits from its sparsifier; `extra` are the
    sparsifier's own per-model parameters, passed to it by name."""
    return MethodSpec(
        name=name,
        pretty_name=pretty,
        merge=task_arithmetic_family(pruning.prune, consensus),
        # mergekit accepts `density` for plain task arithmetic too; it has no effect there.
        params=_task_arithmetic_params(normalize, rescale, extra, pruning.density_is_probability),
        base=BasePolicy.REQUIRED,
        randomized=pruning.randomized,
        reference=reference,
        uses_task_vectors=True,
        ranking=pruning.ranking,
        search_ranges=pruning.search_ranges,
        check_ranges=pruning.check_ranges,
    )


_GAMMA = (ParamSpec("gamma", float, Scope.NON_BASE, 0.01, low=0.0, high=1.0),)
_EPSILON = (ParamSpec("epsilon", float, Scope.NON_BASE, 0.15, low=0.0, high=1.0),)
# RAM's threshold below which a change counts as none: a numerical constant, so only bounded below.
_RAM_EPSILON = ParamSpec("epsilon", float, Scope.SHARED, 1e-5, low=0.0)

METHODS: Registry[MethodSpec] = Registry("merge method")
for _spec in (
    MethodSpec(
        "linear",
        "Linear",
        linear,
        (ParamSpec("weight", float, Scope.INPUT), ParamSpec("normalize", bool, Scope.SHARED, True)),
        reference="https://arxiv.org/abs/2203.05482",
        check=linear_check,
    ),
    MethodSpec(
        "slerp",
        "SLERP",
        slerp,
        (ParamSpec("t", float, Scope.SHARED, low=0.0, high=1.0),),
        base=BasePolicy.REQUIRED,
        min_inputs=2,
        max_inputs=2,
        reference="https://en.wikipedia.org/wiki/Slerp",
        measure=slerp_measure,
    ),
    MethodSpec(
        "nuslerp",
        "NuSLERP",
        nuslerp,
        (
            ParamSpec("weight", float, Scope.NON_BASE),
            ParamSpec("nuslerp_row_wise", bool, Scope.SHARED, False),
            ParamSpec("nuslerp_flatten", bool, Scope.SHARED, True),
        ),
        base=BasePolicy.OPTIONAL,
        min_non_base=2,
        max_non_base=2,
    ),
    _task_arithmetic_method(
        "task_arithmetic",
        "Task Arithmetic",
        sparsify.NO_PRUNING,
        False,
        False,
        False,
        "https://arxiv.org/abs/2212.04089",
    ),
    _task_arithmetic_method(
        "ties", "TIES", sparsify.MAGNITUDE, True, True, False, "https://arxiv.org/abs/2306.01708"
    ),
    _task_arithmetic_method(
        "dare_ties", "DARE TIES", sparsify.DARE, True, False, True, "https://arxiv.org/abs/2311.03099"
    ),
    _task_arithmetic_method(
        "dare_linear", "Linear DARE", sparsify.DARE, False, False, True, "https://arxiv.org/abs/2311.03099"
    ),
    _task_arithmetic_method(
        "breadcrumbs",
        "Model Breadcrumbs",
        sparsify.OUTLIERS,
        False,
        False,
        False,
        "https://arxiv.org/abs/2312.06795",
        _GAMMA,
    ),
    _task_arithmetic_method(
        "breadcrumbs_ties",
        "Model Breadcrumbs with TIES",
        sparsify.OUTLIERS,
        True,
        False,
        False,
        "https://arxiv.org/abs/2312.06795",
        _GAMMA,
    ),
    _task_arithmetic_method(
        "della", "DELLA", sparsify.DELLA, True, True, True, "https://arxiv.org/abs/2406.11617", _EPSILON
    ),
    _task_arithmetic_method(
        "della_linear",
        "Linear DELLA",
        sparsify.DELLA,
        False,
        False,
        True,
        "https://arxiv.org/abs/2406.11617",
        _EPSILON,
    ),
    MethodSpec(
        "model_stock",
        "Model Stock",
        model_stock,
        (ParamSpec("filter_wise", bool, Scope.SHARED, False),),
        base=BasePolicy.REQUIRED,
        min_inputs=3,
        reference="https://arxiv.org/abs/2403.19522",
    ),
    MethodSpec(
        "multislerp",
        "Multi-SLERP",
        multislerp,
        (
            ParamSpec("weight", float, Scope.NON_BASE),
            ParamSpec("normalize_weights", bool, Scope.SHARED, True),
            ParamSpec("eps", float, Scope.SHARED, 1e-8, low=0.0),
        ),
        base=BasePolicy.OPTIONAL,
        min_non_base=1,
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    ),
    MethodSpec(
        "karcher",
        "Karcher Mean",
        karcher,
        (
            ParamSpec("max_iter", int, Scope.SHARED, 10, low=0),
            ParamSpec("tol", float, Scope.SHARED, 1e-5, low=0.0),
        ),
        reference="https://arxiv.org/abs/2603.04972",
    ),
    MethodSpec(
        "sce",
        "SCE",
        sce,
        (
            ParamSpec("int8_mask", bool, Scope.SHARED, False),
            ParamSpec("select_topk", float, Scope.SHARED, 1.0, low=0.0, high=1.0),
        ),
        base=BasePolicy.REQUIRED,
        reference="https://arxiv.org/abs/2408.07990",
    ),
    MethodSpec(
        "nearswap",
        "NearSwap",
        nearswap,
        (ParamSpec("t", float, Scope.SHARED, low=0.0, high=1.0),),
        base=BasePolicy.REQUIRED,
        min_inputs=2,
        max_inputs=2,
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    ),
    MethodSpec(
        "arcee_fusion",
        "Arcee Fusion",
        arcee_fusion,
        (),
        base=BasePolicy.REQUIRED,
        min_inputs=2,
        max_inputs=2,
        randomized=True,  # quantiles of tensors over QUANTILE_SAMPLE entries come from random draws
        least_result_dtype=torch.float32,
        reference="https://arcee.ai",
    ),
    MethodSpec(
        "ram",
        "Reinforced Agent Merging",
        ram,
        (_RAM_EPSILON,),
        base=BasePolicy.REQUIRED,
        reference="https://arxiv.org/abs/2601.13572",
    ),
    MethodSpec(
        "ramplus_tl",
        "Reinforced Agent Merging Plus (Tensor-Local)",
        ramplus_tl,
        (
            ParamSpec("r", float, Scope.SHARED, 0.1, low=0.0, high=1.0),
            ParamSpec("alpha", float, Scope.SHARED, 0.2, low=0.0, high=1.0),
            _RAM_EPSILON,
        ),
        base=BasePolicy.REQUIRED,
        least_result_dtype=torch.float32,
        reference="https://arxiv.org/abs/2601.13572",
    ),
    MethodSpec(
        "passthrough",
        "Passthrough",
        passthrough,
        (ParamSpec("scale", Optional[float], Scope.INPUT, None),),
        max_inputs=1,
    ),
):
    METHODS.register(_spec.name, _spec)
