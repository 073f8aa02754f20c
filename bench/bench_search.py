"""Search benchmark on the demo models: pruners (none, successive halving, the estimator), TPE vs CMA-ES vs random.

One process loads the demo's models and evaluator once; each configuration and
seed runs its own fresh study (in-memory Optuna storage) on the same documents,
its methods one after the other as `mergetune study run` runs them, then scores
each method's finalists on the same held-out documents. Reported per configuration: the
best held-out (final) score, the documents scored in total, and the documents
scored until the trial that turned out best had been scored.

    python bench/bench_search.py --trials 24 --methods slerp dare_ties --seeds 0 1 2 3 4 --samplers tpe random
    python bench/bench_search.py --samplers tpe --pruners none estimator estimator:min_trials=3 --multiples 1

(the second: the estimator's defaults and a variant of them, side by side against one run without pruning)
"""

from __future__ import annotations

import argparse
import itertools
import math
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
from mergetune.eval.evidence import paired_bootstrap, summarize
from mergetune.search.documents import choose_documents
from mergetune.search.runner import StudyRunner
from mergetune.search.samplers import TPE_STARTUP_TRIALS
from mergetune.search.study_file import load_study
from mergetune.search.leaderboard import rank_correlation, races_of, reached_bar
from mergetune.search.trials import COUNTED, StoredTrial, final_records
from mergetune.search.workspace import Workspace


def with_estimator(evaluation, settings: list[str]):
    """`evaluation` with its estimator's settings overridden by KEY=VALUE strings (validated as a study file's)."""
    given = dict(setting.split("=", 1) for setting in settings)
    estimator = evaluation.estimator.model_validate({**evaluation.estimator.model_dump(), **given})
    return evaluation.model_copy(update={"estimator": estimator})


def configured(base: Workspace, sampler: str, pruner: str, seed: int) -> Workspace:
    """The base workspace's models and evaluator under one configuration's study settings.

    A pruner may carry estimator settings of its own, `estimator:min_trials=3,confidence=0.9`, so that
    variants run side by side against one run without pruning.
    """
    name, _, settings = pruner.partition(":")
    update = {"sampler": sampler, "pruning": name, "seed": seed}
    if settings:
        update["evaluation"] = with_estimator(base.study.spec.evaluation, settings.split(","))
    spec = base.study.spec.model_copy(update=update)
    study = base.study.model_copy(update={"spec": spec})
    return Workspace(study, base.builder, base.evaluator, choose_documents(base.evaluator, spec))


def run_config(runner: StudyRunner, method: str, trials: int) -> dict:
    """One method of a configuration's study, to `trials`, then its finalists."""
    spec = runner.workspace.study.spec
    start = time.perf_counter()
    runner.run_method(method, trials, None, None)
    runner.finalize(method)
    seconds = time.perf_counter() - start
    optuna_study = runner.optuna_study(method)
    final_evidence = final_records(optuna_study)
    finals = {number: summarize(record).average for number, record in final_evidence.items()}
    best_trial = max(finals, key=finals.get)
    ordered = sorted(optuna_study.get_trials(deepcopy=False), key=lambda t: t.number)
    stored = [StoredTrial.of(t) for t in ordered]
    scored = list(itertools.accumulate(t.docs_scored for t in stored))
    races = races_of(method, [t for t in stored if t.state in COUNTED])
    return {
        "estimated": races.estimated if races else [],  # (first estimate, measured) of raced trials scored in full
        "best_final": finals[best_trial],
        "best_record": final_evidence[best_trial],
        "best_trial": best_trial,
        "incumbent_finals": incumbent_finals(runner, ordered),
        "docs_until": scored,  # documents scored up to and including each trial
        "docs_total": scored[-1],
        "docs_to_best": scored[best_trial],
        "pruned": sum(t.state == TrialState.PRUNED for t in ordered),
        "fates": fates(stored),
        "floors": floors(stored, spec.evaluation) if (spec.sampler, spec.pruning) == ("tpe", "none") else {},
        "seconds": seconds,
    }


