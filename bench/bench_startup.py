"""Task loading at a worker's start, side by side: mergetune's choice of lm-eval task index against the full
index that the `lm_eval` CLI builds on every run (and mergetune built in every process before 2026-12-01).

Each measurement is a fresh process (as each study worker is) timing `load_tasks` alone, after the imports:
"mergetune" as it runs (`task_manager_for`: the include paths' own index when every task is a plain task of
theirs), "full index" with `task_manager_for` replaced by the full index. Cases: the demo's four tasks (a
study of its own task YAMLs), ARC-Easy and Winogrande from local data (bench/studies/smollm2_real.yaml's
tasks), and the leaderboard suite on local data (its `mmlu` group takes the full index either way: a control).

    python bench/bench_startup.py [--repeats 3] [--data-dir ../shared/benchmarks]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TIMED = textwrap.dedent(
    """
    import json, sys, time
    from mergetune.eval import EvalConfig, evaluator, tasks

    config, full = EvalConfig(**json.loads(sys.argv[1])), sys.argv[2] == "full"
    if full:  # where load_tasks looks it up
        evaluator.task_manager_for = lambda paths, names: tasks.task_manager(paths)
    start = time.perf_counter()
    loaded = evaluator.load_tasks(config)
    print(json.dumps({"seconds": time.perf_counter() - start, "tasks": sorted(loaded)}))
    """
)


def timed(config: dict, way: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", TIMED, json.dumps(config), way], capture_output=True, text=True, timeout=600
    )
    if completed.returncode != 0:
        sys.exit(f"{way} run failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per case and way; the best is shown")
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "benchmarks")
    args = parser.parse_args()

    from mergetune.demo.skills import HELDOUT_TASKS, SEARCH_TASKS, write_task_dir

    with tempfile.TemporaryDirectory() as folder:
        task_dir = str(write_task_dir(folder))
        data_dir = str(args.data_dir)
        cases = {
            "demo's own tasks": {"tasks": [*SEARCH_TASKS, *HELDOUT_TASKS], "include_paths": [task_dir]},
            "arc_easy + winogrande, local data": {"tasks": ["arc_easy", "winogrande"], "data_dir": data_dir},
            "leaderboard suite, local data (control)": {"suite": "leaderboard", "data_dir": data_dir},
        }
        print("| tasks | mergetune, s | full index, s | ratio |")
        print("|---|---|---|---|")
        for name, config in cases.items():
            best = {}
            for way in ("mergetune", "full"):  # interleaved: both see the same machine load
                runs = [timed(config, way) for _ in range(args.repeats)]
                if len({tuple(run["tasks"]) for run in runs}) != 1:
                    sys.exit(f"{name}: {way} loaded different tasks across runs")
                best[way] = (min(run["seconds"] for run in runs), runs[0]["tasks"])
            if best["mergetune"][1] != best["full"][1]:
                sys.exit(f"{name}: the two ways loaded different tasks: {best['mergetune'][1]} vs {best['full'][1]}")
            ours, full = best["mergetune"][0], best["full"][0]
            print(f"| {name} | {ours:.2f} | {full:.2f} | {full / ours:.1f}x |", flush=True)


if __name__ == "__main__":
    main()
