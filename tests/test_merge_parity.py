"""Given tiny models and a recipe, mergetune writes the tensors mergekit 0.1.5 writes.

Each recipe runs through mergekit's own `run_merge` and through `mergetune merge`'s
engine; every output tensor must have the same name, shape and dtype, and equal
values within the dtype's float tolerance. Random methods run at density 1.0 here
(mergekit's random draws follow its task order); their seeded behaviour below 1.0
is specified in test_merge_engine.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from mergetune.merge_ops.disk import merge_recipe_file
from mergetune.merge_ops.recipe import parse_recipes
from mergetune.demo.tiny import load_state

mergekit_merge = pytest.importorskip("mergekit.merge")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

SLERP_CURVES = {
    "t": [
        {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
        {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
        {"value": 0.5},
    ]
}

RECIPES = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.3}},
            {"model": "model_b", "parameters": {"weight": [0.2, 0.9]}},
        ],
    },
    "linear_unnormalized_filtered": {
        "merge_method": "linear",
        "models": [
            {"model": "model_a", "parameters": {"weight": [{"filter": "mlp", "value": 0.8}, {"value": 0.4}]}},
            {"model": "model_b", "parameters": {"weight": 0.5}},
        ],
        "parameters": {"normalize": False},
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "model_a"}],
        "parameters": SLERP_CURVES,
    },
    "slerp_colinear": {
        # A model with itself: every pair is colinear, so SLERP falls back to lerp.
        "merge_method": "slerp",
        "base_model": "model_a",
        "slices": [
            {"sources": [{"model": "model_a", "layer_range": [0, 4]}, {"model": "base", "layer_range": [0, 4]}]}
        ],
        "parameters": {"t": 0.0},
    },
    "nuslerp_with_base": {
        "merge_method": "nuslerp",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.4}},
            {"model": "model_b", "parameters": {"weight": 0.6}},
        ],
    },
    "nuslerp_row_wise": {
        "merge_method": "nuslerp",
        "models": [
            {"model": "model_a", "parameters": {"weight": 1.0}},
            {"model": "model_b", "parameters": {"weight": 3.0}},
        ],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.5}},
            {"model": "model_b", "parameters": {"weight": 0.3}},
        ],
        "parameters": {"lambda": 0.9},
    },
    "ties": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": "model_b", "parameters": {"weight": 0.5, "density": [0.3, 0.8]}},
        ],
    },
    "ties_int8_mask": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 1.0, "density": 0.7}},
            {"model": "model_b", "parameters": {"weight": 0.4, "density": 0.7}},
        ],
        "parameters": {"int8_mask": True, "normalize": False},
    },
    "dare_ties": {
        "merge_method": "dare_ties",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.5, "density": 1.0}},
            {"model": "model_b", "parameters": {"weight": 0.5, "density": 1.0}},
        ],
    },
    "dare_linear": {
        "merge_method": "dare_linear",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.6}},
            {"model": "model_b", "parameters": {"weight": 0.4}},
        ],
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.5, "density": 0.9, "gamma": 0.02}},
            {"model": "model_b", "parameters": {"weight": 0.5, "density": 0.8}},
        ],
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.7, "density": 0.9}},
            {"model": "model_b", "parameters": {"weight": 0.3, "density": 0.9}},
        ],
    },
    "della": {
        "merge_method": "della",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.5, "density": 1.0}},
            {"model": "model_b", "parameters": {"weight": 0.5, "density": 1.0}},
        ],
    },
    "della_linear": {
        "merge_method": "della_linear",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.5}},
            {"model": "model_b", "parameters": {"weight": 0.5}},
        ],
        "parameters": {"lambda": 1.2},
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": "base",
        "models": [{"model": "model_a"}, {"model": "model_b"}, {"model": "model_c"}],
    },
    "model_stock_filter_wise": {
        "merge_method": "model_stock",
        "base_model": "base",
        "models": [{"model": "model_a"}, {"model": "model_b"}, {"model": "model_c"}],
        "parameters": {"filter_wise": True},
    },
    "passthrough_stack": {
        # 4 + 4 layers → 6: model_a's layers 0-2 then model_b's layers 1-3.
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "model_a", "layer_range": [0, 3]}]},
            {"sources": [{"model": "model_b", "layer_range": [1, 4]}]},
        ],
    },
    "linear_last_slice_wider": {
        # The final norm and lm_head come from the last slice's first source only: mergekit pairs
        # as many of its models as the first slice has sources.
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": "model_a", "layer_range": [0, 2], "parameters": {"weight": 1.0}}]},
            {
                "sources": [
                    {"model": "model_b", "layer_range": [2, 4], "parameters": {"weight": 0.3}},
                    {"model": "model_c", "layer_range": [2, 4], "parameters": {"weight": 0.7}},
                ]
            },
        ],
    },
    "linear_mergekit_spellings": {
        # mergekit's other ways to say the same: a `torch.` dtype name, the `tokenizer:` section,
        # a slice's residual_weight (declared by mergekit, read nowhere).
        "merge_method": "linear",
        "base_model": "model_a",
        "slices": [
            {
                "sources": [
                    {"model": "model_a", "layer_range": [0, 4], "parameters": {"weight": 0.4}},
                    {"model": "model_b", "layer_range": [0, 4], "parameters": {"weight": 0.6}},
                ],
                "residual_weight": 0.3,
            }
        ],
        "dtype": "torch.float32",
        "tokenizer": {"source": "base"},
    },
    "passthrough_scaled": {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "model_a", "layer_range": [0, 2], "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"value": 1.0}]}}]},
            {"sources": [{"model": "model_a", "layer_range": [1, 4]}]},
        ],
    },
    "multislerp": {
        "merge_method": "multislerp",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.5}},
            {"model": "model_b", "parameters": {"weight": 0.3}},
            {"model": "model_c", "parameters": {"weight": [0.2, 0.6]}},
        ],
    },
    "multislerp_task_vectors_unnormalized": {
        "merge_method": "multislerp",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 1.0}},
            {"model": "model_b", "parameters": {"weight": 2.0}},
        ],
        "parameters": {"normalize_weights": False},
    },
    "karcher": {
        "merge_method": "karcher",
        "models": [{"model": "model_a"}, {"model": "model_b"}, {"model": "model_c"}],
    },
    "karcher_with_base_few_iterations": {
        # karcher ignores the base's role: an unlisted base_model is one more input.
        "merge_method": "karcher",
        "base_model": "base",
        "models": [{"model": "model_a"}, {"model": "model_b"}],
        "parameters": {"max_iter": 2, "tol": 1e-6},
    },
    "sce": {
        "merge_method": "sce",
        "base_model": "base",
        "models": [{"model": "model_a"}, {"model": "model_b"}, {"model": "model_c"}],
    },
    "sce_select_topk_int8_mask": {
        "merge_method": "sce",
        "base_model": "base",
        "models": [{"model": "model_a"}, {"model": "model_b"}],
        "parameters": {"select_topk": [0.3, 0.8], "int8_mask": True},
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "model_a"}],
        "parameters": {"t": [{"filter": "mlp", "value": [0.001, 0.05]}, {"value": 0.01}]},
    },
    "arcee_fusion": {
        "merge_method": "arcee_fusion",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "model_b"}],
    },
    "ram": {
        "merge_method": "ram",
        "base_model": "base",
        "models": [{"model": "model_a"}, {"model": "model_b"}, {"model": "model_c"}],
        "parameters": {"epsilon": 0.02},  # about a third of each task vector counts as unchanged
    },
    "ram_default_epsilon": {
        "merge_method": "ram",
        "base_model": "base",
        "models": [{"model": "model_a"}, {"model": "model_b"}],
    },
    "ramplus_tl": {
        "merge_method": "ramplus_tl",
        "base_model": "base",
        "models": [{"model": "model_a"}, {"model": "model_b"}, {"model": "model_c"}],
        "parameters": {"epsilon": 0.02, "r": 0.5, "alpha": 0.3},
    },
    "slerp_out_dtype": {
        "merge_method": "slerp",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "model_b"}],
        "parameters": {"t": [0.1, 0.9]},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
}


def with_paths(node, paths: dict[str, Path]):
    """Replace model names in a recipe with the fixture's absolute directories."""
    if isinstance(node, dict):
        return {
            key: str(paths[value]) if key in ("model", "base_model") and value in paths else with_paths(value, paths)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [with_paths(item, paths) for item in node]
    return node


def run_mergekit(recipe: dict, out: Path) -> Path:
    config = MergeConfiguration.model_validate(recipe)
    options = MergeOptions(copy_tokenizer=False, lazy_unpickle=False, quiet=True, write_model_card=False)
    mergekit_merge.run_merge(config, str(out), options)
    return out


def run_mergetune(recipe_text: str, out: Path, seed=None) -> Path:
    merge_recipe_file(parse_recipes(recipe_text), out, seed=seed)
    return out




def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(theirs)
    for name, reference in theirs.items():
        assert ours[name].dtype == reference.dtype, name
        assert ours[name].shape == reference.shape, name
        torch.testing.assert_close(ours[name], reference, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("family", ["family_f32", "family_bf16_tied"])
@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_matches_mergekit(name, family, request, tmp_path):
    paths = request.getfixturevalue(family)
    recipe = with_paths(RECIPES[name], paths)
    if family == "family_bf16_tied" and "dtype" not in recipe:
        recipe["dtype"] = "bfloat16"
    theirs = load_state(run_mergekit(recipe, tmp_path / "mergekit"))
    ours = load_state(run_mergetune(yaml.safe_dump(recipe), tmp_path / "mergetune", seed=0))
    assert_same_tensors(ours, theirs)


OUT_OF_RANGE = {  # values outside a parameter's range that mergekit 0.1.5 merges into finite tensors
    "slerp t extrapolated": {
        "merge_method": "slerp",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "model_a"}],
        "parameters": {"t": [-0.2, 1.3]},
    },
    "ties density 0 and 1.5": {
        "merge_method": "ties",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.5, "density": 0}},
            {"model": "model_b", "parameters": {"weight": 0.5, "density": 1.5}},
        ],
    },
    "dare_ties density 0 and 1.5": {
        "merge_method": "dare_ties",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.5, "density": 0}},
            {"model": "model_b", "parameters": {"weight": 0.5, "density": 1.5}},
        ],
    },
    "breadcrumbs gamma 1.5": {
        "merge_method": "breadcrumbs",
        "base_model": "base",
        "models": [
            {"model": "model_a", "parameters": {"weight": 0.5, "density": 0.5, "gamma": 1.5}},
            {"model": "model_b", "parameters": {"weight": 0.5, "density": 0.5, "gamma": -0.1}},
        ],
    },
    "sce select_topk 1.5": {
        "merge_method": "sce",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "model_a"}, {"model": "model_b"}],
        "parameters": {"select_topk": 1.5},
    },
    "ramplus_tl r and alpha outside [0, 1]": {
        "merge_method": "ramplus_tl",
        "base_model": "base",
        "models": [{"model": "base"}, {"model": "model_a"}, {"model": "model_b"}],
        "parameters": {"r": 1.5, "alpha": -0.1},
    },
}


