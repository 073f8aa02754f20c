"""`mergetune study run`, `leaderboard`, `export`, `report`: the search's command-line layer."""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from mergetune.errors import MergetuneError
from mergetune.outputs import check_distinct_outputs, check_output_dir, check_output_file, refuse_protected
from mergetune.search.study_file import Study, load_study

study_app = typer.Typer(help="Run Optuna studies over merge recipes.", no_args_is_help=True)


def storage_option():
    """--storage, also read from MERGETUNE_STORAGE (which keeps a database password out of `ps`)."""
    return typer.Option(
        None,
        envvar="MERGETUNE_STORAGE",
        help="Optuna storage: postgresql://…, sqlite:///…, journal:///path.log (default: SQLite beside the study file).",
    )


def _load(path: Path, storage: Optional[str], device: Optional[str] = None) -> Study:
    study = load_study(path)
    overrides = {key: value for key, value in (("storage", storage), ("device", device)) if value}
    if overrides:
        study = study.model_copy(update={"spec": study.spec.model_copy(update=overrides)})
    return study


def check_count(option: str, value: Optional[float]) -> None:
    """A count or a duration from the command line: a finite number, at least 1 (typer's `min` would print a
    usage panel, not the one-line message every other input error gets)."""
    if value is not None and not (math.isfinite(value) and value >= 1):
        raise MergetuneError(f"{option}: must be a finite number of at least 1, got {value:g}")


def _write_file(path: Path, text: str, option: str) -> None:
    """Write `text` to `path` whole or not at all: a temporary file beside it, renamed into place."""
    temporary: Optional[str] = None
    try:  # creating the temporary file fails too where `path` can't be written (read-only, /proc)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.partial-", dir=path.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except OSError as error:  # a full disk, a lost mount
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise MergetuneError(
            f"{option} {path}: cannot write it: {error.strerror or error}; nothing was written there"
        ) from None


def _check_evaluation(study: Study) -> None:
    """What the evaluator would refuse about the study's data and task directories, before any model loads,
    naming the study file's fields (the evaluator itself knows only command-line names)."""
    from mergetune.eval.tasks import Origins, check_task_sources
    from mergetune.search.documents import final_only_tasks

    evaluation = study.spec.evaluation

    def local(reference: str) -> Path:
        return study.directory / Path(reference).expanduser()

    check_task_sources(
        evaluation.suite,
        [*evaluation.tasks, *final_only_tasks(study.spec)],
        local(evaluation.data_dir) if evaluation.data_dir else None,
        [local(path) for path in evaluation.include_paths],
        Origins.study_file(study.path),
    )


def print_leaderboard(board, top: Optional[int] = None, console: Optional[Console] = None) -> None:
    from mergetune.search.leaderboard import comparison_lines, table_rows

    # Piped output gets a wide table rather than rich's 80-column default.
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    headers, cells = table_rows(board, top)
    table = Table(title=f"study {board.study}: ranked by held-out score", show_lines=False)
    for header in headers:
        table.add_column(header, justify="right" if header not in ("method", "origin", "scored on") else "left")
    for row in cells:
        table.add_row(*row)
    console.print(table)
    for line in comparison_lines(board):
        console.print(line)


LOADING = "loading models"  # BarProgress's key for the models' loading bar, beside the methods'


class Bars:
    """tqdm bars on stderr, closed as the block ends, however it ends: a bar left open by an error or a Ctrl-C is
    redrawn when collected, after (and on the line of) the command's last message."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bars: dict = {}

    def __enter__(self) -> "Bars":
        return self

    def __exit__(self, *exc_info: object) -> None:
        for bar in self.bars.values():
            bar.close()


class TensorBars(Bars):
    """A merge's progress (`merge_ops.disk.Progress`): a tqdm bar of tensors per stage on stderr."""

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit="tensor", file=sys.stderr, disable=self.quiet)
        bar.update(done - bar.n)
        if done == total:
            bar.close()


