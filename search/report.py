"""Pictures of a study: optimisation history, best t-curves, weights/densities, importances — PNG and one HTML page."""

from __future__ import annotations

import html
import json
import logging
import math
import re
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import yaml  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from mergetune.errors import MergetuneError  # noqa: E402
from mergetune.merge_ops.parameters import check_value, coercer, evaluate_setting, numeric_leaves  # noqa: E402
from mergetune.merge_ops.recipe import ParameterSetting, Recipe, recipe_from_dict  # noqa: E402
from mergetune.search.leaderboard import Leaderboard, build_leaderboard, comparison_lines, table_rows  # noqa: E402
from mergetune.search.storage import dashboard_target  # noqa: E402
from mergetune.search.study_file import Study  # noqa: E402
from mergetune.search.trials import COUNTED, StoredTrial, is_baseline, load_optuna_study  # noqa: E402

log = logging.getLogger(__name__)
DEFAULT_LAYERS = 32


def layer_count(study: Study) -> int:
    """The first model's layer count (from its local config), for drawing curves across layers.

    Only the drawing depends on it, so a config that can't be read is a warning, not a failed report.
    """
    config = Path(study.resolve(study.spec.models[0])) / "config.json"
    if not config.exists():
        return DEFAULT_LAYERS
    try:
        layers = json.loads(config.read_text(encoding="utf-8")).get("num_hidden_layers", DEFAULT_LAYERS)
    except (OSError, ValueError, AttributeError) as error:  # unreadable, not JSON, not an object
        log.warning("cannot read %s (%s); drawing curves over %d layers", config, error, DEFAULT_LAYERS)
        return DEFAULT_LAYERS
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        log.warning("%s: num_hidden_layers is %r; drawing curves over %d layers", config, layers, DEFAULT_LAYERS)
        return DEFAULT_LAYERS
    return layers


LEGEND_INSIDE = 6  # more entries than this go beside the plot, where they cover nothing


