"""Suites and lm-eval task loading: what gets scored, with lm-eval's own task definitions.

Indexing lm-eval's ~15k task configs takes seconds (10-14 s on a 2-core CPU), so
one `TaskManager` is built per process (per set of include paths) and shared by
every evaluator, and tasks that are all plain tasks of the include paths (a
study of its own tasks, local copies of single benchmarks) are loaded from an
index of those paths alone, which takes milliseconds.
A suite is a list of `SuiteTask`s: an lm-eval task, tag or group name, its
few-shot count and the metric that stands for it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from lm_eval.api.group import Group
from lm_eval.api.task import Task
from lm_eval.tasks import TaskManager

from mergetune.errors import MergetuneError
from mergetune.eval.lm_eval_adapter import TASK_INDEX_LOGGER, declared_output_type, skipped_task_files
from mergetune.eval.local_data import (
    PROXY_TASKS,
    check_data_dir,
    existing_data_dir,
    local_task_families,
    local_task_configs,
    local_task_dir,
    missing_folder_message,
    missing_split_files,
    missing_split_message,
)
from mergetune.eval.quiet import quieted

log = logging.getLogger(__name__)

#: Output types scored from log-likelihoods; generation tasks are not supported.
SUPPORTED_OUTPUT_TYPES = ("multiple_choice", "loglikelihood")


@dataclass(frozen=True)
class SuiteTask:
    """One scored entry: an lm-eval task, tag or group, its shots and headline metric.

    `num_fewshot=None` keeps the task config's own count (0 when it has none);
    `metric=None` takes the task's first metric (a group's first aggregate metric).
    """

    name: str
    num_fewshot: int | None = None
    metric: str | None = None


#: The Open LLM Leaderboard v1 suite, as the merges this project serves are compared.
SUITES: dict[str, tuple[SuiteTask, ...]] = {
    "leaderboard": (
        SuiteTask("arc_challenge", 25, "acc_norm"),
        SuiteTask("hellaswag", 10, "acc_norm"),
        SuiteTask("truthfulqa_mc2", 0, "acc"),
        SuiteTask("mmlu", 5, "acc"),
        SuiteTask("winogrande", 5, "acc"),
    ),
}

_HELLASWAG_PROXY = "hellaswag_proxy_llamacpp"
SHOWN_SKIPPED_FILES = 3  # task YAMLs lm-eval skipped, named when a task is unknown


@dataclass(frozen=True)
class Origins:
    """Where the data and task directories were set, as messages name them: command-line options, or a
    study file's fields."""

    data_dir: str = "--data-dir"
    include_paths: str = "--include-path"
    tasks: str = ""  # where task names were given, when not on the command line

    @classmethod
    def study_file(cls, path: Path) -> Origins:
        return cls(
            f"{path}: evaluation.data_dir",
            f"{path}: evaluation.include_paths",
            f"{path}: evaluation (tasks, suite or final.tasks)",
        )


@dataclass
class LoadedTask:
    """A suite entry with its lm-eval objects: leaf tasks and, for a group, the group.

    A group's documents are sampled per leaf (stratified) and its score is
    aggregated the way lm-eval aggregates the group.
    """

    name: str
    metric: str
    #: None when a group's leaves run with different counts
    num_fewshot: int | None
    leaves: dict[str, Task]
    group: Group | None = None

    @property
    def proxy(self) -> str | None:
        """Why this entry's score is only an approximation, or None."""
        return PROXY_TASKS.get(self.name)


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval logs a hint about `--metadata` for every task with a `custom_dataset`
    (all local-data tasks); it does not apply here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed to `--metadata`" not in record.getMessage()


_CUSTOM_DATASET_NOTICE = _DropCustomDatasetNotice()