@pytest.mark.parametrize("name", sorted(OUT_OF_RANGE))
def test_values_outside_a_parameter_s_range_merge_as_in_mergekit_with_a_warning(name, family_f32, tmp_path):
    recipe = with_paths(OUT_OF_RANGE[name], family_f32)
    theirs = load_state(run_mergekit(recipe, tmp_path / "mergekit"))
    result = merge_recipe_file(parse_recipes(yaml.safe_dump(recipe)), tmp_path / "mergetune", seed=0)
    assert_same_tensors(load_state(tmp_path / "mergetune"), theirs)
    assert any("is outside" in warning and "merged as mergekit 0.1.5 merges it" in warning for warning in result.warnings)


def test_a_negative_dare_density_is_refused_where_mergekit_fails(family_f32, tmp_path):
    from mergetune.errors import MergetuneError

    recipe = with_paths(
        {
            "merge_method": "dare_ties",
            "base_model": "base",
            "models": [{"model": "model_a", "parameters": {"weight": 1.0, "density": -0.1}}],
        },
        family_f32,
    )
    with pytest.raises(RuntimeError, match="p_in >= 0"):
        run_mergekit(recipe, tmp_path / "mergekit")
    with pytest.raises(MergetuneError, match=r"density: -0.1 is below 0.0: dare_ties cannot merge it"):
        run_mergetune(yaml.safe_dump(recipe), tmp_path / "mergetune")
    assert not (tmp_path / "mergetune").exists()


