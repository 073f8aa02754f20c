"""A short model card (README.md) for a merged model, in the community's usual shape."""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING, Optional

from mergetune.merge_ops.recipe import Recipe, parse_recipes

if TYPE_CHECKING:  # the card's text helpers serve the read side, which must not load torch
    from mergetune.merge_ops.plan import MergePlan


MULTI_STAGE = "\n---\n"  # between the YAML documents of a multi-stage recipe
RECIPE_FILE = "mergekit_config.yml"  # the recipe beside every merged model, under mergekit's name

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


def escape_markdown(text: str) -> str:
    """Model and task names are user input: keep them from injecting Markdown, HTML or table cells."""
    return html.escape(" ".join(text.split())).replace("|", "\\|").replace("`", "\\`")


def reproduce_command(recipe_file: str, seed: Optional[int], stages: bool) -> str:
    """How to rebuild these tensors. A seed means random masks (DARE, DELLA, ...): only mergetune draws them
    the same way again, where mergekit merges the same recipe with masks of its own drawing."""
    mergekit = "`mergekit-multi` (one stage per YAML document)" if stages else f"`mergekit-yaml {recipe_file} OUT`"
    if seed is None:
        return f"`mergetune merge {recipe_file} OUT` or {mergekit}"
    return (
        f"`mergetune merge {recipe_file} OUT --seed {seed}` on the same device type (CPU or CUDA); "
        f"{mergekit} merges the same recipe with random masks of its own, so other tensors"
    )


def merged_inputs(recipe: Recipe, recipe_yaml: str) -> dict[str, bool]:
    """The checkpoints merged, in order, each once, and whether one is a stage's base model: of every stage of a
    multi-stage recipe, not the stage names its last stage refers to."""
    stages = parse_recipes(recipe_yaml).stages if MULTI_STAGE in recipe_yaml else [recipe]
    names = {stage.name for stage in stages if stage.name}
    found: dict[str, bool] = {}
    for stage in stages:
        for model in stage.referenced_models():
            if model not in names:
                found[model] = found.get(model, False) or model == stage.base_model
    return found


def model_card(recipe: Recipe, plan: "MergePlan", recipe_yaml: str, seed: Optional[int], extra: str = "") -> str:
    """The card; `seed` is None unless some stage draws random masks (`merge_recipe_file`)."""
    inputs = merged_inputs(recipe, recipe_yaml)
    models = list(inputs)
    front = ["---", "library_name: transformers", "tags:", "- merge", "- mergetune", "- mergekit"]
    # Only names shaped like hub ids go into the YAML front matter (a stray newline or colon would rewrite it).
    hub_models = [model for model in models if HUB_ID.fullmatch(model)]
    if hub_models:
        front.append("base_model:")
        front.extend(f"- {model}" for model in hub_models)
    front.append("---")
    lines = [
        *front,
        "",
        "# Merged model",
        "",
        f"Built with mergetune using the **{plan.method.pretty_name}** merge method"
        + (f" ([reference]({plan.method.reference}))" if plan.method.reference else "")
        + ".",
        "",
        "## Models merged",
        "",
    ]
    for model, base in inputs.items():
        lines.append(f"* {escape_markdown(model)}{' (base)' if base else ''}")
    lines += [
        "",
        f"Output: {plan.config.get('num_hidden_layers', '?')} layers, {len(plan.ops)} tensors"
        + (f", random seed {seed}" if seed is not None else "")
        + ".",
        "",
        "## Configuration",
        "",
        f"This recipe (`{RECIPE_FILE}`) reproduces the merge with "
        + reproduce_command(RECIPE_FILE, seed, MULTI_STAGE in recipe_yaml)
        + ":",
        "",
        "```yaml",
        recipe_yaml.rstrip().replace("```", "ʼʼʼ"),
        "```",
        "",
    ]
    if extra:
        lines += [extra.rstrip(), ""]
    return "\n".join(lines)
