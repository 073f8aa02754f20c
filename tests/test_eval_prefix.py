"""Shared-prefix scoring: the groups it forms, and scores that are lm-eval's, document by document."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from eval_fixtures import TOY_TASK
from mergetune.cli import app
from mergetune.demo.tiny import build_tokenizer, save_model
from mergetune.errors import MergetuneError
from mergetune.eval import EvalConfig, Evaluator
from mergetune.eval.backends.hf import HFBackend
from mergetune.eval.backends.hf_prefix import SUPPORTED_MODEL_TYPES
from mergetune.eval.prefix import MIN_SHARED_TOKENS, PrefixPlan, model_input, plan_prefixes, within_window

pytest_plugins = ["eval_fixtures"]

TASKS = ("arc_challenge", "winogrande", "truthfulqa_mc2", "hellaswag_proxy_llamacpp", "mmlu")
PROBABILITY_TASKS = ("truthfulqa_mc2",)  # per-document results that are probabilities, not decisions


def groups_of(plan: PrefixPlan) -> list[tuple[int, list[int]]]:
    """(prefix length, request indices) per group."""
    return [(group.prefix_len, sorted(i for row in group.rows for i in row.requests)) for group in plan.groups]


# --- the plan: pure functions of token ids -------------------------------------------------------


def test_model_input_is_lm_evals_left_truncated_input():
    assert model_input([1, 2, 3], [4, 5], max_length=10) == (1, 2, 3, 4)
    assert model_input([1, 2, 3], [4, 5], max_length=3) == (2, 3, 4)  # last max_length + 1 tokens, minus the last


def test_a_documents_choices_share_their_context_and_a_lone_request_is_scored_alone():
    shots = tuple(range(100, 130))
    doc_a = [(shots + (1, 2, 3), (cont, 9)) for cont in (40, 41, 42)]
    doc_b = [((7,) * 20 + (4, 5), (cont, 9)) for cont in (50, 51)]
    lone = [((8,) * 30, (60, 61))]
    requests = doc_a + doc_b + lone
    plan = plan_prefixes([model_input(c, k, 1000) for c, k in requests], [len(k) for _, k in requests])
    # A prefix stops before the first position whose logits are read (the context's last token).
    assert sorted(groups_of(plan)) == [(21, [3, 4]), (32, [0, 1, 2])]
    assert plan.alone == (5,)


def test_equal_inputs_are_one_row_reading_the_longest_continuation():
    plan = plan_prefixes([(1,) * 20, (1,) * 20, (2,) * 20], [1, 3, 1])
    assert plan.groups == () and plan.alone == (0, 1, 2)  # one row per input: nothing to share with another
    inputs = [(1,) * 20 + (5,), (1,) * 20 + (5,), (1,) * 20 + (6,)]
    (group,) = plan_prefixes(inputs, [1, 2, 1]).groups
    assert sorted((row.keep, row.requests) for row in group.rows) == [(1, (2,)), (2, (0, 1))]
    assert group.prefix_len == 19  # the two-token continuation reads position 19 already


def test_a_common_preamble_is_shared_across_documents_unless_per_document_prefixes_save_more():
    preamble = tuple(range(100, 140))
    singles = [preamble + (k,) * 5 for k in range(3)]  # one request per document: only the preamble is shared
    assert groups_of(plan_prefixes(singles, [1, 1, 1])) == [(40, [0, 1, 2])]
    choices = [preamble + (k,) * 30 + (c,) for k in range(2) for c in range(4)]  # 4 choices per document
    assert sorted(groups_of(plan_prefixes(choices, [1] * 8))) == [(70, [0, 1, 2, 3]), (70, [4, 5, 6, 7])]


def test_prefixes_shorter_than_the_minimum_are_not_shared():
    short = tuple(range(MIN_SHARED_TOKENS - 1))
    plan = plan_prefixes([short + (1, 2), short + (3, 4)], [1, 1])
    assert plan.groups == () and plan.alone == (0, 1)


def test_a_short_prefix_before_long_rests_is_not_shared():
    """The first words of unrelated documents: sharing them would cost more (masked passes) than it saves."""
    opening = tuple(range(10))
    documents = [opening + (k,) * 30 for k in range(3)]
    plan = plan_prefixes(documents, [1, 1, 1])
    assert plan.groups == () and plan.alone == (0, 1, 2)
    assert groups_of(plan_prefixes([opening + (k,) * 5 for k in range(3)], [1, 1, 1])) == [(10, [0, 1, 2])]


def test_groups_reaching_a_sliding_window_are_scored_as_whole_sequences():
    plan = plan_prefixes([(1,) * 20 + (2,), (1,) * 20 + (3,), (4,) * 30 + (5,), (4,) * 30 + (6,)], [1] * 4)
    kept = within_window(plan, window=25)
    assert groups_of(kept) == [(20, [0, 1])] and kept.alone == (2, 3)
    assert within_window(plan, None) == plan


# --- parity: the cache path against lm-eval's path ----------------------------------------------


def request_scores(evaluator: Evaluator) -> tuple[list[tuple[float, bool]], list]:
    """(scores, requests) of every request the evaluator prepared, through its backend."""
    requests = [r for prepared in evaluator._prepared.values() for doc in prepared.docs for r in doc.requests]
    return evaluator.backend.loglikelihood(requests), requests


def document_agreement(ours, theirs, tolerance: float | None) -> tuple[int, int]:
    """(documents whose results are identical, documents). TruthfulQA mc2's result is a probability computed
    from the log-likelihoods, not a decision: it must agree within `tolerance` instead (unchecked if None)."""
    agree = total = 0
    for name, score in ours.tasks.items():
        for task, docs in score.docs.items():
            reference = theirs.tasks[name].docs[task]
            assert [d.doc_id for d in docs] == [d.doc_id for d in reference]
            for doc, ref in zip(docs, reference):
                total += 1
                if task not in PROBABILITY_TASKS:
                    agree += doc.metrics == ref.metrics
                    continue
                agree += 1
                if tolerance is not None:
                    assert doc.metrics == pytest.approx(ref.metrics, abs=tolerance), (task, doc.doc_id)
    return agree, total


def both_paths(model_dir: Path, config: EvalConfig, doc_ids=None, limit: int = 5, **options):
    """The same documents scored with and without shared prefixes (two backends on one model)."""
    on = Evaluator.from_dir(model_dir, config, batch_size=4, **options)
    off = Evaluator(HFBackend(on.backend.model, on.backend.lm.tokenizer, batch_size=4, shared_prefix=False), config, on.tasks)
    assert on.backend.describe()["shared_prefix"] and not off.backend.describe()["shared_prefix"]
    if doc_ids is None:
        doc_ids = on.sample_doc_ids([t for t in config.tasks if t != "mmlu"], limit=limit, seed=3)
        if "mmlu" in config.tasks:
            doc_ids |= on.sample_doc_ids(["mmlu"], limit=57)
    start = on.backend.forward_tokens, off.backend.forward_tokens
    results = on.score(doc_ids=doc_ids), off.score(doc_ids=doc_ids)
    tokens = on.backend.forward_tokens - start[0], off.backend.forward_tokens - start[1]
    return on, off, results, tokens


@pytest.fixture(scope="module")
def float32_paths(eval_models, benchmarks_dir):
    return both_paths(eval_models["base"], EvalConfig(tasks=TASKS, data_dir=benchmarks_dir, num_fewshot=2))


def test_float32_log_likelihoods_agree_within_1e4_and_every_document_result_is_identical(float32_paths):
    on, off, (ours, plain), (tokens_on, tokens_off) = float32_paths
    scored_on, requests = request_scores(on)
    scored_off, _ = request_scores(off)
    assert any(len(r.continuation) > 1 for r in requests)  # multi-token continuations (ARC, TruthfulQA, HellaSwag)
    for (lp_on, greedy_on), (lp_off, greedy_off) in zip(scored_on, scored_off, strict=True):
        assert lp_on == pytest.approx(lp_off, abs=1e-4) and greedy_on == greedy_off
    agree, total = document_agreement(ours, plain, tolerance=1e-4)
    assert agree == total == 4 * 5 + 57
    assert tokens_on < tokens_off  # and it did share something


def test_truncated_25_shot_requests_score_as_lm_eval_truncates_them(eval_models, benchmarks_dir):
    """The tiny models read 512 positions: 25 shots of ARC are cut from the left, sharing what survives."""
    config = EvalConfig(tasks=("arc_challenge",), data_dir=benchmarks_dir, num_fewshot=25)
    on, off, (ours, plain), _ = both_paths(eval_models["base"], config, limit=6)
    _, requests = request_scores(on)
    assert all(len(r.context) + len(r.continuation) > 513 for r in requests)
    assert document_agreement(ours, plain, tolerance=1e-4) == (6, 6)
    for (a, ga), (b, gb) in zip(request_scores(on)[0], request_scores(off)[0], strict=True):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb


def tiny_of_architecture(model_type: str, out: Path, **config: object) -> Path:
    """A tiny random checkpoint of another architecture than the other tests' Llama, with their tokenizer."""
    tokenizer = build_tokenizer()
    if model_type == "gpt2":  # its own names for the shape
        shape = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 512}
    else:
        shape = {
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
        }  # fmt: skip
    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=len(tokenizer), **shape, **special, **config))
    return save_model(model.eval(), tokenizer, out)


