"""Parameter values per tensor: filters, gradients and the lookup order, as mergekit does it.

* A filter list picks its first entry whose `filter` is a substring of the tensor
  name (an entry without a filter, or `*`, matches everything).
* A list of numbers is a gradient: the value at `t` (the layer's position in its
  slice, 0..1) interpolates linearly between neighbouring points; a list of
  booleans or strings picks the point at or below `t`.
* Lookup order: the model's own parameters, then the slice's, then the recipe's
  global ones, then the method's default.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Optional

from pydantic import TypeAdapter, ValidationError

from mergetune.merge_ops.recipe import ConditionalParameter, ParameterSetting

Coerce = Callable[[Any], Any]


def coercer(value_type: Any) -> Coerce:
    """Validate scalars the way mergekit does (pydantic lax mode: '0.5' → 0.5)."""
    adapter = TypeAdapter(value_type)
    return adapter.validate_python


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluate_setting(tensor_name: str, setting: ParameterSetting, t: float, coerce: Coerce) -> Any:
    """The value of one setting for one tensor at layer position `t`, or None if no filter matched."""
    if isinstance(setting, ConditionalParameter):
        setting = [setting]
    if _is_scalar(setting):
        return coerce(setting)
    if not isinstance(setting, list) or not setting:
        return None
    if all(_is_scalar(point) for point in setting):
        values = [coerce(point) for point in setting]
        if not all(_is_number(value) for value in values):
            return values[int(t * (len(values) - 1))]
        position = t * (len(values) - 1)
        lower = int(position)
        upper = min(len(values) - 1, lower + 1)
        fraction = position - lower
        return coerce((1 - fraction) * values[lower] + fraction * values[upper])
    for condition in setting:
        if condition.filter in (None, "*") or (tensor_name and condition.filter in tensor_name):
            return evaluate_setting(tensor_name, condition.value, t, coerce)
    return None


def resolve(
    name: str,
    scopes: Iterable[Optional[Mapping[str, ParameterSetting]]],
    tensor_name: str,
    t: float,
    coerce: Coerce,
    default: Any,
) -> Any:
    """First scope (highest precedence first) whose setting yields a value; else the default."""
    for scope in scopes:
        if scope is not None and name in scope:
            value = evaluate_setting(tensor_name, scope[name], t, coerce)
            if value is not None:
                return value
    return default


def numeric_leaves(setting: ParameterSetting) -> list[Any]:
    """Every point written in a setting, through filters and gradients (for range checks)."""
    if isinstance(setting, ConditionalParameter):
        return numeric_leaves(setting.value)
    if isinstance(setting, list):
        leaves: list[Any] = []
        for item in setting:
            leaves.extend(numeric_leaves(item))
        return leaves
    return [setting]


def empty_gradients(setting: ParameterSetting) -> bool:
    """True if any gradient list in the setting is empty (mergekit would silently skip it)."""
    if isinstance(setting, ConditionalParameter):
        return empty_gradients(setting.value)
    if isinstance(setting, list):
        return not setting or any(empty_gradients(item) for item in setting)
    return False


def filters_of(setting: ParameterSetting) -> list[str]:
    """The filter strings a setting uses (to warn about filters that match no tensor)."""
    if isinstance(setting, ConditionalParameter):
        return [setting.filter] if setting.filter not in (None, "*") else []
    if isinstance(setting, list):
        return [name for item in setting if isinstance(item, ConditionalParameter) for name in filters_of(item)]
    return []


def shadowed_filters(setting: ParameterSetting) -> list[tuple[str, str]]:
    """Entries of a filter list that never apply, each described with the earlier entry that matches every
    tensor they would (the first match wins, here as in mergekit): a repeated filter, `self_attn.q_proj`
    after `self_attn`, anything after an entry without a filter."""
    if not isinstance(setting, list):
        return []
    conditions = [item for item in setting if isinstance(item, ConditionalParameter)]
    patterns = ["" if item.filter in (None, "*") else item.filter for item in conditions]  # "": every name
    found = []
    for index, pattern in enumerate(patterns):
        earlier = next((other for other in patterns[:index] if other in pattern), None)
        if earlier is not None:
            found.append((_entry(pattern), _entry(earlier)))
    return found


def _entry(pattern: str) -> str:
    return f"filter '{pattern}'" if pattern else "entry without a filter"


def check_value(coerce: Coerce, value: Any) -> Optional[str]:
    """None if `value` has the parameter's type and is finite, else the reason.

    A NaN would slip past every range check (`nan < 0` is False) into the weights, and `weight: true`
    is a slip, not a weight of 1 (pydantic's lax mode, hence mergekit, reads it as 1).
    """
    try:
        coerced = coerce(value)
    except ValidationError as error:
        return error.errors()[0]["msg"]
    if isinstance(value, bool) and not isinstance(coerced, bool):
        return "true/false where a number is expected"
    if isinstance(coerced, float) and not math.isfinite(coerced):
        return "not a finite number"
    return None
