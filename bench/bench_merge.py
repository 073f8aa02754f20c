"""Merge engine benchmark: mergetune vs mergekit side by side, on a synthetic model family.

Measures, in one run on one machine:
  1. wall time and peak RSS of a disk merge, `mergetune merge` vs `mergekit-yaml`'s
     engine, for a SLERP recipe and a DARE TIES recipe;
  2. the time to get a candidate into a usable model: mergekit disk merge + reload
     with transformers vs mergetune's in-memory build into a live model.

Each disk merge runs in its own fresh Python process (peak RSS is that process's
VmHWM); page cache is warmed by reading every input file first, for both.

    python bench/bench_merge.py --layers 12 --hidden 2048   # ~1.5 GB per model in bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from datetime import date
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

WORKER = textwrap.dedent(
    """
    import json, sys, time
    tool, recipe_path, out = sys.argv[1:4]
    start = time.perf_counter()
    if tool == "mergekit":
        import yaml
        from mergekit.config import MergeConfiguration
        from mergekit.merge import run_merge
        from mergekit.options import MergeOptions
        config = MergeConfiguration.model_validate(yaml.safe_load(open(recipe_path)))
        run_merge(config, out, MergeOptions(copy_tokenizer=False, quiet=True, random_seed=0))
    else:
        from mergetune.merge_ops.disk import merge_recipe_file
        from mergetune.merge_ops.recipe import load_recipes
        merge_recipe_file(load_recipes(recipe_path), __import__("pathlib").Path(out), seed=0)
    seconds = time.perf_counter() - start
    # VmHWM is this process's own peak (ru_maxrss would include the parent's RSS at fork time).
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak_kb / 1024}))
    """
)


def synthetic_model(directory: Path, hidden: int, layers: int, vocab: int, seed: int, base: dict | None) -> None:
    """A Llama-shaped bf16 checkpoint of random weights (relatives: base + noise), written in ~1 GB shards."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    intermediate = int(hidden * 2.75)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for index in range(layers):
        prefix = f"model.layers.{index}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}.self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{prefix}.mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}.mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}.mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{prefix}.input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, files, weight_map = 0, [], {}

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(directory / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update({key: name for key in shard})
            shard, shard_bytes = {}, 0

    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator) * 0.02
        tensor = (noise if base is None else base[name].float() + noise * 0.1).to(torch.bfloat16)
        shard[name] = tensor
        shard_bytes += tensor.numel() * 2
        if shard_bytes > 1e9:
            flush()
    flush()
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 128,
        "num_key_value_heads": hidden // 128,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(config))


def warm(directory: Path) -> None:
    for file in directory.glob("*.safetensors"):
        with open(file, "rb") as handle:
            while handle.read(1 << 24):
                pass


