"""Planning: a recipe plus its sources' metadata → one operation per output tensor.

No tensor data is read here. The plan names, for every output tensor, which input
tensors feed it, the method's parameters resolved for it (filters, gradients,
lookup order), and its shape and dtype. Executing a plan (to disk, or into a live
model) is a separate step; the search re-plans each candidate in milliseconds.

Layout rules, as mergekit's: a `models:` recipe is one slice over every layer of
every model (the base is appended if it is not listed); each output slice's
layers get `t = i / (n - 1)` for gradients; embeddings come from the first
slice's sources and the final norm / lm_head from the last slice's (no more of
them than the first slice has), with t = 0. Only weights are planned: buffers that
transformers recomputes (`NOT_WEIGHTS`) are left out, as mergekit leaves them.
"""

from __future__ import annotations

import copy
import functools
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

import torch

from mergetune.dtypes import RECIPE_DTYPES
from mergetune.errors import MergetuneError
from mergetune.merge_ops.methods import METHODS, REQUIRED, BasePolicy, MethodSpec, ParamSpec, Scope
from mergetune.merge_ops.parameters import (
    check_value,
    coercer,
    empty_gradients,
    filters_of,
    numeric_leaves,
    resolve,
    shadowed_filters,
)
from mergetune.merge_ops.recipe import InputSlice, OutputSlice, Parameters, Recipe
from mergetune.merge_ops.sources import TensorSource

if TYPE_CHECKING:
    from mergetune.merge_ops.vocab import VocabAlignment

log = logging.getLogger(__name__)

LAYER_PATTERN = re.compile(r"^(?P<prefix>.*?\.(?:layers|h|blocks|layer))\.(?P<index>\d+)\.(?P<suffix>.+)$")
#: Buffers older checkpoints saved that transformers recomputes from the config (rotary frequencies);
#: mergekit 0.1.5 plans only its architectures' weights, so they are not merged or written.
NOT_WEIGHTS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
DTYPES = {name: getattr(torch, name) for name in RECIPE_DTYPES}


@dataclass(frozen=True)
class TensorInput:
    model: str
    name: str


@dataclass
class TensorOp:
    """How to make one output tensor."""

    output: str
    inputs: tuple[TensorInput, ...]
    base_index: Optional[int]
    shared: dict[str, Any]
    per_input: dict[str, list[Any]]
    shape: tuple[int, ...]
    compute_dtype: torch.dtype
    dtype: torch.dtype
    t: float
    # Set for embedding-like tensors when the inputs' vocabularies are aligned first (vocab.py).
    vocab: Optional["VocabAlignment"] = None


@dataclass
class MergePlan:
    recipe: Recipe
    method: MethodSpec
    ops: list[TensorOp]
    config: dict[str, Any]
    donor: str
    warnings: list[str] = field(default_factory=list)

    def op(self, output: str) -> TensorOp:
        return next(op for op in self.ops if op.output == output)


@dataclass(frozen=True)
class LayerLayout:
    """A model's tensor names split into decoder layers and the rest."""

    prefix: Optional[str]
    layers: list[list[str]]  # suffixes per layer index
    pre: list[str]  # embeddings: taken from the first slice
    post: list[str]  # final norm, lm_head: taken from the last slice

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def layout_of(source: TensorSource) -> LayerLayout:
    prefix = None
    layers: dict[int, list[str]] = {}
    rest = []
    for name in source.names():
        if NOT_WEIGHTS.search(name):
            continue
        match = LAYER_PATTERN.match(name)
        if match:
            prefix = prefix or match["prefix"]
            layers.setdefault(int(match["index"]), []).append(match["suffix"])
        else:
            rest.append(name)
    count = len(layers)
    if layers and sorted(layers) != list(range(count)):
        raise MergetuneError(f"model {source.label}: layer indices are not contiguous from 0: {sorted(layers)}")
    pre = [name for name in rest if "embed" in name or name.split(".")[-2:-1] in (["wte"], ["wpe"])]
    post = [name for name in rest if name not in pre]
    return LayerLayout(prefix, [layers[index] for index in range(count)], pre, post)


