"""Search spaces: Optuna parameters ↔ mergekit recipes.

A trial's parameters are a small flat dict (`t.self_attn.0` … `t.rest.4`,
`weight.1`, `density.1.3`); `recipe_for` turns them into the mergekit recipe
that is built, scored, stored and exported — the curve found *is* the recipe.
"""

from __future__ import annotations

from typing import Any, Optional

import optuna

from mergetune.search.study_file import StudySpec, WeightedSpace

REST = "rest"
# The hand-written recipes published with the merges this project exists for.
HAND_SLERP_CURVES = {"self_attn": [0, 0.5, 0.3, 0.7, 1], "mlp": [1, 0.5, 0.7, 0.3, 0]}
HAND_SLERP_DEFAULT = 0.5
HAND_WEIGHT = 0.5
HAND_DENSITY = 0.5
SPARSIFYING = ("dare_ties", "ties")
DIGITS = 4  # recipe values are rounded so the exported YAML is exactly what was built


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


def merged_models(spec: StudySpec, resolve) -> list[str]:
    """The models that get weights (every listed model except the base)."""
    return [resolve(model) for model in spec.models if model != spec.base_model]


def _value(values: list[float]) -> Any:
    rounded = [round(value, DIGITS) for value in values]
    return rounded[0] if len(rounded) == 1 else rounded


def _weighted_names(prefix: str, index: int, space: WeightedSpace) -> list[str]:
    if space.curve_points:
        return [f"{prefix}.{index}.{point}" for point in range(space.curve_points)]
    return [f"{prefix}.{index}"]


def suggest(trial: optuna.Trial, method: str, spec: StudySpec) -> dict[str, float]:
    """Ask Optuna for one candidate's parameters (the space depends only on the study file)."""
    params: dict[str, float] = {}
    if method == "slerp":
        space = spec.space.slerp
        for name in [*space.filters, REST]:
            for point in range(space.control_points):
                key = f"t.{name}.{point}"
                params[key] = trial.suggest_float(key, 0.0, 1.0)
        return params
    space: WeightedSpace = getattr(spec.space, method)
    for index in range(len([m for m in spec.models if m != spec.base_model])):
        for key in _weighted_names("weight", index, space):
            params[key] = trial.suggest_float(key, space.weight.low, space.weight.high)
        if method in SPARSIFYING:
            for key in _weighted_names("density", index, space):
                params[key] = trial.suggest_float(key, space.density.low, space.density.high)
    return params


def baseline(method: str, spec: StudySpec) -> Optional[dict[str, float]]:
    """The published hand recipe for `method`, as parameters of this study's space."""
    if method == "slerp":
        space = spec.space.slerp
        params = {}
        for name in [*space.filters, REST]:
            curve = HAND_SLERP_CURVES.get(name, [HAND_SLERP_DEFAULT])
            for point, value in enumerate(resample([float(v) for v in curve], space.control_points)):
                params[f"t.{name}.{point}"] = value
        return params
    space: WeightedSpace = getattr(spec.space, method)
    params = {}
    for index in range(len([m for m in spec.models if m != spec.base_model])):
        for key in _weighted_names("weight", index, space):
            params[key] = min(max(HAND_WEIGHT, space.weight.low), space.weight.high)
        if method in SPARSIFYING:
            for key in _weighted_names("density", index, space):
                params[key] = min(max(HAND_DENSITY, space.density.low), space.density.high)
    return params


def recipe_for(method: str, params: dict[str, float], spec: StudySpec, resolve) -> dict[str, Any]:
    """The mergekit recipe (as a dict) a trial's parameters stand for."""
    if method == "slerp":
        first, second = (resolve(model) for model in spec.models)
        space = spec.space.slerp
        curves = [
            {"filter": name, "value": _value([params[f"t.{name}.{p}"] for p in range(space.control_points)])}
            for name in space.filters
        ]
        curves.append({"value": _value([params[f"t.{REST}.{p}"] for p in range(space.control_points)])})
        return {
            "merge_method": "slerp",
            "base_model": first,
            "models": [{"model": first}, {"model": second}],
            "parameters": {"t": curves},
            "dtype": spec.dtype,
        }
    space: WeightedSpace = getattr(spec.space, method)
    models = []
    for index, model in enumerate(merged_models(spec, resolve)):
        parameters = {"weight": _value([params[key] for key in _weighted_names("weight", index, space)])}
        if method in SPARSIFYING:
            parameters["density"] = _value([params[key] for key in _weighted_names("density", index, space)])
        models.append({"model": model, "parameters": parameters})
    recipe: dict[str, Any] = {"merge_method": method, "models": models, "dtype": spec.dtype}
    if method != "linear":
        base = resolve(spec.base_model)
        recipe["base_model"] = base
        recipe["models"] = [{"model": base}, *models]
    if method == "dare_ties":
        # As in the published OpenHermes × neural-chat DARE TIES recipe.
        recipe["parameters"] = {"normalize": False, "int8_mask": True}
    return recipe
