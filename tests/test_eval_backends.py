"""The backend registry: names resolve lazily, unknown or unfit names are one clear error, one call shape fits all."""

from __future__ import annotations

import subprocess
import sys

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from eval_fixtures import TOY_TASK
from mergetune.errors import MergetuneError
from mergetune.eval import EvalConfig, Evaluator
from mergetune.eval.backends import (
    backend_names,
    engine_backend_names,
    get_backend_class,
    live_backend_names,
    search_backend_names,
)
from mergetune.eval.backends.base import Backend

pytest_plugins = ["eval_fixtures"]  # session fixtures shared by every test_eval_* module


def test_naming_the_backends_imports_none_of_them():
    code = (
        "import sys\nfrom mergetune.eval.backends import backend_names, live_backend_names\n"
        "backend_names(), live_backend_names()\n"
        "print([m for m in sys.modules if m.startswith('mergetune.eval.backends.') or m == 'vllm'])"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
    assert backend_names() == ["hf", "vllm", "server"] and live_backend_names() == ["hf"]
    assert engine_backend_names() == ["vllm"] and search_backend_names() == ["hf", "vllm"]


@pytest.mark.parametrize("name", backend_names())
def test_every_registered_backend_resolves_to_a_backend_class_that_says_whether_it_scores_live_models(name):
    backend_class = get_backend_class(name)
    assert issubclass(backend_class, Backend) and backend_class.name == name
    overrides_live = backend_class.for_live_model.__func__ is not Backend.for_live_model.__func__
    accepts_live = backend_class.check_live.__func__ is not Backend.check_live.__func__
    assert overrides_live == accepts_live == (name in live_backend_names())
    builds = backend_class.for_candidates.__func__ is not Backend.for_candidates.__func__
    assert builds == (name in engine_backend_names())


def test_an_unknown_backend_lists_the_known_ones():
    with pytest.raises(MergetuneError, match="unknown backend 'tpu'; known: hf, vllm, server"):
        get_backend_class("tpu")


@pytest.fixture
def config(toy_task_dir) -> EvalConfig:
    return EvalConfig(tasks=(TOY_TASK,), include_paths=(toy_task_dir,), limit=2)


def test_a_live_model_is_scored_by_a_live_backend_and_refused_by_the_others(eval_models, config):
    model = AutoModelForCausalLM.from_pretrained(eval_models["base"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(eval_models["base"])
    evaluator = Evaluator.from_model(model, tokenizer, config, backend="hf", checkpoint_dir=eval_models["base"])
    assert evaluator.score().backend["backend"] == "hf"  # hf scores the object and ignores the checkpoint
    for other in ("server", "vllm"):  # vllm merges candidates in its own engine: no live model crosses to it
        with pytest.raises(MergetuneError, match=f"backend '{other}' cannot score a live model; use one of hf"):
            Evaluator.from_model(model, tokenizer, config, backend=other, checkpoint_dir=eval_models["base"])