def test_stack_layer_layout_and_config(family_f32, tmp_path):
    """A passthrough stack of 3 + 3 layers has 6 layers, renumbered, and says so in config.json."""
    recipe = with_paths(RECIPES["passthrough_stack"], family_f32)
    out = run_mergetune(yaml.safe_dump(recipe), tmp_path / "stack")
    tensors = load_state(out)
    source_b = load_state(family_f32["model_b"])
    assert max(int(name.split(".")[2]) for name in tensors if ".layers." in name) == 5
    torch.testing.assert_close(
        tensors["model.layers.3.mlp.up_proj.weight"], source_b["model.layers.1.mlp.up_proj.weight"], rtol=0, atol=0
    )
    config = yaml.safe_load((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6


def test_multi_stage_slerp_of_two_stacks_matches_mergekit_run_stage_by_stage(family_f32, tmp_path):
    """Stage 1 and 2 build stacks; stage 3 SLERPs them — the same as three mergekit runs chained by hand."""
    stack = lambda first, second: {  # noqa: E731
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": first, "layer_range": [0, 3]}]},
            {"sources": [{"model": second, "layer_range": [1, 4]}]},
        ],
    }
    stage_a = with_paths(stack("model_a", "base"), family_f32)
    stage_b = with_paths(stack("model_b", "base"), family_f32)
    final = {
        "merge_method": "slerp",
        "base_model": "stack_a",
        "slices": [
            {"sources": [{"model": "stack_a", "layer_range": [0, 6]}, {"model": "stack_b", "layer_range": [0, 6]}]}
        ],
        "parameters": {
            "t": [
                {"filter": "lm_head", "value": 0.75},
                {"filter": "embed_tokens", "value": 0.25},
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"filter": "layernorm", "value": [0, 1]},
                {"value": 0.5},
            ]
        },
    }
    text = yaml.safe_dump_all([{"name": "stack_a", **stage_a}, {"name": "stack_b", **stage_b}, final])
    ours = load_state(run_mergetune(text, tmp_path / "ours"))

    dir_a = run_mergekit(stage_a, tmp_path / "mk_a")
    dir_b = run_mergekit(stage_b, tmp_path / "mk_b")
    final_paths = with_paths(final, {"stack_a": dir_a, "stack_b": dir_b})
    theirs = load_state(run_mergekit(final_paths, tmp_path / "mk_final"))
    assert_same_tensors(ours, theirs)
    assert not (tmp_path / "ours" / ".stages").exists()


