"""In-memory builds: resident source tensors + a live model + a recipe → merged weights in place.

This is the search's hot path. Sources are loaded onto the device once; each
candidate recipe is planned (milliseconds) and its tensors are computed from the
resident inputs and copied straight into the live model's existing parameters:
no disk I/O, no reallocation of the model, no reload. SLERP's per-tensor geometry
(norms and angle of each pair) does not depend on `t`, so it is measured once and
each candidate costs a single weighted sum per tensor. With `cache_task_vectors`, the
task vectors (fine-tune − base) of task-arithmetic methods (DARE TIES, TIES, …) are also
computed once and kept: one more tensor per non-base model, in the compute dtype; for the
rank-based ones (TIES, breadcrumbs, DELLA) also each vector's magnitude ranking (4 bytes
per entry at most), whose sort is most of such a candidate's cost.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Mapping, Optional

import torch

from mergetune.errors import MergetuneError
from mergetune.merge_ops.execute import compute_measure, compute_rankings, compute_task_vectors, fetch_inputs, run_op
from mergetune.merge_ops.methods import Reuse, Scratch
from mergetune.merge_ops.plan import MergePlan, TensorOp
from mergetune.merge_ops.recipe import Recipe, RecipeFile
from mergetune.merge_ops.sources import MemorySource, TensorSource, resident_bytes
from mergetune.merge_ops.stages import final_stage, plan_stage
from mergetune.merge_ops.vocab import tokenizer_directory, tokenizer_donor
from mergetune.merge_ops.writer import all_finite, not_finite

log = logging.getLogger(__name__)


def live_model(config: dict, device: str = "cpu", dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """An uninitialised transformers model of the output architecture, parameters allocated on `device`.

    Parameters are created empty (no random init: a 7B model would take minutes);
    buffers such as rotary frequencies are built normally. The first build fills
    every parameter.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = config.get("model_type")
    if not model_type:
        raise MergetuneError("output config has no model_type; cannot build a live model")
    fields = {key: value for key, value in config.items() if key not in ("model_type", "transformers_version")}
    hf_config = AutoConfig.for_model(model_type, **fields)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.device.type == "meta":
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False
                )
    model.tie_weights()
    return model.to(device).eval()


