"""Recipes: mergekit's YAML, as pydantic models that mirror it field for field.

A recipe file holds one merge, or several YAML documents (``---``) where each
named stage can be used as a model by the stages after it (mergekit-multi's
format): a SLERP of two passthrough stacks, a merge of a merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Union

import yaml
from pydantic import BaseModel, field_validator, model_validator

from mergetune.errors import MergetuneError
from mergetune.validation import Strict, read_text, validate, yaml_problem

Scalar = Union[bool, int, float, str]
ScalarOrGradient = Union[Scalar, list[Scalar]]


class ConditionalParameter(Strict):
    """`{filter: self_attn, value: [0, 0.5, 1]}`; no filter matches every tensor."""

    value: ScalarOrGradient
    filter: Optional[str] = None


ParameterSetting = Union[ScalarOrGradient, ConditionalParameter, list[ConditionalParameter]]
Parameters = dict[str, ParameterSetting]


class InputModel(Strict):
    model: str
    parameters: Optional[Parameters] = None


class InputSlice(Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Optional[Parameters] = None

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if start < 0 or end <= start:
            raise ValueError(f"layer_range {list(value)} must satisfy 0 <= start < end")
        return value


class OutputSlice(Strict):
    sources: list[InputSlice]
    base_model: Optional[str] = None
    parameters: Optional[Parameters] = None
    #: Accepted for mergekit's schema; mergekit 0.1.5 declares it and reads it nowhere, and neither does mergetune.
    residual_weight: Optional[float] = None

    @field_validator("sources")
    @classmethod
    def _not_empty(cls, value: list[InputSlice]) -> list[InputSlice]:
        if not value:
            raise ValueError("a slice needs at least one source")
        return value


class TokenizerSection(Strict):
    """mergekit's `tokenizer:` section. Its `source` is `tokenizer_source` (mergekit's default: union);
    added tokens' embeddings and vocabulary padding are not supported."""

    source: str = "union"
    tokens: Optional[dict[str, Any]] = None
    pad_to_multiple_of: Optional[int] = None


class Recipe(Strict):
    """One merge: mergekit's `MergeConfiguration` without its multimodal `modules`."""

    name: Optional[str] = None
    merge_method: str
    base_model: Optional[str] = None
    models: Optional[list[InputModel]] = None
    slices: Optional[list[OutputSlice]] = None
    parameters: Optional[Parameters] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[TokenizerSection] = None  # folded into tokenizer_source when the recipe is read
    chat_template: Optional[str] = None

    @field_validator("dtype", "out_dtype")
    @classmethod
    def _dtype_name(cls, value: Optional[str]) -> Optional[str]:
        """mergekit reads `torch.bfloat16` as `bfloat16`."""
        return value.removeprefix("torch.") if value is not None else None

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: Optional[str]) -> Optional[str]:
        """A stage is written to a directory of its name: a path there (`../model`) would write outside the merge."""
        if value is not None and (value in ("", ".", "..") or any(mark in value for mark in "/\\\0")):
            raise ValueError(f"a stage name must be a plain name, not a path: {value!r}")
        return value

    @model_validator(mode="after")
    def _models_or_slices(self) -> "Recipe":
        if bool(self.models) == bool(self.slices):
            raise ValueError("exactly one of 'models' or 'slices' must be given (and not empty)")
        return self

    @model_validator(mode="after")
    def _one_tokenizer_setting(self) -> "Recipe":
        if self.tokenizer is None:
            return self
        if self.tokenizer_source is not None:
            raise ValueError("give either tokenizer_source or tokenizer, not both (as mergekit requires)")
        if self.tokenizer.tokens or self.tokenizer.pad_to_multiple_of:
            raise ValueError(
                "tokenizer.tokens and tokenizer.pad_to_multiple_of are not supported; "
                "tokenizer.source (or tokenizer_source) alone is"
            )
        self.tokenizer_source, self.tokenizer = self.tokenizer.source, None
        return self

    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, base first, each once, in order of appearance."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for model in self.models or []:
            seen[model.model] = None
        for out_slice in self.slices or []:
            if out_slice.base_model:
                seen[out_slice.base_model] = None
            for source in out_slice.sources:
                seen[source.model] = None
        return list(seen)

    def to_yaml(self) -> str:
        """mergekit-readable YAML (no `name`; number lists in flow style)."""
        data = self.model_dump(mode="json", exclude_none=True, exclude={"name"})
        return yaml.dump(data, Dumper=_RecipeDumper, sort_keys=False).rstrip() + "\n"


class _RecipeDumper(yaml.SafeDumper):
    pass


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = bool(data) and all(isinstance(item, (int, float)) for item in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_RecipeDumper.add_representer(list, _represent_list)
_RecipeDumper.add_representer(tuple, _represent_list)


class RecipeFile(BaseModel):
    """The stages of a recipe file in order; the last is the output."""

    stages: list[Recipe]
    source: str = "<recipe>"

    @property
    def final(self) -> Recipe:
        return self.stages[-1]

    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages if stage.name]

    def to_yaml(self) -> str:
        parts = []
        for stage in self.stages:
            text = stage.to_yaml()
            parts.append(f"name: {stage.name}\n{text}" if stage.name else text)
        return "---\n".join(parts)

    def __iter__(self) -> Iterator[Recipe]:  # type: ignore[override]
        return iter(self.stages)


def parse_recipes(text: str, source: str = "<recipe>") -> RecipeFile:
    """Parse one or several YAML documents into validated stages."""
    try:
        documents = [doc for doc in yaml.safe_load_all(text) if doc is not None]
    except yaml.YAMLError as error:
        raise yaml_problem(source, error) from None
    if not documents:
        raise MergetuneError(f"{source}: the file holds no recipe")
    stages = []
    for index, document in enumerate(documents):
        where = source if len(documents) == 1 else f"{source} (document {index + 1})"
        if not isinstance(document, dict):
            raise MergetuneError(f"{where}: a recipe must be a mapping of fields, got {type(document).__name__}")
        stages.append(validate(Recipe, document, where))
    names = [stage.name for stage in stages if stage.name]
    duplicates = {name for name in names if names.count(name) > 1}
    if duplicates:
        raise MergetuneError(f"{source}: duplicate stage name(s): {', '.join(sorted(duplicates))}")
    unnamed = [index for index, stage in enumerate(stages) if not stage.name]
    if len(stages) > 1 and (len(unnamed) > 1 or (unnamed and unnamed[0] != len(stages) - 1)):
        raise MergetuneError(f"{source}: in a multi-stage recipe every stage but the last needs a `name`")
    _check_stage_order(stages, source)
    return RecipeFile(stages=stages, source=source)


def _check_stage_order(stages: list[Recipe], source: str) -> None:
    """A stage may use only the stages before it (no cycles, no forward references)."""
    later = {stage.name for stage in stages if stage.name}
    for stage in stages:
        if stage.name:
            later.discard(stage.name)
        used_too_early = sorted(set(stage.referenced_models()) & later)
        if used_too_early:
            raise MergetuneError(
                f"{source}: stage {stage.name or '(final)'} uses {', '.join(used_too_early)} "
                "before it is defined; order the stages so each comes after its inputs"
            )


def load_recipes(path: str | Path) -> RecipeFile:
    path = Path(path)
    return parse_recipes(read_text(path, "recipe file"), source=str(path))


def recipe_from_dict(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate one programmatically built recipe (the search builds them)."""
    return validate(Recipe, data, source)

