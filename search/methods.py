"""Searchable merge methods: each one's search space, hand-written baseline and recipe, by name.

A trial's parameters are a small flat dict (`t.self_attn.0` … `t.rest.4`,
`weight.1`, `density.1.3`); a method's `recipe` turns them into the mergekit
recipe that is built, scored, stored and exported — the curve found *is* the
recipe. The study file's `space:` section has one entry per registered method,
built from each method's `space` model.

To make another mergekit method searchable, register an instance here: a
`WeightedMethod` when its knobs are per-model weights (and densities), or a new
`SearchableMethod` subclass for anything else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Optional

import optuna
from pydantic import Field, field_validator, model_validator

from mergetune.registry import Registry
from mergetune.validation import Strict

if TYPE_CHECKING:
    from mergetune.search.study_file import StudySpec

Params = dict[str, float]
Resolve = Callable[[str], str]

DIGITS = 4  # recipe values are rounded so the exported YAML is exactly what was built


class Range(Strict):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        return self

    def clamp(self, value: float) -> float:
        return min(max(value, self.low), self.high)


def resample(points: list[float], count: int) -> list[float]:
    """The same piecewise-linear curve expressed with `count` evenly spaced points."""
    if count == 1:
        return [points[len(points) // 2]]
    values = []
    for index in range(count):
        position = index / (count - 1) * (len(points) - 1)
        lower = int(position)
        upper = min(lower + 1, len(points) - 1)
        fraction = position - lower
        values.append(points[lower] * (1 - fraction) + points[upper] * fraction)
    return values


def _value(values: list[float]) -> Any:
    """One recipe value: a scalar, or a gradient across layers."""
    rounded = [round(value, DIGITS) for value in values]
    return rounded[0] if len(rounded) == 1 else rounded


class SearchableMethod(ABC):
    """One merge method as a search: its space, its baseline, its recipe."""

    name: str
    space: type[Strict]  # the study file's `space.<name>` section
    model_count: Optional[int] = None  # how many models it merges, when fixed
    needs_base: bool = False

    def settings(self, spec: "StudySpec") -> Any:
        """This method's `space.<name>` section of the study file."""
        return getattr(spec.space, self.name)

    @abstractmethod
    def suggest(self, trial: optuna.Trial, spec: "StudySpec") -> Params:
        """Ask Optuna for one candidate's parameters (the space depends only on the study file)."""

    @abstractmethod
    def baseline(self, spec: "StudySpec") -> Params:
        """The published hand-written recipe for this method, as parameters of this study's space."""

    @abstractmethod
    def recipe(self, params: Params, spec: "StudySpec", resolve: Resolve) -> dict[str, Any]:
        """The mergekit recipe (as a dict) a trial's parameters stand for."""


class SlerpSpace(Strict):
    """A t-curve of `control_points` values in [0, 1] per filter, plus one for all other tensors."""

    filters: list[str] = Field(default_factory=lambda: ["self_attn", "mlp"])
    control_points: int = Field(5, ge=1, le=64)


class SlerpMethod(SearchableMethod):
    """SLERP between two models with one t-curve per filter and one for the rest."""

    name = "slerp"
    space = SlerpSpace
    model_count = 2
    REST = "rest"
    # The hand-written curves published with the merges this project exists for.
    HAND_CURVES = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0]}
    HAND_DEFAULT = 0.5

    def _keys(self, space: SlerpSpace) -> dict[str, list[str]]:
        return {name: [f"t.{name}.{p}" for p in range(space.control_points)] for name in [*space.filters, self.REST]}

    def suggest(self, trial: optuna.Trial, spec: "StudySpec") -> Params:
        keys = self._keys(self.settings(spec))
        return {key: trial.suggest_float(key, 0.0, 1.0) for curve in keys.values() for key in curve}

    def baseline(self, spec: "StudySpec") -> Params:
        params = {}
        for name, keys in self._keys(self.settings(spec)).items():
            curve = [float(v) for v in self.HAND_CURVES.get(name, [self.HAND_DEFAULT])]
            params.update(zip(keys, resample(curve, len(keys))))
        return params

    def recipe(self, params: Params, spec: "StudySpec", resolve: Resolve) -> dict[str, Any]:
        first, second = (resolve(model) for model in spec.models)
        curves = [
            {"filter": name, "value": _value([params[key] for key in keys])}
            for name, keys in self._keys(self.settings(spec)).items()
        ]
        curves[-1].pop("filter")  # the rest: every tensor no filter matched
        return {
            "merge_method": self.name,
            "base_model": first,
            "models": [{"model": first}, {"model": second}],
            "parameters": {"t": curves},
            "dtype": spec.dtype,
        }


