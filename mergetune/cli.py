"""The `mergetune` command: the only place that prints to the user.

Every subcommand turns a `MergetuneError` into one line on stderr and exit code 2,
and Ctrl-C into exit code 130, without a traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer

from mergetune.errors import MergetuneError

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
            return func(*args, **kwargs)
        except MergetuneError as error:
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


@app.callback()
def main(
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More logging (-vv for debug)."),
) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
