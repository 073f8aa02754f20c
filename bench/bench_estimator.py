"""Fitness estimators side by side on one study's per-document evidence: how well does part of the documents
predict a candidate's full search score?

Every trial of a study run without pruning is scored on all search documents.
Walking the trials in order, each one (after the first `--min-trials`) is
predicted from the trials before it (its basis), as a study would have to, from a
fraction of its documents, by:

- ``subset mean``: the plain mean of a seeded random subset (what successive
  halving's rungs score; tinyBenchmarks' random baseline);
- ``2PL IRT``: a two-parameter item-response model fitted to the basis (each
  document a difficulty and a discrimination, each candidate an ability), the
  candidate's ability fitted on the scored documents, the rest predicted
  (tinyBenchmarks' p-IRT, MERGE³'s estimator, without their pre-trained item bank);
- ``regression``: mergetune's estimator (`mergetune.search.estimator`), documents
  that separate the basis's better candidates first;
- ``regression, random order``: the same regression on the random subset;
- ``regression, the study's trials``: for a method after the first, the regression
  fitted to the earlier methods' trials (same seed, same documents) as well as the
  trials before it, as `learn_from: study` fits it.

Reported per fraction: mean absolute error in points, Spearman rank correlation of
estimated and measured scores, and (regression) how often the measured score lay
inside the 95% interval.

    python bench/bench_estimator.py --trials 40 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import platform
from datetime import date
from pathlib import Path
from typing import Optional

import numpy as np
import optuna
import torch

from mergetune.demo.study import prepare_demo
from mergetune.search.documents import choose_documents
from mergetune.search.estimator import FitnessModel, Layout, predict
from mergetune.search.leaderboard import rank_correlation
from mergetune.search.runner import StudyRunner
from mergetune.search.setup import open_optuna_study
from mergetune.search.trials import StoredTrial
from mergetune.search.workspace import Workspace

FRACTIONS = (0.05, 0.1, 0.25, 0.5)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def fit_irt(values: np.ndarray, steps: int = 300, rate: float = 0.5, prior: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """2PL item parameters (discrimination a, easiness b) by gradient ascent on the penalised likelihood."""
    candidates, docs = values.shape
    ability = np.zeros(candidates)
    a, b = np.ones(docs), np.zeros(docs)
    for _ in range(steps):
        p = sigmoid(np.outer(ability, a) + b)
        residual = values - p
        ability += rate * ((residual * a).mean(axis=1) - prior * ability)
        ability -= ability.mean()
        a += rate * ((residual * ability[:, None]).mean(axis=0) - prior * (a - 1))
        b += rate * (residual.mean(axis=0) - prior * b)
    return a, b


def irt_estimate(a: np.ndarray, b: np.ndarray, weights: np.ndarray, scored: np.ndarray, values: np.ndarray) -> float:
    """The candidate's ability from its scored documents (MAP, Newton), then observed + predicted rest."""
    theta = 0.0
    for _ in range(30):
        p = sigmoid(a[scored] * theta + b[scored])
        gradient = float((a[scored] * (values - p)).sum()) - theta
        curvature = float((a[scored] ** 2 * p * (1 - p)).sum()) + 1
        theta += gradient / curvature
    rest = np.setdiff1d(np.arange(len(weights)), scored)
    return float(values @ weights[scored] + sigmoid(a[rest] * theta + b[rest]) @ weights[rest])


