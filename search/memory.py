"""The memory plan: will a study fit on its device, before anything is loaded?

A study keeps every source model resident on its device and, next to them, the
model it scores: a live transformers model (`hf`) or an inference engine's weights
and key/value cache (`vllm`). The engine takes the share of the card it is given
(`gpu_memory_utilization`) and its workers then load the sources beside it, so
its default share is what is left once the sources and a headroom are counted,
not a fixed fraction. (vLLM 0.34 then caps what torch may hold in each worker at
what the share leaves free, less 512 MiB: inside the headroom.) A study that cannot fit is
refused with the numbers and what to change. Pure arithmetic over byte counts:
callers measure the device (`torch.cuda.mem_get_info`, psutil) and the checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from mergetune.errors import MergetuneError

GB = 1e9
# Headroom vLLM's own start-up and CUDA context take beyond the share it is given.
ENGINE_HEADROOM_BYTES = int(2 * GB)
# The smallest key/value cache worth starting an engine for (a few long requests).
MIN_KV_CACHE_BYTES = int(2 * GB)
# Forward-pass activations and merge scratch of the hf backend, as a fraction of the live model.
LIVE_WORKING_FRACTION = 0.25


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes a study needs on one device (per rank under tensor parallelism), against what it has."""

    device: str
    free: int
    total: int
    sources: int
    model: int  # the live model, or the engine's weights on one rank
    working: int  # activations (hf), or the key/value cache the engine gets (vllm)
    engine_share: Optional[float] = None  # gpu_memory_utilization to start the engine with

    @property
    def needed(self) -> int:
        return self.sources + self.model + self.working

    def table(self) -> str:
        rows = [("sources (resident)", self.sources), ("scored model", self.model), ("working memory", self.working),
                ("needed", self.needed), (f"free on {self.device}", self.free)]
        return "; ".join(f"{label} {value / GB:.1f} GB" for label, value in rows)


def plan_live(device: str, free: int, total: int, sources: int, model: int) -> MemoryPlan:
    """hf: resident sources, one live model, and its forward passes' working memory."""
    plan = MemoryPlan(device, free, total, sources, model, int(LIVE_WORKING_FRACTION * model))
    if plan.needed > free:
        raise MergetuneError(
            f"the study does not fit on {device}: {plan.table()}. Use a smaller dtype (bfloat16), fewer "
            "methods per run (each method's models are resident), or a device with more memory"
        )
    return plan


def cache_fits(plan: MemoryPlan, cache: int) -> bool:
    """Whether the in-memory builder may also keep task vectors (`cache` bytes) between candidates."""
    return plan.needed + cache <= plan.free


def plan_engine(
    device: str, free: int, total: int, sources: int, weights: int, tensor_parallel_size: int = 1,
    share: Optional[float] = None,
) -> MemoryPlan:
    """vllm: resident sources on every rank, then an engine given `share` of the card (default: what is left).

    Every rank holds the full sources today; the engine's weights are split across ranks.
    """
    rank_weights = weights // tensor_parallel_size
    left = free - sources - ENGINE_HEADROOM_BYTES
    chosen = share is not None
    if share is None:
        share = max(0.0, min(0.95, left / total))
    given = int(share * total)
    plan = MemoryPlan(device, free, total, sources, rank_weights, max(0, given - rank_weights), round(share, 3))
    advice = (
        "Use a smaller dtype (bfloat16), more GPUs (engine.tensor_parallel_size; the sources are on every GPU), "
        "fewer methods per run, or smaller models"
    )
    if chosen and given > left:
        raise MergetuneError(
            f"the engine cannot start on {device}: engine.gpu_memory_utilization {share:g} asks for {given / GB:.1f} GB "
            f"but {max(left, 0) / GB:.1f} GB are free once the sources are resident ({plan.table()}). "
            "Lower engine.gpu_memory_utilization or leave it unset to use what is free"
        )
    if given < rank_weights + MIN_KV_CACHE_BYTES:
        raise MergetuneError(
            f"the study does not fit on {device}: the engine's weights need {rank_weights / GB:.1f} GB and its cache at "
            f"least {MIN_KV_CACHE_BYTES / GB:.0f} GB, but {max(given, 0) / GB:.1f} GB are left once the sources are "
            f"resident ({plan.table()}). {advice}"
        )
    return plan