@pytest.fixture(scope="session")
def family_other_vocab(tmp_path_factory, family_f32) -> dict[str, Path]:
    """model_x: same architecture as family_f32 but a tokenizer with more (and renumbered) words."""
    from mergetune.demo.tiny import TinySpec, build_tokenizer, random_model, save_model

    tokenizer = build_tokenizer(extra_text="zebra yak quokka aardvark")
    model = random_model(TinySpec(), tokenizer, seed=5)
    return {**family_f32, "model_x": save_model(model, tokenizer, tmp_path_factory.mktemp("vocab") / "model_x")}


def test_different_vocabularies_are_aligned_like_mergekit(family_other_vocab, tmp_path):
    """tokenizer_source: base re-indexes model_x's embedding rows by token before the linear merge."""
    recipe = with_paths(
        {
            "merge_method": "linear",
            "base_model": "base",
            "models": [
                {"model": "base", "parameters": {"weight": 0.5}},
                {"model": "model_x", "parameters": {"weight": 0.5}},
            ],
            "tokenizer_source": "base",
        },
        family_other_vocab,
    )
    theirs = load_state(run_mergekit(recipe, tmp_path / "mergekit"))
    ours = load_state(run_mergetune(yaml.safe_dump(recipe), tmp_path / "mergetune"))
    assert_same_tensors(ours, theirs)


