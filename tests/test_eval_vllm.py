"""The vLLM backend without vLLM: candidates merged inside the engine, checked against a stand-in engine.

vLLM cannot be installed here. The stand-in below plays vLLM's part as its public
API and source (0.33, 0.34) say: `LLM(..., worker_extension_cls=...)` mixes our extension
into each worker (one per tensor-parallel rank), `collective_rpc` calls it with
arguments that pass through the engine core's serializer — msgpack with tensors
encoded as (dtype, shape, frame) and utility arguments decoded untyped
(`v1/serial_utils.py`, `v1/engine/core.py`), so only plain data survives — the
engine model keeps Llama's q/k/v and gate/up projections in fused `qkv_proj` /
`gate_up_proj` parameters filled by `load_weights`, `load_format="dummy"` starts it
with random weights, and `generate` with `prompt_logprobs` returns, per prompt
position, a dict of token id -> Logprob holding the prompt token and the top one,
computed from the engine's own fused parameters. From 0.34 on, a request with
`prompt_logprob_start` gets None for the rows before it and may take that many
leading tokens, in whole blocks, from the prefix cache (`v1/engine/logprobs.py`,
`v1/request.py`); the stand-in counts the tokens it had to compute. What the
stand-in does not show: real CUDA workers in other processes, vLLM's own Llama,
memory, and whether vLLM shares blocks between requests of one batch.
"""

from __future__ import annotations

import logging
import importlib
import sys
import types
from dataclasses import dataclass

import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM
from typer.testing import CliRunner

from eval_fixtures import TOY_TASK
from mergetune.cli import app
from mergetune.demo.tiny import load_state
from mergetune.errors import MergetuneError
from mergetune.eval import EvalConfig, Evaluator
from mergetune.eval.backends.vllm import WORKER_EXTENSION
from mergetune.merge_ops.disk import merge_recipe_file
from mergetune.merge_ops.inmemory import InMemoryBuilder
from mergetune.merge_ops.plan import plan_merge
from mergetune.merge_ops.recipe import parse_recipes
from mergetune.merge_ops.sources import open_source
from mergetune.search.workspace import write_skeleton

pytest_plugins = ["eval_fixtures"]  # session fixtures shared by every test_eval_* module

# The engine's layout, written out independently of the code under test.
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def engine_layout(hf_names):
    """vLLM parameter -> ordered HF parts, derived with the rule table above."""
    layout: dict[str, list[tuple[int, str]]] = {}
    for name in hf_names:
        module, _, leaf = name.rpartition(".")
        parent, _, projection = module.rpartition(".")
        fused, position = _FUSED.get(projection, (projection, 0))
        layout.setdefault(f"{parent}.{fused}.{leaf}".lstrip("."), []).append((position, name))
    return {target: [name for _, name in sorted(parts)] for target, parts in layout.items()}


def vllm_wire(value, frames=None):
    """What a value becomes after vLLM's engine-core serializer and untyped decoder: plain data only."""
    frames = [] if frames is None else frames
    if isinstance(value, torch.Tensor):
        frames.append(value)
        return [str(value.dtype).removeprefix("torch."), list(value.shape), len(frames)]
    if isinstance(value, (list, tuple)):
        return [vllm_wire(item, frames) for item in value]
    if isinstance(value, dict):
        return {key: vllm_wire(item, frames) for key, item in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"Object of type {type(value)} is not serializable")


@pytest.mark.parametrize("version, said", [("0.33.0", False), ("0.34.2", False), ("0.32.1", True), ("0.35.0rc1", True)])
def test_a_vllm_the_backend_was_not_written_against_is_said(version, said, caplog):
    from packaging.version import Version

    from mergetune.eval.backends.vllm import warn_if_unchecked

    with caplog.at_level(logging.WARNING):
        warn_if_unchecked(Version(version))
    assert (f"vLLM {version} is outside the versions" in caplog.text) == said


