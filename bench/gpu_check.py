"""The GPU check: one script, one printed table, for a machine with one NVIDIA GPU, torch and transformers.

No vLLM and no network needed. Builds Mistral-shaped checkpoints on the spot
(full-size layers, a few of them; a small word-level vocabulary), then measures what
a search does on the device:

- in-memory SLERP and DARE TIES candidate builds (seconds per candidate, peak memory),
  bit-equality with a disk merge on the same device, seeded reproducibility;
- `hf` scoring (batch-size probe, identical scores when nothing changed, different
  scores after a rebuild);
- the memory plan's predicted bytes against what the device reports.

    python bench/gpu_check.py                       # on the GPU machine (a few minutes)
    python bench/gpu_check.py --tiny --device cpu   # tiny sizes on a CPU (the test suite runs this)
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from mergetune.demo.skills import SEARCH_TASKS, write_task_dir
from mergetune.demo.tiny import TinySpec, build_family, load_state
from mergetune.eval import EvalConfig, Evaluator
from mergetune.merge_ops.disk import merge_recipe_file
from mergetune.merge_ops.inmemory import InMemoryBuilder
from mergetune.merge_ops.recipe import parse_recipes
from mergetune.merge_ops.sources import open_source, resident_bytes
from mergetune.search.memory import plan_live
from mergetune.devices import device_memory
from mergetune.search.workspace import plan_bytes

MISTRAL = TinySpec(hidden_size=4096, intermediate_size=14336, num_hidden_layers=2, num_attention_heads=32,
                   num_key_value_heads=8, max_position_embeddings=4096)
TINY = TinySpec()

RECIPES = {
    "slerp": """merge_method: slerp
base_model: {model_a}
models: [{{model: {model_a}}}, {{model: {model_b}}}]
parameters: {{t: [{{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}}, {{filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}}, {{value: {t}}}]}}
dtype: bfloat16
""",
    "dare_ties": """merge_method: dare_ties
base_model: {base}
models: [{{model: {base}}}, {{model: {model_a}, parameters: {{weight: {t}, density: 0.5}}}},
         {{model: {model_b}, parameters: {{weight: 0.5, density: 0.5}}}}]
