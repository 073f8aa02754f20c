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


def check_output_dir(path: Path, what: str) -> None:
    """Before any work: `path` can be a directory (it is one, or the nearest part of it that exists is one)."""
    absolute = path.absolute()
    existing = next(part for part in (absolute, *absolute.parents) if part.exists())
    if not existing.is_dir():
        raise MergetuneError(f"{what} {path}: {existing} is a file, not a directory")


def relation(path: Path, other: Path) -> str | None:
    """How `path` stands to `other`, links followed: "is", "contains", "lies inside", or None (apart)."""
    target, where = path.resolve(), other.resolve()
    if target == where:
        return "is"
    if target in where.parents:
        return "contains"
    if where in target.parents:
        return "lies inside"
    return None


def refuse_protected(path: Path, option: str, protected: Mapping[str, Path]) -> None:
    """`path` is none of the `protected` files and folders, nor inside one of the folders (a file written there
    adds to a folder; it replaces nothing else)."""
    target = path.resolve()
    shown = "" if str(path) == str(target) else f" ({target})"
    for what, kept in protected.items():
        found = relation(path, kept)
        if found == "is":
            raise MergetuneError(f"{option} {path}: is the {what}{shown}; writing there would destroy it, choose another")
        if found == "lies inside":
            raise MergetuneError(f"{option} {path}: is inside the {what}{shown}; writing there would change it, choose another")


def check_output_apart(out_dir: Path, inputs: Mapping[str, Path]) -> None:
    """Refuse an output directory that is, holds or lies inside an input (links followed).

    Writing there, or replacing it with --overwrite, would destroy the input, so
    not even --overwrite allows it. `inputs` maps a description to its path.
    """
    for what, path in inputs.items():
        found = relation(out_dir, path)
        if found is not None:
            where = path.resolve()
            shown = "" if str(where) in what else f" ({where})"
            raise MergetuneError(
                f"output directory {out_dir} {found} the {what}{shown}; "
                "choose an output outside the inputs (--overwrite never replaces an input)"
            )


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