ARCHITECTURE_TASKS = ("arc_challenge", "truthfulqa_mc2", "winogrande")


@pytest.mark.parametrize(
    "model_type, config",
    [(model_type, {}) for model_type in SUPPORTED_MODEL_TYPES if model_type != "llama"]  # Llama: the tests above
    + [("mistral", {"sliding_window": 100})],  # rows reaching the window, the longer half here, are scored whole
)
def test_every_architecture_the_cache_path_accepts_scores_as_lm_evals_path(model_type, config, benchmarks_dir, tmp_path):
    model_dir = tiny_of_architecture(model_type, tmp_path / model_type, **config)
    eval_config = EvalConfig(tasks=ARCHITECTURE_TASKS, data_dir=benchmarks_dir, num_fewshot=2)
    on, off, (ours, plain), (tokens_on, tokens_off) = both_paths(model_dir, eval_config, limit=4)
    assert on.backend.model.config.model_type == model_type and on.backend.describe()["shared_prefix"]
    for (lp_on, greedy_on), (lp_off, greedy_off) in zip(request_scores(on)[0], request_scores(off)[0], strict=True):
        assert lp_on == pytest.approx(lp_off, abs=1e-4) and greedy_on == greedy_off
    assert document_agreement(ours, plain, tolerance=1e-4) == (12, 12)
    assert tokens_on < 0.95 * tokens_off  # it shared


