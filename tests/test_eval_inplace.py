"""One live model scored again and again: weights written in place are always the ones scored."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval_fixtures import TOY_TASK
from mergetune.errors import MergetuneError
from mergetune.eval import EvalConfig, Evaluator, paired_difference

pytest_plugins = ["eval_fixtures"]  # session fixtures shared by every test_eval_* module


@pytest.fixture(scope="module")
def live(eval_models, toy_task_dir):
    """A live model, its evaluator on the toy task, and the weights of a second checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(eval_models["base"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(eval_models["base"])
    evaluator = Evaluator.from_model(model, tokenizer, EvalConfig(tasks=(TOY_TASK,), include_paths=(toy_task_dir,)))
    other = AutoModelForCausalLM.from_pretrained(eval_models["other"]).state_dict()
    return model, evaluator, other


def write_in_place(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """What the search does between candidates: copy into the existing parameters."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data.copy_(weights[name])


def doc_metrics(result) -> list[dict[str, float]]:
    return [doc.metrics for docs in result.tasks[TOY_TASK].docs.values() for doc in docs]


def test_changed_weights_change_scores_and_restored_weights_restore_them_exactly(live):
    model, evaluator, other = live
    original = {name: param.detach().clone() for name, param in model.named_parameters()}
    first = evaluator.score()

    write_in_place(model, other)
    changed = evaluator.score(doc_ids=first.doc_ids)
    assert doc_metrics(changed) != doc_metrics(first)

    write_in_place(model, original)
    restored = evaluator.score(doc_ids=first.doc_ids)
    assert doc_metrics(restored) == doc_metrics(first)
    assert restored.tasks[TOY_TASK].value == first.tasks[TOY_TASK].value


def test_scores_equal_a_fresh_evaluator_on_a_checkpoint_of_the_same_weights(live, eval_models, toy_task_dir):
    model, evaluator, other = live
    write_in_place(model, other)
    try:
        in_place = evaluator.score()
    finally:
        write_in_place(model, AutoModelForCausalLM.from_pretrained(eval_models["base"]).state_dict())
    fresh = Evaluator.from_dir(eval_models["other"], EvalConfig(tasks=(TOY_TASK,), include_paths=(toy_task_dir,)))
    assert doc_metrics(fresh.score()) == doc_metrics(in_place)


def test_prompts_are_built_and_tokenized_once_per_document_set(live, monkeypatch):
    _, evaluator, _ = live
    ids = evaluator.sample_doc_ids(limit=6, seed=11)
    evaluator.score(doc_ids=ids)
    calls = []
    monkeypatch.setattr(evaluator.backend, "encode", lambda *args: calls.append(args))
    evaluator.score(doc_ids=ids)
    assert calls == []


def test_result_carries_document_ids_and_per_document_results(live):
    _, evaluator, _ = live
    result = evaluator.score(limit=5, seed=2)
    score = result.tasks[TOY_TASK]
    assert score.doc_ids == {TOY_TASK: sorted(score.doc_ids[TOY_TASK])} and score.n_docs == 5
    assert score.value == sum(doc.metrics["acc"] for doc in score.docs[TOY_TASK]) / 5
    assert score.stderr is not None and score.metrics.keys() == {"acc", "acc_norm"}
    assert 0 < result.forward_seconds <= result.seconds


def test_paired_difference_of_a_model_with_itself_is_zero_and_needs_shared_documents(live):
    _, evaluator, _ = live
    a = evaluator.score(limit=6, seed=1).tasks[TOY_TASK]
    assert paired_difference(a, a) == (0.0, 0.0, 6)
    b = evaluator.score(doc_ids={TOY_TASK: [i for i in range(12) if i not in a.doc_ids[TOY_TASK]][:3]}).tasks[TOY_TASK]
    with pytest.raises(MergetuneError, match="share no scored documents"):
        paired_difference(a, b)


def test_documents_of_a_prepared_set_score_alike_in_any_subset_though_lm_eval_would_draw_other_shots(
    eval_models, benchmarks_dir, monkeypatch
):
    from mergetune.eval.requests import prepare_task

    config = EvalConfig(tasks=("arc_easy",), data_dir=benchmarks_dir, num_fewshot=3)
    evaluator = Evaluator.from_dir(eval_models["base"], config, batch_size=4)
    ids = evaluator.sample_doc_ids(limit=12, seed=5)
    evaluator.prepare(ids)
    whole = {doc.doc_id: doc.metrics for doc in evaluator.score(doc_ids=ids).tasks["arc_easy"].docs["arc_easy"]}
    calls = []
    monkeypatch.setattr(evaluator.backend, "encode", lambda *args: calls.append(args))
    odd = {"arc_easy": ids["arc_easy"][1::2]}
    parts = evaluator.score(doc_ids=odd).tasks["arc_easy"].docs["arc_easy"]
    assert {doc.doc_id: doc.metrics for doc in parts} == {doc_id: whole[doc_id] for doc_id in odd["arc_easy"]}
    assert calls == []  # the set's requests, not new ones

    # Why: lm-eval draws each document's shots along the set it is given.
    task = evaluator.tasks["arc_easy"].leaves["arc_easy"]
    contexts = {}
    for subset in (ids["arc_easy"], odd["arc_easy"]):
        prepared = prepare_task(task, subset, config.fewshot_seed, lambda context, _: ([0], [0]))
        contexts[len(subset)] = {doc.doc_id: doc.requests[0].args[0] for doc in prepared.docs}
    assert any(contexts[12][doc_id] != contexts[6][doc_id] for doc_id in odd["arc_easy"])