def test_a_tokenizer_source_merged_nowhere_gives_its_vocabulary_like_mergekit(family_other_vocab, tmp_path):
    """tokenizer_source may name a model the recipe does not merge: its tokenizer alone is taken, and every
    merged model's embedding rows are re-indexed to it."""
    from transformers import AutoTokenizer

    recipe = with_paths(
        {
            "merge_method": "linear",
            "base_model": "base",
            "models": [
                {"model": "base", "parameters": {"weight": 0.5}},
                {"model": "model_a", "parameters": {"weight": 0.5}},
            ],
        },
        family_other_vocab,
    )
    recipe["tokenizer_source"] = str(family_other_vocab["model_x"])
    theirs_dir = run_mergekit(recipe, tmp_path / "mergekit")
    ours_dir = run_mergetune(yaml.safe_dump(recipe), tmp_path / "mergetune")
    assert_same_tensors(load_state(ours_dir), load_state(theirs_dir))
    vocab = AutoTokenizer.from_pretrained(str(family_other_vocab["model_x"])).get_vocab()
    assert AutoTokenizer.from_pretrained(str(ours_dir)).get_vocab() == vocab
    assert json.loads((ours_dir / "config.json").read_text())["vocab_size"] == len(vocab)


def test_different_vocabularies_without_tokenizer_source_name_the_tensor(family_other_vocab, tmp_path):
    from mergetune.errors import MergetuneError

    recipe = with_paths(
        {"merge_method": "linear", "models": [{"model": "base", "parameters": {"weight": 1}}, {"model": "model_x", "parameters": {"weight": 1}}]},
        family_other_vocab,
    )
    with pytest.raises(MergetuneError, match="tensor model.embed_tokens.weight: shape .* set tokenizer_source"):
        run_mergetune(yaml.safe_dump(recipe), tmp_path / "out")


def test_a_stack_of_models_with_different_vocabularies_is_refused_unless_aligned(family_other_vocab, tmp_path):
    """mergekit 0.1.5 writes model_x's head under base's embeddings (a model transformers cannot load); with a
    tokenizer_source both are re-indexed to one vocabulary."""
    from mergetune.errors import MergetuneError

    recipe = with_paths(
        {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "base", "layer_range": [0, 2]}]}, {"sources": [{"model": "model_x", "layer_range": [2, 4]}]}
        ]},
        family_other_vocab,
    )
    with pytest.raises(MergetuneError, match=r"tensor lm_head.weight: \d+ rows \(from .*model_x\) but model.embed_tokens.weight has \d+ .* set tokenizer_source"):
        run_mergetune(yaml.safe_dump(recipe), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    recipe["tokenizer_source"] = str(family_other_vocab["model_x"])
    state = load_state(run_mergetune(yaml.safe_dump(recipe), tmp_path / "aligned"))
    assert state["model.embed_tokens.weight"].shape == state["lm_head.weight"].shape


def test_rotary_frequency_buffers_of_older_checkpoints_are_not_merged_like_mergekit(family_bf16_tied, tmp_path):
    """Checkpoints saved by older transformers hold `rotary_emb.inv_freq` buffers; mergekit writes only weights."""
    from safetensors.torch import load_file, save_file

    paths = {}
    for name in ("model_a", "model_b"):
        paths[name] = shutil.copytree(family_bf16_tied[name], tmp_path / name)
        (weights,) = paths[name].glob("*.safetensors")
        state = load_file(weights)
        layers = {int(key.split(".")[2]) for key in state if key.startswith("model.layers.")}
        state.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(8) for i in layers})
        save_file(state, weights, metadata={"format": "pt"})
    recipe = with_paths(RECIPES["linear"], paths)
    theirs = load_state(run_mergekit(recipe, tmp_path / "mergekit"))
    ours = load_state(run_mergetune(yaml.safe_dump(recipe), tmp_path / "mergetune"))
    assert not any("inv_freq" in name for name in ours)
    assert_same_tensors(ours, theirs)


def test_a_last_slice_whose_base_mergekit_would_leave_out_of_the_final_tensors_is_refused(family_f32, tmp_path):
    from mergetune.errors import MergetuneError

    recipe = with_paths(
        {
            "merge_method": "ties",
            "base_model": "base",
            "slices": [
                {"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "model_a", "layer_range": [0, 2]}]},
                {
                    "sources": [
                        {"model": "model_a", "layer_range": [2, 4]},
                        {"model": "model_b", "layer_range": [2, 4]},
                        {"model": "base", "layer_range": [2, 4]},
                    ]
                },
            ],
            "parameters": {"weight": 0.5, "density": 0.5},
        },
        family_f32,
    )
    with pytest.raises(MergetuneError, match=r"last slice: .* first 2 source\(s\) .* leaves out its base model"):
        run_mergetune(yaml.safe_dump(recipe), tmp_path / "out")
    assert not (tmp_path / "out").exists()
