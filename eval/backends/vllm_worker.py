"""vLLM worker extension: loads mergetune's weights into a running engine, in place.

vLLM mixes this class into each of its workers (`LLM(..., worker_extension_cls=
"mergetune.eval.backends.vllm_worker.WeightLoadExtension")`); the driver calls its
methods on every worker with `LLM.collective_rpc`. This module is imported inside
vLLM's worker processes, so it imports nothing from mergetune at module level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class WeightLoadExtension:
    """Methods vLLM adds to its worker; `self.model_runner.model` is the engine's nn.Module."""

    def mergetune_parameter_names(self) -> list[str]:
        """Names of the engine model's parameters (fused qkv_proj / gate_up_proj included)."""
        return [name for name, _ in self.model_runner.model.named_parameters()]

    def mergetune_load_weights(self, weights: Sequence[tuple[str, torch.Tensor]]) -> list[str]:
        """Run the model's own `load_weights` on (HF name, tensor) pairs.

        `load_weights` maps HF names onto vLLM's fused parameters and, under tensor
        parallelism, keeps this worker's shard. Returns the parameters it loaded,
        so the driver can check that nothing was skipped.
        """
        loaded = self.model_runner.model.load_weights(weights=iter(weights))
        return sorted(loaded or ())