def test_another_architecture_goes_through_lm_evals_path_and_says_so(benchmarks_dir, tmp_path, caplog):
    model_dir = tiny_of_architecture("gpt2", tmp_path / "gpt2")
    config = EvalConfig(tasks=("arc_challenge",), data_dir=benchmarks_dir, num_fewshot=2)
    with caplog.at_level(logging.WARNING, logger="mergetune.eval.backends.hf"):
        evaluator = Evaluator.from_dir(model_dir, config, batch_size=4)
    assert not evaluator.backend.describe()["shared_prefix"]
    assert "shared prefixes off (architecture 'gpt2' is not one of llama, mistral" in caplog.text
    assert 0 <= evaluator.score(limit=3).tasks["arc_challenge"].value <= 1


def test_every_document_result_equals_lm_eval_cli_on_the_same_ids(float32_paths, eval_models, benchmarks_dir, lm_eval_cli):
    on, _, (ours, _), _ = float32_paths
    theirs = lm_eval_cli(eval_models["base"], benchmarks_dir, TASKS, ours.doc_ids, 2)
    scored, requests = request_scores(on)
    by_args = dict(zip((r.args for r in requests), scored))
    for score in ours.tasks.values():
        for task, docs in score.docs.items():
            logged = {row["doc_id"]: row for row in theirs["samples"][task]}
            for doc in docs:
                row = logged[doc.doc_id]
                for metric, value in doc.metrics.items():
                    if task in PROBABILITY_TASKS:
                        assert value == pytest.approx(row[metric], abs=1e-4), (task, doc.doc_id, metric)
                    else:
                        assert value == row[metric], (task, doc.doc_id, metric)
                # Logged per request as {"gen_args_N": {"arg_0": context, "arg_1": continuation}}, [[logprob, greedy]] (strings).
                for args, [[loglikelihood, greedy]] in zip(row["arguments"].values(), row["resps"], strict=True):
                    ll, is_greedy = by_args[(args["arg_0"], args["arg_1"])]
                    assert ll == pytest.approx(float(loglikelihood), abs=1e-4) and str(is_greedy) == greedy