def _is_tied_head(name: str) -> bool:
    return name.endswith("lm_head.weight")


def _is_integer_buffer(output: str, dtypes: Sequence[torch.dtype]) -> bool:
    """Position ids and the like: one integer dtype in every model, and not named like a weight."""
    return not dtypes[0].is_floating_point and len(set(dtypes)) == 1 and not output.endswith("weight")


def _check_floating(inputs: Sequence[TensorInput], dtypes: Sequence[torch.dtype]) -> None:
    """Integer weights are quantized: averaging their codes (or promoting them to float) gives garbage."""
    for item, dtype in zip(inputs, dtypes):
        if not dtype.is_floating_point:
            raise MergetuneError(
                f"model {item.model}: tensor {item.name} is {str(dtype).removeprefix('torch.')}, not floating point; "
                "quantized checkpoints are not supported (merge the unquantized weights)"
            )


# ------------------------------------------------------------------- validation


def validate_recipe(recipe: Recipe) -> MethodSpec:
    """Checks that need no model: method, parameter names, types and ranges."""
    if recipe.merge_method not in METHODS:
        raise MergetuneError(
            f"unknown merge_method '{recipe.merge_method}'; supported: {', '.join(sorted(METHODS))}"
        )
    method = METHODS.get(recipe.merge_method)
    for where, name, spec, value, number in _values(recipe, method):
        if spec.refuse_below is not None and isinstance(number, (int, float)) and number < spec.refuse_below:
            raise MergetuneError(
                f"{where}.{name}: {value!r} is below {spec.refuse_below}: {method.name} cannot merge it "
                f"(mergekit 0.1.5 fails on it too); its range is {spec.range_text()}"
            )
    for dtype_field in ("dtype", "out_dtype"):
        value = getattr(recipe, dtype_field)
        if value is not None and value not in DTYPES:
            raise MergetuneError(f"{dtype_field}: '{value}' is not one of {', '.join(DTYPES)}")
    if recipe.tokenizer_source == "union":
        raise MergetuneError("tokenizer_source: 'union' is not supported; use 'base' or a model path")
    return method


def range_warnings(recipe: Recipe, method: MethodSpec) -> list[str]:
    """Values outside a parameter's range that mergekit 0.1.5 merges all the same (a SLERP `t` of 1.3
    extrapolates, a TIES `density` of 0 keeps nothing): merged as it merges them, and said."""
    return [
        f"{where}.{name}: {value!r} is outside {spec.range_text()}; merged as mergekit 0.1.5 merges it"
        for where, name, spec, value, number in _values(recipe, method)
        if spec.low is not None and isinstance(number, (int, float)) and spec.out_of_range(number)
    ]


def _values(recipe: Recipe, method: MethodSpec) -> Iterator[tuple[str, str, ParamSpec, Any, Any]]:
    """Every parameter value of the recipe, checked for name, type and finiteness:
    (where, parameter, its spec, the value as written, the value the merge uses)."""
    for where, parameters in _parameter_scopes(recipe):
        for name, setting in (parameters or {}).items():
            spec = method.param(name)
            if spec is None:
                known = ", ".join(p.name for p in method.params) or "none"
                raise MergetuneError(f"{where}: unknown parameter '{name}' for {method.name} (it takes: {known})")
            if empty_gradients(setting):
                raise MergetuneError(f"{where}.{name}: empty gradient list")
            coerce = coercer(spec.value_type)
            for value in numeric_leaves(setting):
                problem = check_value(coerce, value)
                if problem:
                    raise MergetuneError(f"{where}.{name}: {value!r} is not valid: {problem}")
                yield where, name, spec, value, coerce(value)  # what the merge uses: a quoted "1.5" is 1.5


