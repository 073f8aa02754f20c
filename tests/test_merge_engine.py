"""The merge engine's rules, stated on small inputs: gradients, filters, seeds, in-memory builds."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from mergetune.merge_ops.disk import merge_recipe_file
from mergetune.merge_ops.inmemory import InMemoryBuilder
from mergetune.merge_ops.parameters import coercer, evaluate_setting
from mergetune.merge_ops.plan import plan_merge
from mergetune.merge_ops.recipe import ConditionalParameter, parse_recipes, recipe_from_dict
from mergetune.demo.tiny import load_state
from mergetune.merge_ops.sources import MemorySource, open_source

CURVE = [0, 0.5, 0.3, 0.7, 1]
as_float = coercer(float)


def fake_model(label: str, layers: int) -> MemorySource:
    """A metadata-only Llama-shaped source: enough for planning."""
    tensors = {"model.embed_tokens.weight": torch.zeros(8, 4), "model.norm.weight": torch.zeros(4), "lm_head.weight": torch.zeros(8, 4)}
    for index in range(layers):
        for suffix in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            tensors[f"model.layers.{index}.{suffix}"] = torch.zeros(4, 4) if "proj" in suffix else torch.zeros(4)
    return MemorySource(label, tensors, {"model_type": "llama", "num_hidden_layers": layers})


@pytest.mark.parametrize(
    "layer, expected",
    [
        (0, 0.0),  # t = 0: the first point
        (10, 0.494872),  # position 40/39 = 1.0256: 0.5 + 0.0256 * (0.3 - 0.5)
        (20, 0.320513),  # position 80/39 = 2.0513: 0.3 + 0.0513 * (0.7 - 0.3)
        (29, 0.689744),  # position 116/39 = 2.9744: 0.3 + 0.9744 * (0.7 - 0.3)
        (39, 1.0),  # t = 1: the last point
    ],
)
def test_forty_layer_gradient_interpolates_linearly_between_points(layer, expected):
    """[0, 0.5, 0.3, 0.7, 1] over 40 layers: layer i sits at t = i/39, position 4t along the list."""
    recipe = recipe_from_dict(
        {
            "merge_method": "slerp",
            "base_model": "a",
            "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {"t": [{"filter": "self_attn", "value": CURVE}, {"value": 0.5}]},
        }
    )
    plan = plan_merge(recipe, {"a": fake_model("a", 40), "b": fake_model("b", 40)})
    assert plan.op(f"model.layers.{layer}.self_attn.q_proj.weight").shared["t"] == pytest.approx(expected, abs=1e-6)
    assert plan.op(f"model.layers.{layer}.mlp.up_proj.weight").shared["t"] == 0.5


def test_first_matching_filter_wins_by_substring():
    setting = [
        ConditionalParameter(filter="mlp", value=0.1),
        ConditionalParameter(filter="up_proj", value=0.2),
        ConditionalParameter(value=0.9),
    ]
    assert evaluate_setting("model.layers.3.mlp.up_proj.weight", setting, 0.0, as_float) == 0.1
    assert evaluate_setting("model.layers.3.self_attn.q_proj.weight", setting, 0.0, as_float) == 0.9


def test_boolean_gradients_select_instead_of_interpolating():
    as_bool = coercer(bool)
    assert evaluate_setting("x", [True, False], 0.49, as_bool) is True
    assert evaluate_setting("x", [True, False], 1.0, as_bool) is False


def test_lookup_order_model_then_slice_then_global_then_default():
    recipe = recipe_from_dict(
        {
            "merge_method": "ties",
            "base_model": "a",
            "slices": [
                {
                    "sources": [
                        {"model": "a", "layer_range": [0, 2]},
                        {"model": "b", "layer_range": [0, 2], "parameters": {"weight": 0.7}},
                        {"model": "c", "layer_range": [0, 2]},
                    ],
                    "parameters": {"weight": 0.2},
                }
            ],
            "parameters": {"weight": 0.1, "density": 0.4},
        }
    )
    sources = {name: fake_model(name, 2) for name in "abc"}
    op = plan_merge(recipe, sources).op("model.layers.1.mlp.up_proj.weight")
    assert op.per_input["weight"] == [None, 0.7, 0.2]  # base has no weight; model beats slice
    assert op.per_input["density"] == [None, 0.4, 0.4]  # global
    assert op.shared["normalize"] is True and op.shared["lambda"] == 1.0  # TIES defaults


def test_non_layer_tensors_take_the_first_gradient_point():
    """mergekit plans embeddings, the final norm and lm_head with t = 0."""
    recipe = recipe_from_dict(
        {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"t": [0.2, 0.9]}}
    )
    plan = plan_merge(recipe, {"a": fake_model("a", 3), "b": fake_model("b", 3)})
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert plan.op(name).shared["t"] == pytest.approx(0.2)
    assert plan.op("model.layers.2.mlp.up_proj.weight").shared["t"] == pytest.approx(0.9)


def dare_recipe(paths, density: float) -> str:
    return yaml.safe_dump(
        {
            "merge_method": "dare_ties",
            "base_model": str(paths["base"]),
            "models": [
                {"model": str(paths["model_a"]), "parameters": {"weight": 0.5, "density": density}},
                {"model": str(paths["model_b"]), "parameters": {"weight": 0.5, "density": density}},
            ],
        }
    )


def merged(text: str, out, seed):
    merge_recipe_file(parse_recipes(text), out, seed=seed)
    return load_state(out)


def test_dare_with_a_seed_is_bit_identical_wherever_the_models_are_and_another_seed_differs(family_f32, tmp_path):
    text = dare_recipe(family_f32, 0.5)
    moved = {name: shutil.copytree(family_f32[name], tmp_path / "elsewhere" / name) for name in ("base", "model_a", "model_b")}
    first = merged(text, tmp_path / "one", seed=7)
    again = merged(dare_recipe(moved, 0.5), tmp_path / "two", seed=7)
    other = merged(text, tmp_path / "three", seed=8)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_dare_keeps_about_density_of_each_task_vector_and_rescales(family_f32, tmp_path):
    """DARE-linear of one model at density 0.3: ~30% of the delta survives, scaled back to its L1 norm."""
    text = yaml.safe_dump(
        {
            "merge_method": "dare_linear",
            "base_model": str(family_f32["base"]),
            "models": [{"model": str(family_f32["model_a"]), "parameters": {"weight": 1.0, "density": 0.3}}],
        }
    )
    out = merged(text, tmp_path / "dare", seed=3)
    base, model = load_state(family_f32["base"]), load_state(family_f32["model_a"])
    name = "model.layers.0.mlp.up_proj.weight"
    delta, kept = model[name] - base[name], out[name] - base[name]
    fraction = (kept.abs() > 1e-9).float().mean().item()
    assert 0.25 < fraction < 0.35
    assert kept.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-3)


def test_in_memory_rebuilds_overwrite_parameters_in_place(family_f32):
    """Candidate after candidate, the same parameter storage holds the latest merge."""
    paths = family_f32
    recipe_at = lambda t: recipe_from_dict(  # noqa: E731
        {
            "merge_method": "slerp",
            "base_model": str(paths["base"]),
            "models": [{"model": str(paths["base"])}, {"model": str(paths["model_a"])}],
            "parameters": {"t": t},
        }
    )
    sources = {name: open_source(name) for name in recipe_at(0).referenced_models()}
    builder = InMemoryBuilder.for_recipe(recipe_at(0), sources)
    weight = builder.model.get_parameter("model.layers.0.mlp.up_proj.weight")
    pointer = weight.data_ptr()
    builder.build(recipe_at(0.0))
    torch.testing.assert_close(weight, sources[str(paths["base"])].get("model.layers.0.mlp.up_proj.weight"))
    builder.build(recipe_at(1.0))
    torch.testing.assert_close(weight, sources[str(paths["model_a"])].get("model.layers.0.mlp.up_proj.weight"))
    assert weight.data_ptr() == pointer


def test_live_model_after_build_matches_the_merged_checkpoint_loaded_by_transformers(family_f32, tmp_path):
    from transformers import AutoModelForCausalLM

    text = dare_recipe(family_f32, 1.0)
    recipe = parse_recipes(text).final
    merged(text, tmp_path / "disk", seed=0)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").eval()
    sources = {name: open_source(name) for name in recipe.referenced_models()}
    builder = InMemoryBuilder.for_recipe(recipe, sources)
    builder.build(recipe, seed=0)
    tokens = torch.tensor([[1, 5, 9, 13, 2]])
    with torch.no_grad():
        torch.testing.assert_close(builder.model(tokens).logits, reference(tokens).logits)


def test_a_tied_model_merged_with_an_untied_one_gives_an_untied_model_with_its_merged_head(
    family_bf16_tied, family_f32, tmp_path
):
    """The tied model donates the config, the untied one an lm_head: the merged head is written, so the config must
    not tie it to the embeddings (transformers would warn and vLLM score with the embeddings as the head), and the
    live model must not share one tensor for both (building the head would overwrite the embeddings)."""
    from transformers import AutoModelForCausalLM

    tied, untied = str(family_bf16_tied["model_a"]), str(family_f32["model_a"])
    text = yaml.safe_dump(
        {"merge_method": "linear", "dtype": "float32", "models": [{"model": m, "parameters": {"weight": 1}} for m in (tied, untied)]}
    )
    recipe = parse_recipes(text).final
    merged(text, tmp_path / "disk", seed=None)
    assert json.loads((tmp_path / "disk" / "config.json").read_text())["tie_word_embeddings"] is False
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").eval()
    assert not torch.equal(reference.lm_head.weight, reference.model.embed_tokens.weight)
    builder = InMemoryBuilder.for_recipe(recipe, {name: open_source(name) for name in recipe.referenced_models()})
    builder.build(recipe)
    assert builder.model.lm_head.weight.data_ptr() != builder.model.model.embed_tokens.weight.data_ptr()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(builder.model.state_dict()[name], tensor), name


def test_a_donor_config_silent_on_tying_is_untied_where_a_head_is_written(family_bf16_tied, family_f32, tmp_path):
    """Gemma's and GPT-2's configs tie by default and may leave the key out: a written head unties them too."""
    silent = shutil.copytree(family_bf16_tied["model_a"], tmp_path / "silent")
    config = json.loads((silent / "config.json").read_text())
    del config["tie_word_embeddings"]
    (silent / "config.json").write_text(json.dumps(config))
    models = [{"model": str(m), "parameters": {"weight": 1}} for m in (silent, family_f32["model_a"])]
    recipe = parse_recipes(yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": models})).final
    plan = plan_merge(recipe, {name: open_source(name) for name in recipe.referenced_models()})
    assert "lm_head.weight" in {op.output for op in plan.ops} and plan.config["tie_word_embeddings"] is False


def test_a_problem_in_one_stage_of_a_recipe_file_names_the_file_and_the_stage(family_f32, tmp_path):
    from mergetune.errors import MergetuneError

    a, b = family_f32["model_a"], family_f32["model_b"]
    text = (
        f"name: blend\nmerge_method: slerp\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{t: 0.5}}\n---\n"
        f"merge_method: linear\nmodels: [{{model: blend, parameters: {{weight: 1}}}}, {{model: {a}, parameters: {{weight: 1}}}}]\n"
    )
    recipe_file = parse_recipes(text, source="two.yaml")
    with pytest.raises(MergetuneError, match=r"^two\.yaml \(stage blend\): slerp needs a base_model"):
        merge_recipe_file(recipe_file, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_recipe_yaml_round_trips(family_f32):
    text = yaml.safe_dump(
        {
            "merge_method": "slerp",
            "base_model": "a",
            "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {"t": [{"filter": "self_attn", "value": CURVE}, {"value": 0.5}]},
            "dtype": "bfloat16",
        }
    )
    recipe = parse_recipes(text).final
    assert "value: [0, 0.5, 0.3, 0.7, 1]" in recipe.to_yaml()
    assert parse_recipes(recipe.to_yaml()).final == recipe