parameters: {{normalize: false, int8_mask: true}}
dtype: bfloat16
""",
}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def peak_bytes(device: str) -> int:
    return torch.cuda.max_memory_allocated(torch.device(device)) if device.startswith("cuda") else 0


def snapshot(builder: InMemoryBuilder) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().to("cpu").clone() for name, tensor in builder.model.state_dict().items()}


def check_builds(models: dict[str, Path], device: str, work: Path, rows: list[tuple[str, str]]) -> InMemoryBuilder:
    """In-memory builds per method: time per candidate, equality with the disk merge, seeded reproducibility."""
    sources = {str(path): open_source(str(path)) for path in models.values()}
    first = parse_recipes(RECIPES["slerp"].format(t=0.5, **models))
    builder = InMemoryBuilder.for_recipe(first.stages[0], sources, device=device, dtype=torch.bfloat16)
    for method, template in RECIPES.items():
        recipe = parse_recipes(template.format(t=0.5, **models))
        builder.build(recipe, seed=7)  # warm: SLERP's geometry is measured once per pair
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(torch.device(device))
        seconds = []
        for t in (0.3, 0.6, 0.9):
            synchronize(device)
            start = time.perf_counter()
            builder.build(parse_recipes(template.format(t=t, **models)), seed=7)
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        builder.build(recipe, seed=7)
        built = snapshot(builder)
        builder.build(parse_recipes(template.format(t=0.9, **models)), seed=8)  # something else in between
        builder.build(recipe, seed=7)
        again = snapshot(builder)
        disk = load_state(merge_recipe_file(recipe, work / method, seed=7, device=device).output)
        same_as_disk = all(torch.equal(again[name], disk[name]) for name in disk)
        start = time.perf_counter()
        merge_recipe_file(recipe, work / f"{method}-timed", seed=7, device=device)
        reloaded = load_state(work / f"{method}-timed")
        disk_seconds = time.perf_counter() - start
        rows += [
            (f"{method}: in-memory build, s per candidate", f"{min(seconds):.3f} (of {', '.join(f'{s:.3f}' for s in seconds)})"),
            (f"{method}: disk merge + reload, s", f"{disk_seconds:.2f} ({disk_seconds / min(seconds):.0f}x the build)"),
            (f"{method}: peak device memory during builds, GB", f"{peak_bytes(device) / 1e9:.2f}"),
            (f"{method}: in-memory == disk merge on {device}, bit for bit", "yes" if same_as_disk else "NO"),
            (f"{method}: same recipe and seed again later, identical", "yes" if all(torch.equal(built[n], again[n]) for n in built) else "NO"),
        ]
        del reloaded
    return builder


def check_scoring(builder: InMemoryBuilder, models: dict[str, Path], device: str, work: Path, rows: list) -> None:
    """hf scoring on the device: the batch-size probe, determinism, and a score that follows the weights."""
    from transformers import AutoTokenizer

    tasks = write_task_dir(work / "tasks", docs_per_split=40)
    config = EvalConfig(tasks=tuple(SEARCH_TASKS), include_paths=(tasks,))
    tokenizer = AutoTokenizer.from_pretrained(str(models["base"]))
    evaluator = Evaluator.from_model(builder.model, tokenizer, config, backend="hf", batch_size="auto")
    ids = evaluator.sample_doc_ids(limit=20, seed=0)
    builder.build(parse_recipes(RECIPES["slerp"].format(t=0.2, **models)), seed=7)
    first, second = evaluator.score(doc_ids=ids), evaluator.score(doc_ids=ids)
    builder.build(parse_recipes(RECIPES["dare_ties"].format(t=0.9, **models)), seed=7)
    third = evaluator.score(doc_ids=ids)
    per_doc = lambda result: [d.metrics for s in result.tasks.values() for docs in s.docs.values() for d in docs]  # noqa: E731
    rows += [
        ("hf: batch sizes chosen by the probe", str(sorted(set(evaluator.backend._probed.values())) or "fixed")),
        ("hf: the same weights scored twice, identical", "yes" if per_doc(first) == per_doc(second) else "NO"),
        ("hf: another candidate, another score", "yes" if per_doc(first) != per_doc(third) else "NO"),
        ("hf: s per candidate (40 documents)", f"{second.seconds:.2f} (forward {second.forward_seconds:.2f})"),
    ]


def check_memory_plan(models: dict[str, Path], device: str, rows: list) -> None:
    """The plan's bytes for a SLERP search of these models against what the device reports once they are loaded."""
    sources = {str(path): open_source(str(path)) for path in (models["model_a"], models["model_b"])}
    recipe = parse_recipes(RECIPES["slerp"].format(t=0.5, **models)).stages[0]
    from mergetune.merge_ops.plan import plan_merge

    free, total = device_memory(device)
    plan = plan_live(device, free, total, sum(map(resident_bytes, sources.values())), plan_bytes(plan_merge(recipe, sources)))
    predicted = plan.sources + plan.model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        before = torch.cuda.mem_get_info(torch.device(device))[0]
        held = InMemoryBuilder.for_recipe(recipe, sources, device=device, dtype=torch.bfloat16)
        measured = before - torch.cuda.mem_get_info(torch.device(device))[0]
        del held
        rows.append(("memory plan: sources + live model, predicted / measured GB", f"{predicted / 1e9:.2f} / {measured / 1e9:.2f}"))
    else:
        rows.append(("memory plan: sources + live model, predicted GB (measured on GPUs only)", f"{predicted / 1e9:.3f}"))
    rows.append((f"memory plan: free / total on {device}, GB", f"{free / 1e9:.1f} / {total / 1e9:.1f}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny layers (for a CPU), not Mistral-sized ones")
    parser.add_argument("--layers", type=int, default=MISTRAL.num_hidden_layers)
    args = parser.parse_args(argv)
    spec = TINY if args.tiny else MISTRAL
    spec = TinySpec(**{**spec.__dict__, "num_hidden_layers": args.layers if not args.tiny else spec.num_hidden_layers})
    rows: list[tuple[str, str]] = [("device", torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu")]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mergetune-gpu-check-") as scratch:
        work = Path(scratch)
        models = build_family(work / "models", spec=spec, dtype=torch.bfloat16)
        params = sum(math.prod(open_source(str(models["base"])).shape(n)) for n in open_source(str(models["base"])).names())
        rows.append(("checkpoints: layers, hidden, parameters each", f"{spec.num_hidden_layers}, {spec.hidden_size}, {params / 1e6:.1f} M"))
        builder = check_builds(models, args.device, work, rows)
        check_scoring(builder, models, args.device, work, rows)
        check_memory_plan(models, args.device, rows)
    rows.append(("wall time, s", f"{time.perf_counter() - started:.0f}"))
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")
    return 1 if any(value.startswith("NO") for _, value in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