@functools.lru_cache(maxsize=None)
def task_manager(include_paths: tuple[str, ...] = (), defaults: bool = True) -> TaskManager:
    """The process-wide lm-eval task index for these include paths, with lm-eval's own tasks or without (built once)."""
    logging.getLogger("lm_eval.api.task").addFilter(_CUSTOM_DATASET_NOTICE)
    # Local-data configs deliberately shadow lm-eval's tasks of the same name;
    # one "overrides existing task" warning per task would only be noise.
    with quieted(TASK_INDEX_LOGGER):
        manager = TaskManager(include_path=list(include_paths) or None, include_defaults=defaults)
    log.info("lm-eval task index built: %d names", len(manager.all_tasks))
    return manager


def task_manager_for(include_paths: tuple[str, ...], names: Sequence[str]) -> TaskManager:
    """The include paths' own index when every name is a plain task there, else the index with lm-eval's tasks.

    A group or tag may gather tasks from anywhere (the local `mmlu` is lm-eval's group over local subjects), and
    a name not in the include paths is lm-eval's or unknown: those take the full index, as before.
    """
    if include_paths:
        own = task_manager(include_paths, defaults=False)
        if set(names) <= set(own.all_subtasks):
            return own
    return task_manager(include_paths)


def _user_paths(user_paths: Sequence[str | Path], origins: Origins) -> list[str]:
    """The user's task directories, resolved; one that is missing is named with where it was set."""
    paths = []
    for path in user_paths:
        path = Path(path).expanduser().resolve()
        if not path.is_dir():
            raise MergetuneError(f"task directory {path} ({origins.include_paths}) does not exist")
        paths.append(str(path))
    return paths


def include_paths(
    data_dir: Path | None, user_paths: Sequence[str | Path], origins: Origins = Origins()
) -> tuple[str, ...]:
    """lm-eval include paths: the local-data configs first, so a user's own YAMLs win."""
    local = [str(local_task_dir(Path(data_dir), origins.data_dir))] if data_dir is not None else []
    return (*local, *_user_paths(user_paths, origins))


def check_task_sources(
    suite: str | None, tasks: Sequence[str], data_dir: Path | None, user_paths: Sequence[str | Path], origins: Origins
) -> None:
    """What `load_tasks` would refuse about the data and task directories, said before anything slow: for
    callers that load models before the evaluator (a study); `load_tasks` names the same `origins`."""
    if data_dir is not None:
        check_data_dir(data_dir, origins.data_dir)
    _user_paths(user_paths, origins)
    suite_tasks(suite, tasks, data_dir, origins)


def suite_tasks(
    suite: str | None, tasks: Sequence[str], data_dir: Path | None, origins: Origins = Origins()
) -> list[SuiteTask]:
    """The entries to score: the named suite's, then any extra task names.

    With local data that has only the HellaSwag stand-in, the suite's hellaswag
    entry is scored on the stand-in, under the stand-in's (proxy) name. A task
    whose dataset folder lacks a split file is named with the file.
    """
    if suite is not None and suite not in SUITES:
        raise MergetuneError(f"unknown suite {suite!r}; known suites: {', '.join(SUITES)}")
    entries = list(SUITES[suite]) if suite else []
    if data_dir is not None:
        data_dir = existing_data_dir(data_dir, origins.data_dir)
        incomplete = missing_split_files(data_dir)
        for name in (*(e.name for e in entries), *tasks):
            if name in incomplete:
                raise MergetuneError(missing_split_message(origins.data_dir, data_dir, name, *incomplete[name]))
        local = local_task_configs(data_dir)
        if "hellaswag" not in local and _HELLASWAG_PROXY in local:
            entries = [
                SuiteTask(_HELLASWAG_PROXY, e.num_fewshot, e.metric) if e.name == "hellaswag" else e
                for e in entries
            ]
            if any(e.name == _HELLASWAG_PROXY for e in entries):
                log.warning("hellaswag is scored on %s: %s", _HELLASWAG_PROXY, PROXY_TASKS[_HELLASWAG_PROXY])
    known = {e.name for e in entries}
    entries += [SuiteTask(name) for name in tasks if name not in known]
    if data_dir is not None:
        for entry in entries:
            missing = missing_folder_message(origins.data_dir, data_dir, entry.name)
            if missing:
                raise MergetuneError(missing)
    if not entries:
        raise MergetuneError("nothing to score: give a suite or task names")
    return entries


