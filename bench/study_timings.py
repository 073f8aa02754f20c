"""Per-trial timings of a study, as its workers stored them (the `timings` trial attribute: build, evaluate,
forward and total seconds, forward tokens; see search/trials.py), with the issue #13 target: build at most a
fifth of the scoring time.

    python bench/study_timings.py bench/studies/smollm2_real.yaml [--storage sqlite:///…] [--json out.json]

Prints one Markdown row per finished trial and, per method, the medians over the trials scored on every
search document (complete trials; pruned ones stopped at a rung).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from optuna.trial import TrialState

from mergetune.search.study_file import load_study
from mergetune.search.trials import DOCS_SCORED, TIMINGS, is_baseline, load_optuna_study


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_file", type=Path)
    parser.add_argument("--storage", help="the study's storage URL (default: the file's, SQLite beside it)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    study = load_study(args.study_file)
    rows, summary = [], []
    print("| method | trial | state | baseline | docs scored | build s | evaluate s | forward s | forward tokens "
          "| build / evaluate |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in study.spec.methods:
        stored = load_optuna_study(study, method, args.storage)
        if stored is None:
            continue
        for trial in stored.get_trials(deepcopy=False):
            timings = trial.user_attrs.get(TIMINGS)
            if not timings:
                continue
            row = {
                "method": method, "trial": trial.number, "state": trial.state.name, "baseline": is_baseline(trial),
                "docs_scored": trial.user_attrs.get(DOCS_SCORED, 0), **timings,
            }
            rows.append(row)
            forward, tokens = row.get("forward"), row.get("forward_tokens")  # absent in studies stored before them
            print(f"| {method} | {trial.number} | {row['state']} | {'yes' if row['baseline'] else ''} | {row['docs_scored']} | "
                  f"{row['build']:.2f} | {row['evaluate']:.1f} | {'—' if forward is None else f'{forward:.1f}'} | "
                  f"{'—' if tokens is None else f'{tokens:,}'} | {row['build'] / row['evaluate']:.3f} |")
        full = [row for row in rows if row["method"] == method and row["state"] == TrialState.COMPLETE.name]
        if full:
            build = statistics.median(row["build"] for row in full)
            evaluate = statistics.median(row["evaluate"] for row in full)
            summary.append((method, len(full), build, evaluate))
    print("\n| method | complete trials | median build s | median evaluate s | build / evaluate | build ≤ evaluate / 5 |")
    print("|---|---|---|---|---|---|")
    for method, count, build, evaluate in summary:
        print(f"| {method} | {count} | {build:.2f} | {evaluate:.1f} | {build / evaluate:.3f} | "
              f"{'yes' if build <= evaluate / 5 else 'no'} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
