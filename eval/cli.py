"""`mergetune eval`: score a checkpoint (or a served model) on a suite, print a table, write JSON."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.table import Table

from mergetune.dtypes import MODEL_DTYPES
from mergetune.errors import MergetuneError
from mergetune.outputs import check_output_file

if TYPE_CHECKING:  # the package imports torch and lm-eval: not at CLI start-up
    from mergetune.eval import EvalResult, Evaluator


def _check_at_least(option: str, value: Optional[int], least: int) -> None:
    if value is not None and value < least:
        raise MergetuneError(f"{option}: must be at least {least}, got {value}")


DTYPES = ("auto", *MODEL_DTYPES)


def _doc_ids_from(path: Path) -> dict[str, list[int]]:
    """Document ids from an earlier `--json` output, or from a plain {task: [ids]} file."""
    try:
        data = json.loads(path.read_text())
        if "tasks" in data:
            found = {task: ids for entry in data["tasks"].values() for task, ids in entry["doc_ids"].items()}
        else:
            found = dict(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise MergetuneError(f"--doc-ids {path}: not a mergetune --json output nor a {{task: [ids]}} file ({error})") from error
    for task, ids in found.items():
        problem = _ids_problem(ids)
        if problem:
            raise MergetuneError(f"--doc-ids {path}: task {task}: {problem}")
    return found


def _ids_problem(ids: object) -> Optional[str]:
    """Why `ids` is not a list of distinct document ids (whole numbers from 0), or None: lm-eval's own files hold
    integers, a float or a boolean was read as another document, and a repeat was silently scored once."""
    if not isinstance(ids, list):
        return f"expected a list of document ids, got {json.dumps(ids)}"
    wrong = next((i for i in ids if isinstance(i, bool) or not isinstance(i, int) or i < 0), None)
    if wrong is not None:
        return f"{json.dumps(wrong)} is not a document id (a whole number from 0)"
    repeated = sorted(i for i, count in Counter(ids).items() if count > 1)
    if repeated:
        return f"document id(s) {', '.join(map(str, repeated))} listed more than once"
    return None


def _doc_ids_to_score(evaluator: Evaluator, wanted: dict[str, list[int]], path: Path) -> dict[str, list[int]]:
    """The file's ids for the tasks this run scores (an earlier run may have scored more); every task scored
    here must have some, or its score would silently be missing from the table."""
    for name, task in evaluator.tasks.items():
        if not any(leaf in wanted for leaf in task.leaves):
            raise MergetuneError(
                f"--doc-ids {path} has no document ids for {name}, which this run scores; "
                "leave it out of --tasks, or score it in another run"
            )
    leaves = {leaf for task in evaluator.tasks.values() for leaf in task.leaves}
    return {task: ids for task, ids in wanted.items() if task in leaves}


def _table(result: EvalResult) -> Table:
    share = result.forward_seconds / result.seconds if result.seconds else 0.0
    table = Table(
        title="mergetune eval",
        caption=f"{result.backend.get('backend')}: scored in {result.seconds:.1f} s, {share:.0%} of it in forward passes",
    )
    for column in ("task", "metric", "value", "± stderr", "shots", "docs"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for score in result.tasks.values():
        stderr = "—" if score.stderr is None else f"{score.stderr:.4f}"
        shots = "mixed" if score.num_fewshot is None else str(score.num_fewshot)
        table.add_row(score.label, score.metric, f"{score.value:.4f}", stderr, shots, str(score.n_docs))
    if len(result.tasks) > 1:
        stderr = "—" if result.average_stderr is None else f"{result.average_stderr:.4f}"
        label = "average (includes proxy)" if result.includes_proxy else "average"
        table.add_row(label, "", f"{result.average:.4f}", stderr, "", "", style="bold")
    return table


def eval_command(
    model_dir: Path = typer.Argument(..., help="Checkpoint directory; for --backend server, the served model's tokenizer."),
    suite: Optional[str] = typer.Option(None, "--suite", help="A named suite: leaderboard."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Comma-separated lm-eval tasks, groups or tags (added to --suite)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Local JSONL copies of the datasets (offline)."),
    include_path: list[Path] = typer.Option([], "--include-path", help="A directory of your own lm-eval task YAMLs."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Seeded random sample of N documents per task (stratified for groups)."),
    num_fewshot: Optional[int] = typer.Option(None, "--num-fewshot", help="Few-shot count for every task (default: per task)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the document sample (default 0)."),
    doc_ids: Optional[Path] = typer.Option(None, "--doc-ids", help="Score the documents of an earlier --json output."),
    backend: str = typer.Option("hf", "--backend", help="hf, vllm, server: a name registered in mergetune.eval.backends."),
    device: Optional[str] = typer.Option(None, "--device", help="hf: cpu, cuda, cuda:1, ... (default: cuda if available)."),
    batch_size: str = typer.Option("auto", "--batch-size", help="hf: an integer or 'auto'."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="server: e.g. http://127.0.0.1:8000/v1"),
    served_model: Optional[str] = typer.Option(None, "--served-model", help="server: model name (default: MODEL_DIR)."),
    num_concurrent: int = typer.Option(8, "--concurrency", help="server: requests in flight."),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm: GPUs per engine."),
    dtype: str = typer.Option(
        "auto",
        "--dtype",
        help="hf, vllm: auto, float32, bfloat16 or float16. auto is the checkpoint's dtype for hf; vllm, like "
        "lm-eval's vllm model, runs a float32 checkpoint in half precision with auto. On a CPU, float32 gives the same "
        "per-document results at any batch size; bfloat16 may flip near-ties between batch sizes, as in lm-eval.",
    ),
    no_shared_prefix: bool = typer.Option(
        False,
        "--no-shared-prefix",
        help="hf, vllm (0.34 or later): score every request as its own sequence (lm-eval's way), for comparing.",
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Write per-task metrics, stderrs and document ids here."),
) -> None:
    """Score a model on lm-eval tasks: a table here, and JSON with metrics, stderrs and document ids."""
    import datasets
    from transformers.utils import logging as transformers_logging

    from mergetune.eval import EvalConfig, Evaluator
    from mergetune.eval.backends import backend_names, get_backend_class

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    if suite is None and not tasks:
        raise MergetuneError("give --suite leaderboard or --tasks a,b,... (with --doc-ids too: the tasks to score)")
    for option, value in (("--limit", limit), ("--seed", seed)):
        if doc_ids is not None and value is not None:
            raise MergetuneError(f"{option} and --doc-ids: give one (the ids say which documents to score)")
    wanted = _doc_ids_from(doc_ids) if doc_ids is not None else None  # a bad file fails before anything loads
    if backend not in backend_names():
        raise MergetuneError(f"unknown --backend {backend!r}; use {', '.join(backend_names())}")
    for option, value, least in (
        ("--limit", limit, 1), ("--num-fewshot", num_fewshot, 0), ("--concurrency", num_concurrent, 1),
        ("--tensor-parallel-size", tensor_parallel_size, 1),
    ):
        _check_at_least(option, value, least)
    if dtype not in DTYPES:
        raise MergetuneError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    if device is not None and "device" in get_backend_class(backend).command_options:
        from mergetune.devices import check_device

        check_device(device)
    if json_out is not None:
        inputs = {f"model directory {model_dir}": model_dir}
        inputs.update({f"task folder {path} (--include-path)": path for path in include_path})
        if data_dir is not None:
            inputs[f"data folder {data_dir} (--data-dir)"] = data_dir
        check_output_file(json_out, "--json", inputs)
    given = {
        "device": device,
        "batch_size": batch_size,
        "base_url": base_url,
        "model": served_model,
        "num_concurrent": num_concurrent,
        "tensor_parallel_size": tensor_parallel_size,
        "shared_prefix": not no_shared_prefix,
        "dtype": dtype,
    }
    options = {name: given[name] for name in get_backend_class(backend).command_options}
    if "batch_size" in options:
        if batch_size != "auto" and not batch_size.isdigit():
            raise MergetuneError(f"--batch-size must be an integer or 'auto', not {batch_size!r}")
        options["batch_size"] = batch_size if batch_size == "auto" else int(batch_size)
    config = EvalConfig(
        suite=suite,
        tasks=tuple(name.strip() for name in (tasks or "").split(",") if name.strip()),
        include_paths=tuple(include_path),
        data_dir=data_dir,
        num_fewshot=num_fewshot,
        limit=limit,
        seed=seed or 0,
    )
    # from_dir loads the tasks (checking the data and task directories) before the model.
    typer.echo(f"loading the tasks, then {model_dir} ({backend})", err=True)
    evaluator = Evaluator.from_dir(model_dir, config, backend=backend, **options)
    typer.echo(f"scoring {', '.join(evaluator.tasks)}", err=True)
    try:
        result = evaluator.score(doc_ids=_doc_ids_to_score(evaluator, wanted, doc_ids) if wanted is not None else None)
    finally:
        evaluator.close()
    console = Console()
    console.print(_table(result))
    for score in result.tasks.values():
        if score.proxy:
            console.print(f"[yellow]{score.name} is a proxy: {score.proxy}[/yellow]")
    if json_out is not None:
        console.print(f"wrote {result.write_json(json_out)}")
