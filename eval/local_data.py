"""Offline evaluation data: lm-eval task configs that read local JSON Lines files.

Air-gapped clusters cannot reach the Hugging Face hub, so `--data-dir DIR` points
the suite at JSONL copies of the benchmark datasets (one folder per dataset, one
file per split, hub field schemas; see `LOCAL_DATASETS`). For every task whose
files exist we write a small YAML that *includes lm-eval's own task config* and
only swaps the data source, so prompts, few-shot rules and metrics stay lm-eval's.
The generated directory is an ordinary lm-eval `include_path`: the `lm_eval` CLI
reads the same files, which is what the parity tests rely on.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import lm_eval.tasks
import yaml

from mergetune.errors import MergetuneError

log = logging.getLogger(__name__)

LM_EVAL_TASKS_DIR = Path(lm_eval.tasks.__file__).resolve().parent

#: Tasks whose local data is a lossy stand-in for the real benchmark; their
#: scores are labelled as proxies wherever they appear.
PROXY_TASKS: Mapping[str, str] = {
    "hellaswag_proxy_llamacpp": "lossy HellaSwag stand-in (llama.cpp text dump); not HellaSwag",
}


@dataclass(frozen=True)
class LocalDataset:
    """One folder of the local data layout and the lm-eval task configs it feeds."""

    folder: str
    splits: tuple[str, ...]
    #: task name -> lm-eval YAML (relative to lm_eval/tasks) that the local config includes
    tasks: Mapping[str, str]
    #: extra config keys, for data whose schema or splits differ from the hub's
    overrides: Mapping[str, Any] = field(default_factory=dict)


LOCAL_DATASETS: tuple[LocalDataset, ...] = (
    LocalDataset("arc_challenge", ("train", "validation", "test"), {"arc_challenge": "arc/arc_challenge.yaml"}),
    LocalDataset("arc_easy", ("train", "validation", "test"), {"arc_easy": "arc/arc_easy.yaml"}),
    LocalDataset(
        "truthfulqa_mc",
        ("validation",),
        {"truthfulqa_mc1": "truthfulqa/truthfulqa_mc1.yaml", "truthfulqa_mc2": "truthfulqa/truthfulqa_mc2.yaml"},
    ),
    LocalDataset("winogrande", ("train", "validation"), {"winogrande": "winogrande/default.yaml"}),
    LocalDataset("hellaswag", ("train", "validation"), {"hellaswag": "hellaswag/hellaswag.yaml"}),
    LocalDataset(
        "hellaswag_proxy_llamacpp",
        ("validation",),
        {"hellaswag_proxy_llamacpp": "hellaswag/hellaswag.yaml"},
        # No train split: shots come from validation, never the scored document itself
        # (lm-eval excludes the eval doc only when the few-shot split is the test split).
        overrides={
            "training_split": None,
            "validation_split": None,
            "test_split": "validation",
            "fewshot_split": "validation",
            "dataset_kwargs": {"schema": "hellaswag_proxy"},
        },
    ),
)

_MMLU = LocalDataset("mmlu", ("dev", "validation", "test"), {})
_MMLU_GROUP = "mmlu"  # the lm-eval group of the MMLU subject tasks
_FUNCTION_KEYS = ("custom_dataset",)


def _mmlu_subject_configs() -> dict[str, tuple[str, str]]:
    """task name -> (lm-eval YAML, subject) for every MMLU subject task lm-eval defines."""
    configs = {}
    for path in sorted((LM_EVAL_TASKS_DIR / "mmlu" / "default").glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        configs[cfg["task"]] = (str(path.relative_to(LM_EVAL_TASKS_DIR)), cfg["dataset_name"])
    return configs


def _render(config: dict[str, Any]) -> str:
    """YAML text for one task config; callables are written as lm-eval `!function` tags."""
    lines = []
    for key, value in config.items():
        if key in _FUNCTION_KEYS:
            lines.append(f"{key}: !function {value}")
        else:
            lines.append(f"{key}: {json.dumps(value)}")  # JSON is valid YAML
    return "\n".join(lines) + "\n"


def _task_config(
    name: str, included_yaml: str, folder: Path, splits: tuple[str, ...], extra: Mapping[str, Any]
) -> dict[str, Any]:
    data_files = {split: str(folder / f"{split}.jsonl") for split in splits}
    return {
        "include": str(LM_EVAL_TASKS_DIR / included_yaml),
        "task": name,
        # Keep lm-eval's tags and groups pointing at names, not at our files.
        "tag": None,
        "dataset_path": str(folder),
        "dataset_name": None,
        "custom_dataset": "mergetune.eval.local_data.load_split_files",
        "dataset_kwargs": {"data_files": data_files, **extra.get("dataset_kwargs", {})},
        **{key: value for key, value in extra.items() if key != "dataset_kwargs"},
    }


def _missing_split(folder: Path, dataset: LocalDataset) -> str | None:
    """The first of the dataset's splits without its `<split>.jsonl` in `folder`, else None."""
    return next((split for split in dataset.splits if not (folder / f"{split}.jsonl").is_file()), None)


