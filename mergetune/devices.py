"""How much memory a device has: one answer for the memory plan and for the evaluator's batch sizes."""

from __future__ import annotations

import resource

import psutil
import torch


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