def _parameter_scopes(recipe: Recipe):
    yield "parameters", recipe.parameters
    for index, model in enumerate(recipe.models or []):
        yield f"models[{index}] ({model.model}).parameters", model.parameters
    for slice_index, out_slice in enumerate(recipe.slices or []):
        yield f"slices[{slice_index}].parameters", out_slice.parameters
        for source_index, source in enumerate(out_slice.sources):
            yield f"slices[{slice_index}].sources[{source_index}] ({source.model}).parameters", source.parameters


def _expected_count(count: int, minimum: int, maximum: Optional[int]) -> Optional[str]:
    """What a method's contract says about `count` models when it is outside [minimum, maximum], else None."""
    if minimum <= count and (maximum is None or count <= maximum):
        return None
    if maximum == minimum:
        return f"exactly {minimum}"
    return f"at least {minimum}" + (f" and at most {maximum}" if maximum is not None else "")


# --------------------------------------------------------------------- planning


def _post_sources(first: OutputSlice, last: OutputSlice, base_index: Optional[int]) -> tuple[OutputSlice, Optional[int]]:
    """The slice the final norm and lm_head are merged from: the last slice, cut to the first slice's source count.

    mergekit 0.1.5 (`MergePlanner.plan_module`) zips the last slice's models with
    one input per first-slice source, so a last slice with more sources than the
    first contributes only its leading ones to these tensors.
    """
    count = len(first.sources)
    if len(last.sources) <= count:
        return last, base_index
    if base_index is not None and base_index >= count:
        raise MergetuneError(
            f"last slice: mergekit 0.1.5 merges the final norm and lm_head from its first {count} source(s) "
            f"(as many as the first slice has), which leaves out its base model {last.sources[base_index].model}; "
            f"list the base among its first {count} source(s)"
        )
    return last.model_copy(update={"sources": last.sources[:count]}), base_index


