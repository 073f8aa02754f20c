"""Exporting a trial: its mergekit recipe, the merged model, and a model card with its scores.

Choosing the trial and writing its card read only the storage; the models (and
torch with them) are read once the trial is chosen: first to check that they hold
the weights the study scored, then to merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from optuna.storages import BaseStorage

from mergetune.errors import MergetuneError
from mergetune.merge_ops.card import RECIPE_FILE, escape_markdown, reproduce_command
from mergetune.merge_ops.recipe import parse_recipes
from mergetune.search import trials
from mergetune.search.leaderboard import Leaderboard, Row, build_leaderboard, comparison_lines
from mergetune.search.storage import local_file
from mergetune.search.study_file import Study

if TYPE_CHECKING:
    from mergetune.merge_ops.disk import Progress


@dataclass
class ExportResult:
    row: Row
    output: Path
    note: Optional[str] = None  # picked by search score, or what differs from the scored candidate (re-merged unlike it)
    reproduce: str = ""  # the command that rebuilds these tensors from the exported recipe (`card.reproduce_command`)


def export_device(
    built_on: Optional[str], requested: Optional[str], cuda_available: bool, randomized: bool
) -> tuple[str, Optional[str]]:
    """Where to re-merge a trial — where it was built, unless told otherwise — and what differs when not there.

    Seeded random masks (DARE, DELLA, ...) come from the device's generator, so the
    same recipe and seed give other masks on another device type; deterministic
    methods agree up to floating-point rounding, which needs no warning.
    """
    if requested is not None:
        device = requested
    elif built_on == "cuda" and not cuda_available:
        device = "cpu"
    else:
        device = built_on or "cpu"
    kind = device.split(":")[0]
    if built_on is None or kind == built_on or not randomized:
        return device, None
    return device, (
        f"the scored candidate was built on {built_on}, this export on {kind}: the recipe's seeded random masks "
        f"differ between the two, so this model differs from the one scored. Export on a {built_on} machine "
        "for the scored model"
    )


def draws_note(stored: Optional[str], current: str, randomized: bool) -> Optional[str]:
    """What differs when the trial's masks were drawn under another scheme than this mergetune's (None: alike)."""
    if not randomized or stored == current:
        return None
    scheme = f"the {stored} scheme" if stored else "an older mergetune's scheme (one float32 per entry)"
    return (
        f"the scored candidate's random masks were drawn under {scheme}, this export's under the {current} scheme: "
        "the same seed gives other masks, so this model differs from the one scored"
    )


def pick_row(board: Leaderboard, method: Optional[str], trial: Optional[int], methods: list[str]) -> Row:
    """A given trial, else the best finalist (of `method`, one of the study's `methods`, or overall)."""
    if method is not None and method not in methods:
        raise MergetuneError(f"--method {method}: not a method of study {board.study} ({', '.join(methods)})")
    rows = [row for row in board.rows if method is None or row.method == method]
    if method is not None and not rows:
        raise MergetuneError(f"no completed {method} trials in study {board.study}")
    if trial is not None:
        matches = [row for row in rows if row.trial == trial]
        if not matches:
            raise MergetuneError(f"no completed trial {trial}" + (f" for {method}" if method else ""))
        if len(matches) > 1:
            raise MergetuneError(f"trial {trial} exists for several methods; say which with --method")
        return matches[0]
    finalists = [row for row in rows if row.final is not None]
    return (finalists or rows)[0]


def search_score_note(row: Row, method: Optional[str], trial: Optional[int]) -> Optional[str]:
    """What to say when the exported trial was picked by its search score: no finalist had a held-out one."""
    if trial is not None or row.final is not None:
        return None
    return (
        f"picked {row.method} trial {row.trial} by its search score: no {method + ' ' if method else ''}trial has a "
        "held-out score yet "
        "(the study stopped before scoring its finalists; `mergetune study run` again scores them)"
    )


def pending_note(board: Leaderboard, row: Row, trial: Optional[int]) -> Optional[str]:
    """What to say when the best trial was picked while later, better-searching trials await their held-out score."""
    if trial is not None or row.method not in board.pending:
        return None
    numbers = ", ".join(map(str, board.pending[row.method]))
    return (
        f"{row.method} trial(s) {numbers} search better but have no held-out score yet; `mergetune study run` scores "
        "them, and the best may change"
    )


def score_table(board: Leaderboard, row: Row, fingerprints: Optional[dict[str, str]] = None) -> str:
    """The model card's benchmark section: held-out scores, search scores, the comparisons, and the input
    models' fingerprints (`CheckpointSource.fingerprint`) the scores belong to."""
    shown = row.final or row.search
    label = "held-out" if row.final else "search"
    lines = [
        "## Evaluation",
        "",
        f"Found by mergetune study `{board.study}` ({row.method}, trial {row.trial}"
        + (f", {escape_markdown(row.baseline)}" if row.baseline else "")
        + f"). Scores on {label} documents (lm-eval tasks, per-document results stored in the study):",
        "",
        "| task | metric | score | ± stderr | documents |",
        "|---|---|---|---|---|",
    ]
    for name, task in shown.tasks.items():
        stderr = "" if task.stderr is None else f"{100 * task.stderr:.2f}"
        proxy = " (proxy data)" if task.proxy else ""
        lines.append(
            f"| {escape_markdown(name)}{proxy} | {escape_markdown(task.metric)} | {100 * task.value:.2f} | {stderr} | {task.n} |"
        )
    average_stderr = "" if shown.average_stderr is None else f"{100 * shown.average_stderr:.2f}"
    lines.append(f"| **average** | | **{100 * shown.average:.2f}** | {average_stderr} | |")
    if row.final:
        lines += ["", f"Search score {100 * row.search.average:.2f}; gap to held-out {100 * row.gap:+.2f} points."]
    comparisons = comparison_lines(board)
    if comparisons:
        lines += [""] + [f"- {escape_markdown(line)}" for line in comparisons]
    if fingerprints:
        lines += ["", "The scores belong to these input weights (mergetune's fingerprint of each checkpoint):", ""]
        lines += [f"- {escape_markdown(model)}: `{fingerprint}`" for model, fingerprint in fingerprints.items()]
    return "\n".join(lines) + "\n"


def check_scored_weights(study: Study, row: Row, storage: Optional[BaseStorage]) -> dict[str, str]:
    """Refuse to re-merge a trial from checkpoints whose weights are not those the study scored: the model
    would not be the scored candidate, and its card would carry another model's scores. Returns the
    fingerprints checked (none for a study stored before fingerprints were)."""
    from mergetune.merge_ops.sources import open_source

    stored = trials.stored_model_fingerprints(trials.load_optuna_study(study, row.method, storage))
    if stored is None:
        return {}
    current = {model: open_source(study.resolve(model)).fingerprint() for model in stored}
    trials.refuse_changed_models(
        stored,
        current,
        "the study scored",
        f"the export would not be the candidate it scored. Restore that checkpoint, or merge trial {row.trial}'s "
        "recipe (`mergetune leaderboard --json`: rows[].recipe and rows[].seed) knowingly with `mergetune merge --seed`",
    )
    return current


def protected_files(study: Study) -> dict[str, Path]:
    """What a command's output (an export, a leaderboard file, a report) must never overwrite: the study file,
    its storage, the models it merges (those on this machine) and the task folders it scores from."""
    files = {"study file": study.path}
    for index, model in enumerate(study.spec.models):
        files[f"model {model} (models[{index}])"] = Path(study.resolve(model))
    if study.spec.base_model:
        files[f"base model {study.spec.base_model} (base_model)"] = Path(study.resolve(study.spec.base_model))
    storage = local_file(study)
    if storage is not None:
        files["study storage"] = storage
    evaluation = study.spec.evaluation
    for path in evaluation.include_paths:
        files[f"task folder {path} (evaluation.include_paths)"] = Path(study.resolve(path))
    if evaluation.data_dir:
        files[f"task data folder {evaluation.data_dir} (evaluation.data_dir)"] = Path(study.resolve(evaluation.data_dir))
    return files


def export_trial(
    study: Study,
    out_dir: Path,
    method: Optional[str] = None,
    trial: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional["Progress"] = None,
    storage: Optional[BaseStorage] = None,
    device: Optional[str] = None,
) -> ExportResult:
    """Re-merge a trial on the device type it was built on (or `device`), saying what differs if that cannot be."""
    import torch

    from mergetune.merge_ops.disk import merge_recipe_file
    from mergetune.merge_ops.plan import validate_recipe
    from mergetune.merge_ops.sparsify import DRAWS

    board = build_leaderboard(study, storage)
    row = pick_row(board, method, trial, study.spec.methods)
    fingerprints = check_scored_weights(study, row, storage)
    recipe_file = parse_recipes(row.recipe, source=f"{study.spec.name} trial {row.trial}")
    randomized = any(validate_recipe(stage).randomized for stage in recipe_file.stages)
    device, note = export_device(row.device, device, torch.cuda.is_available(), randomized)
    drawn = draws_note(row.draws, DRAWS, randomized)
    parts = (search_score_note(row, method, trial), pending_note(board, row, trial), note, drawn)
    note = "; ".join(part for part in parts if part) or None
    merged = merge_recipe_file(
        recipe_file,
        out_dir,
        seed=row.seed,
        device=device,
        overwrite=overwrite,
        progress=progress,
        card_extra=score_table(board, row, fingerprints),
        protected=protected_files(study),
    )
    reproduce = reproduce_command(str(out_dir / RECIPE_FILE), merged.seed, len(recipe_file.stages) > 1)
    return ExportResult(row, out_dir, note, reproduce)

