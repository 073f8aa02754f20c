"""lm-eval's private API is where `mergetune.eval.lm_eval_adapter` expects it, and behaves as its public API does.

If a test here fails after an lm-eval upgrade, lm-eval changed something the
adapter relies on: fix the adapter (only it), then widen `CHECKED_VERSIONS`.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import shutil

import pytest
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.models.huggingface import HFLM
from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.tasks import TaskManager
from packaging.version import Version
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergetune.eval import lm_eval_adapter as adapter

pytest_plugins = ["eval_fixtures"]  # session fixtures shared by every test_eval_* module

# (context, continuation) pairs covering every branch of lm-eval's request tokenization:
# plain, trailing space moved to the continuation, empty context (prefix token added),
# and an empty context whose continuation already starts with the prefix token.
REQUESTS = [
    ("question : what is the capital of france ? answer :", " paris"),
    ("question : what is the capital of france ? answer : ", "berlin"),
    ("the capital of japan is", " tokyo city"),
    ("", "the sun is a star"),
    ("", "<s> the moon"),
]


def accepts(function, *args, **kwargs) -> bool:
    try:
        inspect.signature(function).bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def test_the_installed_lm_eval_is_one_the_adapter_was_checked_against():
    installed = adapter.installed_version()
    low, high = adapter.CHECKED_VERSIONS
    assert adapter.is_checked(installed), (
        f"lm-eval {installed} is outside the adapter's CHECKED_VERSIONS ({low} to {high}): "
        "if the other tests in this file pass, widen CHECKED_VERSIONS in mergetune/eval/lm_eval_adapter.py"
    )


def test_an_unchecked_version_is_a_warning_naming_it(monkeypatch, caplog):
    monkeypatch.setattr(adapter, "installed_version", lambda: Version("99.0"))
    with caplog.at_level(logging.WARNING, logger=adapter.__name__):
        adapter._warn_if_unchecked()
    assert "lm-eval 99.0 is installed" in caplog.text


def test_the_private_methods_exist_and_take_the_arguments_the_adapter_passes():
    batch = [(("a", " b"), [1], [2])]
    calls = {
        "TemplateLM._encode_pair(context, continuation)": (TemplateLM, "_encode_pair", ("context", "continuation"), {}),
        "TemplateLM._loglikelihood_tokens(batch, disable_tqdm=True)": (TemplateLM, "_loglikelihood_tokens", (batch,), {"disable_tqdm": True}),
        "HFLM._loglikelihood_tokens(batch, disable_tqdm=True, override_bs=n)": (
            HFLM, "_loglikelihood_tokens", (batch,), {"disable_tqdm": True, "override_bs": 8}
        ),
        "LocalCompletionsAPI._loglikelihood_tokens(batch, disable_tqdm=True)": (
            LocalCompletionsAPI, "_loglikelihood_tokens", (batch,), {"disable_tqdm": True}
        ),
        "HFLM._detect_batch_size([request])": (HFLM, "_detect_batch_size", (batch,), {}),
        "HFLM._model_call(inps, attn_mask, labels)": (HFLM, "_model_call", ("inps", None, None), {}),
    }
    broken = [
        call for call, (cls, name, args, kwargs) in calls.items()
        if not callable(getattr(cls, name, None)) or not accepts(getattr(cls, name), None, *args, **kwargs)
    ]
    assert broken == [], f"lm-eval {adapter.installed_version()} no longer accepts: {'; '.join(broken)}"
    assert "_loglikelihood_tokens" in TemplateLM.__abstractmethods__, (
        "TemplateLM's abstract token-level hook is no longer `_loglikelihood_tokens`: fix TokenScoringLM"
    )


def test_the_task_index_holds_each_task_s_own_config_without_loading_its_data():
    manager = TaskManager()
    assert adapter.declared_output_type(manager, "gsm8k") == "generate_until", "the index no longer keeps a task's cfg"
    assert adapter.declared_output_type(manager, "mmlu") is None  # a group: its tasks declare theirs


def test_the_task_index_logger_is_the_private_modules_own():
    module = importlib.import_module(adapter.TASK_INDEX_LOGGER)  # ModuleNotFoundError: the module moved
    loggers = [value.name for value in vars(module).values() if isinstance(value, logging.Logger)]
    assert adapter.TASK_INDEX_LOGGER in loggers, f"{module.__name__} logs through {loggers}, not its own logger"


def test_request_building_draws_its_bars_with_the_module_s_tqdm_which_the_adapter_silences():
    module = importlib.import_module(adapter.REQUEST_PROGRESS_MODULE)
    assert "tqdm(" in inspect.getsource(module.Task.build_all_requests), "lm-eval no longer draws this bar with tqdm"
    drawn = module.tqdm
    with adapter.no_request_progress():
        assert module.tqdm([1, 2]).disable
    assert module.tqdm is drawn


@pytest.fixture(scope="module")
def hflm(eval_models) -> HFLM:
    model = AutoModelForCausalLM.from_pretrained(eval_models["base"]).eval()
    return HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(eval_models["base"]), batch_size=2)


def test_tokens_and_logprobs_equal_lm_evals_public_loglikelihood(hflm, monkeypatch):
    """`encode_request` + `loglikelihood_tokens` give what `HFLM.loglikelihood` gives, request by request."""
    seen: list = []
    token_level = hflm._loglikelihood_tokens

    def spy(requests, **kwargs):
        seen.extend(requests)
        return token_level(requests, **kwargs)

    monkeypatch.setattr(hflm, "_loglikelihood_tokens", spy)
    instances = [
        Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=index) for index, pair in enumerate(REQUESTS)
    ]
    public = hflm.loglikelihood(instances, disable_tqdm=True)
    monkeypatch.undo()

    batch = [(pair, *adapter.encode_request(hflm, *pair)) for pair in REQUESTS]
    for pair, (_, context, continuation), (_, lm_context, lm_continuation) in zip(REQUESTS, batch, seen, strict=True):
        assert (context, continuation) == (lm_context, lm_continuation), f"{pair}: lm-eval tokenizes it differently now"
    prefix = hflm.prefix_token_id
    assert batch[3][1] == [prefix] and batch[3][2][0] != prefix  # prefix token added
    assert batch[4][1] == [prefix] and batch[4][2][0] != prefix  # prefix token split off the continuation
    private = adapter.loglikelihood_tokens(hflm, batch)
    assert [greedy for _, greedy in private] == [greedy for _, greedy in public]
    assert [logprob for logprob, _ in private] == pytest.approx([logprob for logprob, _ in public], abs=1e-5)


def test_the_model_call_hook_sees_every_forward_pass_and_the_batch_size_probe_runs(hflm, monkeypatch):
    calls: list[int] = []
    original = hflm._model_call

    def counting(model_call):
        def counted(*args, **kwargs):
            calls.append(1)
            return model_call(*args, **kwargs)

        return counted

    monkeypatch.setattr(hflm, "_model_call", original)  # the original is put back after the test
    adapter.wrap_model_call(hflm, counting)
    batch = [(pair, *adapter.encode_request(hflm, *pair)) for pair in REQUESTS]
    adapter.loglikelihood_tokens(hflm, batch, override_bs=len(batch))
    assert calls, "HFLM's scoring no longer goes through `_model_call`: the hf backend's timing would miss it"
    scored = len(calls)
    assert adapter.detect_batch_size(hflm, batch[0]) >= 1
    assert len(calls) > scored, "HFLM's batch-size probe no longer goes through `_model_call`"


def test_every_hflm_s_forward_passes_can_be_wrapped_as_the_lm_eval_cli_makes_them(hflm, monkeypatch):
    """bench/bench_eval.py times the `lm_eval` CLI's forward passes this way: its HFLM is made inside the CLI."""
    calls: list[int] = []

    def counting(model_call):
        def counted(self, *args, **kwargs):
            calls.append(1)
            return model_call(self, *args, **kwargs)

        return counted

    monkeypatch.setattr(HFLM, "_model_call", HFLM._model_call)  # the original is put back after the test
    adapter.wrap_every_model_call(counting)
    batch = [(pair, *adapter.encode_request(hflm, *pair)) for pair in REQUESTS]
    adapter.loglikelihood_tokens(hflm, batch, override_bs=len(batch))
    assert calls, "HFLM's scoring no longer goes through the class's `_model_call`"