class Planner:
    """Builds a `MergePlan` for one recipe stage from its sources' metadata."""

    def __init__(self, recipe: Recipe, sources: Mapping[str, TensorSource]):
        self.recipe = recipe
        self.method = validate_recipe(recipe)
        missing = [name for name in recipe.referenced_models() if name not in sources]
        if missing:
            raise MergetuneError(f"no source for model(s): {', '.join(missing)}")
        self.sources = sources
        self._check_architectures()
        self.layouts = {name: layout_of(sources[name]) for name in recipe.referenced_models()}
        self._names = {name: set(sources[name].names()) for name in recipe.referenced_models()}
        self._coercers = {spec.name: coercer(spec.value_type) for spec in self.method.params}

    def _check_architectures(self) -> None:
        """Models of different architectures cannot be merged tensor by tensor."""
        kinds = {name: self.sources[name].config.get("model_type") for name in self.recipe.referenced_models()}
        if len(set(kinds.values())) > 1:
            described = ", ".join(f"{name} is {kind or 'unknown'}" for name, kind in kinds.items())
            raise MergetuneError(f"the models have different architectures ({described})")

    # -- structure

    def slices(self) -> list[OutputSlice]:
        if self.recipe.slices:
            return self.recipe.slices
        sources = [
            InputSlice(model=model.model, layer_range=(0, self._layer_count(model.model)), parameters=model.parameters)
            for model in self.recipe.models or []
        ]
        base = self.recipe.base_model
        if base and all(source.model != base for source in sources):
            sources.append(InputSlice(model=base, layer_range=(0, self._layer_count(base))))
        return [OutputSlice(sources=sources)]

    def _layer_count(self, model: str) -> int:
        count = self.layouts[model].num_layers
        if count == 0:
            raise MergetuneError(f"model {model}: no decoder layers found (tensor names like '*.layers.N.*')")
        return count

    def _check_contract(self, index: int, out_slice: OutputSlice) -> Optional[int]:
        """Validate input counts and the base for one slice; return the base's position."""
        models = [source.model for source in out_slice.sources]
        where = f"slice {index}" if self.recipe.slices else "models"
        if len(set(models)) != len(models):
            raise MergetuneError(f"{where}: a model is listed twice ({', '.join(models)})")
        method = self.method
        base = out_slice.base_model or self.recipe.base_model
        base_index = models.index(base) if base in models else None
        if method.base == BasePolicy.REQUIRED:
            if base is None:
                raise MergetuneError(f"{method.name} needs a base_model")
            if base_index is None:
                raise MergetuneError(f"{where}: base_model {base} is not among its sources")
        if method.base == BasePolicy.IGNORED:
            base_index = None
        count = len(models)
        expected = _expected_count(count, method.min_inputs, method.max_inputs)
        if expected:
            raise MergetuneError(f"{where}: {method.name} takes {expected} input model(s), got {count}")
        non_base = count - (base_index is not None)
        expected = _expected_count(non_base, method.min_non_base or 0, method.max_non_base)
        if expected:
            raise MergetuneError(f"{where}: {method.name} takes {expected} model(s) besides the base, got {non_base}")
        for source in out_slice.sources:
            available = self.layouts[source.model].num_layers
            if source.layer_range[1] > available:
                raise MergetuneError(
                    f"{where}: layer_range {list(source.layer_range)} of {source.model} exceeds its {available} layers"
                )
        lengths = {source.layer_range[1] - source.layer_range[0] for source in out_slice.sources}
        if len(lengths) > 1:
            ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in out_slice.sources)
            raise MergetuneError(f"{where}: all sources of a slice need the same number of layers ({ranges})")
        return base_index

    # -- tensors

    def plan(self, vocab: Optional["VocabAlignment"] = None) -> MergePlan:
        slices = self.slices()
        bases = [self._check_contract(index, out_slice) for index, out_slice in enumerate(slices)]
        donor = self.recipe.base_model or self.recipe.referenced_models()[0]
        out_prefix = self.layouts[donor].prefix or self.layouts[slices[0].sources[0].model].prefix
        ops: list[TensorOp] = []
        first, last = slices[0], slices[-1]
        for name in self._non_layer_names(first, "pre"):
            ops.append(self._op(name, [(s, name) for s in first.sources], bases[0], first, 0.0, vocab))
        out_layer = 0
        for out_slice, base_index in zip(slices, bases):
            length = out_slice.sources[0].layer_range[1] - out_slice.sources[0].layer_range[0]
            for offset in range(length):
                t = offset / (length - 1) if length > 1 else 1.0
                anchor = out_slice.sources[0]
                for suffix in self.layouts[anchor.model].layers[anchor.layer_range[0] + offset]:
                    inputs = [
                        (source, f"{self.layouts[source.model].prefix}.{source.layer_range[0] + offset}.{suffix}")
                        for source in out_slice.sources
                    ]
                    ops.append(self._op(f"{out_prefix}.{out_layer}.{suffix}", inputs, base_index, out_slice, t, None))
                out_layer += 1
        post, post_base = _post_sources(first, last, bases[-1])
        if len(post.sources) < len(last.sources):
            plan_warnings = [
                f"the final norm and lm_head are merged from the last slice's first {len(post.sources)} source(s) "
                f"({', '.join(s.model for s in post.sources)}), as many as the first slice has, as mergekit 0.1.5 does"
            ]
        else:
            plan_warnings = []
        plan_warnings += [
            f"slice {index}: residual_weight is ignored (mergekit 0.1.5 reads it nowhere either)"
            for index, out_slice in enumerate(slices)
            if out_slice.residual_weight is not None
        ]
        for name in self._non_layer_names(post, "post"):
            ops.append(self._op(name, [(s, name) for s in post.sources], post_base, post, 0.0, vocab))
        _check_vocabulary_rows(ops)
        config = self._output_config(donor, out_layer, vocab, separate_head=any(_is_tied_head(op.output) for op in ops))
        plan = MergePlan(self.recipe, self.method, ops, config, donor)
        plan.warnings.extend(plan_warnings + range_warnings(self.recipe, self.method) + self._filter_warnings(ops))
        for warning in plan.warnings:
            log.info(warning)
        return plan

    def _non_layer_names(self, out_slice: OutputSlice, part: str) -> list[str]:
        names: dict[str, None] = {}
        for source in out_slice.sources:
            for name in getattr(self.layouts[source.model], part):
                names[name] = None
        return list(names)

    def _resolve_input_name(self, model: str, name: str) -> str:
        if name in self._names[model]:
            return name
        if _is_tied_head(name):
            embed = next((n for n in self.layouts[model].pre if n.endswith("embed_tokens.weight")), None)
            if embed:
                return embed  # tied embeddings: lm_head is the embedding matrix
        raise MergetuneError(f"tensor {name} is missing from model {model}")

    def _op(
        self,
        output: str,
        inputs: Sequence[tuple[InputSlice, str]],
        base_index: Optional[int],
        out_slice: OutputSlice,
        t: float,
        vocab: Optional["VocabAlignment"],
    ) -> TensorOp:
        resolved = [TensorInput(source.model, self._resolve_input_name(source.model, name)) for source, name in inputs]
        shapes = [self.sources[item.model].shape(item.name) for item in resolved]
        aligned = vocab if vocab is not None and vocab.applies(resolved, shapes) else None
        shape = shapes[0] if aligned is None else (aligned.size, *shapes[0][1:])
        if aligned is None:
            for item, item_shape in zip(resolved[1:], shapes[1:]):
                if item_shape != shapes[0]:
                    raise MergetuneError(
                        f"tensor {output}: shape {list(shapes[0])} in {resolved[0].model} ({resolved[0].name}) "
                        f"but {list(item_shape)} in {item.model} ({item.name})"
                        + _shape_hint(output, shapes[0], item_shape)
                    )
        dtypes = [self.sources[item.model].dtype(item.name) for item in resolved]
        if _is_integer_buffer(output, dtypes):
            compute = out_dtype = dtypes[0]  # copied as it is, never averaged
        else:
            _check_floating(resolved, dtypes)
            compute = DTYPES[self.recipe.dtype] if self.recipe.dtype else functools.reduce(torch.promote_types, dtypes)
            out_dtype = DTYPES[self.recipe.out_dtype] if self.recipe.out_dtype else self.method.result_dtype(compute)
        shared, per_input = self._parameters(output, inputs, resolved, base_index, out_slice, t)
        problem = self.method.check(shared, per_input) if self.method.check else None
        if problem:
            raise MergetuneError(f"tensor {output}: {problem}")
        return TensorOp(
            output=output,
            inputs=tuple(resolved),
            base_index=base_index,
            shared=shared,
            per_input=per_input,
            shape=tuple(shape),
            compute_dtype=compute,
            dtype=out_dtype,
            t=t,
            vocab=aligned,
        )

    def _parameters(
        self,
        output: str,
        inputs: Sequence[tuple[InputSlice, str]],
        resolved: Sequence[TensorInput],
        base_index: Optional[int],
        out_slice: OutputSlice,
        t: float,
    ) -> tuple[dict[str, Any], dict[str, list[Any]]]:
        global_scopes: list[Optional[Parameters]] = [out_slice.parameters, self.recipe.parameters]
        shared = {}
        per_input: dict[str, list[Any]] = {}
        for spec in self.method.params:
            coerce = self._coercers[spec.name]
            if spec.scope == Scope.SHARED:
                shared[spec.name] = self._required(
                    spec.name, resolve(spec.name, global_scopes, output, t, coerce, spec.default), output, None
                )
                continue
            values = []
            for position, ((source, _), item) in enumerate(zip(inputs, resolved)):
                if spec.scope == Scope.NON_BASE and position == base_index:
                    values.append(None)
                    continue
                scopes = [s.parameters for s in out_slice.sources if s.model == source.model] + global_scopes
                value = resolve(spec.name, scopes, item.name, t, coerce, spec.default)
                values.append(self._required(spec.name, value, item.name, source.model))
            per_input[spec.name] = values
        return shared, per_input

    def _required(self, name: str, value: Any, tensor: str, model: Optional[str]) -> Any:
        if value is REQUIRED:
            owner = f" of model {model}" if model else ""
            raise MergetuneError(
                f"parameter '{name}' is required by {self.method.name} but has no value for tensor {tensor}{owner}"
            )
        return value

    def _filter_warnings(self, ops: list[TensorOp]) -> list[str]:
        """Filters that match no tensor, and filter-list entries an earlier entry hides."""
        names = [op.output for op in ops] + [item.name for op in ops for item in op.inputs]
        warnings = []
        for where, parameters in _parameter_scopes(self.recipe):
            for name, setting in (parameters or {}).items():
                for text in filters_of(setting):
                    if not any(text in tensor for tensor in names):
                        warnings.append(f"{where}.{name}: filter '{text}' matches no tensor")
                for entry, earlier in shadowed_filters(setting):
                    warnings.append(f"{where}.{name}: the {entry} never applies: the earlier {earlier} matches first")
        return warnings

    def _output_config(
        self, donor: str, num_layers: int, vocab: Optional["VocabAlignment"], separate_head: bool
    ) -> dict[str, Any]:
        """The donor's config, with the output's layer count, dtype, vocabulary size, and untied embeddings where
        a merged lm_head is written: it differs from the merged embeddings, and under a tied config transformers
        warns and vLLM ties them anyway, scoring with the embeddings as the head (the donor may be a tied model
        merged with untied ones)."""
        config = copy.deepcopy(self.sources[donor].config)
        if separate_head and config.get("tie_word_embeddings") is not False:  # absent: some architectures tie
            log.info("the merged lm_head is written beside the embeddings: tie_word_embeddings set to false")
            config["tie_word_embeddings"] = False
        if "num_hidden_layers" in config or "n_layer" not in config:
            config["num_hidden_layers"] = num_layers
        else:
            config["n_layer"] = num_layers
        dtype_name = self.recipe.out_dtype or self.recipe.dtype
        if dtype_name:
            config["torch_dtype"] = dtype_name
            config["dtype"] = dtype_name
        if vocab is not None:
            config["vocab_size"] = vocab.size
        return config