def run_worker(tool: str, recipe: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    completed = subprocess.run(
        [sys.executable, "-c", WORKER, tool, str(recipe), str(out)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def in_memory_vs_reload(recipe_path: Path, mergekit_out: Path, candidates: int) -> dict:
    from transformers import AutoModelForCausalLM

    from mergetune.merge_ops.inmemory import InMemoryBuilder
    from mergetune.merge_ops.recipe import load_recipes
    from mergetune.merge_ops.sources import open_source

    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(mergekit_out, dtype=torch.bfloat16)
    reload_seconds = time.perf_counter() - start

    recipe = load_recipes(recipe_path).final
    sources = {ref: open_source(ref) for ref in recipe.referenced_models()}
    start = time.perf_counter()
    builder = InMemoryBuilder.for_recipe(recipe, sources, dtype=torch.bfloat16)
    setup_seconds = time.perf_counter() - start
    timings = []
    for candidate in range(candidates):
        start = time.perf_counter()
        builder.build(recipe, seed=candidate)
        timings.append(time.perf_counter() - start)
    return {"reload_seconds": reload_seconds, "setup_seconds": setup_seconds, "builds": timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--candidates", type=int, default=3, help="in-memory builds to time per recipe")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mergetune-bench-merge"))
    args = parser.parse_args()

    work = args.work_dir
    models = {name: work / name for name in ("base", "model_a", "model_b")}
    if not all((path / "config.json").exists() for path in models.values()):
        shutil.rmtree(work, ignore_errors=True)
        from mergetune.demo.tiny import load_state

        synthetic_model(models["base"], args.hidden, args.layers, args.vocab, 0, None)
        base = load_state(models["base"])
        synthetic_model(models["model_a"], args.hidden, args.layers, args.vocab, 1, base)
        synthetic_model(models["model_b"], args.hidden, args.layers, args.vocab, 2, base)
        del base
    size_gb = sum(f.stat().st_size for f in models["base"].glob("*.safetensors")) / 1e9

    recipes = {
        "SLERP (t-curves)": {
            "merge_method": "slerp",
            "base_model": str(models["model_a"]),
            "models": [{"model": str(models["model_a"])}, {"model": str(models["model_b"])}],
            "parameters": {
                "t": [
                    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                    {"value": 0.5},
                ]
            },
            "dtype": "bfloat16",
        },
        "DARE TIES (0.5/0.5)": {
            "merge_method": "dare_ties",
            "base_model": str(models["base"]),
            "models": [
                {"model": str(models["base"])},
                {"model": str(models["model_a"]), "parameters": {"weight": 0.5, "density": 0.5}},
                {"model": str(models["model_b"]), "parameters": {"weight": 0.5, "density": 0.5}},
            ],
            "parameters": {"int8_mask": True},
            "dtype": "bfloat16",
        },
    }
    rows, memory_rows = [], []
    for label, recipe in recipes.items():
        recipe_path = work / (label.split()[0].lower() + ".yaml")
        recipe_path.write_text(yaml.safe_dump(recipe))
        for path in models.values():
            warm(path)
        mergekit = run_worker("mergekit", recipe_path, work / "out-mergekit")
        mergetune = run_worker("mergetune", recipe_path, work / "out-mergetune")
        rows.append((label, mergekit, mergetune))
        memory = in_memory_vs_reload(recipe_path, work / "out-mergekit", args.candidates)
        memory_rows.append((label, mergekit, memory))
        print(label, mergekit, mergetune, memory, file=sys.stderr)

    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, torch {torch.__version__}"
    print(f"### Merge engine — {date.today().isoformat()}\n")
    print(f"Machine: {machine}. Synthetic Llama-shaped bf16 models, hidden {args.hidden}, {args.layers} layers, "
          f"vocab {args.vocab}: {size_gb:.2f} GB each.\n")
    print(f"Command: `python bench/bench_merge.py --hidden {args.hidden} --layers {args.layers} --vocab {args.vocab}`\n")
    print("| recipe | mergekit wall s | mergetune wall s | speed-up | mergekit peak RSS MB | mergetune peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for label, mergekit, mergetune in rows:
        print(
            f"| {label} | {mergekit['seconds']:.1f} | {mergetune['seconds']:.1f} | "
            f"{mergekit['seconds'] / mergetune['seconds']:.2f}x | {mergekit['peak_rss_mb']:.0f} | {mergetune['peak_rss_mb']:.0f} |"
        )
    print("\n| recipe | mergekit disk merge + reload s | mergetune in-memory build s (first, then each) | speed-up (steady) |")
    print("|---|---|---|---|")
    for label, mergekit, memory in memory_rows:
        naive = mergekit["seconds"] + memory["reload_seconds"]
        steady = sum(memory["builds"][1:]) / max(1, len(memory["builds"]) - 1)
        builds = ", ".join(f"{seconds:.2f}" for seconds in memory["builds"])
        print(f"| {label} | {mergekit['seconds']:.1f} + {memory['reload_seconds']:.1f} | {builds} | {naive / steady:.1f}x |")
    print(f"\nOne-time setup of the in-memory builder (sources resident + live model): "
          + ", ".join(f"{label}: {memory['setup_seconds']:.1f}s" for label, _, memory in memory_rows))


if __name__ == "__main__":
    main()
