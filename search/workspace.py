"""What a study's worker loads once: the source models, the model it scores, the evaluator, the documents.

Everything here is reused by every trial the process runs. With a live backend
(`hf`) the sources are resident here and a trial rewrites a transformers model's
weights in place; with an engine backend (`vllm`) no model is kept here: the
engine's workers hold the sources and a trial sends them the recipe.
"""

from __future__ import annotations

import atexit
import logging
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Protocol

import torch

from mergetune.devices import check_device, device_memory, linear_slowdown
from mergetune.eval import EvalConfig, Evaluator
from mergetune.eval.evaluator import load_tasks
from mergetune.eval.backends import engine_backend_names
from mergetune.eval.tasks import Origins
from mergetune.merge_ops.disk import write_side_files
from mergetune.merge_ops.inmemory import InMemoryBuilder
from mergetune.merge_ops.methods import METHODS
from mergetune.merge_ops.plan import DTYPES, MergePlan
from mergetune.merge_ops.recipe import Recipe, recipe_from_dict
from mergetune.merge_ops.sources import CheckpointSource, TensorSource, open_source, resident_bytes
from mergetune.merge_ops.stages import plan_stage
from mergetune.search.documents import Documents, choose_documents, final_only_tasks
from mergetune.search.memory import cache_fits, plan_engine, plan_live
from mergetune.search.methods import SEARCHABLE
from mergetune.search.study_file import Study

log = logging.getLogger(__name__)


class CandidateBuilder(Protocol):
    """Makes the scored model a candidate: the live model's weights, or the engine's."""

    device_type: str  # where candidates are built ("cpu", "cuda"): seeded random masks depend on it

    def build(self, recipe: Recipe, seed: Optional[int] = None) -> Any: ...


@dataclass
class Workspace:
    """What a study loads once per process."""

    study: Study
    builder: CandidateBuilder
    evaluator: Evaluator
    documents: Documents
    fingerprints: Optional[dict[str, str]] = None  # each model as the study file names it (`model_fingerprints`)

    @classmethod
    def open(
        cls,
        study: Study,
        say: Callable[[str], None] = log.info,
        models: Optional["OpenedModels"] = None,
        loading: Optional[Callable[[int, int], None]] = None,
    ) -> "Workspace":
        """Load what the study's trials share; `models` are the study's models already opened (`open_models`),
        `loading(bytes loaded, bytes in all)` is called as a live backend loads them."""
        spec = study.spec
        check_device(spec.device)
        for method in spec.methods:
            SEARCHABLE.get(method).check(spec)
        models = models or open_models(study)
        sources = models.sources
        references = list(sources)
        # The scored model takes its shape from the first method's hand-written recipe.
        baselines = {method: baseline_recipe(study, method) for method in spec.methods}
        first_recipe = baselines[spec.methods[0]]
        config = eval_config(study)
        plans = {method: plan_stage(recipe, sources) for method, recipe in baselines.items()}  # shapes only
        for method, plan in plans.items():
            for warning in plan.warnings:  # e.g. a filter of the search space that matches no tensor of these models
                log.warning("%s (its hand-written recipe, as the study's space writes it): %s", method, warning)
        merged = plans[spec.methods[0]]
        say("preparing the evaluation tasks")
        tasks = load_tasks(config)  # a wrong task name or missing data is refused before minutes of loading models
        sources_bytes = sum(resident_bytes(source) for source in sources.values())
        if spec.backend in engine_backend_names():
            options = spec.engine.model_dump(exclude_none=True)
            if torch.cuda.is_available():  # the engine's first GPU, whatever this worker's `device` says
                free, total = device_memory("cuda:0")
                memory = plan_engine(
                    "cuda:0", free, total, sources_bytes, plan_bytes(merged), spec.engine.tensor_parallel_size,
                    spec.engine.gpu_memory_utilization,
                )
                options["gpu_memory_utilization"] = memory.engine_share
                log.info("memory plan: %s; engine share %g", memory.table(), memory.engine_share)
            say(f"starting the {spec.backend} engine; its workers load {len(references)} model(s)")
            skeleton = write_skeleton(first_recipe, merged, sources)
            evaluator = Evaluator.for_candidates(
                skeleton, references, spec.dtype, config, backend=spec.backend, tasks=tasks,
                shared_prefix=spec.evaluation.shared_prefix, **options,
            )
            builder: CandidateBuilder = evaluator.backend
        else:
            warning = slow_dtype_warning(spec.device, spec.dtype)
            if warning:
                log.warning(warning)
            free, total = device_memory(spec.device)
            memory = plan_live(spec.device, free, total, sources_bytes, plan_bytes(merged))
            log.info("memory plan: %s", memory.table())
            cache = task_vector_bytes(study, merged)
            keep = cache > 0 and cache_fits(memory, cache)
            if cache:
                state = "kept" if keep else "recomputed: no room to keep them"
                log.info("task vectors (and rankings) %s between candidates (%.1f GB)", state, cache / 1e9)
            say(f"loading {len(references)} model(s) onto {spec.device}")
            live = InMemoryBuilder.for_recipe(
                first_recipe, sources, device=spec.device, dtype=DTYPES[spec.dtype], cache_task_vectors=keep,
                progress=loading,
            )
            from transformers import AutoTokenizer

            checkpoint_dir = sources[references[0]].directory
            tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
            evaluator = Evaluator.from_model(
                live.model, tokenizer, config, backend=spec.backend, checkpoint_dir=checkpoint_dir,
                shared_prefix=spec.evaluation.shared_prefix, tasks=tasks,
            )
            builder = live
        return cls(study, builder, evaluator, choose_documents(evaluator, spec), models.fingerprints)


