"""Searchable merge methods: each one's search space, hand-written baseline and recipe, by name.

A trial's parameters are a small flat dict (`t.self_attn.0` … `t.rest.4`,
`weight.1`, `density.1.3`); a method's `recipe` turns them into the mergekit
recipe that is built, scored, stored and exported — the curve found *is* the
recipe. The study file's `space:` section has one entry per registered method,
built from each method's `space` model.

`slerp`, `dare_ties`, `ties`, `task_arithmetic` and `linear` have hand-written
spaces and the published baselines; every other mergekit method is searched from
its own parameter declarations in `merge_ops.methods` (`DeclaredMethod`: each
numeric parameter with a known range, per model when its scope says so, per
filter and as a curve across layers when the study file asks; the declarations
load with torch, so the study file is checked against them where the models load).
To give a method a hand-made space, register an instance of a `SearchableMethod`
subclass under its name in this module, before the declared ones: the study file
builds its `space:` model from this registry when it is first imported.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Annotated, Any, Callable, Optional, Union

import optuna
from pydantic import AfterValidator, Field, field_validator, model_validator

from mergetune.errors import MergetuneError
from mergetune.registry import Registry
from mergetune.validation import Settings

if TYPE_CHECKING:
    from mergetune.merge_ops.methods import MethodSpec, ParamSpec
    from mergetune.search.study_file import StudySpec

Params = dict[str, float]
Resolve = Callable[[str], str]

DIGITS = 4  # recipe values are rounded so the exported YAML is exactly what was built
REST = "rest"  # the values for every tensor no filter matched


def _check_filters(values: list[str]) -> list[str]:
    """Each filter names its own tensors: a repeat would search a value no tensor gets, `rest` is the name of
    the tensors no filter matched, and an empty filter matches every tensor."""
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        raise ValueError(f"listed more than once: {', '.join(repeated)}")
    if REST in values:
        raise ValueError(f"'{REST}' names the tensors no filter matches, which always get their own value; it cannot be a filter")
    if any(not value.strip() for value in values):
        raise ValueError("an empty filter matches every tensor; leave it out (the rest gets its own value)")
    return values


Filters = Annotated[list[str], AfterValidator(_check_filters)]
NOT_SEARCHABLE = ("passthrough",)  # stacks layers as given: nothing to blend, nothing to search


class Range(Settings):
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        return self

    def clamp(self, value: float) -> float:
        return min(max(value, self.low), self.high)


# Search ranges where a declaration has none, or one whose end is useless to search (a density of 0 keeps nothing).
DEFAULT_RANGES = {"weight": Range(low=0.1, high=1.0), "density": Range(low=0.1, high=1.0)}


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


def _per_filter(values: dict[str, Any]) -> list[dict[str, Any]]:
    """mergekit's conditional parameter list from one value per filter, in order, the rest (`REST`) last."""
    return [{"filter": label, "value": value} for label, value in values.items() if label != REST] + [
        {"value": values[REST]}
    ]


class SearchableMethod(ABC):
    """One merge method as a search: its space, its baseline, its recipe."""

    name: str
    space: type[Settings]  # the study file's `space.<name>` section
    model_count: Optional[int] = None  # how many models it merges, when fixed
    needs_base: bool = False

    def settings(self, spec: "StudySpec") -> Any:
        """This method's `space.<name>` section of the study file."""
        return getattr(spec.space, self.name)

    def check(self, spec: "StudySpec") -> None:
        """Refuse, before any model loads, what only the run side can check (nothing, unless overridden)."""

    @abstractmethod
    def suggest(self, trial: optuna.Trial, spec: "StudySpec") -> Params:
        """Ask Optuna for one candidate's parameters (the space depends only on the study file)."""

    @abstractmethod
    def baseline(self, spec: "StudySpec") -> Params:
        """The published hand-written recipe for this method, as parameters of this study's space."""

    @abstractmethod
    def recipe(self, params: Params, spec: "StudySpec", resolve: Resolve) -> dict[str, Any]:
        """The mergekit recipe (as a dict) a trial's parameters stand for."""


class SlerpSpace(Settings):
    """A t-curve of `control_points` values in [0, 1] per filter, plus one for all other tensors."""

    filters: Filters = Field(default_factory=lambda: ["self_attn", "mlp"])
    control_points: int = Field(5, ge=1, le=64)