def test_a_text_that_starts_with_bos_gets_no_second_one_as_lm_eval_s_vllm_model_tokenizes_it():
    from tokenizers import processors

    from mergetune.demo.tiny import build_tokenizer
    from mergetune.eval.backends.vllm import _VLLMLM

    tokenizer = build_tokenizer()
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    lm = _VLLMLM(llm=None, tokenizer=tokenizer, max_length=64, prefix_cache=False)
    plain = lm.tok_encode("the capital")
    assert plain[0] == bos and plain[1] != bos  # the tokenizer's own default adds one
    assert lm.tok_encode("<s> the capital") == plain  # not two
    assert lm.tok_encode("the capital", add_special_tokens=False) == plain[1:]
    assert lm.tok_encode("") == []


def test_only_plain_data_crosses_the_engine_boundary():
    assert vllm_wire(("recipe: text", 7, None)) == ["recipe: text", 7, None]
    assert vllm_wire([("w", torch.zeros(2, 3))]) == [["w", ["float32", [2, 3], 1]]]  # not a tensor any more
    with pytest.raises(TypeError):
        vllm_wire(object())


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
        self.tied = hf_model.config.tie_word_embeddings  # the head is the embeddings: no parameter of its own

    def named_parameters(self):
        return iter(self.params.items())

    def parameters(self):
        return iter(self.params.values())

    def _rows(self, target: str, hf_name: str) -> slice:
        parts = self.layout[target]
        start = sum(self.hf_params[p].shape[0] for p in parts[: parts.index(hf_name)])
        return slice(start, start + self.hf_params[hf_name].shape[0])

    def load_weights(self, weights):
        loaded = set()
        for name, tensor in weights:
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name}: expected a tensor, got {type(tensor).__name__} {tensor!r:.60}")
            if self.skip and self.skip in name:
                continue
            if self.tied and name == "lm_head.weight":  # vLLM 0.33, loaded without the embeddings in the same call
                raise ValueError("'lm_head.weight' was skipped because it is tied to 'model.embed_tokens.weight'")
            target = next(t for t, parts in self.layout.items() if name in parts)
            self.params[target][self._rows(target, name)].copy_(tensor)
            loaded.add(target)
        return loaded

    def hf_state(self) -> dict[str, torch.Tensor]:
        """The engine's weights under their HF names, unfused."""
        return {name: self.params[target][self._rows(target, name)] for target, parts in self.layout.items() for name in parts}

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
    block_size = 4  # tokens per prefix-cache block
    resets_fail = False
    stale_cache = False  # cached blocks hold keys of other tokens: what a wrong cache would do to the scores

    def __init__(self, model, tokenizer, worker_extension_cls, tensor_parallel_size=1, load_format="auto", **options):
        module, _, name = worker_extension_cls.rpartition(".")
        extension = getattr(importlib.import_module(module), name)
        worker_cls = type("Worker", (extension,), {"get_model": lambda self: self.model})
        self.workers = []
        for rank in range(tensor_parallel_size):
            if load_format == "dummy":  # random weights, as vLLM's dummy loader
                torch.manual_seed(100 + rank)
                hf_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).eval()
            else:
                hf_model = AutoModelForCausalLM.from_pretrained(model).eval()
            worker = worker_cls()
            worker.model = EngineModel(hf_model, skip=FakeLLM.skip)
            self.workers.append(worker)
        self.options = {"worker_extension_cls": worker_extension_cls, "load_format": load_format, **options}
        self.llm_engine = types.SimpleNamespace(model_config=types.SimpleNamespace(max_model_len=512, model=model, dtype=torch.float32))
        self.prefix_cache_resets = 0
        self.generate_calls = 0
        self.cached_blocks: set[tuple[int, ...]] = set()  # token prefixes whose blocks the cache holds
        self.prompt_tokens = self.computed_tokens = 0
        FakeLLM.instances.append(self)

    def collective_rpc(self, method, args=(), kwargs=None):
        args, kwargs = vllm_wire(args), vllm_wire(kwargs or {})
        return [vllm_wire(getattr(worker, method)(*args, **kwargs)) for worker in self.workers]

    def reset_prefix_cache(self):
        if FakeLLM.resets_fail:
            return False
        self.prefix_cache_resets += 1
        self.cached_blocks.clear()
        return True

    def generate(self, prompts, sampling_params, use_tqdm=True):
        assert all(len(p["prompt_token_ids"]) < 512 for p in prompts)  # room for one generated token
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        self.generate_calls += 1
        model = self.workers[0].model
        model.unfuse()
        return [self._one(model, p["prompt_token_ids"], params) for p, params in zip(prompts, sampling_params, strict=True)]

    def _one(self, model, tokens, params):
        assert params.kwargs["prompt_logprobs"] >= 1
        start = params.kwargs.get("prompt_logprob_start") or 0
        assert not start or start < len(tokens) - 1, "vLLM: prompt_logprob_start must be less than prompt_len - 1"
        reads_cache = self.options["enable_prefix_caching"] and params.kwargs.get("skip_reading_prefix_cache") is False
        hit = 0
        if reads_cache:  # whole blocks, at most `start` tokens: the scored rows are always computed
            while hit + self.block_size <= start and tuple(tokens[: hit + self.block_size]) in self.cached_blocks:
                hit += self.block_size
        if self.options["enable_prefix_caching"]:
            self.cached_blocks.update(tuple(tokens[:end]) for end in range(self.block_size, len(tokens) + 1, self.block_size))
        self.prompt_tokens += len(tokens)
        self.computed_tokens += len(tokens) - hit
        logprobs = model.prompt_logprobs([0] * hit + tokens[hit:] if FakeLLM.stale_cache else tokens)
        return types.SimpleNamespace(prompt_logprobs=[None] * (start + 1) + logprobs[start + 1 :])


