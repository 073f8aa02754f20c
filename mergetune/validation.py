"""Reading the user's YAML files into pydantic models: one wording for every file the tool reads.

Recipes and study files are both strict (an unknown key is an error, so a misspelt
`paramters:` is never silently ignored) and both report problems the same way: the
file, then each failing field as a dotted path with pydantic's message.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from mergetune.errors import MergetuneError

SHOWN_PROBLEMS = 4  # union types report one failure per alternative; more than a few is noise

Model = TypeVar("Model", bound=BaseModel)


def yaml_problem(source: str, error: yaml.YAMLError) -> MergetuneError:
    """One line: the file, where in it, and what the parser expected (PyYAML names the text '<unicode string>')."""
    mark = getattr(error, "problem_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    context = getattr(error, "context", None)
    return MergetuneError(f"{source}{where}: not valid YAML: {f'{context}: ' if context else ''}{problem}")


class Strict(BaseModel):
    """Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class Settings(Strict):
    """A study file's section: strict, and none of its numbers NaN or infinite (a range from NaN would reach
    Optuna and fail every trial, and be stored with the study's definition)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


STRUCTURAL = ("extra_forbidden", "missing")  # a mapping's keys were wrong: the mapping was meant for this model
SCALAR_FORMS = {"bool": "true/false", "int": "an integer", "float": "a number", "str": "a string"}
SCALAR_TAGS = tuple(SCALAR_FORMS)
MAPPING_FORMS = {"ConditionalParameter": "a {filter, value} mapping"}  # what the user writes, not the class's name


def _is_union_tag(part: object) -> bool:
    """Pydantic names each alternative of a union in the error's location (`list[Filter]`, `Filter`, `int`);
    our fields are snake_case, so a type name is one of those tags."""
    return isinstance(part, str) and (part in SCALAR_TAGS or "[" in part or part[:1].isupper())


def _field_path(location: tuple) -> tuple:
    """The location up to the first union tag: the field whose value matched no alternative."""
    tags = [index for index, part in enumerate(location) if _is_union_tag(part)]
    return location[: tags[0]] if tags else location


def _shown(location: tuple) -> str:
    return ".".join(str(part) for part in location if not _is_union_tag(part)) or "(top level)"


def _alternatives(items: list, field: tuple) -> list[str]:
    """The forms a union field may take, in words, when its value failed every one of them for its type
    (`t: [[0, 1], 0.5]`: pydantic's one message per alternative says less than the list of forms)."""
    forms = [
        "a finite number" if item["type"] == "finite_number" else _form(item["loc"][len(field)])
        for item in items
        if _field_path(item["loc"]) == field and len(item["loc"]) > len(field) and item["type"] not in STRUCTURAL
    ]
    return list(dict.fromkeys(forms))


def _form(tag: str) -> str:
    """`float` → `a number`; `ConditionalParameter` → `a {filter, value} mapping`; `list[X]` → `a list of` them."""
    if tag.startswith("list["):
        inner = tag[len("list[") : -1]
        return "a list of values" if inner.startswith("union[") or inner in SCALAR_TAGS else f"a list of {_form(inner)[2:]}s"
    return SCALAR_FORMS.get(tag, MAPPING_FORMS.get(tag, f"a {tag} mapping"))


def _excerpt(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_validation_error(error: ValidationError, where: str) -> str:
    """`where: field.path: message; ...`, duplicates removed, the first few kept.

    Where a value matched none of a union's alternatives, pydantic lists every alternative's failure
    (not a bool, not a number, ...); if one alternative failed on a mapping's keys (an unknown or missing
    key), that is the one the user wrote, so only its problems are said."""
    items = error.errors()
    structural = [_field_path(item["loc"]) for item in items if item["type"] in STRUCTURAL]
    items = [
        item
        for item in items
        if item["type"] in STRUCTURAL or _field_path(item["loc"]) not in structural or _field_path(item["loc"]) == item["loc"]
    ]
    problems = []
    for item in items:
        field = _field_path(item["loc"])
        alternatives = _alternatives(items, field)
        if len(alternatives) > 1:
            value = min((other for other in items if _field_path(other["loc"]) == field), key=lambda o: len(o["loc"]))["input"]
            problems.append(f"{_shown(field)}: {_excerpt(value)} is none of: {', '.join(alternatives)}")
            continue
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        problems.append(f"{_shown(item['loc'])}: {message}")
    unique = list(dict.fromkeys(problems))
    shown = "; ".join(unique[:SHOWN_PROBLEMS]) + ("; ..." if len(unique) > SHOWN_PROBLEMS else "")
    return f"{where}: {shown}"


def validate(model: type[Model], data: object, where: str) -> Model:
    """`model.model_validate(data)`, or one MergetuneError naming `where` and the fields at fault."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise MergetuneError(describe_validation_error(error, where)) from None


def read_text(path: Path, kind: str) -> str:
    """A user file's text, or one MergetuneError naming the `kind` of file ("recipe file") and its path."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MergetuneError(f"{kind} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise MergetuneError(f"cannot read {kind} {path}: {error}") from None