class SlerpMethod(SearchableMethod):
    """SLERP between two models with one t-curve per filter and one for the rest."""

    name = "slerp"
    space = SlerpSpace
    model_count = 2
    # The hand-written curves published with the merges this project exists for.
    HAND_CURVES = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0]}
    HAND_DEFAULT = 0.5

    def _keys(self, space: SlerpSpace) -> dict[str, list[str]]:
        return {name: [f"t.{name}.{p}" for p in range(space.control_points)] for name in [*space.filters, REST]}

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
        keys = self._keys(self.settings(spec))
        curves = _per_filter({name: _value([params[key] for key in curve]) for name, curve in keys.items()})
        return {
            "merge_method": self.name,
            "base_model": first,
            "models": [{"model": first}, {"model": second}],
            "parameters": {"t": curves},
            "dtype": spec.dtype,
        }


class WeightedSpace(Settings):
    """Weight (and density, for sparsifying methods) per model; optionally a curve across layers."""

    weight: Range = DEFAULT_RANGES["weight"]
    density: Range = DEFAULT_RANGES["density"]
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


# Every method mergekit 0.1.5 registers (`tests/test_layout.py` checks this against `merge_ops.methods.METHODS`).
MERGEKIT_METHODS = (
    "linear", "slerp", "nuslerp", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "model_stock", "multislerp", "karcher", "sce", "nearswap",
    "arcee_fusion", "ram", "ramplus_tl", "passthrough",
)


class DeclaredSpace(Settings):
    """`space.<method>` for a method searched from its declarations."""

    parameters: dict[str, Range] = Field(
        default_factory=dict, description="ranges to search, narrowing the declared ones or adding parameters"
    )
    fixed: dict[str, Union[bool, int, float]] = Field(default_factory=dict, description="values set, not searched")
    filters: Filters = Field(default_factory=list, description="one value per filter (e.g. self_attn, mlp) plus the rest")
    curve_points: Optional[int] = Field(None, ge=2, le=64, description="each value a curve across layers")
    baseline: dict[str, float] = Field(
        default_factory=dict, description="the hand-written value of searched parameters (default: declared default, else mid-range)"
    )