def test_bfloat16_accuracy_equals_lm_evals_path_on_at_least_99_percent_of_documents(family_bf16_tied, benchmarks_dir):
    config = EvalConfig(tasks=TASKS, data_dir=benchmarks_dir, num_fewshot=2)
    on, off, (ours, plain), _ = both_paths(family_bf16_tied["base"], config, limit=40)
    assert on.backend.model.dtype == torch.bfloat16
    agree, total = document_agreement(ours, plain, tolerance=None)
    gaps = [abs(a[0] - b[0]) for a, b in zip(request_scores(on)[0], request_scores(off)[0])]
    print(f"bfloat16: {agree}/{total} documents agree; largest log-likelihood gap {max(gaps):.4f}")
    assert total >= 200 and agree >= 0.99 * total


# --- memory: a 25-shot task with a large vocabulary, under a cap ---------------------------------

CAPPED = textwrap.dedent(
    """
    import json, resource, sys
    import psutil, torch
    from transformers import LlamaForCausalLM
    from mergetune.demo.tiny import TinySpec, build_tokenizer, tiny_config
    from mergetune.eval import EvalConfig, Evaluator
    from mergetune.eval.backends.hf import HFBackend

    data_dir, cap, cases = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    spec = TinySpec(max_position_embeddings=4096)
    model = LlamaForCausalLM(tiny_config(spec, 50_000, tokenizer)).eval()  # SmolLM2's vocabulary size, roughly
    _, unlimited = resource.getrlimit(resource.RLIMIT_AS)
    outcomes = {}
    for task, shots in cases:
        config = EvalConfig(tasks=(task,), data_dir=data_dir, num_fewshot=shots)
        shared = Evaluator.from_model(model, tokenizer, config)  # batch size auto: 64 on CPU
        plain = Evaluator(HFBackend(model, tokenizer, shared_prefix=False), config, shared.tasks)
        doc_ids = shared.sample_doc_ids(limit=57, seed=0)
        outcomes[task] = {}
        for name, evaluator in (("shared_prefix", shared), ("lm_eval_way", plain)):
            # The soft limit only, so that it can be lifted again for the next case.
            vms = psutil.Process().memory_info().vms
            resource.setrlimit(resource.RLIMIT_AS, (vms + cap, unlimited))
            try:
                result = evaluator.score(doc_ids=doc_ids)
                outcome = {"acc": result.tasks[task].value, "tokens": evaluator.backend.forward_tokens}
            except (RuntimeError, MemoryError) as error:
                outcome = {"error": str(error)}
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (unlimited, unlimited))
            outcomes[task][name] = outcome
    print(json.dumps(outcomes))
    """
)
CAP = 3 * 2**30  # lm-eval's path would need ~20 GiB for a batch of 64 rows of ~1,500 positions x 50k logits
#: Shared prefixes (57 documents, 25 shots); one row per document, nothing shared (5 shots).
CAPPED_CASES = [("arc_challenge", 25), ("mmlu", 5)]