class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams, vllm.__version__ = FakeLLM, SamplingParams, "0.34.0"
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = dict  # a TypedDict in vLLM
    vllm.inputs = inputs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.inputs", inputs)
    FakeLLM.instances, FakeLLM.skip, FakeLLM.resets_fail, FakeLLM.stale_cache = [], None, False, False
    return vllm


def doc_metrics(result):
    return [doc.metrics for docs in result.tasks[TOY_TASK].docs.values() for doc in docs]


SLERP = """merge_method: slerp
base_model: {a}
models: [{{model: {a}}}, {{model: {b}}}]
parameters: {{t: [{{filter: self_attn, value: [0, 0.5, 1]}}, {{value: 0.3}}]}}
dtype: float32
"""
RECIPES = {
    "slerp": SLERP,
    "dare_ties": """merge_method: dare_ties
base_model: {base}
models: [{{model: {base}}}, {{model: {a}, parameters: {{weight: 0.6, density: 0.5}}}},
         {{model: {b}, parameters: {{weight: [0.2, 0.9], density: 0.7}}}}]
dtype: float32
""",
    "ties": """merge_method: ties
base_model: {base}
models: [{{model: {base}}}, {{model: {a}, parameters: {{weight: 0.5, density: 0.6}}}},
         {{model: {b}, parameters: {{weight: 0.5, density: 0.4}}}}]
dtype: float32
""",
    "linear": """merge_method: linear
models: [{{model: {a}, parameters: {{weight: 0.3}}}}, {{model: {b}, parameters: {{weight: 0.7}}}}]
dtype: float32
""",
    "passthrough": """merge_method: passthrough
slices:
  - sources: [{{model: {a}, layer_range: [0, 1]}}]
  - sources: [{{model: {b}, layer_range: [1, 2]}}]
  - sources: [{{model: {a}, layer_range: [2, 4]}}]
dtype: float32
""",
    "two stages": """name: blend
merge_method: linear
models: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.5}}}}]
dtype: float32
---
merge_method: slerp
base_model: blend
models: [{{model: blend}}, {{model: {base}}}]
parameters: {{t: 0.4}}
dtype: float32
""",
}


def recipe_text(name, models):
    return RECIPES[name].format(**{key: str(path) for key, path in models.items()})


