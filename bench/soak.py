"""Scale-out soak: a long study while workers are killed (SIGKILL) and restarted at random.

Runs W worker processes — the real `mergetune study run STUDY --storage URL` — on one study
of N tiny trials (tiny offline models and tasks, a few documents per task, so a trial takes
about a second). At random moments it SIGKILLs a random worker that is running a trial and
starts a fresh one in its place, until the study holds its N trials and the workers finish by
themselves. Then it reads the storage and reports: trials completed, workers killed, trials of
dead workers retried, lost (must be 0), scored twice (must be 0), and the storage's row counts.

    python bench/soak.py --trials 300 --workers 3                     # journal file
    python bench/soak.py --trials 300 --workers 3 --postgres postgresql://user:pw@127.0.0.1/db

With --postgres, a fresh database is created beside the one named (the role needs CREATEDB)
and dropped afterwards, so the row counts are this study's alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from datetime import date
from pathlib import Path

import optuna
import yaml
from optuna.trial import TrialState

from mergetune.demo.postgres import scratch_postgres_database
from mergetune.search.storage import journal_path, open_storage
from mergetune.search.trials import COUNTED, optuna_study_name
from mergetune.search.workers import DIED
from mergetune.search.study_file import load_study, redact_url
from mergetune.demo.study import tiny_study
from mergetune.demo.skills import write_task_dir
from mergetune.demo.tiny import build_family

WORKER = [sys.executable, "-c", "from mergetune.cli import run; run()"]


def write_study(directory: Path, trials: int, storage: str) -> Path:
    family = build_family(directory / "models", names=("model_a", "model_b"))
    tasks = write_task_dir(directory / "tasks", docs_per_split=40)
    options = {"heartbeat_interval": 1, "grace_period": 5, "connect_timeout": 5}
    spec = tiny_study("soak", family, tasks, budget={"n_trials": trials}, storage=storage, storage_options=options)
    path = directory / "soak.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


class Workers:
    """The worker processes, each logging to its own file."""

    def __init__(self, study: Path, logs: Path):
        self.study, self.logs = study, logs
        self.running: list[subprocess.Popen] = []
        self.started = 0
        self.killed = 0
        self.exit_codes: list[int] = []

    def start(self) -> None:
        self.started += 1
        log = open(self.logs / f"worker-{self.started:03d}.log", "w")
        command = [*WORKER, "-v", "study", "run", str(self.study), "--quiet"]
        self.running.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))

    def kill_one(self, rng: random.Random, busy: set[int]) -> bool:
        """SIGKILL a random worker among those running a trial right now; False if none is."""
        candidates = [process for process in self.running if process.pid in busy]
        if not candidates:
            return False
        victim = rng.choice(candidates)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.running.remove(victim)
        self.killed += 1
        return True

    def collect(self) -> None:
        for process in [p for p in self.running if p.poll() is not None]:
            self.exit_codes.append(process.returncode)
            self.running.remove(process)


def progress(study_path: Path) -> tuple[int, set[int]]:
    """Trials completed so far, and the pids of the workers running one now."""
    study = load_study(study_path)
    try:
        optuna_study = optuna.load_study(study_name=optuna_study_name(study.spec, "slerp"), storage=open_storage(study))
    except KeyError:  # no worker has created it yet
        return 0, set()
    trials = optuna_study.get_trials(deepcopy=False)
    busy = {t.user_attrs["worker"]["pid"] for t in trials if t.state == TrialState.RUNNING and "worker" in t.user_attrs}
    return sum(t.state in COUNTED for t in trials), busy


def audit(study_path: Path, trials_wanted: int) -> dict:
    """What the storage holds: counts, retries, and anything lost or scored twice."""
    study = load_study(study_path)
    trials = optuna.load_study(study_name=optuna_study_name(study.spec, "slerp"), storage=open_storage(study)).get_trials()
    counted = [t for t in trials if t.state in COUNTED]
    reasons = [t.user_attrs.get("fail_reason", "") for t in trials if t.state == TrialState.FAIL]
    died = [t for t in trials if t.state == TrialState.FAIL and t.user_attrs["fail_reason"].startswith(DIED)]
    retried = [d for d in died if any(d.number in t.system_attrs.get("retry_history", []) for t in counted)]
    unfinished = [d for d in died if d not in retried and d.params]  # parameters of a dead trial nobody finished
    candidates = Counter(tuple(sorted(t.params.items())) for t in counted)
    not_run = sum(reason.startswith("not run") for reason in reasons)
    return {
        "trials stored": len(trials),
        "completed": sum(t.state == TrialState.COMPLETE for t in trials),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed: worker died": len(died),
        "of those, retried and finished": len(retried),
        "of those, died before choosing parameters (nothing to retry)": sum(not d.params for d in died),
        "failed: not run (lost the race for the last places)": not_run,
        "failed: other reasons": len(reasons) - len(died) - not_run,
        "left running or waiting": sum(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials),
        "lost": abs(trials_wanted - len(counted)) + len(unfinished),
        "scored twice": sum(count - 1 for count in candidates.values()),
    }


def row_counts(study_path: Path) -> dict:
    study = load_study(study_path)
    path = journal_path(study)
    if path is not None:
        return {"journal records": sum(1 for _ in open(path, "rb")), "journal bytes": path.stat().st_size}
    import psycopg

    with psycopg.connect(study.storage_url) as connection:
        tables = connection.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1").fetchall()
        return {table: connection.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] for (table,) in tables}


def soak(work: Path, trials: int, workers: int, storage: str, kill_every: tuple[float, float], seed: int) -> dict:
    rng = random.Random(seed)
    study = write_study(work, trials, storage)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    pool = Workers(study, logs)
    start = time.monotonic()
    for _ in range(workers):
        pool.start()
    while True:
        time.sleep(rng.uniform(*kill_every))
        pool.collect()
        done, busy = progress(study)
        if done >= trials or not pool.running:
            break
        if pool.kill_one(rng, busy):
            pool.start()
        print(f"{time.monotonic() - start:6.0f}s: {done}/{trials} done, {pool.killed} killed", flush=True)
    for process in pool.running:
        process.wait(timeout=600)
    pool.collect()
    seconds = time.monotonic() - start
    result = {
        "seconds": seconds,
        "workers started": pool.started,
        "workers killed": pool.killed,
        "workers that exited with an error": sum(code != 0 for code in pool.exit_codes),
    }
    if storage.startswith("journal:"):  # a worker killed while holding the journal's lock stalls the others 30 s
        logs_text = [path.read_text(errors="replace") for path in logs.iterdir()]
        result["journal locks taken over after a kill"] = sum(text.count("Forcibly releasing") for text in logs_text)
    return {
        **result,
        **audit(study, trials),
        "rows": row_counts(study),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=300)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--postgres", help="a PostgreSQL URL whose role may create databases (default: a journal file)")
    parser.add_argument("--kill-every", type=float, nargs=2, default=(5.0, 25.0), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/mergetune-soak"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    work = args.work_dir / uuid.uuid4().hex[:8]
    work.mkdir(parents=True)
    journal = contextlib.nullcontext(f"journal://{work}/soak.log")
    with scratch_postgres_database(args.postgres, "mergetune_soak") if args.postgres else journal as storage:
        result = soak(work, args.trials, args.workers, storage, tuple(args.kill_every), args.seed)
        shown = redact_url(storage)
    rows = result.pop("rows")
    command = f"python bench/soak.py --trials {args.trials} --workers {args.workers}"
    command += f" --kill-every {args.kill_every[0]:g} {args.kill_every[1]:g} --seed {args.seed}"
    command += f" --postgres {redact_url(args.postgres)}" if args.postgres else ""
    print(f"\n### Soak — {date.today().isoformat()}, {'PostgreSQL' if args.postgres else 'journal file'}\n")
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs. Storage: `{shown}`. Command: `{command}`.\n")
    print("| measure | value |\n|---|---|")
    for key, value in result.items():
        print(f"| {key} | {value:.0f} |" if isinstance(value, float) else f"| {key} | {value} |")
    print("\nStorage rows: " + ", ".join(f"{table} {count}" for table, count in rows.items()))
    if result["lost"] or result["scored twice"] or result["left running or waiting"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
