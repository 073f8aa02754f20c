"""Leaderboards: every trial of a study, ranked by its held-out (final) score, recomputed from stored records.

Finalists rank first, by final score; the gap between search and final score
shows how much the search overfitted its documents. The best SLERP is compared
with the best DARE TIES — and the best of each method with its hand-written
baseline — by a paired bootstrap on the same held-out documents.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import optuna
from optuna.storages import BaseStorage, RetryFailedTrialCallback
from optuna.trial import FrozenTrial, TrialState

from mergetune.errors import MergetuneError
from mergetune.eval.evidence import PairedDifference, Record, Summary, paired_bootstrap, repeated_documents, summarize
from mergetune.search.optuna_adapter import experimental
from mergetune.search.storage import storage_errors
from mergetune.search.trials import COUNTED, StoredTrial, best_by_search, final_records, load_optuna_study
from mergetune.search.study_file import Study


@dataclass
class Row:
    method: str
    trial: int
    baseline: Optional[str]
    search: Summary
    final: Optional[Summary]
    recipe: str
    seed: int
    device: Optional[str] = None  # where the scored candidate was built
    draws: Optional[str] = None  # the random-draw scheme of its masks (None: before schemes were recorded)
    estimate: Optional[tuple[float, int]] = None  # the estimator's first estimate: (search score, from documents)
    rank: int = 0
    method_rank: int = 0

    @property
    def gap(self) -> Optional[float]:
        return None if self.final is None else self.search.average - self.final.average

    @property
    def sort_key(self) -> tuple:
        return (self.final is not None, self.final.average if self.final else self.search.average)


@dataclass
class Comparison:
    """`b` − `a` on the documents both were scored on, as the label says ("best slerp − best dare_ties": b is slerp's)."""

    label: str
    a: Row
    b: Row
    difference: PairedDifference


@dataclass
class Races:
    """How a method's candidates fared under `pruning: estimator`, and how well it estimated."""

    method: str
    raced: int  # candidates the estimator raced (not those scored in full before it could: to learn, or set the bar)
    stopped: int
    docs_scored: int  # by the raced candidates
    docs_in_full: int  # had they all been scored in full
    estimated: list[tuple[float, float]]  # (first estimate, measured search score) of raced candidates scored in full
    reached: int  # raced candidates scored in full whose measured score reached the bar they raced against

    def line(self) -> str:
        text = (
            f"{self.method}: the estimator stopped {self.stopped} of {self.raced} raced candidates, which were scored on "
            f"{100 * self.docs_scored / self.docs_in_full:.0f}% of their search documents"
        )
        if self.raced > self.stopped:
            text += f"; {self.reached} of the {self.raced - self.stopped} it let through reached the bar"
        if len(self.estimated) >= 2:
            error = sum(abs(e - m) for e, m in self.estimated) / len(self.estimated)
            ranks = rank_correlation([e for e, _ in self.estimated], [m for _, m in self.estimated])
            text += (
                f"; on the {len(self.estimated)} it let through, first estimate vs measured: mean absolute error "
                f"{100 * error:.2f} points, rank correlation {ranks:.2f}"
            )
        return text


@dataclass(frozen=True)
class Failure:
    """A trial that failed (not ranked): what the runner or the reaper stored as its reason."""

    method: str
    trial: int
    reason: str
    retried_as: Optional[int] = None  # the trial that ran its parameters again (a dead worker's, an interrupted one)


def retries(all_trials: list[FrozenTrial]) -> dict[int, int]:
    """Failed trial number → the number of the trial queued again with its parameters."""
    with experimental():
        retried = {t.number: RetryFailedTrialCallback.retried_trial_number(t) for t in all_trials}
    return {failed: retry for retry, failed in retried.items() if failed is not None}


#: Characters of a failure's reason shown in a board's lines (the stored reason holds up to 2,000).
REASON_CHARS = 160


def failure_lines(failures: list[Failure]) -> list[str]:
    """One line per method: how many trials failed, grouped by the first line of their reason."""
    lines = []
    for method in dict.fromkeys(f.method for f in failures):
        by_reason: dict[str, list[str]] = {}
        for failure in failures:
            if failure.method == method:
                first = (failure.reason.strip() or "no reason stored").splitlines()[0]
                shown = first if len(first) <= REASON_CHARS else first[: REASON_CHARS - 1] + "…"
                retry = "" if failure.retried_as is None else f" (run again as trial {failure.retried_as})"
                by_reason.setdefault(shown, []).append(f"{failure.trial}{retry}")
        count = sum(len(numbers) for numbers in by_reason.values())
        groups = "; ".join(
            f"trial{'s' if len(numbers) > 1 else ''} {', '.join(numbers)}: {reason}"
            for reason, numbers in by_reason.items()
        )
        lines.append(f"{method}: {count} failed trial{'s' if count > 1 else ''}, not ranked ({groups})")
    return lines


@dataclass
class Leaderboard:
    study: str
    rows: list[Row]
    comparisons: list[Comparison] = field(default_factory=list)
    races: list[Races] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # what a partial study lacks, method by method
    failures: list[Failure] = field(default_factory=list)
    pending: dict[str, list[int]] = field(default_factory=dict)  # finalists by search score not scored held-out yet
    warnings: list[str] = field(default_factory=list)  # stored evidence that cannot be taken at its word

    def best(self, method: str) -> Optional[Row]:
        finalists = [row for row in self.rows if row.method == method and row.final is not None]
        return finalists[0] if finalists else None

    def tasks(self) -> list[str]:
        """The per-task columns: the final evaluation's tasks once there are finalists, else the search's."""
        finals = [row.final for row in self.rows if row.final is not None]
        names: dict[str, None] = {}
        for summary in finals or [row.search for row in self.rows]:
            names.update(dict.fromkeys(summary.tasks))
        return list(names)


def build_leaderboard(study: Study, storage: Optional[BaseStorage] = None, bootstrap_iterations: int = 2000) -> Leaderboard:
    rows: list[Row] = []
    races_found: list[Races] = []
    records: dict[tuple[str, int], Record] = {}
    warnings: list[str] = []
    failures: list[Failure] = []
    pending: dict[str, list[int]] = {}
    stored = {method: load_optuna_study(study, method, storage) for method in study.spec.methods}
    if not any(stored.values()):
        raise MergetuneError(_no_such_study(study, storage))
    for method, optuna_study in stored.items():
        if optuna_study is None:
            continue
        finals = final_records(optuna_study)
        every_trial = optuna_study.get_trials(deepcopy=False)
        counted = [StoredTrial.of(t) for t in every_trial if t.state in COUNTED]
        retried_as = retries(every_trial)
        failures += [
            Failure(method, t.number, t.fail_reason or "", retried_as.get(t.number))
            for t in map(StoredTrial.of, (t for t in every_trial if t.state == TrialState.FAIL))
        ]
        races = races_of(method, counted)
        if races is not None:
            races_found.append(races)
        doubled = [t.number for t in counted if t.record is not None and repeated_documents(t.record)]
        if doubled:
            warnings.append(
                f"{method}: trial(s) {', '.join(map(str, doubled))} hold documents scored twice (an estimator race "
                "stored by mergetune before 2026-12-02), and their search scores count them twice; rank them with care"
            )
        unscored = pending_finalists(counted, finals, study.spec.evaluation.final.finalists)
        if unscored:
            pending[method] = unscored
        for trial in counted:
            if trial.state != TrialState.COMPLETE:
                continue
            final = finals.get(trial.number)
            if final is not None:
                records[(method, trial.number)] = final
            rows.append(
                Row(
                    method=method,
                    trial=trial.number,
                    baseline=trial.baseline,
                    search=summarize(trial.record),
                    final=summarize(final) if final is not None else None,
                    recipe=trial.recipe,
                    seed=trial.seed,
                    device=trial.device,
                    draws=trial.draws,
                    estimate=first_estimate(trial),
                )
            )
    if not rows:
        failed = "".join(f"; {line}" for line in failure_lines(failures))
        raise MergetuneError(f"study {study.spec.name} has no completed trials in {study.storage_display}{failed}")
    rows.sort(key=lambda row: row.sort_key, reverse=True)
    per_method: dict[str, int] = {}
    for position, row in enumerate(rows, start=1):
        row.rank = position
        per_method[row.method] = per_method.get(row.method, 0) + 1
        row.method_rank = per_method[row.method]
    board = Leaderboard(
        study.spec.name,
        rows,
        races=races_found,
        missing=missing_parts(stored, rows, pending),
        failures=failures,
        pending=pending,
        warnings=warnings,
    )
    for method in study.spec.methods:
        # The best searched finalist, also where the hand-written recipe ranks first: that loss is news too.
        searched = next((r for r in rows if r.method == method and not r.baseline and r.final is not None), None)
        hand = next((r for r in rows if r.method == method and r.baseline and r.final is not None), None)
        if searched and hand:
            best = "best" if board.best(method) is searched else "best searched"
            board.comparisons.append(
                Comparison(
                    f"{best} {method} − hand-written {method}",
                    hand,
                    searched,
                    paired_bootstrap(records[(method, hand.trial)], records[(method, searched.trial)], bootstrap_iterations),
                )
            )
    # Between methods: the study's first method (with a finalist) against each other one, in the study's order.
    bests = [(method, best) for method in study.spec.methods if (best := board.best(method)) is not None]
    first, first_row = bests[0] if bests else (None, None)
    for other, other_row in bests[1:]:
        board.comparisons.append(
            Comparison(
                f"best {first} − best {other}",
                other_row,  # a: subtracted
                first_row,
                paired_bootstrap(records[(other, other_row.trial)], records[(first, first_row.trial)], bootstrap_iterations),
            )
        )
    return board


def pending_finalists(counted: list[StoredTrial], finals: dict[int, Record], finalists: int) -> list[int]:
    """The trials the runner's `finalize` would score now (`best_by_search`) that have no held-out score, where
    the method has some: a run stopped after adding trials."""
    if not finals:
        return []
    complete = [t for t in counted if t.state == TrialState.COMPLETE]
    return [t.number for t in best_by_search(complete, finalists) if t.number not in finals]


def missing_parts(stored: dict[str, Optional[optuna.Study]], rows: list[Row], pending: dict[str, list[int]]) -> list[str]:
    """What a partial study lacks, so that a board ranked partly by search score says so: methods with no
    completed trial yet, methods whose finalists were not scored on held-out documents, and methods with
    finalists scored while later trials that are now among the best by search score were not."""
    lines = []
    for method, optuna_study in stored.items():
        mine = [row for row in rows if row.method == method]
        if not mine:
            where = "no trials stored" if optuna_study is None else "no completed trial yet"
            lines.append(f"{method}: {where}; it is missing from this board")
        elif all(row.final is None for row in mine):
            lines.append(
                f"{method}: no held-out scores yet (its finalists are scored once its trials are done, or by the next "
                f"`mergetune study run` of a run stopped before), so its {len(mine)} completed trial(s) show search "
                "scores and rank below every finalist"
            )
        elif method in pending:
            numbers = ", ".join(map(str, pending[method]))
            lines.append(
                f"{method}: trial(s) {numbers} are now among its best by search score but have no held-out score yet "
                "(finalists are scored once a run's trials are done: the next `mergetune study run` scores them), so "
                "they rank below the finalists scored earlier"
            )
    return lines


def first_estimate(trial: StoredTrial) -> Optional[tuple[float, int]]:
    """The estimate from the fewest documents the estimator made for this trial (None if it did not race it)."""
    if not trial.race or not trial.race["estimates"]:
        return None
    docs, value, _ = trial.race["estimates"][0]
    return value, docs


def races_of(method: str, trials: list[StoredTrial]) -> Optional[Races]:
    """The estimator's summary over a method's completed and pruned trials (None if it raced none)."""
    raced = [t for t in trials if t.race]
    if not raced:
        return None
    full = max(t.docs_scored for t in trials if t.state == TrialState.COMPLETE)
    estimated = [
        (estimate[0], t.value)
        for t in raced
        if t.state == TrialState.COMPLETE and (estimate := first_estimate(t)) is not None
    ]
    return Races(
        method=method,
        raced=len(raced),
        stopped=sum(t.state == TrialState.PRUNED for t in raced),
        docs_scored=sum(t.docs_scored for t in raced),
        docs_in_full=full * len(raced),
        estimated=estimated,
        reached=sum(reached_bar(t) for t in raced),
    )


def reached_bar(trial: StoredTrial) -> bool:
    """A raced trial the estimator let through whose measured score reached the bar it raced against."""
    return trial.state == TrialState.COMPLETE and trial.value >= trial.race["bar"]


def rank_correlation(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); 0 when either side is constant."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        start = 0
        while start < len(order):
            end = start
            while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
                end += 1
            for position in order[start : end + 1]:
                result[position] = (start + end) / 2
            start = end + 1
        return result

    ra, rb = ranks(a), ranks(b)
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    covariance = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb))
    spread = (sum((x - mean_a) ** 2 for x in ra) * sum((y - mean_b) ** 2 for y in rb)) ** 0.5
    return covariance / spread if spread else 0.0