@pytest.mark.parametrize("name", RECIPES)
def test_the_worker_side_build_is_the_disk_merge_bit_for_bit(name, family_f32, tmp_path):
    models = {"a": family_f32["model_a"], "b": family_f32["model_b"], "base": family_f32["base"]}
    recipe = parse_recipes(recipe_text(name, models))
    merge_recipe_file(recipe, tmp_path / "disk", seed=11)
    on_disk = load_state(tmp_path / "disk")
    references = {ref for stage in recipe.stages for ref in stage.referenced_models() if ref not in recipe.stage_names()}
    streamed = dict(InMemoryBuilder({ref: open_source(ref) for ref in references}).stream(recipe, seed=11))
    assert streamed.keys() == on_disk.keys()
    assert all(torch.equal(streamed[key], on_disk[key]) for key in on_disk), name


def engine_evaluator(eval_models, toy_task_dir, first_recipe: str = SLERP, **options):
    models = {"a": eval_models["base"], "b": eval_models["other"]}
    first = parse_recipes(first_recipe.format(**models)).stages[0]
    sources = {str(path): open_source(str(path)) for path in models.values()}
    config = EvalConfig(tasks=(TOY_TASK,), include_paths=(toy_task_dir,))
    skeleton = write_skeleton(first, plan_merge(first, sources), sources)
    return Evaluator.for_candidates(skeleton, list(sources), "float32", config, backend="vllm", **options)


@pytest.mark.parametrize(
    "version, shared_prefix, prefix_cache",
    [("0.34.0", True, True), ("0.34.0", False, False), ("0.33.0", True, False), ("0.34.0.dev12+g1a2b3c", True, False)],
)
def test_each_candidate_is_merged_inside_the_engine_and_scores_as_the_disk_merge_does(
    fake_vllm, eval_models, toy_task_dir, tmp_path, version, shared_prefix, prefix_cache
):
    fake_vllm.__version__ = version
    evaluator = engine_evaluator(eval_models, toy_task_dir, shared_prefix=shared_prefix)
    (engine,) = FakeLLM.instances
    assert engine.options["worker_extension_cls"] == WORKER_EXTENSION and engine.options["load_format"] == "dummy"
    assert engine.options["dtype"] == "float32" and engine.options["enable_prefix_caching"] is prefix_cache
    assert evaluator.backend.describe()["shared_prefix"] is prefix_cache
    scores = []
    for t in (0.0, 1.0):  # the base model, then the other
        text = recipe_text("slerp", {"a": eval_models["base"], "b": eval_models["other"]})
        text = text.replace("value: 0.3", f"value: {t}").replace("[0, 0.5, 1]", str(t))
        recipe = parse_recipes(text)
        evaluator.backend.build(recipe, seed=None)
        merge_recipe_file(recipe, tmp_path / f"t{t}")
        disk = load_state(tmp_path / f"t{t}")
        engine_state = engine.workers[0].model.hf_state()
        assert all(torch.equal(engine_state[name], disk[name]) for name in disk)
        on_engine = evaluator.score(limit=12)
        reference = Evaluator.from_dir(tmp_path / f"t{t}", evaluator.config, batch_size=1).score(doc_ids=on_engine.doc_ids)
        assert doc_metrics(on_engine) == doc_metrics(reference)
        scores.append(doc_metrics(on_engine))
    assert scores[0] != scores[1]
    assert FakeLLM.instances == [engine] and engine.prefix_cache_resets == 2  # one engine, cache dropped per candidate
    # Each document's answer choices share its context: with the cache, it is computed about once.
    assert (engine.computed_tokens < 0.7 * engine.prompt_tokens) if prefix_cache else (engine.computed_tokens == engine.prompt_tokens)