class DeclaredMethod(SearchableMethod):
    """A mergekit method searched over the parameters its declaration gives a range."""

    space = DeclaredSpace

    def __init__(self, name: str) -> None:
        self.name = name

    # --- the declaration, loaded on the run side only -------------------------------------------------

    def declaration(self) -> "MethodSpec":
        from mergetune.merge_ops.methods import METHODS

        return METHODS.get(self.name)

    def _searched(self, spec: "StudySpec") -> list[tuple["ParamSpec", Range]]:
        settings: DeclaredSpace = self.settings(spec)
        declaration = self.declaration()
        searched = []
        for param in declaration.params:
            if param.name in settings.fixed or param.value_type is not float:
                continue
            declared = declaration.search_ranges.get(param.name)
            bounds = (
                settings.parameters.get(param.name)
                or (Range(low=declared[0], high=declared[1]) if declared else None)
                or DEFAULT_RANGES.get(param.name)
            )
            if bounds is None and param.low is not None and param.high is not None:
                bounds = Range(low=param.low, high=param.high)
            if bounds is not None:
                searched.append((param, bounds))
        return searched

    def check(self, spec: "StudySpec") -> None:
        """Refuse what the declaration contradicts, before any model loads."""
        from mergetune.merge_ops.methods import BasePolicy

        declaration, settings = self.declaration(), self.settings(spec)
        where = f"space.{self.name}"
        names = {param.name for param in declaration.params}
        for field in ("parameters", "fixed", "baseline"):
            unknown = sorted(set(getattr(settings, field)) - names)
            if unknown:
                raise MergetuneError(
                    f"{where}.{field}: {self.name} has no parameter {', '.join(unknown)} (it has: {', '.join(sorted(names)) or 'none'})"
                )
        for name, bounds in settings.parameters.items():
            param = declaration.param(name)
            if param.out_of_range(bounds.low) or param.out_of_range(bounds.high):
                raise MergetuneError(
                    f"{where}.parameters.{name}: [{bounds.low}, {bounds.high}] is outside {self.name}'s declared "
                    f"range {param.range_text()}"
                )
        searched = {param.name for param, _ in self._searched(spec)}
        missing = [p.name for p in declaration.params if p.required and p.name not in searched | set(settings.fixed)]
        if missing:
            raise MergetuneError(f"{where}: give {', '.join(missing)} a range in `parameters` or a value in `fixed`")
        if declaration.base == BasePolicy.REQUIRED and not spec.base_model:
            raise MergetuneError(f"{self.name} needs a base_model (the models' common ancestor)")
        if not searched:
            numeric = [p.name for p in declaration.params if p.value_type is float and p.name not in settings.fixed]
            remedy = (
                f"give {'one of ' if len(numeric) > 1 else ''}{', '.join(numeric)} a range in {where}.parameters, "
                "or score it once outside a search"
                if numeric
                else "it has nothing to search: score it once outside a search (mergetune merge, then mergetune eval)"
            )
            raise MergetuneError(
                f"{where}: {self.name} declares no numeric parameter with a range, so every candidate would be the "
                f"same; {remedy}"
            )
        if declaration.check_ranges is not None:
            problem = declaration.check_ranges(self._ranges(spec))
            if problem:
                raise MergetuneError(f"{where}: {problem}")

    def _ranges(self, spec: "StudySpec") -> dict[str, tuple[float, float]]:
        """Each numeric parameter's values in this search: its range, or its fixed or default value."""
        settings: DeclaredSpace = self.settings(spec)
        ranges = {
            param.name: (float(param.default), float(param.default))
            for param in self.declaration().params
            if not param.required and isinstance(param.default, (int, float)) and not isinstance(param.default, bool)
        }
        ranges.update({name: (float(value), float(value)) for name, value in settings.fixed.items() if not isinstance(value, bool)})
        ranges.update({param.name: (bounds.low, bounds.high) for param, bounds in self._searched(spec)})
        return ranges

    # --- parameters ↔ recipe ------------------------------------------------------------------------

    def _owners(self, param: "ParamSpec", spec: "StudySpec") -> list[Optional[int]]:
        """None for a shared parameter, else the index (in `_models`) of each model it is given for."""
        from mergetune.merge_ops.methods import Scope

        if param.scope == Scope.SHARED:
            return [None]
        models = self._models(spec)
        return [i for i, model in enumerate(models) if param.scope == Scope.INPUT or model != spec.base_model]

    def _keys(self, param: "ParamSpec", owner: Optional[int], settings: DeclaredSpace) -> dict[str, list[str]]:
        """Optuna names of one parameter's values for one owner: filter label → curve points."""
        prefix = param.name if owner is None else f"{param.name}.{owner}"
        labels = [*settings.filters, REST] if settings.filters else [None]
        points = range(settings.curve_points) if settings.curve_points else [None]
        return {
            label: [".".join(str(part) for part in (prefix, label, point) if part is not None) for point in points]
            for label in labels
        }

    def _models(self, spec: "StudySpec") -> list[str]:
        from mergetune.merge_ops.methods import BasePolicy

        others = [model for model in spec.models if model != spec.base_model]
        uses_base = spec.base_model and self.declaration().base != BasePolicy.IGNORED
        return [spec.base_model, *others] if uses_base else others

    def _each_key(self, spec: "StudySpec"):
        settings = self.settings(spec)
        for param, bounds in self._searched(spec):
            for owner in self._owners(param, spec):
                for keys in self._keys(param, owner, settings).values():
                    for key in keys:
                        yield param, bounds, key

    def suggest(self, trial: optuna.Trial, spec: "StudySpec") -> Params:
        return {key: trial.suggest_float(key, bounds.low, bounds.high) for _, bounds, key in self._each_key(spec)}

    def baseline(self, spec: "StudySpec") -> Params:
        settings = self.settings(spec)

        def hand(param: "ParamSpec", bounds: Range) -> float:
            if param.name in settings.baseline:
                return bounds.clamp(settings.baseline[param.name])
            if not param.required and isinstance(param.default, (int, float)):
                return bounds.clamp(float(param.default))
            return (bounds.low + bounds.high) / 2

        return {key: hand(param, bounds) for param, bounds, key in self._each_key(spec)}

    def recipe(self, params: Params, spec: "StudySpec", resolve: Resolve) -> dict[str, Any]:
        settings = self.settings(spec)
        models = self._models(spec)
        searched = {param.name for param, _ in self._searched(spec)}
        shared: dict[str, Any] = {}
        per_model: list[dict[str, Any]] = [{} for _ in models]
        for param in self.declaration().params:
            for owner in self._owners(param, spec):
                target = shared if owner is None else per_model[owner]
                if param.name in settings.fixed:
                    target[param.name] = settings.fixed[param.name]
                elif param.name in searched:
                    keys = self._keys(param, owner, settings)
                    values = {label: _value([params[key] for key in curve]) for label, curve in keys.items()}
                    target[param.name] = values[None] if None in values else _per_filter(values)
        recipe: dict[str, Any] = {
            "merge_method": self.name,
            "models": [
                {"model": resolve(model), **({"parameters": given} if given else {})}
                for model, given in zip(models, per_model)
            ],
            "dtype": spec.dtype,
        }
        if spec.base_model in models:
            recipe["base_model"] = resolve(spec.base_model)
        if shared:
            recipe["parameters"] = shared
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
for _name in MERGEKIT_METHODS:  # every other mergekit method, searched from its declaration
    if _name not in SEARCHABLE and _name not in NOT_SEARCHABLE:
        SEARCHABLE.register(_name, DeclaredMethod(_name))