def _fewshot(task: Task, suite_shots: int | None, override: int | None) -> int:
    """Shots for one leaf: lm-eval's rule (a config that pins 0 shots keeps 0), then the suite's."""
    configured = task.get_config("num_fewshot")
    if override is not None:
        return 0 if configured == 0 else override
    if suite_shots is not None:
        return suite_shots
    return configured or 0


def _check_output_type(name: str, output_type: str) -> None:
    if output_type not in SUPPORTED_OUTPUT_TYPES:
        raise MergetuneError(
            f"task {name!r} has output type {output_type!r}; mergetune scores "
            f"log-likelihood tasks only ({', '.join(SUPPORTED_OUTPUT_TYPES)})"
        )


def _check_scorable(task: Task) -> None:
    _check_output_type(task.task_name, task.OUTPUT_TYPE)
    if task.config.filter_list is not None:
        raise MergetuneError(f"task {task.task_name!r} defines response filters; they are not supported")


def _skipped_files_note(manager: TaskManager) -> str:
    """The include paths' YAML files lm-eval could not read (its index skips them silently), for a message."""
    roots = manager.include_path or []
    skipped = [(path, why) for root in roots for path, why in skipped_task_files(root).items()]
    if not skipped:
        return ""
    shown = "; ".join(f"{path}: {why}" for path, why in skipped[:SHOWN_SKIPPED_FILES])
    more = f" (and {len(skipped) - SHOWN_SKIPPED_FILES} more)" if len(skipped) > SHOWN_SKIPPED_FILES else ""
    return f"; lm-eval skipped task files it could not read: {shown}{more}"


def _load(manager: TaskManager, name: str, origins: Origins) -> dict:
    if name not in manager.task_index:
        raise MergetuneError(
            (f"{origins.tasks}: " if origins.tasks else "")
            + f"unknown task {name!r}: not an lm-eval task, group or tag, nor in the include paths"
            + _skipped_files_note(manager)
        )
    declared = declared_output_type(manager, name)
    if declared is not None:  # before its data: a hub dataset offline is a minute of retries first
        _check_output_type(name, declared)
    try:
        return manager.load([name])
    except MergetuneError:  # our own data loader's, already naming the file
        raise
    except Exception as error:  # lm-eval raises whatever the dataset loader raised
        raise MergetuneError(
            f"task {name!r} could not be loaded ({type(error).__name__}: {error}); without network access, point "
            f"--data-dir at local copies of the data (it serves {', '.join(local_task_families())})"
        ) from error


def load_task(manager: TaskManager, entry: SuiteTask, num_fewshot: int | None, origins: Origins = Origins()) -> list[LoadedTask]:
    """lm-eval objects for one suite entry, few-shot counts set.

    A group with an aggregate metric stays one entry; a tag, or a group without
    aggregation, becomes one entry per leaf task.
    """
    loaded = _load(manager, entry.name, origins)
    tasks: dict[str, Task] = loaded["tasks"]
    group = loaded.get("groups", {}).get(entry.name)
    for task in tasks.values():
        _check_scorable(task)
        task.set_config(key="num_fewshot", value=_fewshot(task, entry.num_fewshot, num_fewshot))
    if group is not None and group.has_aggregation:
        metric = entry.metric or group.aggregate_metric_list[0].metric
        shots = {task.get_config("num_fewshot") for task in tasks.values()}
        return [LoadedTask(entry.name, metric, shots.pop() if len(shots) == 1 else None, tasks, group)]
    result = []
    for name, task in tasks.items():
        metric = entry.metric or next(iter(task.aggregation()))
        if metric not in task.aggregation():
            raise MergetuneError(f"task {name!r} has no metric {metric!r} (it has: {', '.join(task.aggregation())})")
        result.append(LoadedTask(name, metric, task.get_config("num_fewshot"), {name: task}))
    return result