def test_a_tied_model_merged_with_an_untied_one_loads_its_merged_head_into_the_engine(
    fake_vllm, family_bf16_tied, family_f32, toy_task_dir, tmp_path
):
    """The tied model donates the config and the untied one a head: the engine starts untied, so the merged head is
    loaded (vLLM 0.33 refuses a head loaded into a tied model) and scores as the disk merge does."""
    models = {"base": family_bf16_tied["model_a"], "other": family_f32["model_a"]}
    linear = "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 0.5}}}}, {{model: {b}, parameters: {{weight: 0.5}}}}]\ndtype: float32\n"
    evaluator = engine_evaluator(models, toy_task_dir, first_recipe=linear)
    recipe = parse_recipes(linear.format(a=models["base"], b=models["other"]))
    evaluator.backend.build(recipe)
    merge_recipe_file(recipe, tmp_path / "disk")
    disk = Evaluator.from_dir(tmp_path / "disk", EvalConfig(tasks=(TOY_TASK,), include_paths=(toy_task_dir,)), device="cpu")
    assert evaluator.score().tasks[TOY_TASK].metrics == disk.score().tasks[TOY_TASK].metrics


def test_shared_contexts_are_read_from_the_cache_only_up_to_the_first_scored_row(fake_vllm, eval_models, toy_task_dir):
    evaluator = engine_evaluator(eval_models, toy_task_dir)
    (engine,) = FakeLLM.instances
    calls = []
    generate = engine.generate
    engine.generate = lambda prompts, params, use_tqdm=True: calls.append((prompts, params)) or generate(prompts, params)
    evaluator.backend.build(parse_recipes(recipe_text("slerp", {"a": eval_models["base"], "b": eval_models["other"]})))
    requests = [(("", ""), [5, 6, 7, 8, 9], [10, 11]), (("", ""), [5, 6, 7, 8, 9], [12])]
    evaluator.backend.lm.score_tokens(requests)
    (prompts, params), (checked, plain) = calls  # the engine's first requests are scored again in full, once
    assert [(p["prompt_token_ids"], each.kwargs["prompt_logprob_start"]) for p, each in zip(prompts, params)] == [
        ([5, 6, 7, 8, 9, 10, 11], 4), ([5, 6, 7, 8, 9, 12], 4)  # the row that predicts the first continuation token
    ]
    assert all(each.kwargs["skip_reading_prefix_cache"] is False for each in params)
    assert checked == prompts and "prompt_logprob_start" not in plain.kwargs
    evaluator.backend.lm.score_tokens(requests)
    assert len(calls) == 3


def test_an_empty_continuation_goes_as_a_plain_request_which_vllm_accepts(fake_vllm, eval_models, toy_task_dir):
    """vLLM 0.34 refuses a `prompt_logprob_start` at the prompt's last row, where an empty continuation would put it."""
    evaluator = engine_evaluator(eval_models, toy_task_dir)
    evaluator.backend.build(parse_recipes(recipe_text("slerp", {"a": eval_models["base"], "b": eval_models["other"]})))
    scores = evaluator.backend.lm.score_tokens([(("", ""), [5, 6, 7], []), (("", ""), [5, 6, 7], [8])])
    assert scores[0] == (0.0, True) and scores[1][0] < 0


def test_cached_scores_that_disagree_with_full_scoring_turn_the_cache_off_with_a_warning(
    fake_vllm, eval_models, toy_task_dir, tmp_path, caplog
):
    FakeLLM.stale_cache = True
    evaluator = engine_evaluator(eval_models, toy_task_dir)
    recipe = parse_recipes(recipe_text("slerp", {"a": eval_models["base"], "b": eval_models["other"]}))
    evaluator.backend.build(recipe)
    with caplog.at_level("WARNING", logger="mergetune.eval.backends.vllm"):
        on_engine = evaluator.score(limit=12)
    assert "differ from full scoring" in caplog.text and "scored in full from now on" in caplog.text
    assert evaluator.backend.describe()["shared_prefix"] is False
    merge_recipe_file(recipe, tmp_path / "disk")
    reference = Evaluator.from_dir(tmp_path / "disk", evaluator.config, batch_size=1).score(doc_ids=on_engine.doc_ids)
    assert doc_metrics(on_engine) == doc_metrics(reference)


