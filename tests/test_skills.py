"""The demo's skills and tasks: deterministic data that lm-eval loads offline, and reproducible tiny models."""

from __future__ import annotations

import json

import torch
from lm_eval.tasks import TaskManager

from mergetune.merge_ops.sources import load_state
from mergetune.skills import HELDOUT_TASKS, SEARCH_TASKS, DemoSettings, build_demo_models, write_task_dir
from mergetune.tiny import TinySpec


def test_task_data_is_deterministic_and_search_and_heldout_facts_are_disjoint(tmp_path):
    first = write_task_dir(tmp_path / "one", docs_per_split=30)
    second = write_task_dir(tmp_path / "two", docs_per_split=30)
    for name in ("arithmetic_search.jsonl", "capitals_heldout.jsonl"):
        assert (first / name).read_text() == (second / name).read_text()
    for skill in ("arithmetic", "capitals"):
        search = [json.loads(line) for line in (first / f"{skill}_search.jsonl").read_text().splitlines()]
        heldout = [json.loads(line) for line in (first / f"{skill}_heldout.jsonl").read_text().splitlines()]
        assert len(search) == len(heldout) == 30
        assert {row["question"] for row in search}.isdisjoint(row["question"] for row in heldout)


def test_lm_eval_loads_the_demo_tasks_from_the_directory(tmp_path):
    directory = write_task_dir(tmp_path, docs_per_split=20)
    manager = TaskManager(include_path=str(directory))
    loaded = manager.load_task_or_group(list(SEARCH_TASKS + HELDOUT_TASKS))
    tasks = {task.task_name: task for task in _leaves(loaded)}
    assert set(tasks) == set(SEARCH_TASKS + HELDOUT_TASKS)
    for task in tasks.values():
        assert len(list(task.eval_docs)) == 20
        assert task.OUTPUT_TYPE == "multiple_choice"


def _leaves(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from _leaves(value)
    else:
        yield node


def test_demo_models_rebuild_identically_and_are_cached(tmp_path):
    settings = DemoSettings(spec=TinySpec(hidden_size=32, intermediate_size=64, num_hidden_layers=2), pretrain_steps=3, finetune_steps=3, batch_size=8)
    paths = build_demo_models(tmp_path / "one", settings)
    again = build_demo_models(tmp_path / "two", settings)
    assert set(paths) == {"base", "arithmetic", "capitals"}
    for name in paths:
        ours, theirs = load_state(paths[name]), load_state(again[name])
        assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    stamp = (tmp_path / "one" / "demo-models.json").stat().st_mtime_ns
    build_demo_models(tmp_path / "one", settings)
    assert (tmp_path / "one" / "demo-models.json").stat().st_mtime_ns == stamp  # cached, not rebuilt
    base, arithmetic = load_state(paths["base"]), load_state(paths["arithmetic"])
    assert any(not torch.equal(base[key], arithmetic[key]) for key in base)  # fine-tuning changed weights