def _save(figure, axis, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    """Label, save as PNG and close a figure."""
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    if len(axis.get_legend_handles_labels()[1]) > LEGEND_INSIDE:  # many curves (a value per filter and model)
        axis.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_history(optuna_study: optuna.Study, method: str, path: Path) -> Path:
    figure, axis = plt.subplots(figsize=(6, 3.5))
    complete = optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    pruned = [
        (t.number, 100 * t.intermediate_values[t.last_step])
        for t in optuna_study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        if t.last_step is not None
    ]
    axis.scatter([t.number for t in complete], [100 * t.value for t in complete], s=14, label="completed")
    if pruned:
        axis.scatter(*zip(*pruned), marker="x", s=14, label="pruned (its last rung's score, or estimate)")
    best, line = float("-inf"), []
    for trial in sorted(complete, key=lambda t: t.number):
        best = max(best, trial.value)
        line.append((trial.number, 100 * best))
    if line:
        axis.step(*zip(*line), where="post", color="black", linewidth=1, label="best so far")
    for trial in complete:
        if is_baseline(trial):
            axis.axhline(100 * trial.value, linestyle="--", color="gray", linewidth=1, label="hand-written baseline")
    return _save(figure, axis, path, "trial", "search score (avg %)", f"{method}: optimisation history")


def plot_estimates(optuna_study: optuna.Study, method: str, path: Path) -> Optional[Path]:
    """The estimator's first estimate of each raced candidate against its measured search score (None if it raced none)."""
    raced = [StoredTrial.of(t) for t in optuna_study.get_trials(deepcopy=False, states=COUNTED)]
    raced = [t for t in raced if t.race and t.race["estimates"]]
    if not raced:
        return None
    figure, axis = plt.subplots(figsize=(6, 3.5))
    measured = [t for t in raced if t.state == TrialState.COMPLETE]
    stopped = [t for t in raced if t.state == TrialState.PRUNED]
    if measured:
        first = [t.race["estimates"][0] for t in measured]
        axis.errorbar(
            [100 * value for _, value, _ in first],
            [100 * t.value for t in measured],
            # An infinite stderr (better than every completed trial where scored) gets no bar.
            xerr=[100 * t.race["z"] * stderr if math.isfinite(stderr) else 0 for t, (_, _, stderr) in zip(measured, first)],
            fmt="o",
            markersize=3,
            linewidth=0.8,
            label="scored in full: first estimate vs measured",
        )
        low = min(100 * min(v for _, v, _ in first), 100 * min(t.value for t in measured))
        high = max(100 * max(v for _, v, _ in first), 100 * max(t.value for t in measured))
        axis.plot([low, high], [low, high], color="gray", linewidth=0.8)
    if stopped:
        last = [t.race["estimates"][-1] for t in stopped]
        axis.scatter(
            [100 * value for _, value, _ in last], [100 * t.race["bar"] for t in stopped], marker="x", s=14,
            label="stopped: last estimate vs the bar it missed",
        )
    return _save(figure, axis, path, "estimated search score (avg %)", "measured score / bar (avg %)", f"{method}: the estimator")


def curve_settings(recipe: Recipe) -> list[tuple[str, ParameterSetting]]:
    """Every numeric parameter of the recipe, labelled with its owner: a flag (normalize, nuslerp_flatten) is
    not a curve, whatever its name."""
    as_float = coercer(float)
    scopes = [("", recipe.parameters or {})] + [
        (Path(model.model).name + " ", model.parameters or {}) for model in recipe.models or []
    ]
    return [
        (f"{owner}{name}", setting)
        for owner, parameters in scopes
        for name, setting in parameters.items()
        if not any(check_value(as_float, value) for value in numeric_leaves(setting))
    ]


def plot_curves(recipe_text: str, method: str, layers: int, path: Path) -> Path:
    """Values of every gradient parameter across layers, per filter, for one recipe."""
    as_float = coercer(float)
    positions = [index / (layers - 1) if layers > 1 else 1.0 for index in range(layers)]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for label, setting in curve_settings(recipe_from_dict(yaml.safe_load(recipe_text))):
        entries = setting if isinstance(setting, list) and setting and hasattr(setting[0], "filter") else None
        filters = [entry.filter or "other" for entry in entries] if entries else [None]
        for name in filters:
            probe = f"layers.0.{name}" if name not in (None, "other") else "layers.0.other"
            values = [evaluate_setting(probe, setting, t, as_float) for t in positions]
            axis.plot(range(layers), values, marker=".", label=label + (f" [{name}]" if name else ""))
    axis.set_ylim(-0.05, 1.05)
    return _save(figure, axis, path, "layer", "value", f"best {method}: parameters across layers")


IMPORTANCE_MIN_TRIALS = 10  # PED-ANOVA compares the best tenth of the trials with the rest: below this, noise


def plot_importances(optuna_study: optuna.Study, method: str, path: Path) -> Path | str:
    """PED-ANOVA importances, named so the title cannot drift from Optuna's default evaluator (fANOVA once);
    none from fewer than IMPORTANCE_MIN_TRIALS completed trials, whose bars would look like a finding: then
    why not, for the page to say."""
    completed = len(optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if completed < IMPORTANCE_MIN_TRIALS:
        return (
            f"no parameter importances for {method}: {completed} completed trials, fewer than "
            f"{IMPORTANCE_MIN_TRIALS} (with fewer, its bars would be noise that looks like a finding)"
        )
    try:
        with warnings.catch_warnings():  # Optuna's own "too few trials" notes: the rule above says it
            warnings.simplefilter("ignore", UserWarning)
            evaluator = optuna.importance.PedAnovaImportanceEvaluator()
            importances = optuna.importance.get_param_importances(optuna_study, evaluator=evaluator)
    except (RuntimeError, ValueError, ImportError) as error:
        return f"no parameter importances for {method}: {error}"
    top = list(importances.items())[:15]
    figure, axis = plt.subplots(figsize=(6, 0.3 * len(top) + 1.2))
    axis.barh([name for name, _ in reversed(top)], [value for _, value in reversed(top)])
    axis.set_title(f"{method}: parameter importances (PED-ANOVA)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _html_table(board: Leaderboard) -> str:
    headers, cells = table_rows(board)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


REPORT_TITLE = " — mergetune report</title>"  # how a report's index.html says it is one, for the next report


def check_report_dir(out_dir: Path) -> None:
    """A report may replace an earlier report's files, not someone's own page in the folder it is drawn into."""
    index = out_dir / "index.html"
    if index.is_file() and REPORT_TITLE not in index.read_text(encoding="utf-8", errors="replace"):
        raise MergetuneError(
            f"report directory {out_dir}: holds an index.html that is not a mergetune report; the report would "
            "replace it, choose another directory"
        )


def earlier_figures(out_dir: Path) -> set[str]:
    """The figures an earlier report in `out_dir` shows (its index.html's images): this report replaces them all."""
    index = out_dir / "index.html"
    if not index.is_file():
        return set()
    names = {html.unescape(name) for name in re.findall(r'<img src="([^"]+)"', index.read_text(encoding="utf-8", errors="replace"))}
    return {name for name in names if name == Path(name).name and name.endswith(".png")}


def write_report(study: Study, out_dir: Path, storage=None) -> Path:
    """Draw the report in a hidden folder beside `out_dir`, then move it into place: a failure (a full disk,
    a study without trials) leaves no half-drawn report."""
    board = build_leaderboard(study, storage)
    try:  # creating the hidden folder fails too where `out_dir` can't be written (read-only, /proc)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(
            prefix=f".{out_dir.name}.partial-", dir=out_dir.parent, ignore_cleanup_errors=True
        ) as folder:
            staging = Path(folder)
            staging.chmod(0o755)  # mkdtemp's folder is private; the report is not
            _draw(study, board, staging, storage)
            if out_dir.exists():
                drawn = {file.name for file in staging.iterdir()}
                for name in earlier_figures(out_dir) - drawn:  # not left beside a page that no longer shows them
                    (out_dir / name).unlink(missing_ok=True)
                for file in staging.iterdir():
                    os.replace(file, out_dir / file.name)
            else:
                staging.rename(out_dir)
    except OSError as error:
        raise MergetuneError(f"cannot write {out_dir}: {error.strerror or error}; nothing was written there") from None
    return out_dir / "index.html"


def _draw(study: Study, board: Leaderboard, out_dir: Path, storage) -> None:
    """The figures and index.html of the report, into `out_dir`."""
    layers = layer_count(study)
    sections = []
    for method in study.spec.methods:
        optuna_study = load_optuna_study(study, method, storage)
        if optuna_study is None:
            continue
        images = [plot_history(optuna_study, method, out_dir / f"{method}-history.png")]
        best = board.best(method) or next((row for row in board.rows if row.method == method), None)
        if best is not None:
            images.append(plot_curves(best.recipe, method, layers, out_dir / f"{method}-curves.png"))
        estimates = plot_estimates(optuna_study, method, out_dir / f"{method}-estimates.png")
        if estimates:
            images.append(estimates)
        importances, note = plot_importances(optuna_study, method, out_dir / f"{method}-importances.png"), ""
        if isinstance(importances, Path):
            images.append(importances)
        else:
            log.info(importances)
            note = f"<p>{html.escape(importances)}</p>"
        figures = "".join(f'<img src="{html.escape(image.name)}" alt="{html.escape(image.stem)}">' for image in images)
        sections.append(f"<h2>{html.escape(method)}</h2>{figures}{note}")
    comparisons = "".join(f"<li>{html.escape(line)}</li>" for line in comparison_lines(board))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(study.spec.name)}{REPORT_TITLE}"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 6px}img{max-width:600px;margin:6px}</style></head><body>"
        f"<h1>Study {html.escape(study.spec.name)}</h1><h2>Leaderboard</h2>{_html_table(board)}"
        f"<ul>{comparisons}</ul>{''.join(sections)}"
        "<p>Interactive view: <code>optuna-dashboard " + html.escape(dashboard_target(study)) + "</code></p>"
        "</body></html>"
    )
    (out_dir / "index.html").write_text(page, encoding="utf-8")