def test_a_continuation_longer_than_the_window_is_scored_on_what_fits(fake_vllm, eval_models, toy_task_dir):
    evaluator = engine_evaluator(eval_models, toy_task_dir)
    (engine,) = FakeLLM.instances
    evaluator.backend.build(parse_recipes(recipe_text("slerp", {"a": eval_models["base"], "b": eval_models["other"]})))
    window = engine.llm_engine.model_config.max_model_len - 1
    (total, greedy), = evaluator.backend.lm.score_tokens([(("", ""), [5, 6], [7, 8, 9] * window)])
    expected = engine.workers[0].model.prompt_logprobs(([7, 8, 9] * window)[-window:])
    assert total == pytest.approx(sum(row[token].logprob for row, token in zip(expected[1:], ([7, 8, 9] * window)[-window + 1 :])))


def test_a_prefix_cache_vllm_cannot_drop_stops_the_candidate(fake_vllm, eval_models, toy_task_dir):
    evaluator = engine_evaluator(eval_models, toy_task_dir)
    FakeLLM.resets_fail = True
    recipe = parse_recipes(recipe_text("slerp", {"a": eval_models["base"], "b": eval_models["other"]}))
    with pytest.raises(MergetuneError, match="could not drop its prefix cache"):
        evaluator.backend.build(recipe)
    FakeLLM.instances.clear()
    without_cache = engine_evaluator(eval_models, toy_task_dir, shared_prefix=False)
    without_cache.backend.build(recipe)  # nothing reads a cache it could not drop


def test_every_tensor_parallel_rank_builds_the_same_seeded_candidate(fake_vllm, eval_models, toy_task_dir):
    evaluator = engine_evaluator(eval_models, toy_task_dir, tensor_parallel_size=2)
    (engine,) = FakeLLM.instances
    base, other = eval_models["base"], eval_models["other"]
    recipe = f"""merge_method: dare_ties
base_model: {base}
models: [{{model: {base}}}, {{model: {other}, parameters: {{weight: 0.8, density: 0.5}}}}]
dtype: float32
"""
    evaluator.backend.build(parse_recipes(recipe), seed=5)
    first, second = (worker.model.params for worker in engine.workers)
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_parameter_the_engine_did_not_load_is_an_error_not_a_stale_score(fake_vllm, eval_models, toy_task_dir):
    FakeLLM.skip = "layers.2.self_attn.o_proj"
    evaluator = engine_evaluator(eval_models, toy_task_dir)
    recipe = parse_recipes(recipe_text("slerp", {"a": eval_models["base"], "b": eval_models["other"]}))
    with pytest.raises(MergetuneError, match="kept the previous weights of 1 parameter.*layers.2.self_attn.o_proj.weight"):
        evaluator.backend.build(recipe)


@pytest.mark.parametrize("shared_prefix", [True, False])
def test_a_study_scored_by_vllm_runs_end_to_end_without_a_live_model(
    fake_vllm, eval_models, toy_task_dir, tmp_path, shared_prefix
):
    study = {
        "name": "engine", "models": [str(eval_models["base"]), str(eval_models["other"])], "methods": ["slerp"],
        "dtype": "float32", "backend": "vllm", "engine": {"tensor_parallel_size": 2},
        "space": {"slerp": {"control_points": 2}}, "budget": {"n_trials": 3},
        "evaluation": {
            "tasks": [TOY_TASK], "include_paths": [str(toy_task_dir)], "limit": 4, "final": {"limit": 4, "finalists": 1},
            "shared_prefix": shared_prefix,
        },
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    result = CliRunner().invoke(app, ["study", "run", str(path), "--quiet"])
    assert result.exit_code == 0, result.output
    (engine,) = FakeLLM.instances
    assert len(engine.workers) == 2 and engine.prefix_cache_resets >= 3  # every trial and finalist built in the engine
    assert engine.options["enable_prefix_caching"] is shared_prefix


def test_missing_vllm_is_a_clear_error(monkeypatch, eval_models, toy_task_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    result = CliRunner().invoke(
        app, ["eval", str(eval_models["base"]), "--tasks", TOY_TASK, "--include-path", str(toy_task_dir), "--backend", "vllm"]
    )
    assert result.exit_code == 2
    assert "pip install 'mergetune[vllm]'" in result.output
