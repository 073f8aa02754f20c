"""Executing one planned operation: fetch its inputs, run the method, cast the result."""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Callable, Optional

import torch

from mergetune.errors import MergetuneError
from mergetune.merge_ops.methods import MergeInputs, MethodSpec, Reuse
from mergetune.merge_ops.plan import TensorInput, TensorOp
from mergetune.merge_ops.sparsify import compact

Fetch = Callable[[TensorInput], torch.Tensor]
def fetch_inputs(op: TensorOp, fetch: Fetch, device: str = "cpu") -> list[torch.Tensor]:
    return [fetch(item).to(device=device) for item in op.inputs]


def tensor_generator(seed: int, output: str, position: int, device: str) -> torch.Generator:
    """A generator seeded from (seed, output tensor, input position): the same randomness whatever order the
    tensors are built in and wherever the models are stored, so a seeded recipe reproduces on any machine with the
    same device type: CPU and CUDA generators draw different streams from the same seed."""
    key = zlib.crc32(f"{seed}\x00{output}\x00{position}".encode())
    return torch.Generator(device=device).manual_seed(key)


def merge_inputs(
    op: TensorOp,
    tensors: list[torch.Tensor],
    method: MethodSpec,
    seed: Optional[int],
    device: str,
    reuse: Optional[Reuse] = None,
) -> MergeInputs:
    generators = None
    if method.randomized and seed is not None:
        generators = [tensor_generator(seed, op.output, position, device) for position in range(len(op.inputs))]
    return MergeInputs(
        tensors=tensors,
        base_index=op.base_index,
        per_input=op.per_input,
        generators=generators,
        reuse=reuse or Reuse(),
    )


def compute_task_vectors(op: TensorOp, tensors: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    """Each non-base input's task vector (input − base), flat, in the op's compute dtype: exactly what a
    task-arithmetic merge computes from `tensors` (an op without a vocabulary alignment)."""
    base = tensors[op.base_index].to(op.compute_dtype).reshape(-1)
    return [
        None if position == op.base_index else torch.sub(tensor.to(op.compute_dtype).reshape(-1), base)
        for position, tensor in enumerate(tensors)
    ]


def compute_measure(op: TensorOp, method: MethodSpec, tensors: list[torch.Tensor]) -> object:
    """What `method.measure` gives for `tensors` as the merge sees them (in the op's compute dtype)."""
    assert method.measure is not None
    return method.measure([tensor.to(op.compute_dtype) for tensor in tensors], op.base_index)


def compute_rankings(
    method: MethodSpec, shape: torch.Size, task_vectors: list[Optional[torch.Tensor]]
) -> list[Optional[torch.Tensor]]:
    """Each task vector's ranking for a rank-based method (`MethodSpec.ranking`), compacted to keep: what
    its pruning computes from the vector (of the inputs' `shape`) whatever the density."""
    assert method.ranking is not None
    return [None if vector is None else compact(method.ranking(vector.view(shape))) for vector in task_vectors]


def run_op(
    op: TensorOp,
    method: MethodSpec,
    tensors: list[torch.Tensor],
    seed: Optional[int],
    device: str = "cpu",
    reuse: Optional[Reuse] = None,
) -> torch.Tensor:
    """The output tensor of one operation from its fetched inputs, in the op's output dtype (`reuse`: what
    a repeated build keeps, e.g. the inputs' task vectors as `compute_task_vectors()` gives them and their
    rankings as `compute_rankings()` does; the result may be `reuse.out` itself)."""
    if not op.compute_dtype.is_floating_point:
        # Integer buffers (e.g. position ids) are copied, never averaged.
        return tensors[op.base_index or 0].clone()
    tensors = [tensor.to(op.compute_dtype) for tensor in tensors]
    if op.vocab is not None:
        tensors = op.vocab.align([item.model for item in op.inputs], tensors)
    try:
        if op.vocab is not None and reuse is not None:  # aligned rows: the cached vectors are the unaligned inputs'
            reuse = replace(reuse, task_vectors=None, rankings=None, measured=None)
        result = method.merge(merge_inputs(op, tensors, method, seed, device, reuse), **op.shared)
    except (ValueError, TypeError, RuntimeError) as error:
        raise MergetuneError(f"tensor {op.output}: {method.name} failed: {error}") from None
    return result.to(op.dtype)