class BarProgress(Bars):
    """A tqdm bar per method on stderr; tqdm estimates the time left from the trial rate, a timeout adds its own."""

    def start(self, method: str, total: int) -> None:
        from tqdm import tqdm

        self.bars[method] = tqdm(total=total, desc=method, unit="trial", file=sys.stderr, disable=self.quiet)

    def update(self, method: str, done: int, best: Optional[float], seconds_left: Optional[float]) -> None:
        bar = self.bars[method]
        bar.update(done - bar.n)
        notes = [] if best is None else [f"best {100 * best:.2f}"]
        if seconds_left is not None:
            notes.append(f"timeout in {seconds_left:.0f}s")
        bar.set_postfix_str(", ".join(notes))

    def finish(self, method: str) -> None:
        self.bars[method].close()

    def loading(self, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(LOADING)
        if bar is None:
            bar = self.bars[LOADING] = tqdm(total=total, desc=LOADING, unit="B", unit_scale=True, file=sys.stderr, disable=self.quiet)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()


def run_with_progress(
    study: Study,
    n_trials: Optional[int] = None,
    timeout: Optional[float] = None,
    quiet: bool = False,
    max_failures: Optional[int] = None,
):
    """`run_study` as the terminal shows it: messages on stdout, progress bars on stderr (none with `quiet`)."""
    from mergetune.search.study import run_study

    _check_evaluation(study)
    if quiet:  # the datasets library draws one bar per split it loads
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    with BarProgress(quiet) as progress:
        return run_study(study, n_trials, timeout, say=typer.echo, progress=progress, max_failures=max_failures)


def study_run(
    study_file: Path = typer.Argument(..., help="Study YAML (see studies/)."),
    n_trials: Optional[int] = typer.Option(None, help="Completed (or pruned) trials per method (overrides the file's budget)."),
    timeout: Optional[float] = typer.Option(None, help="Seconds per method (overrides the file's budget)."),
    storage: Optional[str] = storage_option(),
    device: Optional[str] = typer.Option(None, help="This worker's device, e.g. cuda:1 (overrides the file's)."),
    max_failures: Optional[int] = typer.Option(None, help="Stop after this many failed trials in a row (default 5)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Run (or continue) a study: trials until the budget is reached, then the finalists' held-out scores.

    Start it on several GPUs or hosts with the same --storage to share the work.
    """
    for option, value in (("--n-trials", n_trials), ("--timeout", timeout), ("--max-failures", max_failures)):
        check_count(option, value)
    board = run_with_progress(_load(study_file, storage, device), n_trials, timeout, quiet, max_failures)
    print_leaderboard(board, top=20)


def leaderboard_command(
    study_file: Path = typer.Argument(..., help="Study YAML."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the leaderboard as JSON here."),
    csv_out: Optional[Path] = typer.Option(None, "--csv", help="Also write the leaderboard as CSV here."),
    markdown: bool = typer.Option(False, "--markdown", help="Print Markdown instead of a terminal table."),
    top: Optional[int] = typer.Option(None, help="Show only the first N rows here (--json and --csv hold every row)."),
    storage: Optional[str] = storage_option(),
) -> None:
    """Rank a study's trials by held-out score; compare the best SLERP and DARE TIES."""
    from mergetune.search.export import protected_files
    from mergetune.search.leaderboard import build_leaderboard, to_csv, to_json, to_markdown
    from mergetune.search.storage import open_storage

    check_count("--top", top)
    study = _load(study_file, storage)
    check_distinct_outputs({"--json": json_out, "--csv": csv_out})
    for option, path in (("--json", json_out), ("--csv", csv_out)):
        if path:
            check_output_file(path, option, protected_files(study))
    board = build_leaderboard(study, open_storage(study, create=False))
    if markdown:
        typer.echo(to_markdown(board, top))
    else:
        print_leaderboard(board, top)
    if json_out:
        _write_file(json_out, json.dumps(to_json(board), indent=2) + "\n", "--json")
    if csv_out:
        _write_file(csv_out, to_csv(board), "--csv")


def export_command(
    study_file: Path = typer.Argument(..., help="Study YAML."),
    out_dir: Path = typer.Argument(..., help="Directory to create: model, recipe, model card."),
    method: Optional[str] = typer.Option(None, help="Best trial of this method (default: best overall)."),
    trial: Optional[int] = typer.Option(None, help="This trial number instead of the best."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists."),
    device: Optional[str] = typer.Option(
        None, help="Where to merge (default: the device type the trial was built on, when this machine has it)."
    ),
    storage: Optional[str] = storage_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write a trial's mergekit recipe, the merged model and a model card with its scores."""
    from mergetune.search.export import export_trial
    from mergetune.search.storage import open_storage

    check_output_dir(out_dir, "output directory")
    study = _load(study_file, storage)
    with TensorBars(quiet) as progress:
        result = export_trial(
            study, out_dir, method, trial, overwrite, storage=open_storage(study, create=False), device=device,
            progress=progress,
        )
    if result.note:
        typer.secho(f"warning: {result.note}", fg=typer.colors.YELLOW, err=True)
    typer.echo(
        f"exported {result.row.method} trial {result.row.trial} to {out_dir}; reproduce with {result.reproduce}"
    )


def report_command(
    study_file: Path = typer.Argument(..., help="Study YAML."),
    out_dir: Path = typer.Argument(..., help="Directory for the PNG figures and index.html."),
    storage: Optional[str] = storage_option(),
) -> None:
    """Draw the study: optimisation history, best t-curves, weights/densities, parameter importances."""
    from mergetune.search.export import protected_files
    from mergetune.search.report import check_report_dir, write_report
    from mergetune.search.storage import dashboard_target, open_storage

    check_output_dir(out_dir, "report directory")
    study = _load(study_file, storage)
    refuse_protected(out_dir, "report directory", protected_files(study))
    check_report_dir(out_dir)
    index = write_report(study, out_dir, open_storage(study, create=False))
    typer.echo(f"wrote {index}  (interactive: optuna-dashboard {dashboard_target(study)})")
