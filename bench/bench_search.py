"""Search benchmark on the demo models: pruning vs none, TPE vs CMA-ES vs random, at equal trial budgets.

One process loads the demo's models and evaluator once; each configuration runs
its own fresh study (in-memory Optuna storage) on the same documents, then scores
its finalists on the same held-out documents. Reported per configuration: the
best held-out (final) score, the documents scored in total, and the documents
scored until the trial that turned out best had been scored.

    python bench/bench_search.py --trials 24 --methods slerp dare_ties --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time
from datetime import date
from pathlib import Path
from typing import Optional

import optuna
import torch
from optuna.trial import TrialState

from mergetune.demo.study import prepare_demo
from mergetune.eval.evidence import summarize
from mergetune.search.documents import choose_documents
from mergetune.search.runner import StudyRunner
from mergetune.search.setup import open_optuna_study
from mergetune.search.trials import StoredTrial, final_records
from mergetune.search.workspace import Workspace


def run_config(base: Workspace, method: str, sampler: str, pruning: bool, trials: int, seed: int) -> dict:
    pruner = "successive_halving" if pruning else "none"
    spec = base.study.spec.model_copy(update={"sampler": sampler, "pruning": pruner, "seed": seed})
    study = base.study.model_copy(update={"spec": spec})
    workspace = Workspace(study, base.builder, base.evaluator, choose_documents(base.evaluator, spec))
    storage = optuna.storages.InMemoryStorage()
    runner = StudyRunner(workspace, storage=storage)
    start = time.perf_counter()
    runner.run_method(method, trials, None, None)
    runner.finalize(method)
    seconds = time.perf_counter() - start
    optuna_study = open_optuna_study(study, method, storage)
    finals = {number: summarize(record).average for number, record in final_records(optuna_study).items()}
    best_trial = max(finals, key=finals.get)
    ordered = sorted(optuna_study.get_trials(deepcopy=False), key=lambda t: t.number)
    scored = list(itertools.accumulate(StoredTrial.of(t).docs_scored for t in ordered))
    return {
        "best_final": finals[best_trial],
        "best_trial": best_trial,
        "incumbent_finals": incumbent_finals(runner, ordered),
        "docs_until": scored,  # documents scored up to and including each trial
        "docs_total": scored[-1],
        "docs_to_best": scored[best_trial],
        "pruned": sum(t.state == TrialState.PRUNED for t in ordered),
        "seconds": seconds,
    }


def incumbent_finals(runner: StudyRunner, ordered: list) -> list[Optional[float]]:
    """After each trial, the held-out score of the best completed trial so far by search score (the
    recipe a user stopping then would take); measured for the benchmark only, not counted as scored."""
    finals: dict[int, float] = {}
    incumbent = None
    curve = []
    for trial in ordered:
        if trial.state == TrialState.COMPLETE and (incumbent is None or trial.value > incumbent.value):
            incumbent = trial
        if incumbent is not None and incumbent.number not in finals:
            finals[incumbent.number] = summarize(runner.score_final(incumbent)).average
        curve.append(None if incumbent is None else finals[incumbent.number])
    return curve


def docs_to_reach(result: dict, target: float) -> Optional[int]:
    """Documents scored until the incumbent's held-out score is at least `target` (None: never)."""
    for docs, final in zip(result["docs_until"], result["incumbent_finals"]):
        if final is not None and final >= target - 1e-9:
            return docs
    return None


#: (sampler, pruning, trials as a multiple of --trials): no pruning is the reference, as mergekit-evolve runs.
#: TPE with pruning at twice the trials spends about the documents TPE without pruning does.
CONFIGS = [
    ("tpe", False, 1),
    ("tpe", True, 1),
    ("tpe", True, 2),
    ("cmaes", False, 1),
    ("cmaes", True, 1),
    ("random", False, 1),
    ("random", True, 1),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--methods", nargs="+", default=["slerp", "dare_ties"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mergetune-bench-search"))
    args = parser.parse_args()

    study = prepare_demo(args.work_dir)
    workspace = Workspace.open(study)
    evaluation = study.spec.evaluation
    rows = []
    for method in args.methods:
        for sampler, pruning, multiple in CONFIGS:
            for seed in args.seeds:
                result = run_config(workspace, method, sampler, pruning, args.trials * multiple, seed)
                rows.append((method, sampler, pruning, args.trials * multiple, seed, result))
                print(method, sampler, pruning, args.trials * multiple, seed, result, flush=True)

    print(f"\n### Search — {date.today().isoformat()}\n")
    print(
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
        f"Demo models; search tasks {', '.join(evaluation.tasks)} ({evaluation.limit} documents per task, pruning "
        f"rungs {evaluation.rungs()}, reduction factor {evaluation.reduction_factor}); finalists scored on "
        f"{', '.join(evaluation.final.tasks)} ({evaluation.final.limit} documents per task).\n"
    )
    print(
        f"Command: `python bench/bench_search.py --trials {args.trials} --methods {' '.join(args.methods)} "
        f"--seeds {' '.join(map(str, args.seeds))}`\n"
    )
    print("| method | sampler | pruning | trials | seed | best held-out avg | trial | docs until best | docs total | pruned | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for method, sampler, pruning, trials, seed, r in rows:
        print(
            f"| {method} | {sampler} | {'yes' if pruning else 'no'} | {trials} | {seed} | {100 * r['best_final']:.2f} | "
            f"{r['best_trial']} | {r['docs_to_best']} | {r['docs_total']} | {r['pruned']} | {r['seconds']:.0f} |"
        )
    print(
        "\nPer configuration, over seeds: the mean best held-out score of the finalists; the mean documents "
        "scored, as a fraction of the same sampler's run without pruning; and, following the incumbent (the best "
        "trial so far by search score), on how many seeds its held-out score reached the one the run without "
        "pruning ends with, and the median documents that took, as a fraction of those the run without pruning "
        "took to get there:\n"
    )
    print(
        "| method | sampler | pruning | trials | mean best held-out avg | mean docs total | docs vs no pruning "
        "| reached the no-pruning result | median docs to reach it vs no pruning |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for method, sampler, pruning, trials, _, r in rows:
        groups.setdefault((method, sampler, pruning, trials), []).append(r)
    for (method, sampler, pruning, trials), results in groups.items():
        reference = groups[(method, sampler, False, args.trials)]
        docs = statistics.mean(r["docs_total"] for r in results)
        ratio = docs / statistics.mean(r["docs_total"] for r in reference)
        targets = [ref["incumbent_finals"][-1] for ref in reference]
        reached = [(docs_to_reach(r, t), docs_to_reach(ref, t)) for r, ref, t in zip(results, reference, targets)]
        fractions = [docs / reference_docs for docs, reference_docs in reached if docs is not None]
        median = f"{statistics.median(fractions):.2f}" if fractions else "—"
        print(
            f"| {method} | {sampler} | {'yes' if pruning else 'no'} | {trials} | "
            f"{100 * statistics.mean(r['best_final'] for r in results):.2f} | {docs:.0f} | {ratio:.2f} | "
            f"{len(fractions)}/{len(results)} | {median} |"
        )


if __name__ == "__main__":
    main()