def floors(stored: list[StoredTrial], evaluation) -> dict[str, int]:
    """Oracle floors on a run without pruning (every trial scored in full, so every score is known): the documents
    of scoring in full only the trials a rule needs measured and stopping every other one after its first chunk.
    The rules: racing for the estimator's bar (default: a finalist's place) after its `min_trials`, or after the
    `rank` trials of its own a method run after another needs (`learn_from: study`), and for first place with
    nothing to learn (`entered_top`); in hindsight, only the trials TPE or the finalists used (`used_in_hindsight`)."""
    settings = evaluation.estimator
    rank = evaluation.estimator_rank()
    done = [t for t in stored if t.state == TrialState.COMPLETE]
    in_full = {
        f"top {rank}, after {settings.min_trials} trials in full": entered_top(done, rank, settings.min_trials),
        f"top {rank}, after {rank} in full (a later method)": entered_top(done, rank, rank),
        "top 1, nothing to learn": entered_top(done, 1, 0),
        "in hindsight: the finalists and TPE's good trials": used_in_hindsight(done, evaluation.final.finalists),
    }
    return {
        name: sum(t.docs_scored if i in indices else round(t.docs_scored * settings.chunk) for i, t in enumerate(done))
        for name, indices in in_full.items()
    }


def entered_top(done: list[StoredTrial], rank: int, learning: int) -> set[int]:
    """The trials a rule that scores in full every candidate that may reach `rank` must measure, at the least: the
    first `learning` (to learn from), then each that entered the running top `rank` (at or above the `rank`-th
    best before it)."""
    best: list[float] = []
    entered = set()
    for index, trial in enumerate(done):
        if len(best) < max(rank, learning) or trial.value >= best[rank - 1]:
            entered.add(index)
        best = sorted(best + [trial.value], reverse=True)
    return entered


def used_in_hindsight(done: list[StoredTrial], finalists: int) -> set[int]:
    """The trials whose measured score this run's TPE proposals or finalists used, so that any rule ending with
    the same ones must measure, even knowing every score in advance: the `finalists` best at the end, and for each
    proposal after the random start, the trials it treats as good (the best ceil(0.1 n) of the n before it, as
    Optuna's default gamma)."""

    def best(count: int, among: int) -> list[int]:
        return sorted(range(among), key=lambda index: -done[index].value)[:count]

    used = set(best(finalists, len(done)))
    for proposal in range(TPE_STARTUP_TRIALS, len(done)):
        used.update(best(min(math.ceil(0.1 * proposal), 25), proposal))
    return used


FATES = ("not raced", "stopped", "let through, reached the bar", "let through, below the bar")


def fates(stored: list[StoredTrial]) -> dict[str, tuple[int, int]]:
    """Trials and documents scored by what became of each trial: the estimator's cost, broken down."""
    counts = {fate: (0, 0) for fate in FATES}
    for trial in stored:
        if trial.state not in COUNTED:
            continue
        if not trial.race:
            fate = FATES[0]
        elif trial.state == TrialState.PRUNED:
            fate = FATES[1]
        else:
            fate = FATES[2] if reached_bar(trial) else FATES[3]
        trials, docs = counts[fate]
        counts[fate] = (trials + 1, docs + trial.docs_scored)
    return counts


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


