"""Every registered method builds the same model in memory as on disk; the newer methods' own rules.

The recipes are the parity recipes (tests/test_merge_parity.py), so each one is
also known to give mergekit 0.1.5's tensors. Random methods run below density 1
here, with a seed: the in-memory build must make the same draws as the disk merge.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml

from mergetune.demo.tiny import load_state
from mergetune.errors import MergetuneError
from mergetune.merge_ops.disk import merge_recipe_file
from mergetune.merge_ops.inmemory import InMemoryBuilder, live_model
from mergetune.merge_ops.writer import all_finite
from mergetune.merge_ops.methods import METHODS, MergeInputs, _approximate_quantiles, arcee_fusion, ram
from mergetune.merge_ops.plan import plan_merge
from mergetune.merge_ops.recipe import parse_recipes, recipe_from_dict
from mergetune.merge_ops import sparsify
from mergetune.merge_ops.sparsify import NORM_SLICE
from mergetune.merge_ops.sources import open_source
from test_merge_engine import fake_model
from test_merge_parity import RECIPES, family_other_vocab, with_paths  # noqa: F401 (a fixture)

SEED = 11


def method_recipe(method: str) -> dict:
    """The first parity recipe of `method`; a random one at density 0.6, so its seeded draws are compared too."""
    found = next((RECIPES[name] for name in sorted(RECIPES) if RECIPES[name]["merge_method"] == method), None)
    assert found is not None, f"{method} has no recipe in test_merge_parity.RECIPES, which checks it against mergekit"
    recipe = copy.deepcopy(found)
    if METHODS.get(method).randomized and METHODS.get(method).param("density"):
        for model in recipe["models"]:
            model.setdefault("parameters", {})["density"] = 0.6
    return recipe


def disk_and_memory(recipe: dict, out) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The disk merge's tensors and the live model's, built in memory from the same recipe and seed."""
    text = yaml.safe_dump(recipe)
    recipe_file = parse_recipes(text)
    merge_recipe_file(recipe_file, out, seed=SEED)
    disk = load_state(out)
    final = recipe_file.final
    sources = {name: open_source(name) for name in final.referenced_models()}
    dtype = next(iter(disk.values())).dtype
    builder = InMemoryBuilder.for_recipe(final, sources, dtype=dtype)
    builder.build(recipe_file, seed=SEED)
    return disk, builder.model.state_dict()


def assert_identical(disk: dict[str, torch.Tensor], memory: dict[str, torch.Tensor]) -> None:
    for name, tensor in disk.items():
        assert torch.equal(memory[name], tensor), name


