"""The `mergetune` command: the only place that prints to the user.

Every subcommand turns a `MergetuneError` into one line on stderr and exit code 2,
Ctrl-C into exit code 130 and SIGTERM into 143, without a traceback.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer

from mergetune import interrupts
from mergetune.errors import MergetuneError
from mergetune.outputs import check_output_dir

app = typer.Typer(
    help="Search merge recipes for open-weight LLMs; build them; score them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

F = TypeVar("F", bound=Callable)


def user_errors(func: F) -> F:
    """Report user-facing failures as one clear line instead of a traceback."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            with interrupts.noticed():
                return func(*args, **kwargs)
        except MergetuneError as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt as stop:  # the shell's codes: 128 + the signal's number
            typer.secho(interrupts.describe(stop), fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(143 if isinstance(stop, interrupts.Terminated) else 130) from None

    return wrapper  # type: ignore[return-value]


def run() -> None:
    """The console script: `app`, then Ctrl-C and SIGTERM ignored while the interpreter shuts down. The command's
    work is done and said by then; a Ctrl-C would only print a traceback from an exit hook (torch registers some)
    or turn a finished command's exit code into 130 (a SIGTERM into 143)."""
    try:
        app()
    finally:
        for signum in interrupts.SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


@app.callback()
def main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging: -v for info, -vv for debug (a flag to repeat; it takes no number)."),
) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@app.command()
@user_errors
def merge(
    recipe: Path = typer.Argument(..., help="mergekit-style recipe YAML (one or several stages)."),
    out_dir: Path = typer.Argument(..., help="Directory to create with the merged model."),
    seed: Optional[int] = typer.Option(None, help="Seed for random methods (DARE, DELLA); recorded in the card."),
    device: str = typer.Option("cpu", help="Where the tensor math runs: cpu, cuda, cuda:N."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also read pickled .bin checkpoints (can run code)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT_DIR if it exists."),
    shard_size: str = typer.Option("5GB", help="Largest output shard, e.g. 2GB, 500MB."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Merge models as RECIPE says and write the result to OUT_DIR."""
    from mergetune.merge_ops.disk import merge_recipe_file
    from mergetune.merge_ops.recipe import load_recipes
    from mergetune.search.cli import TensorBars

    recipe_file = load_recipes(recipe)
    with TensorBars(quiet) as progress:
        result = merge_recipe_file(
            recipe_file,
            out_dir,
            seed=seed,
            device=device,
            allow_pickle=allow_pickle,
            overwrite=overwrite,
            shard_bytes=parse_size(shard_size),
            progress=progress,
            protected={"recipe file": recipe},
        )
    for warning in result.warnings:
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    seed_note = f", seed {result.seed}" if result.seed is not None else ""
    typer.echo(f"wrote {result.output} ({result.tensors} tensors, {result.layers} layers{seed_note})")


def parse_size(text: str) -> int:
    """'5GB' → 5_000_000_000; plain numbers are bytes, as in mergekit, but a small one must say so ('100B'):
    `--shard-size 100` meant 100 MB more likely than a shard per tensor."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    cleaned = text.strip().upper()
    for unit, factor in units.items():
        if cleaned.endswith(unit):
            number = cleaned[: -len(unit)].strip()
            break
    else:
        number, factor = cleaned, None
    try:
        amount = float(number) * (factor or 1)
    except ValueError:
        raise MergetuneError(f"--shard-size: cannot read '{text}' as a size like 5GB or 500MB") from None
    if not math.isfinite(amount) or int(amount) <= 0:
        raise MergetuneError(f"--shard-size: must be a finite, positive size like 5GB, got '{text}'")
    if factor is None and amount < 10**6:
        raise MergetuneError(
            f"--shard-size {text}: {int(amount)} bytes would put every tensor in a shard of its own; give a unit "
            f"({text.strip()}MB, {text.strip()}GB), or {text.strip()}B if bytes are meant"
        )
    return int(amount)


@app.command()
@user_errors
def demo(
    out_dir: Path = typer.Option(Path("demo-out"), help="Where models, tasks, the study and the export go."),
    n_trials: Optional[int] = typer.Option(None, help="Trials per method (default: the demo's 24)."),
    fresh: bool = typer.Option(False, "--fresh", help="Forget earlier demo trials and search again."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """A whole study offline: tiny specialists, SLERP vs DARE TIES search, leaderboard, export."""
    from mergetune.demo.study import outdated_trials, prepare_demo, storage_file
    from mergetune.search.cli import check_count, print_leaderboard, run_with_progress
    from mergetune.search.export import export_trial

    check_count("--n-trials", n_trials)  # before the demo's study file is written with it
    check_output_dir(out_dir, "--out-dir")
    typer.echo(f"building (or reusing) the demo's tiny models and tasks in {out_dir}/")
    study = prepare_demo(out_dir, n_trials)
    if not fresh and outdated_trials(study):
        typer.echo(f"the demo's study has changed since the trials in {storage_file(study)}: searching afresh")
        fresh = True
    if fresh:
        storage_file(study).unlink(missing_ok=True)
    board = run_with_progress(study, quiet=quiet)
    print_leaderboard(board, top=12)
    export_dir = out_dir / "best-merge"
    result = export_trial(study, export_dir, overwrite=True)
    typer.echo(f"\nbest recipe: {result.row.method} trial {result.row.trial} → {export_dir}/ (mergekit_config.yml, model, README.md)")
    for comparison in board.comparisons:
        if "hand-written" in comparison.label:
            difference = comparison.difference
            verdict = "beats" if difference.low > 0 else ("matches" if difference.high >= 0 else "trails")
            typer.echo(
                f"search {verdict} the hand-written {comparison.a.method} recipe on held-out documents: "
                f"{100 * comparison.a.final.average:.1f} → {100 * comparison.b.final.average:.1f} "
                f"({100 * difference.mean:+.1f} points, 95% CI {100 * difference.low:+.1f} … {100 * difference.high:+.1f})"
            )


# `mergetune eval` lives in mergetune.eval.cli (issue #3); registered here so it shares the error handling.
from mergetune.eval.cli import eval_command  # noqa: E402

app.command("eval")(user_errors(eval_command))

# The search's commands live in mergetune.search.cli (issue #4).
from mergetune.search.cli import (  # noqa: E402
    export_command,
    leaderboard_command,
    report_command,
    study_app,
    study_run,
)

study_app.command("run")(user_errors(study_run))
app.add_typer(study_app, name="study")
app.command("leaderboard")(user_errors(leaderboard_command))
app.command("export")(user_errors(export_command))
app.command("report")(user_errors(report_command))
