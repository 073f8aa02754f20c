"""The in-memory builder's task-vector cache: candidate after candidate, the tensors of a disk merge, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from mergetune.merge_ops.disk import merge_recipe_file
from mergetune.merge_ops.inmemory import InMemoryBuilder
from mergetune.merge_ops.methods import METHODS
from mergetune.merge_ops.recipe import parse_recipes
from mergetune.merge_ops.sources import open_source
from mergetune.demo.tiny import load_state
from test_merge_methods import assert_identical, method_recipe
from test_merge_parity import with_paths

CACHED_METHODS = sorted(name for name in METHODS if METHODS.get(name).uses_task_vectors)


def candidates(recipe: dict) -> list[dict]:
    """The recipe, then the same models with other weights and densities (what a search proposes)."""
    later = copy.deepcopy(recipe)
    for index, model in enumerate(later["models"]):
        parameters = model.get("parameters")
        if parameters and "weight" in parameters:
            parameters["weight"] = 0.3 + 0.2 * index
        if parameters and "density" in parameters:
            parameters["density"] = 0.4 + 0.1 * index
    return [recipe, later]


@pytest.mark.parametrize("family", ["family_f32", "family_bf16_tied"])
@pytest.mark.parametrize("method", CACHED_METHODS)
def test_cached_task_vectors_build_every_candidate_as_on_disk(method, family, request, tmp_path):
    recipe = with_paths(method_recipe(method), request.getfixturevalue(family))
    if family == "family_bf16_tied":
        recipe.setdefault("dtype", "bfloat16")
    builder, cached = None, None
    for number, candidate in enumerate(candidates(recipe)):
        recipe_file = parse_recipes(yaml.safe_dump(candidate))
        out = tmp_path / f"disk{number}"
        merge_recipe_file(recipe_file, out, seed=number)
        disk = load_state(out)
        if builder is None:
            final = recipe_file.final
            sources = {name: open_source(name) for name in final.referenced_models()}
            dtype = next(iter(disk.values())).dtype
            builder = InMemoryBuilder.for_recipe(final, sources, dtype=dtype, cache_task_vectors=True)
        builder.build(recipe_file, seed=number)
        assert builder.task_vector_bytes > 0
        assert cached in (None, builder.task_vector_bytes)  # the second candidate reuses the first's vectors
        cached = builder.task_vector_bytes
        assert_identical(disk, builder.model.state_dict())


def test_the_cache_holds_one_task_vector_per_non_base_model(family_f32):
    recipe = parse_recipes(yaml.safe_dump(with_paths(method_recipe("dare_ties"), family_f32))).final
    sources = {name: open_source(name) for name in recipe.referenced_models()}
    builder = InMemoryBuilder.for_recipe(recipe, sources, cache_task_vectors=True)
    builder.build(recipe, seed=0)
    non_base = [model for model in recipe.referenced_models() if model != recipe.base_model]
    model_bytes = sum(t.numel() * t.element_size() for t in builder.model.state_dict().values() if t.is_floating_point())
    assert builder.task_vector_bytes <= len(non_base) * model_bytes
    uncached = InMemoryBuilder.for_recipe(recipe, sources)
    uncached.build(recipe, seed=0)
    assert uncached.task_vector_bytes == 0
    for name, tensor in builder.model.state_dict().items():
        assert torch.equal(tensor, uncached.model.state_dict()[name]), name


@pytest.mark.parametrize("method, ranking", [("ties", "largest_first"), ("breadcrumbs", "smallest_first"), ("della", "row_positions")])
def test_rank_based_methods_rank_each_task_vector_once(method, ranking, family_f32, monkeypatch):
    """The magnitude ranking does not depend on the density: kept with the task vectors, no later
    candidate sorts again (the sort is most of such a candidate's cost)."""
    from mergetune.merge_ops import sparsify

    sorted_now = []
    original = getattr(sparsify, ranking)
    monkeypatch.setattr(sparsify, ranking, lambda tensor: sorted_now.append(tensor.numel()) or original(tensor))
    recipe = with_paths(method_recipe(method), family_f32)
    first, later = (parse_recipes(yaml.safe_dump(candidate)).final for candidate in candidates(recipe))
    sources = {name: open_source(name) for name in first.referenced_models()}
    uncached = InMemoryBuilder.for_recipe(first, sources)
    uncached.build(later, seed=1)
    assert sorted_now  # without the cache, each candidate ranks while pruning
    sorted_now.clear()
    builder = InMemoryBuilder.for_recipe(first, sources, cache_task_vectors=True)
    builder.build(first, seed=0)
    builder.build(later, seed=1)
    assert sorted_now == []  # ranked once, by the cache (the registered function), then passed in
    for name, tensor in builder.model.state_dict().items():
        assert torch.equal(tensor, uncached.model.state_dict()[name]), name


@pytest.mark.parametrize("family", ["family_f32", "family_bf16_tied"])
def test_slerp_measures_each_pair_once_and_builds_every_t_as_on_disk(family, request, monkeypatch, tmp_path):
    """SLERP's angles do not depend on `t` (`MethodSpec.measure`): the builder measures each tensor pair for
    the first candidate only, and every candidate's tensors are still the disk merge's, bit for bit."""
    from mergetune.merge_ops import methods

    measured = []
    original = methods.slerp_geometry
    monkeypatch.setattr(methods, "slerp_geometry", lambda a, b: measured.append(a.numel()) or original(a, b))
    recipe = with_paths(method_recipe("slerp"), request.getfixturevalue(family))
    builder = None
    for number, t in enumerate([0.3, [0.9, 0.1]]):
        candidate = copy.deepcopy(recipe)
        candidate["parameters"] = {"t": t}
        recipe_file = parse_recipes(yaml.safe_dump(candidate))
        merge_recipe_file(recipe_file, tmp_path / f"disk{number}")
        disk = load_state(tmp_path / f"disk{number}")
        if builder is None:
            sources = {name: open_source(name) for name in recipe_file.final.referenced_models()}
            dtype = next(iter(disk.values())).dtype
            builder = InMemoryBuilder.for_recipe(recipe_file.final, sources, dtype=dtype)
        measured.clear()
        builder.build(recipe_file)
        assert (measured == []) == (number > 0)  # the second candidate measures nothing
        assert_identical(disk, builder.model.state_dict())