@pytest.mark.parametrize("family", ["family_f32", "family_bf16_tied"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_builds_in_memory_bit_for_bit_as_on_disk(method, family, request, tmp_path):
    recipe = with_paths(method_recipe(method), request.getfixturevalue(family))
    if family == "family_bf16_tied":
        recipe.setdefault("dtype", "bfloat16")
    assert_identical(*disk_and_memory(recipe, tmp_path / "disk"))


def test_tokenizer_source_aligns_vocabularies_in_memory_as_on_disk(family_other_vocab, tmp_path):
    """The in-memory build re-indexes embedding rows by token too, into a live model of the output vocabulary."""
    recipe = with_paths(
        {
            "merge_method": "multislerp",
            "base_model": "base",
            "models": [
                {"model": "model_a", "parameters": {"weight": 0.5}},
                {"model": "model_x", "parameters": {"weight": 0.5}},
            ],
        },
        family_other_vocab,
    )
    recipe["tokenizer_source"] = str(family_other_vocab["model_x"])
    disk, memory = disk_and_memory(recipe, tmp_path / "disk")
    base_rows = load_state(family_other_vocab["base"])["model.embed_tokens.weight"].shape[0]
    assert disk["model.embed_tokens.weight"].shape[0] > base_rows
    assert_identical(disk, memory)


def test_a_later_stage_aligns_to_an_earlier_stage_tokenizer_in_memory_as_on_disk(family_other_vocab, tmp_path):
    """An in-memory stage output carries its tokenizer as the disk stage directory does."""
    paths = {**family_other_vocab, "mixed": "mixed"}
    stage = {
        "name": "mixed",  # model_a's rows re-indexed onto model_x's larger vocabulary
        "merge_method": "linear",
        "base_model": "model_x",
        "tokenizer_source": "base",
        "models": [{"model": "model_x", "parameters": {"weight": 0.7}}, {"model": "model_a", "parameters": {"weight": 0.3}}],
    }
    final = {
        "merge_method": "nearswap",  # and back onto base's vocabulary, read from the stage's tokenizer
        "base_model": "base",
        "tokenizer_source": "base",
        "models": [{"model": "base"}, {"model": "mixed"}],
        "parameters": {"t": 0.01},
    }
    recipe_file = parse_recipes(yaml.safe_dump_all([with_paths(stage, paths), with_paths(final, paths)]))
    merge_recipe_file(recipe_file, tmp_path / "disk", seed=SEED)
    disk = load_state(tmp_path / "disk")
    sources = {name: open_source(name) for name in (str(paths["base"]), str(paths["model_a"]), str(paths["model_x"]))}
    builder = InMemoryBuilder(sources, live_model(json.loads((tmp_path / "disk" / "config.json").read_text())))
    builder.build(recipe_file, seed=SEED)
    assert_identical(disk, builder.model.state_dict())


# ----------------------------------------------------------------------------- rules


def test_arcee_fusion_samples_large_tensors_reproducibly_by_seed():
    """Quantiles of tensors over a million entries come from seeded draws: the same seed, the same merge."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(1001, 1000, generator=generator)
    other = base + 0.01 * torch.randn(1001, 1000, generator=generator)

    def fused(seed: int) -> torch.Tensor:
        generators = [None, torch.Generator().manual_seed(seed)]
        return arcee_fusion(MergeInputs([base, other], base_index=0, generators=generators))

    assert torch.equal(fused(1), fused(1))
    quartiles = torch.tensor([0.25, 0.5, 0.75])
    draws = [_approximate_quantiles(other, quartiles, torch.Generator().manual_seed(seed)) for seed in (1, 2)]
    assert not torch.equal(*draws)


def test_ram_takes_a_lone_change_whole_and_averages_shared_ones():
    base = torch.zeros(4)
    first = torch.tensor([1.0, 2.0, 0.0, 0.0])
    second = torch.tensor([3.0, 0.0, 0.0, 1e-6])  # within epsilon: no change
    merged = ram(MergeInputs([base, first, second], base_index=0), epsilon=1e-5)
    assert merged.tolist() == [2.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "method, models, base, message",
    [
        ("multislerp", ["a"], "a", r"multislerp takes at least 1 model\(s\) besides the base, got 0"),
        ("nearswap", ["a", "b", "c"], "a", r"nearswap takes exactly 2 input model\(s\), got 3"),
        ("arcee_fusion", ["a", "b"], None, "arcee_fusion needs a base_model"),
    ],
)
def test_input_contracts_are_mergekits(method, models, base, message):
    recipe = recipe_from_dict({"merge_method": method, "base_model": base, "models": [{"model": name} for name in models]})
    with pytest.raises(MergetuneError, match=message):
        plan_merge(recipe, {name: fake_model(name, 2) for name in models})


# ------------------------------------------------------------------- fused arithmetic


def l1_by_slices(tensor: torch.Tensor) -> float:
    flat = tensor.reshape(-1)
    return sum(float(flat[i : i + NORM_SLICE].abs().sum(dtype=torch.float32)) for i in range(0, flat.numel(), NORM_SLICE))


def whole_tensor_dare(inputs: MergeInputs, consensus: bool, normalize: bool, lam: float) -> torch.Tensor:
    """DARE (TIES) as mergekit writes it, one whole-tensor step after another: the oracle for the fused,
    sliced version. Each model's generator gives one 32-bit number per two entries, whose
    16-bit halves, less their top bit, are the entries' 15-bit draws; an entry is kept when its draw is
    below round(density * 2^15). The L1 norms of the rescaling are float64 sums of float32 sums over
    slices of `NORM_SLICE` entries."""
    base = inputs.base
    deltas = []
    for index in inputs.non_base:
        delta = inputs.tensors[index] - base
        count = delta.numel()
        numbers = torch.empty((count + 1) // 2, dtype=torch.int32).random_(generator=inputs.generators[index])
        draws = (numbers & 0x7FFF7FFF).view(torch.int16)[:count].reshape(delta.shape)
        masked = delta * (draws < round(inputs.per_input["density"][index] * 2**15))
        before, after = l1_by_slices(delta), l1_by_slices(masked)
        deltas.append(masked * (before / after))
    deltas = torch.stack(deltas)
    weights = torch.tensor([inputs.per_input["weight"][i] for i in inputs.non_base], dtype=base.dtype)
    weights = weights.reshape(-1, *([1] * base.dim()))
    deltas = deltas * weights
    if consensus:
        mask = deltas.sign() == (deltas.sum(dim=0) >= 0).to(deltas.dtype) * 2 - 1
        mixed, divisor = (deltas * mask).sum(dim=0), (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = deltas.sum(dim=0), weights.sum(dim=0)
    if normalize:
        mixed = mixed / divisor
    return base + mixed * lam if lam != 1 else base + mixed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "method, consensus, normalize, lam",
    [("dare_ties", True, False, 1.0), ("dare_ties", True, True, 0.8), ("dare_linear", False, False, 1.0)],
)
def test_fused_dare_gives_the_whole_tensor_arithmetic_bit_for_bit(method, consensus, normalize, lam, dtype):
    """Over several draw and combine slices, three models, signs that cancel and negative zeros:
    the same bits as the whole-tensor formulation, so seeded merges reproduce across versions."""
    generator = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(301, 999, generator=generator)).to(dtype)  # an odd count: a lone last draw
    base.view(-1)[:64] = -0.0
    models = [(base.float() + 0.003 * torch.randn(base.shape, generator=generator)).to(dtype) for _ in range(3)]
    models[1].view(-1)[:100] = base.view(-1)[:100]

    def inputs() -> MergeInputs:
        generators = [None] + [torch.Generator().manual_seed(seed) for seed in (5, 6, 7)]
        per_input = {"weight": [None, 0.5, 0.3, -0.2], "density": [None, 0.4, 0.7, 0.5]}
        return MergeInputs([base, *models], base_index=0, per_input=per_input, generators=generators)

    shared = {"int8_mask": True, "normalize": normalize, "rescale": True, "lambda": lam}
    fused = METHODS.get(method).merge(inputs(), **shared)
    expected = whole_tensor_dare(inputs(), consensus, normalize, lam)
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32  # equal bits: negative zeros too
    assert fused.dtype == expected.dtype
    assert torch.equal(fused.view(bits), expected.view(bits))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.93])
def test_random_pruning_keeps_each_entry_with_its_probability(density, dtype):
    """DARE's and DELLA's masks keep the requested share of entries (within 5 binomial standard
    deviations over a million entries), and a seed gives the same mask again."""
    count = 1_000_003
    tensor = torch.linspace(-1, 1, count, dtype=torch.float32).add_(1e-3).to(dtype)
    tensor[tensor == 0] = 1e-3

    def pruned(sparsifier, seed: int, **extra: float) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return sparsifier(tensor.clone(), density=density, rescale=False, generator=generator, **extra)

    kept = pruned(sparsify.bernoulli, 1) != 0
    assert abs(kept.float().mean().item() - density) < 5 * (density * (1 - density) / count) ** 0.5
    assert torch.equal(kept, pruned(sparsify.bernoulli, 1) != 0)
    assert not torch.equal(kept, pruned(sparsify.bernoulli, 2) != 0)
    if 0.05 < density < 0.9:  # DELLA: density ± epsilon inside (0, 1); on average it keeps `density`
        della = pruned(sparsify.della_magprune, 1, epsilon=0.05) != 0
        assert abs(della.float().mean().item() - density) < 5 * (density * (1 - density) / count) ** 0.5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_finite_check_finds_nan_and_inf(dtype):
    assert bool(all_finite(torch.zeros(3, 5, dtype=dtype)))
    assert bool(all_finite(torch.zeros(0, dtype=dtype)))
    for bad in (float("nan"), float("inf"), float("-inf")):
        tensor = torch.zeros(3, 5, dtype=dtype)
        tensor[2, 4] = bad
        assert not bool(all_finite(tensor))


def test_a_range_is_written_as_intervals_are():
    from mergetune.merge_ops.methods import ParamSpec, Scope

    assert ParamSpec("t", float, Scope.SHARED, low=0.0, high=1.0).range_text() == "[0.0, 1.0]"
    assert ParamSpec("density", float, Scope.NON_BASE, low=0.0, high=1.0, low_inclusive=False).range_text() == "(0.0, 1.0]"
    assert ParamSpec("max_iter", int, Scope.SHARED, low=0).range_text() == "[0, ∞)"  # not "[0, None]"