def local_task_configs(data_dir: Path) -> dict[str, dict[str, Any]]:
    """Config of every task the data directory can feed, keyed by task name."""
    configs: dict[str, dict[str, Any]] = {}
    for dataset in LOCAL_DATASETS:
        folder = data_dir / dataset.folder
        if _missing_split(folder, dataset) is not None:
            continue
        for name, included in dataset.tasks.items():
            configs[name] = _task_config(name, included, folder, dataset.splits, dataset.overrides)
    mmlu_folder = data_dir / _MMLU.folder
    if _missing_split(mmlu_folder, _MMLU) is None:
        for name, (included, subject) in _mmlu_subject_configs().items():
            extra = {"dataset_kwargs": {"subject": subject}}
            configs[name] = _task_config(name, included, mmlu_folder, _MMLU.splits, extra)
    return configs


def missing_split_files(data_dir: Path) -> dict[str, tuple[str, Path]]:
    """task name -> (split, file) for each task whose dataset folder is in `data_dir` but lacks a split file.

    Such a folder is not served (an lm-eval task cannot run without its splits); the
    user who made it meant it to be, so the tasks it was for are named, not skipped.
    """
    missing: dict[str, tuple[str, Path]] = {}
    for dataset in (*LOCAL_DATASETS, _MMLU):
        folder = data_dir / dataset.folder
        split = _missing_split(folder, dataset)
        if folder.is_dir() and split is not None:
            names = [*dataset.tasks] or [_MMLU_GROUP, *_mmlu_subject_configs()]
            missing.update(dict.fromkeys(names, (split, folder / f"{split}.jsonl")))
    return missing


def missing_split_message(origin: str, data_dir: Path, task: str, split: str, file: Path) -> str:
    return f"{origin} {data_dir}: task {task!r} needs its {split!r} split, {file}, which does not exist"


def missing_folder_message(origin: str, data_dir: Path, task: str) -> str | None:
    """What to say when `task` is one the local layout serves but `data_dir` lacks its folder (None otherwise):
    lm-eval would go to the hub for it, which an offline machine retries for minutes before failing."""
    named = [d for d in LOCAL_DATASETS if task in d.tasks]
    dataset = named[0] if named else _MMLU if task == _MMLU_GROUP or task in _mmlu_subject_configs() else None
    if dataset is None or (data_dir / dataset.folder).is_dir():
        return None
    files = ", ".join(f"{split}.jsonl" for split in dataset.splits)
    return (
        f"{origin} {data_dir}: has no data for task {task!r} (a folder {data_dir / dataset.folder} with {files}); "
        "add it, or name only tasks it has"
    )


def local_task_families() -> list[str]:
    """The tasks a data directory can serve, for messages: every dataset's tasks, then MMLU and its subjects."""
    return [name for dataset in LOCAL_DATASETS for name in dataset.tasks] + [f"{_MMLU_GROUP} and its subjects"]


def existing_data_dir(data_dir: str | Path, origin: str = "--data-dir") -> Path:
    """`data_dir` resolved, if it is a directory."""
    data_dir = Path(data_dir).expanduser().resolve()
    if not data_dir.is_dir():
        raise MergetuneError(f"{origin} {data_dir} does not exist or is not a directory")
    return data_dir


