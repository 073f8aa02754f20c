"""Reading the user's YAML files into pydantic models: one wording for every file the tool reads.

Recipes and study files are both strict (an unknown key is an error, so a misspelt
`paramters:` is never silently ignored) and both report problems the same way: the
file, then each failing field as a dotted path with pydantic's message.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from mergetune.errors import MergetuneError

SHOWN_PROBLEMS = 4  # union types report one failure per alternative; more than a few is noise

Model = TypeVar("Model", bound=BaseModel)


class Strict(BaseModel):
    """Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def describe_validation_error(error: ValidationError, where: str) -> str:
    """`where: field.path: message; ...`, duplicates removed, the first few kept."""
    problems = []
    for item in error.errors():
        location = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = "unknown field" if item["type"] == "extra_forbidden" else item["msg"]
        problems.append(f"{location}: {message}")
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
