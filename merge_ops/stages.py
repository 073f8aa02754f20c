"""The one stage loop of a recipe file, shared by the disk merge and the in-memory build.

Both paths plan every stage here, with the same vocabulary alignment, and differ
only in where a stage's tensors go (shards on disk, tensors in memory, a live
model): so a recipe means the same on both, and the model a search scores is the
model `mergetune merge` writes.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

from mergetune.errors import MergetuneError
from mergetune.merge_ops.plan import MergePlan, plan_merge
from mergetune.merge_ops.recipe import Recipe
from mergetune.merge_ops.sources import TensorSource
from mergetune.merge_ops.vocab import vocab_alignment

# Builds one intermediate stage from its plan and sources; returns its output, read by later stages by name.
BuildStage = Callable[[Recipe, MergePlan, Mapping[str, TensorSource]], TensorSource]


def plan_stage(recipe: Recipe, sources: Mapping[str, TensorSource]) -> MergePlan:
    """A stage's plan, embedding rows re-indexed onto the output vocabulary when `tokenizer_source` asks."""
    return plan_merge(recipe, sources, vocab_alignment(recipe, sources))


def in_recipe(source: str, stages: Sequence[Recipe], stage: Recipe, error: MergetuneError) -> MergetuneError:
    """`error`, about what a recipe says (its models, parameters, layer ranges), naming the recipe file and, in a
    multi-stage file, the stage."""
    where = source + (f" (stage {stage.name})" if len(stages) > 1 and stage.name else "")
    return MergetuneError(f"{where}: {error}")


def final_stage(
    stages: Sequence[Recipe],
    lookup: Callable[[str], Optional[TensorSource]],
    build: BuildStage,
    source: Optional[str] = None,
) -> tuple[MergePlan, dict[str, TensorSource]]:
    """Build every stage but the last; return the last one's plan and sources, for the caller to output.

    `lookup` gives an input model by reference (None if unknown: the planner names what is missing); `source`,
    the recipe file, is named in planning errors.
    """
    outputs: dict[str, TensorSource] = {}

    def sources_of(stage: Recipe) -> dict[str, TensorSource]:
        found = {ref: outputs[ref] if ref in outputs else lookup(ref) for ref in stage.referenced_models()}
        return {ref: source for ref, source in found.items() if source is not None}

    def planned(stage: Recipe, sources: Mapping[str, TensorSource]) -> MergePlan:
        try:
            return plan_stage(stage, sources)
        except MergetuneError as error:
            if source is None:
                raise
            raise in_recipe(source, stages, stage, error) from None

    for stage in stages[:-1]:
        sources = sources_of(stage)
        outputs[stage.name] = build(stage, planned(stage, sources), sources)
    sources = sources_of(stages[-1])
    return planned(stages[-1], sources), sources
