"""Evaluation benchmark: mergetune's in-place evaluator vs the naive disk + `lm_eval` loop, side by side.

K candidate models (seeded perturbations of one Llama-shaped model) are scored on
the same documents of the same suite, in one run on one machine:

  (a) mergetune: one `Evaluator` over one live model; per candidate, its weights
      are copied into the model's parameters in place, then `score()`, shared
      prefixes computed once (the default);
  (a') the same, each request scored as its own sequence (`shared_prefix=False`, lm-eval's way);
  (b) naive: per candidate, the model is written to disk and `lm_eval --model hf`
      runs in a fresh process (index tasks, load data and model, build prompts, score).

Reported per loop: candidates per hour, and the share of each trial spent outside
forward passes (both loops time the model's forward calls; for lm_eval, by
wrapping HFLM._model_call in the child process, which otherwise is the lm_eval CLI);
for (a) against (a'): forward tokens (padding included; independent of machine load)
and forward seconds per candidate, for the suite and per task; and the linear floor:
(a)'s forward tokens through the decoder's linear maps at this machine's measured
GEMM rate, the least time any scorer of those tokens needs, so the most candidates
per hour it could reach against (b).

    python bench/bench_eval.py --candidates 5 --limit 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import textwrap
import time
from datetime import date
from pathlib import Path

import psutil
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergetune.eval import EvalConfig, Evaluator
from mergetune.eval.backends.hf import HFBackend
from mergetune.eval.local_data import local_task_dir
from mergetune.demo.tiny import TinySpec, build_tokenizer, perturbed, random_model, save_model

REPO = Path(__file__).resolve().parents[1]

# The lm_eval CLI, with its forward passes timed; the total is written at exit.
TIMED_LM_EVAL = textwrap.dedent(
    """
    import atexit, os, sys, time
    from lm_eval.__main__ import cli_evaluate
    from mergetune.eval.lm_eval_adapter import wrap_every_model_call
    spent = [0.0]
    def timed(model_call):
        def call(self, *args, **kwargs):
            start = time.perf_counter()
            try:
                return model_call(self, *args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start
        return call
    wrap_every_model_call(timed)
    atexit.register(lambda: open(os.environ["FORWARD_SECONDS_FILE"], "w").write(str(spent[0])))
    sys.exit(cli_evaluate())
    """
)


def base_model(model_dir: Path | None, spec: TinySpec, tokenizer, dtype: torch.dtype) -> torch.nn.Module:
    """The model every candidate perturbs, in `dtype` (lm_eval loads the saved candidates in it): a real checkpoint
    or a random tiny Llama."""
    if model_dir is not None:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    return random_model(spec, tokenizer, seed=0).to(dtype)


def candidates(base: torch.nn.Module, count: int, scale: float) -> list[dict[str, torch.Tensor]]:
    """`count` perturbed relatives' weights."""
    return [perturbed(base, seed=index + 1, scale=scale).state_dict() for index in range(count)]


def write_in_place(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data.copy_(weights[name])


def mergetune_trial(evaluator: Evaluator, model, candidate, doc_ids) -> dict:
    start, tokens = time.perf_counter(), evaluator.backend.forward_tokens
    write_in_place(model, candidate)
    result = evaluator.score(doc_ids=doc_ids)
    return {
        "seconds": time.perf_counter() - start,
        "forward_seconds": result.forward_seconds,
        "forward_tokens": evaluator.backend.forward_tokens - tokens,
        "result": result,
    }


def per_task(evaluators: dict[str, Evaluator], doc_ids) -> dict[str, dict]:
    """Forward tokens and seconds of one candidate (the current weights), task by task, for each evaluator."""
    figures = {}
    for name, entry in next(iter(evaluators.values())).tasks.items():
        ids = {leaf: doc_ids[leaf] for leaf in entry.leaves if leaf in doc_ids}
        row = {}
        for label, evaluator in evaluators.items():
            tokens = evaluator.backend.forward_tokens
            result = evaluator.score([name], doc_ids=ids)
            row[label] = {"forward_tokens": evaluator.backend.forward_tokens - tokens, "forward_seconds": result.forward_seconds}
        row["token_ratio"] = row["lm_eval_way"]["forward_tokens"] / row["shared_prefix"]["forward_tokens"]
        row["time_ratio"] = row["lm_eval_way"]["forward_seconds"] / row["shared_prefix"]["forward_seconds"]
        figures[name] = row
    return figures


def check_agree(trials: list[dict], reference: list[dict], tolerance: float | None) -> dict:
    """How far task scores are from lm_eval's, over every candidate (the largest difference, and how many of the
    scores differ); stop if a difference exceeds `tolerance` (TruthfulQA mc2 is a mean of probabilities, which
    shared prefixes reproduce within 1e-4, not bit for bit; None: in bfloat16 a near-tie may fall the other way,
    as it does between lm_eval's own batch sizes)."""
    largest, differ, scores = 0.0, 0, 0
    for mine, theirs in zip(trials, reference, strict=True):
        for score in mine["result"].tasks.values():
            for leaf, docs in score.docs.items():
                value = sum(doc.metrics[score.metric] for doc in docs) / len(docs)
                expected = theirs["results"][leaf][f"{score.metric},none"]
                difference = abs(value - expected)
                if tolerance is not None and difference > tolerance:
                    raise SystemExit(f"scores differ on {leaf}: {value} vs {expected}")
                largest, differ, scores = max(largest, difference), differ + (difference > 1e-4), scores + 1
    return {"largest_difference": largest, "scores_differing": differ, "scores": scores}


def suite_yaml(evaluator: Evaluator, path: Path) -> Path:
    """The suite as an lm-eval group file (like lm-eval's openllm.yaml) with per-task few-shot counts.

    A group (MMLU) is listed as its subtasks: lm-eval 0.4.13 fails to apply
    overrides to a nested group.
    """
    lines = ["group: mergetune_bench_suite", "task:"]
    for entry in evaluator.tasks.values():
        for leaf in entry.leaves:
            lines += [f"  - task: {leaf}", f"    num_fewshot: {entry.num_fewshot}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def naive_trial(base, tokenizer, candidate, work: Path, suite: Path, include_path: Path, doc_ids, batch_size: int) -> dict:
    """Write the candidate to disk, then a fresh `lm_eval` process scores it."""
    model_dir, out, forward_file = work / "candidate", work / "lm_eval", work / "forward_seconds.txt"
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable, str(work / "timed_lm_eval.py"), "--model", "hf", "--model_args", f"pretrained={model_dir}",
        "--device", "cpu", "--tasks", str(suite), "--include_path", str(include_path),
        "--samples", json.dumps(doc_ids), "--batch_size", str(batch_size), "--output_path", str(out),
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "FORWARD_SECONDS_FILE": str(forward_file)}
    start = time.perf_counter()
    write_in_place(base, candidate)
    save_model(base, tokenizer, model_dir, dtype=base.dtype)
    completed = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise SystemExit(f"lm_eval failed:\n{completed.stderr[-3000:]}")
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    return {"seconds": seconds, "forward_seconds": float(forward_file.read_text()), "results": results}


def linear_floor(model: torch.nn.Module, tokens: int, naive_seconds: float) -> dict:
    """What the decoder layers' linear maps alone cost for `tokens` positions at this machine's GEMM rate (timed on
    the model's largest one, at the run's thread count): a lower bound on any scorer's forward seconds with these
    tokens (attention, norms and the kept logits come on top), hence on its candidates per hour against the naive
    loop's mean trial of `naive_seconds`."""
    linears = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    flops_per_token = 2 * sum(w.numel() for w in linears)
    weight = max(linears, key=torch.Tensor.numel).detach()
    rows = torch.randn(2048, weight.shape[1], dtype=weight.dtype)
    with torch.no_grad():
        torch.nn.functional.linear(rows, weight)
        start = time.perf_counter()
        for _ in range(20):
            torch.nn.functional.linear(rows, weight)
        rate = 20 * 2 * rows.shape[0] * weight.numel() / (time.perf_counter() - start)
    seconds = tokens * flops_per_token / rate
    return {
        "flops_per_token": flops_per_token,
        "gemm_flops_per_second": rate,
        "forward_seconds": seconds,
        "max_speedup_over_naive": naive_seconds / seconds,
    }


def summarize(trials: list[dict], setup_seconds: float = 0.0) -> dict:
    """Per-trial figures; for mergetune, trial 1 also builds and tokenizes every prompt (once per process)."""
    seconds = [t["seconds"] for t in trials]
    outside = [1 - t["forward_seconds"] / t["seconds"] for t in trials]
    steady = seconds[1:] or seconds
    return {
        "trial_seconds": seconds,
        "forward_seconds": [t["forward_seconds"] for t in trials],
        "outside_forward": outside,
        "mean_outside_forward": statistics.mean(outside),
        "mean_outside_forward_after_first": statistics.mean(outside[1:] or outside),
        "candidates_per_hour": 3600 * len(trials) / sum(seconds),
        "candidates_per_hour_after_first": 3600 / statistics.mean(steady),
        "candidates_per_hour_with_setup": 3600 * len(trials) / (sum(seconds) + setup_seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--suite", default="leaderboard")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "benchmarks")
    parser.add_argument("--limit", type=int, default=10, help="documents per task (MMLU: see --group-limit)")
    parser.add_argument(
        "--group-limit", type=int, default=None,
        help="documents per group task such as MMLU, stratified over its subjects as a study samples them (default and "
        "least: one per subject, since lm_eval scores every subject left out of --samples); e.g. 570, as many as "
        "`lm_eval --limit 10` scores of MMLU, spread in proportion to the subjects' sizes",
    )
    parser.add_argument("--num-fewshot", type=int, default=None, help="default: the suite's per-task counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--tokenizer", type=Path, default=None,
        help="a real tokenizer's directory (e.g. SmolLM2's, from bench/smollm2.py); default: --model's, or the tiny "
        "word-level one",
    )
    parser.add_argument("--model", type=Path, default=None, help="a real Llama checkpoint instead of the tiny model")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--perturb", type=float, default=0.05, help="the candidates' noise scale (0.002 for --model)")
    parser.add_argument("--batch-size", type=int, default=8, help="the same for both loops")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mergetune-bench-eval"))
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()

    from datasets import disable_progress_bars

    disable_progress_bars()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.threads:  # for this process and the lm_eval children alike
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    spec = TinySpec(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    tokenizer_dir = args.tokenizer or args.model
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else build_tokenizer()
    dtype = getattr(torch, args.dtype)
    base = base_model(args.model, spec, tokenizer, dtype)
    weights = candidates(base, args.candidates, args.perturb)
    config = EvalConfig(suite=args.suite, data_dir=args.data_dir, num_fewshot=args.num_fewshot)

    load_average = os.getloadavg()
    live = base_model(args.model, spec, tokenizer, dtype)
    start = time.perf_counter()
    evaluator = Evaluator.from_model(live, tokenizer, config, batch_size=args.batch_size)
    setup_seconds = time.perf_counter() - start
    plain = Evaluator(HFBackend(live, tokenizer, batch_size=args.batch_size, shared_prefix=False), config, evaluator.tasks)
    groups = [name for name, task in evaluator.tasks.items() if task.group is not None]
    doc_ids = evaluator.sample_doc_ids([name for name in evaluator.tasks if name not in groups], limit=args.limit)
    for group in groups:  # lm_eval scores all of a subtask left out of --samples: sample every subject
        subjects = len(evaluator.tasks[group].leaves)
        doc_ids |= evaluator.sample_doc_ids([group], limit=max(args.group_limit or args.limit, subjects))
    print(f"{sum(map(len, doc_ids.values()))} documents in {len(doc_ids)} lm-eval tasks; {len(weights)} candidates")

    suite = suite_yaml(evaluator, args.work_dir / "suite.yaml")
    (args.work_dir / "timed_lm_eval.py").write_text(TIMED_LM_EVAL)
    include_path = local_task_dir(args.data_dir)
    ours, unshared, theirs = [], [], []
    for index, candidate in enumerate(weights):  # interleaved: all loops see the same machine load
        ours.append(mergetune_trial(evaluator, live, candidate, doc_ids))
        unshared.append(mergetune_trial(plain, live, candidate, doc_ids))
        theirs.append(naive_trial(base, tokenizer, candidate, args.work_dir, suite, include_path, doc_ids, args.batch_size))
        print(
            f"candidate {index}: mergetune {ours[-1]['seconds']:.1f} s (without shared prefixes "
            f"{unshared[-1]['seconds']:.1f} s), lm_eval {theirs[-1]['seconds']:.1f} s",
            flush=True,
        )

    # Same candidates, same documents: every task's score must agree.
    check_agree(unshared, theirs, tolerance=0.0)
    agreement = check_agree(ours, theirs, tolerance=1e-4 if dtype == torch.float32 else None)
    tasks = per_task({"shared_prefix": evaluator, "lm_eval_way": plain}, doc_ids)

    a, a_plain, b = summarize(ours, setup_seconds), summarize(unshared), summarize(theirs)
    tokens, tokens_plain = ours[0]["forward_tokens"], unshared[0]["forward_tokens"]
    seconds, seconds_plain = statistics.mean(a["forward_seconds"]), statistics.mean(a_plain["forward_seconds"])
    report = {
        "date": date.today().isoformat(),
        "machine": f"{psutil.cpu_count()}-core CPU, {psutil.virtual_memory().total / 2**30:.0f} GiB, {platform.processor() or platform.machine()}",
        "load_average_at_start": load_average,
        "command": "python bench/bench_eval.py " + " ".join(sys.argv[1:]),
        "tokenizer": str(tokenizer_dir or "tiny word-level"),
        "dtype": args.dtype,
        "model": {"params": sum(p.numel() for p in live.parameters()), **({"dir": str(args.model)} if args.model else spec.__dict__)},
        "documents": sum(map(len, doc_ids.values())),
        "mergetune": {"setup_seconds": setup_seconds, **a},
        "mergetune_without_shared_prefix": a_plain,
        "naive_lm_eval": b,
        "speedup": {
            "all_trials": a["candidates_per_hour"] / b["candidates_per_hour"],
            "after_first": a["candidates_per_hour_after_first"] / b["candidates_per_hour"],
            "with_setup": a["candidates_per_hour_with_setup"] / b["candidates_per_hour"],
            "without_shared_prefix_after_first": a_plain["candidates_per_hour_after_first"] / b["candidates_per_hour"],
        },
        "shared_prefix": {
            "forward_tokens_per_candidate": {"shared": tokens, "lm_eval_way": tokens_plain, "ratio": tokens_plain / tokens},
            "forward_seconds_per_candidate": {
                "shared": seconds, "lm_eval_way": seconds_plain, "ratio": seconds_plain / seconds,
            },
            "per_task": tasks,
        },
        "scores_agree": {"without_shared_prefix": "exactly", "shared_prefix": agreement},
        "linear_floor": linear_floor(live, tokens, statistics.mean(b["trial_seconds"])),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
