"""The vLLM backend without vLLM: name mapping, and the update + scoring flow against a stand-in engine.

vLLM cannot be installed here. The stand-in below plays vLLM's part as its public
API documents it: `LLM(..., worker_extension_cls=...)` mixes our extension into
each worker, `collective_rpc` calls it, the engine model keeps Llama's q/k/v and
gate/up projections in fused `qkv_proj` / `gate_up_proj` parameters and fills them
in `load_weights`, and `generate` with `prompt_logprobs` returns, per prompt
position, a dict of token id -> Logprob holding the prompt token and the top one.
The engine computes those logprobs from its own fused parameters.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from eval_fixtures import TOY_TASK
from mergetune.cli import app
from mergetune.errors import MergetuneError
from mergetune.eval import EvalConfig, Evaluator
from mergetune.eval.backends.vllm import WORKER_EXTENSION, plan_weight_update, vllm_parameter

pytest_plugins = ["eval_fixtures"]  # session fixtures shared by every test_eval_* module

# The engine's layout, written out independently of the code under test.
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
_SHARD_IDS = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "gate_proj": 0, "up_proj": 1}


def test_hf_llama_names_map_onto_vllm_fused_parameters():
    assert vllm_parameter("model.layers.3.self_attn.q_proj.weight") == ("model.layers.3.self_attn.qkv_proj.weight", "q")
    assert vllm_parameter("model.layers.3.self_attn.k_proj.weight") == ("model.layers.3.self_attn.qkv_proj.weight", "k")
    assert vllm_parameter("model.layers.3.self_attn.v_proj.weight") == ("model.layers.3.self_attn.qkv_proj.weight", "v")
    assert vllm_parameter("model.layers.0.mlp.gate_proj.weight") == ("model.layers.0.mlp.gate_up_proj.weight", 0)
    assert vllm_parameter("model.layers.0.mlp.up_proj.weight") == ("model.layers.0.mlp.gate_up_proj.weight", 1)
    for unfused in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight",
                    "model.layers.0.input_layernorm.weight", "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert vllm_parameter(unfused) == (unfused, None)


def engine_layout(hf_names):
    """vLLM parameter -> ordered HF parts, derived with the rule table above."""
    layout: dict[str, list[tuple[int, str]]] = {}
    for name in hf_names:
        module, _, leaf = name.rpartition(".")
        parent, _, projection = module.rpartition(".")
        fused, position = _FUSED.get(projection, (projection, 0))
        layout.setdefault(f"{parent}.{fused}.{leaf}".lstrip("."), []).append((position, name))
    return {target: [name for _, name in sorted(parts)] for target, parts in layout.items()}


def test_a_full_update_of_a_tiny_llama_covers_every_engine_parameter(eval_models):
    names = [n for n, _ in AutoModelForCausalLM.from_pretrained(eval_models["base"]).named_parameters()]
    layout = engine_layout(names)
    plan = plan_weight_update(names, set(layout))
    assert set(plan) == set(layout)
    for target, parts in layout.items():
        assert [name for name, _ in plan[target]] == parts
        assert [shard for _, shard in plan[target]] == [_SHARD_IDS.get(p.split(".")[-2]) for p in parts]


def test_update_plans_refuse_unknown_tensors_and_partial_fused_parameters():
    engine = {"model.layers.0.self_attn.qkv_proj.weight", "model.norm.weight"}
    with pytest.raises(MergetuneError, match="model.layers.0.self_attn.rotary.weight"):
        plan_weight_update(["model.layers.0.self_attn.rotary.weight"], engine)
    with pytest.raises(MergetuneError, match="qkv_proj"):
        plan_weight_update(["model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"], engine)


# --------------------------------------------------------------------------- stand-in engine


@dataclass
class Logprob:
    logprob: float
    rank: int


class EngineModel:
    """vLLM's Llama as `load_weights` sees it: fused parameters, filled shard by shard."""

    def __init__(self, hf_model: torch.nn.Module, skip: str | None = None) -> None:
        self.hf = hf_model  # runs the forward passes, with weights unfused from `params`
        self.hf_params = dict(hf_model.named_parameters())
        self.layout = engine_layout(self.hf_params)
        self.params = {t: torch.cat([self.hf_params[n].detach().clone() for n in parts]) for t, parts in self.layout.items()}
        self.skip = skip

    def named_parameters(self):
        return iter(self.params.items())

    def _rows(self, target: str, hf_name: str) -> slice:
        parts = self.layout[target]
        start = sum(self.hf_params[p].shape[0] for p in parts[: parts.index(hf_name)])
        return slice(start, start + self.hf_params[hf_name].shape[0])

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            if self.skip and self.skip in name:
                continue
            target = next(t for t, parts in self.layout.items() if name in parts)
            self.params[target][self._rows(target, name)].copy_(tensor)
            loaded.add(target)
        return loaded

    def unfuse(self) -> None:
        with torch.no_grad():
            for target, parts in self.layout.items():
                for name in parts:
                    self.hf_params[name].copy_(self.params[target][self._rows(target, name)])

    def prompt_logprobs(self, tokens):
        with torch.no_grad():
            logprobs = torch.log_softmax(self.hf(torch.tensor([tokens])).logits[0].float(), dim=-1)
        out = [None]
        for position in range(1, len(tokens)):
            row = logprobs[position - 1]
            best = int(row.argmax())
            entry = {best: Logprob(float(row[best]), 1)}
            entry.setdefault(tokens[position], Logprob(float(row[tokens[position]]), 1 + int((row > row[tokens[position]]).sum())))
            out.append(entry)
        return out


