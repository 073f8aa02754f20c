"""What a device offers: how much memory (one answer for the memory plan and for the evaluator's batch sizes),
and how fast it computes in a dtype."""

from __future__ import annotations

import resource
import time

import psutil
import torch

from mergetune.errors import MergetuneError

DEVICE_TYPES = ("cpu", "cuda")


def check_device(device: str) -> None:
    """One clear message for a device this machine lacks, before any model is read (not a CUDA traceback midway):
    merges, studies and `mergetune eval` check it first."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise MergetuneError(f"device '{device}': not a device name like cpu, cuda or cuda:1") from None
    if parsed.type not in DEVICE_TYPES:
        raise MergetuneError(f"device {device}: mergetune runs on {' or '.join(DEVICE_TYPES)}, not {parsed.type}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise MergetuneError(f"device {device}: CUDA is not available on this machine")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise MergetuneError(f"device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def device_memory(device: str | torch.device) -> tuple[int, int]:
    """(free, total) bytes of `device`: the GPU's, or the machine's for the CPU, where free is also bounded by
    the process's address-space limit (there is no out-of-memory error to recover from on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)
    memory = psutil.virtual_memory()
    free = memory.available
    limit, _ = resource.getrlimit(resource.RLIMIT_AS)
    if limit != resource.RLIM_INFINITY:
        free = min(free, limit - psutil.Process().memory_info().vms)
    return max(free, 0), memory.total


def linear_slowdown(dtype: torch.dtype, rows: int = 256, width: int = 512, repeats: int = 3) -> float:
    """How many times longer a model-sized linear layer takes on this CPU in `dtype` than in float32.

    A CPU without native bfloat16 (no AVX-512 BF16, no AMX) emulates it: on this project's AVX2 machine a
    135M model's forward pass ran 6.6-7.5x slower in bfloat16 than in float32, and this probe said 7-8x.
    Measured rather than read from the CPU's flags, so it holds on any CPU; the best of `repeats` each
    way, so that a moment of other load does not count; about a tenth of a second where bfloat16 is slow.
    """

    def best(kind: torch.dtype) -> float:
        inputs, weight = torch.ones(rows, width, dtype=kind), torch.ones(2 * width, width, dtype=kind)
        torch.nn.functional.linear(inputs, weight)  # the first call pays for the kernel's set-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.nn.functional.linear(inputs, weight)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(dtype) / max(best(torch.float32), 1e-9)