class WeightedSpace(Strict):
    """Weight (and density, for sparsifying methods) per model; optionally a curve across layers."""

    weight: Range = Range(low=0.1, high=1.0)
    density: Range = Range(low=0.1, high=1.0)
    curve_points: Optional[int] = Field(None, ge=2, le=64)

    @field_validator("density")
    @classmethod
    def _density_range(cls, value: Range) -> Range:
        if value.low <= 0 or value.high > 1:
            raise ValueError("density must lie in (0, 1]")
        return value


class WeightedMethod(SearchableMethod):
    """Methods whose knobs are a weight (and a density) per merged model: linear, task arithmetic, TIES, DARE."""

    space = WeightedSpace
    HAND_WEIGHT = 0.5
    HAND_DENSITY = 0.5

    def __init__(
        self, name: str, *, sparsifying: bool, needs_base: bool, parameters: Optional[dict[str, Any]] = None
    ) -> None:
        self.name = name
        self.sparsifying = sparsifying
        self.needs_base = needs_base
        self.parameters = parameters  # method-wide recipe parameters, fixed

    def _knobs(self, space: WeightedSpace) -> list[tuple[str, Range, float]]:
        knobs = [("weight", space.weight, self.HAND_WEIGHT)]
        if self.sparsifying:
            knobs.append(("density", space.density, self.HAND_DENSITY))
        return knobs

    @staticmethod
    def _names(prefix: str, index: int, space: WeightedSpace) -> list[str]:
        if space.curve_points:
            return [f"{prefix}.{index}.{point}" for point in range(space.curve_points)]
        return [f"{prefix}.{index}"]

    @staticmethod
    def _merged(spec: "StudySpec") -> list[str]:
        """The models that get weights: every listed model except the base."""
        return [model for model in spec.models if model != spec.base_model]

    def _params(self, spec: "StudySpec", value: Callable[[str, Range, float], float]) -> Params:
        space = self.settings(spec)
        return {
            key: value(key, bounds, hand)
            for index in range(len(self._merged(spec)))
            for prefix, bounds, hand in self._knobs(space)
            for key in self._names(prefix, index, space)
        }

    def suggest(self, trial: optuna.Trial, spec: "StudySpec") -> Params:
        return self._params(spec, lambda key, bounds, _: trial.suggest_float(key, bounds.low, bounds.high))

    def baseline(self, spec: "StudySpec") -> Params:
        return self._params(spec, lambda _, bounds, hand: bounds.clamp(hand))

    def recipe(self, params: Params, spec: "StudySpec", resolve: Resolve) -> dict[str, Any]:
        space = self.settings(spec)
        models: list[dict[str, Any]] = []
        for index, model in enumerate(self._merged(spec)):
            parameters = {
                prefix: _value([params[key] for key in self._names(prefix, index, space)])
                for prefix, _, _ in self._knobs(space)
            }
            models.append({"model": resolve(model), "parameters": parameters})
        recipe: dict[str, Any] = {"merge_method": self.name, "models": models, "dtype": spec.dtype}
        if self.needs_base:
            base = resolve(spec.base_model)
            recipe["base_model"] = base
            recipe["models"] = [{"model": base}, *models]
        if self.parameters:
            recipe["parameters"] = dict(self.parameters)
        return recipe


SEARCHABLE: Registry[SearchableMethod] = Registry("searchable method")
SEARCHABLE.register("slerp", SlerpMethod())
# normalize/int8_mask as in the published OpenHermes × neural-chat DARE TIES recipe.
SEARCHABLE.register(
    "dare_ties", WeightedMethod("dare_ties", sparsifying=True, needs_base=True, parameters={"normalize": False, "int8_mask": True})
)
SEARCHABLE.register("ties", WeightedMethod("ties", sparsifying=True, needs_base=True))
SEARCHABLE.register("task_arithmetic", WeightedMethod("task_arithmetic", sparsifying=False, needs_base=True))
SEARCHABLE.register("linear", WeightedMethod("linear", sparsifying=False, needs_base=False))