def _no_such_study(study: Study, storage: Optional[BaseStorage]) -> str:
    """Which studies the storage does hold, for when it holds none of this study's (a wrong --storage or name)."""
    with storage_errors(study.storage_url):
        stored = optuna.get_all_study_names(storage=storage or study.storage_url)
    names = sorted({name.rsplit(".", 1)[0] for name in stored})  # Optuna's names are `study.method`
    held = f"it holds {', '.join(names)}" if names else "it holds no study"
    return f"study {study.spec.name} is not in {study.storage_display} ({held}); check the study's name and storage"


def _percent(value: Optional[float]) -> str:
    return "" if value is None else f"{100 * value:.2f}"


def table_rows(board: Leaderboard, top: Optional[int] = None) -> tuple[list[str], list[list[str]]]:
    """Column headers and cells shared by the terminal, Markdown and CSV renderings."""
    tasks = board.tasks()
    proxies = {name for row in board.rows for name, task in (row.final or row.search).tasks.items() if task.proxy}
    headers = ["rank", "method", "trial", "origin", "scored on"] + [f"{t} (proxy)" if t in proxies else t for t in tasks]
    headers += ["final avg", "± se", "search avg", "gap"]
    estimated = any(row.estimate for row in board.rows)
    if estimated:
        headers.append("estimated (docs)")
    cells = []
    for row in board.rows[:top]:
        shown = row.final or row.search
        cells.append(
            [str(row.rank), row.method, str(row.trial), "baseline" if row.baseline else "search"]
            + ["held-out" if row.final else "search"]  # which documents the task columns' scores come from
            + [_percent(shown.tasks[t].value) if t in shown.tasks else "" for t in tasks]
            + [
                _percent(row.final.average) if row.final else "—",
                _percent(row.final.average_stderr) if row.final else "",
                _percent(row.search.average),
                _percent(row.gap) if row.gap is not None else "",
            ]
            + ([f"{_percent(row.estimate[0])} ({row.estimate[1]})" if row.estimate else ""] if estimated else [])
        )
    return headers, cells