def evidence_matrix(workspace: Workspace, method: str, sampler: str, trials: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Every trial's values on every search document, from a fresh study without pruning."""
    spec = workspace.study.spec.model_copy(update={"sampler": sampler, "pruning": "none", "seed": seed})
    study = workspace.study.model_copy(update={"spec": spec})
    run = Workspace(study, workspace.builder, workspace.evaluator, choose_documents(workspace.evaluator, spec))
    storage = optuna.storages.InMemoryStorage()
    StudyRunner(run, storage=storage).run_method(method, trials, None, None)
    stored = [StoredTrial.of(t) for t in open_optuna_study(study, method, storage).get_trials(deepcopy=False)]
    records = [t.record for t in sorted(stored, key=lambda t: t.number) if t.record is not None]
    layout = Layout.of(records[0])
    return np.stack([layout.values(record) for record in records]), layout.weights


def compare(
    values: np.ndarray,
    weights: np.ndarray,
    min_trials: int,
    seed: int,
    top_fraction: float = 0.5,
    earlier: Optional[np.ndarray] = None,
) -> dict[str, dict[float, list]]:
    """(estimate, measured, stderr or None) per estimator and fraction, each trial predicted from those before it
    (and from `earlier`, the trials of the methods run before this one, where given)."""
    rng = np.random.default_rng(seed)
    full = values @ weights
    names = ("subset mean", "2PL IRT", "regression", "regression, random order")
    names += ("regression, the study's trials",) if earlier is not None else ()
    found: dict[str, dict[float, list]] = {name: {f: [] for f in FRACTIONS} for name in names}
    for index in range(min_trials, len(values)):
        basis = values[:index]
        model = FitnessModel(basis, weights, top_fraction)
        study = None if earlier is None else FitnessModel(np.vstack([earlier, basis]), weights, top_fraction)
        a, b = fit_irt(basis)
        for fraction in FRACTIONS:
            count = max(1, round(len(weights) * fraction))
            subset = rng.permutation(len(weights))[:count]
            plain = float(values[index, subset] @ weights[subset] / weights[subset].sum())
            found["subset mean"][fraction].append((plain, full[index], None))
            scored = model.order[:count]
            found["2PL IRT"][fraction].append((irt_estimate(a, b, weights, scored, values[index, scored]), full[index], None))
            estimate = model.estimate(values[index, scored])
            found["regression"][fraction].append((estimate.value, full[index], estimate.stderr))
            shuffled = predict(basis, weights, subset, values[index, subset])
            found["regression, random order"][fraction].append((shuffled.value, full[index], shuffled.stderr))
            if study is not None:
                pooled = study.estimate(values[index, study.order[:count]])
                found["regression, the study's trials"][fraction].append((pooled.value, full[index], pooled.stderr))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--methods", nargs="+", default=["slerp", "dare_ties"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sampler", default="tpe")
    parser.add_argument("--min-trials", type=int, default=5)
    parser.add_argument("--top-fraction", type=float, default=0.5, help="the regression's evaluation.estimator.top_fraction")
    parser.add_argument("--study", type=Path, help="a study file to use instead of the demo's")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mergetune-bench-search"))
    args = parser.parse_args()

    from mergetune.search.study_file import load_study

    study = load_study(args.study) if args.study else prepare_demo(args.work_dir)
    workspace = Workspace.open(study)
    pooled: dict[str, dict[float, list]] = {}
    earlier: dict[int, np.ndarray] = {}  # per seed: the trials of the methods run so far
    for method in args.methods:
        for seed in args.seeds:
            values, weights = evidence_matrix(workspace, method, args.sampler, args.trials, seed)
            found = compare(values, weights, args.min_trials, seed, args.top_fraction, earlier.get(seed))
            for name, by_fraction in found.items():
                for fraction, rows in by_fraction.items():
                    pooled.setdefault(f"{method} {name}", {}).setdefault(fraction, []).extend(rows)
            earlier[seed] = values if seed not in earlier else np.vstack([earlier[seed], values])
            print(method, seed, "done", flush=True)

    print(f"\n### Estimators — {date.today().isoformat()}\n")
    print(
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}. "
        f"{'Study ' + str(args.study) if args.study else 'Demo models and tasks'}; {args.sampler}, {args.trials} trials "
        f"per study without pruning, seeds {' '.join(map(str, args.seeds))}; each trial after the first "
        f"{args.min_trials} predicted from those before it.\n"
    )
    print(
        f"Command: `python bench/bench_estimator.py --trials {args.trials} --methods {' '.join(args.methods)} "
        f"--seeds {' '.join(map(str, args.seeds))} --sampler {args.sampler} --min-trials {args.min_trials} "
        f"--top-fraction {args.top_fraction}"
        + (f" --study {args.study}" if args.study else "")
        + "`\n"
    )
    header = " | ".join(f"{int(100 * f)}%: MAE / rank corr." for f in FRACTIONS)
    print(f"| method, estimator | {header} | 95% interval covers |")
    print("|---|" + "---|" * len(FRACTIONS) + "---|")
    for name, by_fraction in pooled.items():
        cells = []
        for fraction in FRACTIONS:
            rows = by_fraction[fraction]
            error = 100 * np.mean([abs(e - m) for e, m, _ in rows])
            ranks = rank_correlation([e for e, _, _ in rows], [m for _, m, _ in rows])
            cells.append(f"{error:.2f} / {ranks:.2f}")
        cover = "—"
        if "regression" in name:
            rows = [row for f in FRACTIONS for row in by_fraction[f]]
            cover = f"{np.mean([abs(e - m) <= 1.96 * s for e, m, s in rows]):.0%}"
        print(f"| {name} | {' | '.join(cells)} | {cover} |")


if __name__ == "__main__":
    main()