class InMemoryBuilder:
    """Builds candidate recipes from resident sources, again and again: into one live model (`build`), or
    tensor by tensor for a model that loads them itself (`stream`, a vLLM worker's)."""

    def __init__(
        self,
        sources: Mapping[str, TensorSource],
        model: Optional[torch.nn.Module] = None,
        device: str = "cpu",
        cache_task_vectors: bool = False,
    ):
        """`cache_task_vectors`: keep each task-arithmetic op's task vectors (input − base) between builds,
        costing one more copy of every non-base model (in the compute dtype), and a rank-based method's
        rankings of them; the tensors built are the same."""
        self.device = device
        self.cache_task_vectors = cache_task_vectors
        self._task_vectors: dict[tuple, list[Optional[torch.Tensor]]] = {}
        self._rankings: dict[tuple, list[Optional[torch.Tensor]]] = {}
        # On the CPU: working memory kept between candidates (a GPU's caching allocator does this itself).
        self._scratch = Scratch() if torch.device(device).type == "cpu" else None
        self.sources: dict[str, TensorSource] = {
            name: source if isinstance(source, MemorySource) else MemorySource.resident(source, device)
            for name, source in sources.items()
        }
        self.model = model
        self.targets = model.state_dict(keep_vars=True) if model is not None else {}
        # What a method measures of its inputs alone (`MethodSpec.measure`: SLERP's angles), a few numbers per tensor.
        self._measured: dict[tuple, object] = {}

    @classmethod
    def for_recipe(
        cls,
        recipe: Recipe,
        sources: Mapping[str, TensorSource],
        device: str = "cpu",
        dtype: Optional[torch.dtype] = None,
        cache_task_vectors: bool = False,
        progress: Optional[Callable[[int, int], None]] = None,
    ) -> "InMemoryBuilder":
        """Resident sources and a live model shaped like `recipe`'s output; `progress(bytes loaded, bytes in
        all)` as the sources load (minutes for a 70B)."""
        total = sum(resident_bytes(source) for source in sources.values())
        done = 0

        def loaded(count: int) -> None:
            nonlocal done
            done += count
            if progress is not None:
                progress(done, total)

        resident = {name: MemorySource.resident(source, device, loaded) for name, source in sources.items()}
        config = plan_stage(recipe, resident).config
        return cls(resident, live_model(config, device, dtype), device, cache_task_vectors)

    @property
    def task_vector_bytes(self) -> int:
        """Memory the task-vector cache (the vectors and their rankings) holds now."""
        return sum(
            vector.numel() * vector.element_size()
            for cache in (self._task_vectors, self._rankings)
            for vectors in cache.values()
            for vector in vectors
            if vector is not None
        )

    @property
    def device_type(self) -> str:
        """"cpu" or "cuda": seeded random draws (DARE, DELLA masks) depend on it."""
        return torch.device(self.device).type

    def _final_stage(self, recipe: Recipe | RecipeFile, seed: Optional[int]) -> tuple[MergePlan, dict[str, TensorSource]]:
        """The last stage's plan and its sources: the resident models plus every earlier stage, built in memory."""
        stages = recipe.stages if isinstance(recipe, RecipeFile) else [recipe]

        def build_intermediate(stage: Recipe, plan: MergePlan, sources: Mapping[str, TensorSource]) -> TensorSource:
            tensors = {}
            for op in plan.ops:
                tensors[op.output] = torch.empty(op.shape, dtype=op.dtype, device=self.device)
                self._build_into(tensors[op.output], op, plan, sources, seed)
            # It carries its tokenizer donor's files, as the disk merge's stage directory does.
            directory = tokenizer_directory(tokenizer_donor(stage, plan), sources)
            return MemorySource(stage.name, tensors, plan.config, directory)

        return final_stage(stages, self.sources.get, build_intermediate)

    def stream(
        self, recipe: Recipe | RecipeFile, seed: Optional[int] = None, dtype: Optional[torch.dtype] = None
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """The recipe's merged tensors one at a time (as `dtype`, default the plan's), each checked finite:
        what the disk merge would write, without a live model and with one tensor's memory at a time."""
        plan, sources = self._final_stage(recipe, seed)
        with torch.no_grad():
            for op in plan.ops:
                tensor = torch.empty(op.shape, dtype=op.dtype, device=self.device)
                self._build_into(tensor, op, plan, sources, seed)
                if not bool(all_finite(tensor)):
                    raise not_finite([op.output])
                yield op.output, tensor if dtype is None else tensor.to(dtype)

    def build(self, recipe: Recipe | RecipeFile, seed: Optional[int] = None) -> MergePlan:
        """Write the recipe's merged tensors into the live model's parameters."""
        if self.model is None:
            raise MergetuneError("this builder has no live model to build into; use stream()")
        plan, sources = self._final_stage(recipe, seed)
        self._check_fits(plan)
        with torch.no_grad():
            for op in plan.ops:
                self._build_into(self.targets[op.output], op, plan, sources, seed)
            self._check_finite(plan)
        return plan

    def _check_finite(self, plan: MergePlan) -> None:
        """A candidate with NaN or inf weights (a damaged input, an unstable method) must not be scored."""
        targets = [self.targets[op.output] for op in plan.ops]
        finite = torch.stack([all_finite(target) for target in targets]).tolist()  # one device sync
        bad = [op.output for op, ok in zip(plan.ops, finite) if not ok]
        if bad:
            raise not_finite(bad)

    def _check_fits(self, plan: MergePlan) -> None:
        for op in plan.ops:
            target = self.targets.get(op.output)
            if target is None:
                raise MergetuneError(f"tensor {op.output}: the live model has no such parameter")
            if tuple(target.shape) != op.shape:
                raise MergetuneError(
                    f"tensor {op.output}: merged shape {list(op.shape)} but the live model has {list(target.shape)}"
                )
        produced = {op.output for op in plan.ops}
        # named_parameters lists a tied lm_head once, under the embedding's name.
        missing = [name for name, _ in self.model.named_parameters() if name not in produced]
        if missing:
            raise MergetuneError(f"the recipe produces no value for parameter(s): {', '.join(missing[:5])}")

    def _build_into(
        self, target: torch.Tensor, op: TensorOp, plan: MergePlan, sources: Mapping[str, TensorSource], seed: Optional[int]
    ) -> None:
        def fetch(item):
            return sources[item.model].get(item.name, self.device)

        # Only the builder's own resident sources are stable enough to cache against.
        cacheable = all(sources[item.model] is self.sources.get(item.model) for item in op.inputs)
        tensors = fetch_inputs(op, fetch, self.device)
        vectors = rankings = None
        if (
            self.cache_task_vectors
            and cacheable
            and plan.method.uses_task_vectors
            and op.vocab is None
            and op.base_index is not None
            and op.compute_dtype.is_floating_point
        ):
            key = (op.inputs, op.base_index, op.compute_dtype)
            vectors = self._task_vectors.get(key)
            if vectors is None:
                vectors = self._task_vectors[key] = compute_task_vectors(op, tensors)
            if plan.method.ranking is not None:
                ranked = (key, plan.method.ranking)
                rankings = self._rankings.get(ranked)
                if rankings is None:
                    shape = tensors[op.base_index].shape
                    rankings = self._rankings[ranked] = compute_rankings(plan.method, shape, vectors)
        measured = None
        if plan.method.measure is not None and cacheable and op.vocab is None and op.compute_dtype.is_floating_point:
            measure_key = (plan.method.name, op.inputs, op.base_index, op.compute_dtype)
            measured = self._measured.get(measure_key)
            if measured is None:
                measured = self._measured[measure_key] = compute_measure(op, plan.method, tensors)
        reuse = Reuse(vectors, rankings, measured, out=target, scratch=self._scratch)
        target.copy_(run_op(op, plan.method, tensors, seed, self.device, reuse))  # no copy if written in place