def comparison_lines(board: Leaderboard) -> list[str]:
    """The paired comparisons, what the estimator did (if the study used it), what a partial study lacks, the
    failed trials, then warnings about stored evidence."""
    return [
        f"{c.label}: {100 * c.difference.mean:+.2f} points "
        f"(95% CI {100 * c.difference.low:+.2f} … {100 * c.difference.high:+.2f}, {c.difference.n_docs} paired documents)"
        for c in board.comparisons
    ] + [races.line() for races in board.races] + board.missing + failure_lines(board.failures) + board.warnings


def to_markdown(board: Leaderboard, top: Optional[int] = None) -> str:
    headers, cells = table_rows(board, top)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in cells]
    lines += [""] + [f"- {line}" for line in comparison_lines(board)]
    return "\n".join(lines) + "\n"


def to_csv(board: Leaderboard) -> str:
    headers, cells = table_rows(board)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(headers)
    writer.writerows([["" if cell == "—" else cell for cell in row] for row in cells])  # empty, not a dash, for a number
    return buffer.getvalue()


def to_json(board: Leaderboard) -> dict[str, Any]:
    def summary(value: Optional[Summary]) -> Optional[dict]:
        return None if value is None else asdict(value)

    return {
        "study": board.study,
        "rows": [
            {
                "rank": row.rank,
                "method_rank": row.method_rank,
                "method": row.method,
                "trial": row.trial,
                "baseline": row.baseline,
                "search": summary(row.search),
                "final": summary(row.final),
                "gap": row.gap,
                "estimate": None if row.estimate is None else {"value": row.estimate[0], "docs": row.estimate[1]},
                "recipe": row.recipe,
                # With the recipe, what rebuilds the scored tensors: `mergetune merge recipe out --seed S` on `device`
                # (random masks: DARE, DELLA), drawn under the `draws` scheme.
                "seed": row.seed,
                "device": row.device,
                "draws": row.draws,
            }
            for row in board.rows
        ],
        "comparisons": [
            {
                "label": c.label,
                "of": {"method": c.b.method, "trial": c.b.trial},  # the difference is this row's score ...
                "minus": {"method": c.a.method, "trial": c.a.trial},  # ... minus this one's
                **asdict(c.difference),
            }
            for c in board.comparisons
        ],
        "races": [asdict(races) for races in board.races],
        "missing": board.missing,
        "failures": [asdict(failure) for failure in board.failures],
        "warnings": board.warnings,
    }
