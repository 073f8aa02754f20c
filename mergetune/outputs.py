"""Where a command may write a file: checked before any work, so a bad path costs nothing and destroys nothing."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mergetune.errors import MergetuneError


def check_output_file(path: Path, option: str, protected: Mapping[str, Path] | None = None) -> None:
    """The output file's folder exists and the path is not a folder; and renaming a new file onto `path` destroys
    neither a `protected` file or anything inside a protected folder (the command's inputs, by description) nor a
    special file (a device, a pipe), which would become a regular one."""
    if not path.parent.is_dir():
        state = "is a file, not a directory" if path.parent.exists() else "does not exist"
        raise MergetuneError(f"{option} {path}: directory {path.parent} {state}")
    if path.is_dir():
        raise MergetuneError(f"{option} {path}: is a directory, expected a file name")
    refuse_protected(path, option, protected or {})
    if path.exists() and not path.is_file():
        raise MergetuneError(f"{option} {path}: is not a regular file (a device, a pipe or a socket); choose a file name")


def refuse_protected(path: Path, option: str, protected: Mapping[str, Path]) -> None:
    """`path` is none of the `protected` files and folders, nor inside one of the folders."""
    target = path.resolve()
    shown = "" if str(path) == str(target) else f" ({target})"
    for what, kept in protected.items():
        kept = kept.resolve()
        if target == kept:
            raise MergetuneError(f"{option} {path}: is the {what}{shown}; writing there would destroy it, choose another")
        if kept.is_dir() and kept in target.parents:
            raise MergetuneError(f"{option} {path}: is inside the {what}{shown}; writing there would change it, choose another")


def check_distinct_outputs(outputs: Mapping[str, Path | None]) -> None:
    """No two options name the same file: the second written would silently replace the first."""
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        target = path.resolve()
        if target in seen:
            raise MergetuneError(f"{option} {path}: is also the {seen[target]} output; give each its own file")
        seen[target] = option