def check_data_dir(data_dir: str | Path, origin: str = "--data-dir") -> Path:
    """`data_dir` resolved, if it holds a dataset folder (a folder missing a split file is named by the tasks that
    need it, `suite_tasks`: not by another task); else one MergetuneError listing the folders expected.

    `origin` says where the setting came from ("--data-dir", or a study file's field).
    """
    data_dir = existing_data_dir(data_dir, origin)
    if not local_task_configs(data_dir) and not missing_split_files(data_dir):
        expected = ", ".join(d.folder for d in (*LOCAL_DATASETS, _MMLU))
        raise MergetuneError(
            f"{origin} {data_dir} holds none of the known datasets "
            f"(expected folders with <split>.jsonl files: {expected})"
        )
    return data_dir


@functools.lru_cache(maxsize=None)
def local_task_dir(data_dir: Path, origin: str = "--data-dir") -> Path:
    """Write (once per process, removed at exit) an lm-eval include_path that serves `data_dir`'s tasks.

    Raises MergetuneError (`check_data_dir`'s) when the directory holds no dataset folder.
    """
    data_dir = check_data_dir(data_dir, origin)
    configs = local_task_configs(data_dir)
    out = Path(tempfile.mkdtemp(prefix="mergetune-local-tasks-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    for name, config in configs.items():
        (out / f"{name}.yaml").write_text(_render(config))
    log.info("local data %s: %d task configs written to %s", data_dir, len(configs), out)
    return out


def _proxy_hellaswag_row(row: dict[str, Any]) -> dict[str, Any]:
    """A proxy row {activity_label, ctx, endings, label} in the hub's HellaSwag fields.

    The proxy has no ctx_a/ctx_b split: all of `ctx` goes to ctx_a, so lm-eval's
    own HellaSwag `process_docs` builds the query from it (uncapitalised, which is
    one of the ways the proxy differs from the real data).
    """
    return {
        "activity_label": row["activity_label"],
        "ctx_a": row["ctx"],
        "ctx_b": "",
        "endings": row["endings"],
        "label": row["label"],
    }


_ROW_SCHEMAS = {"hellaswag_proxy": _proxy_hellaswag_row}


@functools.lru_cache(maxsize=None)
def _read_jsonl(path: str, schema: str | None) -> datasets.Dataset:
    """Parse a split file once per process; MMLU's 57 subject tasks share each file."""
    convert = _ROW_SCHEMAS[schema] if schema else dict
    rows = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    rows.append(convert(json.loads(line)))
    except (OSError, UnicodeDecodeError) as error:
        raise MergetuneError(f"cannot read {path}: {error}") from None
    except (ValueError, KeyError, TypeError) as error:  # not JSON, or not an object with the schema's fields
        raise MergetuneError(f"{path} line {number}: not a JSON object in this dataset's schema ({type(error).__name__}: {error})") from None
    return datasets.Dataset.from_list(rows)


@functools.lru_cache(maxsize=None)
def _rows_by_subject(path: str) -> dict[str, list[int]]:
    index: dict[str, list[int]] = {}
    for row, subject in enumerate(_read_jsonl(path, None)["subject"]):
        index.setdefault(subject, []).append(row)
    return index


def load_split_files(
    data_files: Mapping[str, str],
    subject: str | None = None,
    schema: str | None = None,
    **_task_metadata: Any,
) -> datasets.DatasetDict:
    """lm-eval `custom_dataset` hook: the local split files as a DatasetDict.

    `subject` keeps one MMLU subject's rows, in file order (so `first_n` few-shot
    sampling picks the same dev shots as on the hub). `schema` names a row
    conversion for stand-in data. lm-eval also passes the task's metadata
    (version, model args) as keyword arguments; they are unused.
    """
    splits = {}
    for split, path in data_files.items():
        dataset = _read_jsonl(path, schema)
        if subject is not None:
            dataset = dataset.select(_rows_by_subject(path).get(subject, []))
        splits[split] = dataset
    return datasets.DatasetDict(splits)
