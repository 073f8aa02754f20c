"""The README's main job until the search lands: merge tiny models built on the spot.

Builds (once, cached) a tiny base model and two relatives of it, then runs the
two recipes this project is about — a SLERP with per-filter t-curves and a DARE
TIES at weight/density 0.5 — on disk, and rebuilds them in memory into one live
model to show the search's hot path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from mergetune.merge_ops.disk import Progress, merge_recipe_file
from mergetune.merge_ops.inmemory import InMemoryBuilder
from mergetune.merge_ops.recipe import parse_recipes
from mergetune.merge_ops.sources import open_source
from mergetune.tiny import TinySpec, build_family

DEMO_SPEC = TinySpec(hidden_size=128, intermediate_size=256, num_hidden_layers=8)


def demo_recipes(models: dict[str, Path]) -> dict[str, str]:
    base, model_a, model_b = (str(models[name]) for name in ("base", "model_a", "model_b"))
    slerp = {
        "merge_method": "slerp",
        "base_model": model_a,
        "slices": [{"sources": [{"model": model_a, "layer_range": [0, 8]}, {"model": model_b, "layer_range": [0, 8]}]}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5},
            ]
        },
        "dtype": "bfloat16",
    }
    dare_ties = {
        "merge_method": "dare_ties",
        "base_model": base,
        "models": [
            {"model": base},
            {"model": model_a, "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": model_b, "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "parameters": {"int8_mask": True},
        "dtype": "bfloat16",
    }
    return {"slerp": yaml.safe_dump(slerp, sort_keys=False), "dare_ties": yaml.safe_dump(dare_ties, sort_keys=False)}


@dataclass
class DemoMerge:
    name: str
    recipe_path: Path
    output: Path
    disk_seconds: float
    in_memory_seconds: float


def ensure_models(cache_dir: Path) -> dict[str, Path]:
    """The demo's tiny models, built once and reused (deterministic, so a rebuild is identical)."""
    names = ("base", "model_a", "model_b")
    if all((cache_dir / name / "config.json").exists() for name in names):
        return {name: cache_dir / name for name in names}
    return build_family(cache_dir, names=names, spec=DEMO_SPEC, seed=0)


def run_merge_demo(
    out_dir: Path, seed: int = 0, progress: Optional[Progress] = None, say: Callable[[str], None] = lambda _: None
) -> list[DemoMerge]:
    out_dir.mkdir(parents=True, exist_ok=True)
    models = ensure_models(out_dir / "models")
    say(f"tiny models in {out_dir / 'models'}: base, model_a, model_b ({DEMO_SPEC.num_hidden_layers} layers)")
    results = []
    for name, text in demo_recipes(models).items():
        recipe_path = out_dir / f"{name}.yaml"
        recipe_path.write_text(text)
        recipe_file = parse_recipes(text, source=str(recipe_path))
        output = out_dir / f"merged-{name}"
        start = time.perf_counter()
        merge_recipe_file(recipe_file, output, seed=seed, overwrite=True, progress=progress)
        disk_seconds = time.perf_counter() - start
        recipe = recipe_file.final
        sources = {ref: open_source(ref) for ref in recipe.referenced_models()}
        builder = InMemoryBuilder.for_recipe(recipe, sources)
        builder.build(recipe, seed=seed)  # first build also measures SLERP geometry
        start = time.perf_counter()
        builder.build(recipe, seed=seed)
        results.append(DemoMerge(name, recipe_path, output, disk_seconds, time.perf_counter() - start))
    return results
