"""Document subsets: seeded, reproducible, nested, stratified across a group's tasks."""

from __future__ import annotations

from mergetune.eval import EvalConfig
from mergetune.eval.evaluator import load_tasks
from mergetune.eval.subsets import allocate, sample_doc_ids

pytest_plugins = ["eval_fixtures"]  # session fixtures shared by every test_eval_* module


def test_allocation_is_proportional_and_sums_to_n():
    counts = allocate({"a": 100, "b": 300, "c": 600}, 10)
    assert counts == {"a": 1, "b": 3, "c": 6}
    assert sum(allocate({"a": 7, "b": 11, "c": 13}, 9).values()) == 9


def test_every_stratum_gets_a_document_when_n_allows():
    sizes = {"big": 1000, "small1": 5, "small2": 5}
    assert allocate(sizes, 3) == {"big": 1, "small1": 1, "small2": 1}
    assert allocate(sizes, 2) == {"big": 2, "small1": 0, "small2": 0}


def test_n_beyond_the_documents_takes_them_all():
    assert allocate({"a": 2, "b": 3}, 50) == {"a": 2, "b": 3}
    assert sample_doc_ids({"a": 3}, None, seed=0) == {"a": [0, 1, 2]}


def test_sample_is_seeded_sorted_in_range_and_not_the_first_n():
    first = sample_doc_ids({"task": 1000}, 20, seed=7)["task"]
    assert first == sample_doc_ids({"task": 1000}, 20, seed=7)["task"]
    assert first == sorted(set(first)) and len(first) == 20 and 0 <= first[0] and first[-1] < 1000
    assert first != list(range(20))
    assert first != sample_doc_ids({"task": 1000}, 20, seed=8)["task"]


def test_a_larger_sample_extends_a_smaller_one():
    small = set(sample_doc_ids({"task": 500}, 10, seed=1)["task"])
    large = set(sample_doc_ids({"task": 500}, 40, seed=1)["task"])
    assert small < large


def test_a_task_sample_does_not_depend_on_the_other_tasks():
    alone = sample_doc_ids({"x": 100}, 5, seed=0)["x"]
    assert sample_doc_ids({"x": 100, "y": 100}, 10, seed=0)["x"] == alone


def test_mmlu_sample_is_stratified_by_subject(benchmarks_dir):
    tasks = load_tasks(EvalConfig(tasks=("mmlu",), data_dir=benchmarks_dir))
    sizes = {name: len(task.eval_docs) for name, task in tasks["mmlu"].leaves.items()}
    ids = sample_doc_ids(sizes, 570, seed=0)
    assert len(ids) == 57 and sum(map(len, ids.values())) == 570
    total = sum(sizes.values())
    for subject, chosen in ids.items():
        assert abs(len(chosen) - 570 * sizes[subject] / total) < 1.5, subject
    assert set(ids) == set(sizes)  # keyed by subject task, as `lm_eval --samples` expects
