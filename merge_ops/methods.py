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
from typing import Any, Callable, Optional

import torch

from mergetune.merge_ops import sparsify
from mergetune.merge_ops.sparsify import Sparsifier

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
    # Closed/open interval the values must lie in, checked when a recipe is validated.
    low: Optional[float] = None
    high: Optional[float] = None
    low_inclusive: bool = True

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def out_of_range(self, value: float) -> bool:
        if self.low is not None and (value < self.low or (value == self.low and not self.low_inclusive)):
            return True
        return self.high is not None and value > self.high

    def range_text(self) -> str:
        opening = "[" if self.low_inclusive else "("
        return f"{opening}{self.low}, {self.high}]"


@dataclass
class MergeInputs:
    """One output tensor's inputs, in recipe order, already in the compute dtype."""

    tensors: list[torch.Tensor]
    base_index: Optional[int]
    # Per-input parameter values aligned with `tensors` (None where not applicable).
    per_input: dict[str, list[Any]] = field(default_factory=dict)
    generators: Optional[list[Optional[torch.Generator]]] = None

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
    non_base_count: Optional[int] = None
    randomized: bool = False
    reference: str = ""
    # check(shared, per_input) -> why one tensor's resolved parameters would give NaN or inf, or None.
    check: Optional[Callable[[dict[str, Any], dict[str, list[Any]]], Optional[str]]] = None

    def param(self, name: str) -> Optional[ParamSpec]:
        return next((spec for spec in self.params if spec.name == name), None)


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


def slerp(inputs: MergeInputs, t: float) -> torch.Tensor:
    """Spherical interpolation from the base (t=0) to the other model (t=1)."""
    if not inputs.tensors[0].is_floating_point():
        raise TypeError("SLERP requires floating-point tensors")
    base = inputs.tensors[inputs.base_index]
    other = inputs.tensors[1 - inputs.base_index]
    coefficients = slerp_coefficients(t, slerp_geometry(base, other))
    return slerp_into(base, other, coefficients, torch.empty_like(base))


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


def task_arithmetic_family(
    sparsifier: Optional[Sparsifier], consensus: bool
) -> MergeFunction:
    """Build one of task_arithmetic / ties / dare_* / breadcrumbs* / della*.

    They differ only in how each task vector is pruned and whether signs are elected.
    """

    def merge(
        inputs: MergeInputs,
        int8_mask: bool,
        normalize: bool,
        rescale: bool,
        **shared: Any,
    ) -> torch.Tensor:
        lam = shared["lambda"]
        base = inputs.base
        others = inputs.non_base
        if not others:
            return base
        deltas = base.new_empty((len(others), *base.shape))
        for row, index in enumerate(others):
            delta = inputs.tensors[index] - base
            if sparsifier is not None:
                generator = inputs.generators[index] if inputs.generators else None
                extra = {key: inputs.per_input[key][index] for key in ("gamma", "epsilon") if key in inputs.per_input}
                delta = sparsifier(
                    delta,
                    density=inputs.per_input["density"][index],
                    rescale=rescale,
                    generator=generator,
                    **extra,
                )
            deltas[row] = delta
        weights = torch.tensor(
            [inputs.per_input["weight"][index] for index in others], dtype=deltas.dtype, device=deltas.device
        ).reshape(-1, *([1] * base.dim()))
        deltas.mul_(weights)
        if consensus:
            mask = _majority_mask(deltas, int8_mask)
            mixed = (deltas * mask).sum(dim=0)
            divisor = (weights * mask).sum(dim=0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(dim=0)
            divisor = weights.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
        if normalize:
            mixed /= divisor
        if lam != 1:
            mixed *= lam
        return (base + mixed).to(base.dtype)

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


# -------------------------------------------------------------------------- registry


def _task_arithmetic_params(normalize: bool, rescale: bool, extra: tuple[ParamSpec, ...] = ()):
    return (
        ParamSpec("int8_mask", bool, Scope.SHARED, False),
        ParamSpec("normalize", bool, Scope.SHARED, normalize),
        ParamSpec("rescale", bool, Scope.SHARED, rescale),
        ParamSpec("lambda", float, Scope.SHARED, 1.0),
        ParamSpec("weight", float, Scope.NON_BASE),
        ParamSpec("density", float, Scope.NON_BASE, 1.0, low=0.0, high=1.0, low_inclusive=False),
        *extra,
    )


def _task_arithmetic_method(
    name: str,
    pretty: str,
    sparsifier: Optional[Sparsifier],
    consensus: bool,
    normalize: bool,
    rescale: bool,
    reference: str,
    extra: tuple[ParamSpec, ...] = (),
) -> MethodSpec:
    return MethodSpec(
        name=name,
        pretty_name=pretty,
        merge=task_arithmetic_family(sparsifier, consensus),
        # mergekit accepts `density` for plain task arithmetic too; it has no effect there.
        params=_task_arithmetic_params(normalize, rescale, extra),
        base=BasePolicy.REQUIRED,
        randomized=sparsifier in (sparsify.bernoulli, sparsify.della_magprune),
        reference=reference,
    )


_GAMMA = (ParamSpec("gamma", float, Scope.NON_BASE, 0.01, low=0.0, high=1.0),)
_EPSILON = (ParamSpec("epsilon", float, Scope.NON_BASE, 0.15, low=0.0, high=1.0),)

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
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
            non_base_count=2,
        ),
        _task_arithmetic_method(
            "task_arithmetic", "Task Arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089"
        ),
        _task_arithmetic_method(
            "ties", "TIES", sparsify.magnitude, True, True, False, "https://arxiv.org/abs/2306.01708"
        ),
        _task_arithmetic_method(
            "dare_ties", "DARE TIES", sparsify.bernoulli, True, False, True, "https://arxiv.org/abs/2311.03099"
        ),
        _task_arithmetic_method(
            "dare_linear", "Linear DARE", sparsify.bernoulli, False, False, True, "https://arxiv.org/abs/2311.03099"
        ),
        _task_arithmetic_method(
            "breadcrumbs",
            "Model Breadcrumbs",
            sparsify.magnitude_outliers,
            False,
            False,
            False,
            "https://arxiv.org/abs/2312.06795",
            _GAMMA,
        ),
        _task_arithmetic_method(
            "breadcrumbs_ties",
            "Model Breadcrumbs with TIES",
            sparsify.magnitude_outliers,
            True,
            False,
            False,
            "https://arxiv.org/abs/2312.06795",
            _GAMMA,
        ),
        _task_arithmetic_method(
            "della", "DELLA", sparsify.della_magprune, True, True, True, "https://arxiv.org/abs/2406.11617", _EPSILON
        ),
        _task_arithmetic_method(
            "della_linear",
            "Linear DELLA",
            sparsify.della_magprune,
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
            "passthrough",
            "Passthrough",
            passthrough,
            (ParamSpec("scale", Optional[float], Scope.INPUT, None),),
            max_inputs=1,
        ),
    )
}