def plan_merge(
    recipe: Recipe, sources: Mapping[str, TensorSource], vocab: Optional["VocabAlignment"] = None
) -> MergePlan:
    return Planner(recipe, sources).plan(vocab)


#: The tensors indexed by token id: a model's embeddings and head must index the same vocabulary.
VOCABULARY_TENSORS = ("embed_tokens.weight", "wte.weight", "lm_head.weight")


def _check_vocabulary_rows(ops: Sequence[TensorOp]) -> None:
    """Embeddings and head taken from different models (a passthrough stack's first and last slices) have the same
    rows: each op checks its own inputs' shapes, but these come from different ops."""
    indexed = [op for op in ops if op.output.endswith(VOCABULARY_TENSORS)]
    for op in indexed[1:]:
        first = indexed[0]
        if op.shape[0] != first.shape[0]:
            raise MergetuneError(
                f"tensor {op.output}: {op.shape[0]} rows (from {op.inputs[0].model}) but {first.output} has "
                f"{first.shape[0]} (from {first.inputs[0].model}): the models have different vocabularies"
                + _shape_hint(op.output, first.shape, op.shape)
            )


def _shape_hint(output: str, first: tuple[int, ...], other: tuple[int, ...]) -> str:
    """What to do about two shapes that differ: only a vocabulary (an embedding's rows) can be aligned."""
    if ("embed" in output or "lm_head" in output) and first[1:] == other[1:]:
        return " — set tokenizer_source to merge models with different vocabularies"
    return " — the models are not the same architecture (hidden or intermediate sizes differ)"