#: (sampler, pruner, trials as a multiple of --trials): no pruning is the reference, as mergekit-evolve runs.
#: With a pruner at twice the trials a study spends about the documents the run without pruning does, or fewer.
CONFIGS = [
    ("tpe", "none", 1),
    ("tpe", "successive_halving", 1),
    ("tpe", "successive_halving", 2),
    ("tpe", "estimator", 1),
    ("tpe", "estimator", 2),
    ("cmaes", "none", 1),
    ("cmaes", "successive_halving", 1),
    ("random", "none", 1),
    ("random", "successive_halving", 1),
    ("random", "estimator", 1),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--methods", nargs="+", default=["slerp", "dare_ties"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--samplers", nargs="+", default=["tpe", "cmaes", "random"], help="run only these samplers' rows")
    parser.add_argument(
        "--pruners",
        nargs="+",
        default=["none", "successive_halving", "estimator"],
        help="run only these pruners' rows; estimator:KEY=VALUE,... runs the estimator with those settings",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mergetune-bench-search"))
    parser.add_argument("--study", type=Path, help="a study file to benchmark instead of the demo's")
    parser.add_argument("--multiples", type=int, nargs="+", default=[1, 2], help="run only these trial multiples")
    parser.add_argument(
        "--estimator", nargs="+", default=[], metavar="KEY=VALUE", help="evaluation.estimator settings, e.g. confidence=0.8"
    )
    args = parser.parse_args()
    configs = [
        (sampler, pruner, multiple)
        for sampler, name, multiple in CONFIGS
        if sampler in args.samplers and multiple in args.multiples
        for pruner in args.pruners
        if pruner.partition(":")[0] == name
    ]
    if not configs:
        known = ", ".join(f"{sampler}/{name} ×{multiple}" for sampler, name, multiple in CONFIGS)
        parser.error(f"no benchmark row matches --samplers, --pruners and --multiples; the rows are {known}")
    unreferenced = sorted({s for s, _, _ in configs} - {s for s, p, m in configs if p == "none" and m == 1})
    if unreferenced:  # every row is read against its sampler's run without pruning at --trials
        parser.error(f"{', '.join(unreferenced)}: the rows need their run without pruning (--pruners none, --multiples 1)")

    study = load_study(args.study) if args.study else prepare_demo(args.work_dir)
    if args.estimator:
        spec = study.spec.model_copy(update={"evaluation": with_estimator(study.spec.evaluation, args.estimator)})
        study = study.model_copy(update={"spec": spec})
    workspace = Workspace.open(study)
    evaluation = study.spec.evaluation
    rows = []
    for sampler, pruner, multiple in configs:
        for seed in args.seeds:
            # One study, its methods one after the other as `mergetune study run` runs them (a later method's
            # estimator learns from the earlier ones); one runner, so each method's study is opened once and
            # samples with the study's seed.
            runner = StudyRunner(configured(workspace, sampler, pruner, seed), storage=optuna.storages.InMemoryStorage())
            for method in args.methods:
                result = run_config(runner, method, args.trials * multiple)
                rows.append((method, sampler, pruner, args.trials * multiple, seed, result))
                brief = {key: value for key, value in result.items() if key not in ("best_record", "docs_until")}
                print(method, sampler, pruner, args.trials * multiple, seed, brief, flush=True)
    rows.sort(key=lambda row: args.methods.index(row[0]))  # the tables list one method's rows, then the next's

    print(f"\n### Search — {date.today().isoformat()}\n")
    print(
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
        f"{'Study ' + str(args.study) if args.study else 'Demo models'}; search tasks {', '.join(evaluation.tasks)} ({evaluation.limit} documents per task, pruning "
        f"rungs {evaluation.rungs()}, reduction factor {evaluation.reduction_factor}; estimator "
        f"{evaluation.estimator.model_dump()}); finalists scored on "
        f"{', '.join(evaluation.final.tasks) or 'the search tasks, documents the search did not use'} "
        f"({evaluation.final.limit} documents per task).\n"
    )
    print(
        f"Command: `python bench/bench_search.py --trials {args.trials} --methods {' '.join(args.methods)} "
        f"--seeds {' '.join(map(str, args.seeds))} --samplers {' '.join(args.samplers)} --pruners {' '.join(args.pruners)} "
        f"--multiples {' '.join(map(str, args.multiples))}"
        + (f" --study {args.study}" if args.study else "")
        + (f" --estimator {' '.join(args.estimator)}" if args.estimator else "")
        + "`\n"
    )
    print(
        "| method | sampler | pruning | trials | seed | best held-out avg | vs no pruning (95% CI) | trial "
        "| docs until best | docs total | pruned | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    reference = {(m, sa, se): r for m, sa, pr, t, se, r in rows if pr == "none" and t == args.trials}
    for method, sampler, pruner, trials, seed, r in rows:
        difference = paired_bootstrap(reference[(method, sampler, seed)]["best_record"], r["best_record"])
        r["difference"] = difference
        print(
            f"| {method} | {sampler} | {pruner} | {trials} | {seed} | {100 * r['best_final']:.2f} | "
            f"{100 * difference.mean:+.2f} ({100 * difference.low:+.2f} … {100 * difference.high:+.2f}) | "
            f"{r['best_trial']} | {r['docs_to_best']} | {r['docs_total']} | {r['pruned']} | {r['seconds']:.0f} |"
        )
    print(
        "\nPer configuration, over seeds: the mean best held-out score of the finalists; on how many seeds the "
        "paired 95% CI of its difference to the same sampler's run without pruning (same seed, same held-out "
        "documents) includes 0 or lies above it; the mean documents scored, as a fraction of that run's; and, "
        "following the incumbent (the best trial so far by search score), on how many seeds its held-out score "
        "reached the one the run without pruning ends with, and the median documents that took, as a fraction of "
        "those the run without pruning took to get there; for the estimator, its first estimate of each raced "
        "trial scored in full against the measured search score (mean absolute error in points, rank correlation):\n"
    )
    print(
        "| method | sampler | pruning | trials | mean best held-out avg | not worse (CI) | mean docs total "
        "| docs vs no pruning | reached the no-pruning result | median docs to reach it vs no pruning "
        "| estimate MAE | rank corr. |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for method, sampler, pruner, trials, _, r in rows:
        groups.setdefault((method, sampler, pruner, trials), []).append(r)
    for (method, sampler, pruner, trials), results in groups.items():
        references = groups[(method, sampler, "none", args.trials)]
        docs = statistics.mean(r["docs_total"] for r in results)
        ratio = docs / statistics.mean(r["docs_total"] for r in references)
        targets = [ref["incumbent_finals"][-1] for ref in references]
        reached = [(docs_to_reach(r, t), docs_to_reach(ref, t)) for r, ref, t in zip(results, references, targets)]
        fractions = [docs / reference_docs for docs, reference_docs in reached if docs is not None]
        median = f"{statistics.median(fractions):.2f}" if fractions else "—"
        not_worse = sum(r["difference"].high >= 0 for r in results)
        pairs = [pair for r in results for pair in r["estimated"]]
        error = f"{100 * statistics.mean(abs(e - m) for e, m in pairs):.2f}" if pairs else "—"
        ranks = f"{rank_correlation([e for e, _ in pairs], [m for _, m in pairs]):.2f}" if len(pairs) > 1 else "—"
        print(
            f"| {method} | {sampler} | {pruner} | {trials} | "
            f"{100 * statistics.mean(r['best_final'] for r in results):.2f} | {not_worse}/{len(results)} | {docs:.0f} | "
            f"{ratio:.2f} | {len(fractions)}/{len(results)} | {median} | {error} | {ranks} |"
        )

    unpruned = {key: results for key, results in groups.items() if key[1:3] == ("tpe", "none")}
    if unpruned:
        print(
            "\nFloors, on the candidates of TPE's run without pruning: the fewest documents an oracle scores that "
            "scores in full only some trials and stops every other one after its first chunk "
            f"({100 * evaluation.estimator.chunk:.0f}% of its documents): each trial that entered the running top k "
            "(after the first trials, to learn from, or none); or, in hindsight, only the trials whose score the "
            "finalists or one of TPE's proposals used. As a fraction of that run's documents, mean over seeds (range):\n"
        )
        names = list(unpruned[next(iter(unpruned))][0]["floors"])
        print("| method | sampler | trials | " + " | ".join(names) + " |")
        print("|---|---|---|" + "---|" * len(names))
        for (method, sampler, _, trials), results in unpruned.items():
            shares = {name: [r["floors"][name] / r["docs_total"] for r in results] for name in names}
            cells = [f"{statistics.mean(v):.2f} ({min(v):.2f}–{max(v):.2f})" for v in shares.values()]
            print(f"| {method} | {sampler} | {trials} | " + " | ".join(cells) + " |")

    raced = {key: results for key, results in groups.items() if key[2].startswith("estimator")}
    if raced:
        print(
            "\nWhere the estimator's documents went, per configuration over seeds: trials in total and the share of "
            "all documents scored, by what became of each trial (not raced: scored in full before the estimator "
            "raced, to learn from or to set its bar, baseline included; let through: scored in full, its measured "
            "score at or above, or below, the bar it raced against):\n"
        )
        print("| method | sampler | pruning | trials | " + " | ".join(FATES) + " |")
        print("|---|---|---|---|" + "---|" * len(FATES))
        for (method, sampler, pruner, trials), results in raced.items():
            total = sum(r["docs_total"] for r in results)
            cells = []
            for fate in FATES:
                count = sum(r["fates"][fate][0] for r in results)
                share = sum(r["fates"][fate][1] for r in results) / total
                cells.append(f"{count} trials, {100 * share:.0f}% of the documents")
            print(f"| {method} | {sampler} | {pruner} | {trials} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