class FakeLLM:
    """Stands in for `vllm.LLM`; records how it was made and used."""

    instances: list[FakeLLM] = []
    skip: str | None = None

    def __init__(self, model, tokenizer, worker_extension_cls, **options):
        module, _, name = worker_extension_cls.rpartition(".")
        extension = getattr(importlib.import_module(module), name)
        worker_cls = type("Worker", (extension,), {})
        self.worker = worker_cls()
        hf_model = AutoModelForCausalLM.from_pretrained(model).eval()
        self.worker.model_runner = types.SimpleNamespace(model=EngineModel(hf_model, skip=FakeLLM.skip))
        self.options = {"worker_extension_cls": worker_extension_cls, **options}
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=512, model=model, dtype=torch.float32))
        self.prefix_cache_resets = 0
        self.generate_calls = 0
        FakeLLM.instances.append(self)

    def collective_rpc(self, method, args=(), kwargs=None):
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.prefix_cache_resets += 1
        return True

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert sampling_params.kwargs["prompt_logprobs"] >= 1
        self.generate_calls += 1
        model = self.worker.model_runner.model
        model.unfuse()
        return [types.SimpleNamespace(prompt_logprobs=model.prompt_logprobs(p["prompt_token_ids"])) for p in prompts]


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = FakeLLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict  # a TypedDict in vLLM
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    FakeLLM.instances, FakeLLM.skip = [], None
    return vllm


@pytest.fixture
def live_model(eval_models):
    return AutoModelForCausalLM.from_pretrained(eval_models["base"]).eval(), AutoTokenizer.from_pretrained(eval_models["base"])


def doc_metrics(result):
    return [doc.metrics for docs in result.tasks[TOY_TASK].docs.values() for doc in docs]


def test_vllm_scores_the_live_weights_after_every_in_place_update(fake_vllm, live_model, eval_models, toy_task_dir):
    model, tokenizer = live_model
    config = EvalConfig(tasks=(TOY_TASK,), include_paths=(toy_task_dir,))
    on_vllm = Evaluator.from_model(model, tokenizer, config, backend="vllm", checkpoint_dir=eval_models["base"])
    in_process = Evaluator.from_model(model, tokenizer, config, batch_size=1)
    (engine,) = FakeLLM.instances
    assert engine.options["worker_extension_cls"] == WORKER_EXTENSION
    assert engine.options["enable_prefix_caching"] is False

    before = on_vllm.score()
    assert doc_metrics(before) == doc_metrics(in_process.score(doc_ids=before.doc_ids))

    other = AutoModelForCausalLM.from_pretrained(eval_models["other"]).state_dict()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.data.copy_(other[name])
    after = on_vllm.score(doc_ids=before.doc_ids)
    assert doc_metrics(after) == doc_metrics(in_process.score(doc_ids=before.doc_ids))
    assert doc_metrics(after) != doc_metrics(before)

    qkv = engine.worker.model_runner.model.params["model.layers.1.self_attn.qkv_proj.weight"]
    layer = model.model.layers[1].self_attn
    assert torch.equal(qkv, torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]))
    assert FakeLLM.instances == [engine]  # one engine for the whole search, never restarted
    assert engine.prefix_cache_resets == 2 and engine.generate_calls == 2
    assert on_vllm.score(doc_ids=before.doc_ids).forward_seconds > 0


def test_a_weight_the_engine_did_not_load_is_an_error_not_a_stale_score(fake_vllm, live_model, eval_models, toy_task_dir):
    model, tokenizer = live_model
    FakeLLM.skip = "layers.2.self_attn.o_proj"
    evaluator = Evaluator.from_model(
        model, tokenizer, EvalConfig(tasks=(TOY_TASK,), include_paths=(toy_task_dir,)), backend="vllm", checkpoint_dir=eval_models["base"]
    )
    with pytest.raises(MergetuneError, match="did not load 1 parameters, e.g. model.layers.2.self_attn.o_proj.weight"):
        evaluator.score(limit=2)


def test_missing_vllm_is_a_clear_error(monkeypatch, eval_models, toy_task_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    result = CliRunner().invoke(
        app, ["eval", str(eval_models["base"]), "--tasks", TOY_TASK, "--include-path", str(toy_task_dir), "--backend", "vllm"]
    )
    assert result.exit_code == 2
    assert "pip install 'mergetune[vllm]'" in result.output