class _CharacterLM(adapter.TokenScoringLM):
    """One token per character; scores each request by its continuation length."""

    backend = "causal"
    eot_token_id = 0

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return [ord(character) for character in string]

    def score_tokens(self, requests):
        return [(-float(len(continuation)), True) for _, _, continuation in requests]

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError


def test_a_token_scoring_lm_is_scored_through_lm_evals_public_loglikelihood():
    lm = _CharacterLM()
    instances = [Instance(request_type="loglikelihood", doc={}, arguments=("ab ", "cd"), idx=0)]
    assert lm.loglikelihood(instances, disable_tqdm=True) == [(-3.0, True)]  # " cd": the trailing space moved over
    assert adapter.loglikelihood_tokens(lm, [(("ab ", "cd"), *adapter.encode_request(lm, "ab ", "cd"))]) == [(-3.0, True)]


def test_skipped_task_files_names_the_files_lm_evals_index_drops(toy_task_dir, tmp_path):
    """What the private index skips (a YAML syntax error, a YAML that is not a mapping) is what the adapter names."""
    folder = shutil.copytree(toy_task_dir, tmp_path / "tasks")
    (folder / "broken.yaml").write_text("task: toy_broken\n  doc_to_text: [\n")
    (folder / "listed.yaml").write_text("- not\n- a mapping\n")
    skipped = adapter.skipped_task_files(folder)
    assert set(skipped) == {folder / "broken.yaml", folder / "listed.yaml"}
    assert skipped[folder / "broken.yaml"].startswith("ScannerError: mapping values are not allowed")
    index = TaskManager(include_path=str(folder)).all_tasks
    assert "toy_capitals" in index and "toy_broken" not in index  # the index really drops it