@pytest.fixture(scope="module")
def capped(benchmarks_dir, tmp_path_factory) -> dict[str, dict[str, dict]]:
    """Each case scored both ways in one process (lm-eval imported once), each way under the cap on top of what the
    process held before it: {task: {"shared_prefix" | "lm_eval_way": {"acc", "tokens"} or {"error"}}}."""
    script = tmp_path_factory.mktemp("capped") / "capped.py"
    script.write_text(CAPPED)
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(
        [sys.executable, str(script), str(benchmarks_dir), str(CAP), json.dumps(CAPPED_CASES)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.splitlines()[-1])


@pytest.mark.parametrize("task", [task for task, _ in CAPPED_CASES])
def test_a_few_shot_task_with_a_large_vocabulary_scores_under_a_memory_cap(capped, task):
    shared = capped[task]["shared_prefix"]
    assert "error" not in shared, shared.get("error")
    assert 0 <= shared["acc"] <= 1 and shared["tokens"] > 0
    # The cap binds: lm-eval's path, with its logits at every position, cannot allocate under it.
    assert "allocate" in capped[task]["lm_eval_way"].get("error", ""), capped[task]["lm_eval_way"]


def test_a_request_that_cannot_fit_the_memory_budget_says_so(eval_models, benchmarks_dir):
    config = EvalConfig(tasks=("arc_challenge",), data_dir=benchmarks_dir, num_fewshot=2)
    evaluator = Evaluator.from_dir(eval_models["base"], config, batch_size=4, memory_budget=10_000)
    with pytest.raises(MergetuneError, match=r"needs about .* GiB; only .* GiB are available"):
        evaluator.score(limit=2)


def test_batches_take_longest_first_and_close_before_padding_more_than_a_twentieth():
    from mergetune.demo.tiny import TinySpec, build_tokenizer, random_model
    from mergetune.eval.backends.hf_prefix import MAX_PADDING, PrefixScorer
    from mergetune.eval.prefix import PrefixGroup, Row

    def group(length: int) -> PrefixGroup:
        return PrefixGroup(length, tuple(Row(tuple(range(length)) + (k,), 1, (k,)) for k in range(2)))

    scorer = PrefixScorer(random_model(TinySpec(), build_tokenizer(), seed=0), max_rows=3, memory_budget=2**30)
    lengths = [100, 98, 97, 96, 60, 59, 40]
    batches = [[g.prefix_len for g in batch] for batch in scorer._batches([group(n) for n in lengths], 2**30)]
    assert MAX_PADDING == 0.05
    assert batches == [[100, 98, 97], [96], [60, 59], [40]]  # at most 3 rows; 60 after 96 would pad 20%
    rows = [Row(tuple(range(n)), 1, (n,)) for n in lengths]  # rows with nothing to share: the same rule
    assert [[len(r.tokens) for r in b] for b in scorer._row_batches(rows, 2**30)] == batches


# --- the switch --------------------------------------------------------------------------------


def test_no_shared_prefix_on_the_command_line_scores_the_same_documents_the_same(eval_models, toy_task_dir, tmp_path):
    def scores(*flags: str) -> dict:
        out = tmp_path / f"scores{len(flags)}.json"
        args = [eval_models["base"], "--tasks", TOY_TASK, "--include-path", toy_task_dir, "--limit", "8", "--json", out]
        result = CliRunner().invoke(app, ["eval", *map(str, args), *flags])
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())

    shared, plain = scores(), scores("--no-shared-prefix")
    assert shared["backend"]["shared_prefix"] is True and plain["backend"]["shared_prefix"] is False
    assert shared["tasks"][TOY_TASK]["docs"] == plain["tasks"][TOY_TASK]["docs"]