def baseline_recipe(study: Study, method: str) -> Recipe:
    """The method's hand-written recipe as the study's search space writes it (filters, curves, models)."""
    searchable = SEARCHABLE.get(method)
    return recipe_from_dict(searchable.recipe(searchable.baseline(study.spec), study.spec, study.resolve))


@dataclass
class OpenedModels:
    """The study's models opened (headers read and checked, no weights loaded) and fingerprinted, once."""

    sources: dict[str, CheckpointSource]  # by resolved reference
    fingerprints: dict[str, str]  # `CheckpointSource.fingerprint` by the name the study file gives (as its definition)


def open_models(study: Study) -> OpenedModels:
    """The study's models (base model last), each opened once even if listed twice."""
    spec = study.spec
    listed = list(dict.fromkeys([*spec.models, *([spec.base_model] if spec.base_model else [])]))
    sources = {reference: open_source(reference) for reference in dict.fromkeys(map(study.resolve, listed))}
    return OpenedModels(sources, {model: sources[study.resolve(model)].fingerprint() for model in listed})


SLOW_DTYPE = 2.0  # a dtype this many times slower than float32 is worth a warning


def slow_dtype_warning(
    device: str, dtype: str, slowdown: Optional[Callable[[torch.dtype], float]] = None
) -> Optional[str]:
    """What to tell a study that computes on a CPU in a dtype the CPU only emulates, or None.

    The default dtype is bfloat16 (that of the hub's checkpoints), and on a CPU without native bfloat16
    every forward pass, so every trial's scoring, takes several times longer than in float32.
    """
    if torch.device(device).type != "cpu" or dtype == "float32":
        return None
    ratio = (slowdown or linear_slowdown)(DTYPES[dtype])
    if ratio < SLOW_DTYPE:
        return None
    return (
        f"dtype {dtype}: this CPU computes a linear layer {ratio:.0f}x slower in {dtype} than in float32 (it has no "
        f"native {dtype} arithmetic), so scoring can take several times longer; `dtype: float32` in the study file "
        f"avoids that (the candidates are then scored as float32 merges, not rounded to {dtype})"
    )


def eval_config(study: Study) -> EvalConfig:
    """What the study scores, paths resolved against the study file."""
    spec, evaluation = study.spec, study.spec.evaluation
    return EvalConfig(
        suite=evaluation.suite,
        tasks=(*evaluation.tasks, *final_only_tasks(spec)),
        include_paths=tuple(study.resolve(path) for path in evaluation.include_paths),
        data_dir=study.resolve(evaluation.data_dir) if evaluation.data_dir else None,
        num_fewshot=evaluation.num_fewshot,
        origins=Origins.study_file(study.path),
    )


RANKING_BYTES = 4  # per entry at most: int32 indices, or positions in a float32 work dtype


def task_vector_bytes(study: Study, merged: MergePlan) -> int:
    """What keeping task vectors between candidates would cost: one model's size per non-base model of
    the methods that merge task vectors, and a ranking per entry of each for rank-based ones (0 if none
    of the study's methods merges task vectors; a searchable method's recipes use the mergekit method
    of its name)."""
    spec = study.spec
    methods = [METHODS.get(name) for name in spec.methods]
    cost = 0
    if any(method.uses_task_vectors for method in methods):
        cost += len(spec.models) * plan_bytes(merged)
    if any(method.ranking is not None for method in methods):
        cost += len(spec.models) * RANKING_BYTES * sum(math.prod(op.shape) for op in merged.ops)
    return cost


def plan_bytes(plan: MergePlan) -> int:
    """What the merged model takes: every output tensor in its dtype."""
    return sum(math.prod(op.shape) * op.dtype.itemsize for op in plan.ops)


def write_skeleton(recipe: Recipe, plan: MergePlan, sources: Mapping[str, TensorSource]) -> Path:
    """A directory with the merged model's config and tokenizer and no weights, for an engine to start from
    (removed when the process exits)."""
    directory = Path(tempfile.mkdtemp(prefix="mergetune-engine-"))
    atexit.register(shutil.rmtree, directory, True)
    write_side_files(directory, recipe, plan, sources, recipe.to_yaml(), seed=None, chat_template=None)
    return directory
