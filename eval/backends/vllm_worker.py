"""vLLM worker extension: each candidate is merged inside the engine's own workers.

vLLM mixes this class into each of its workers (`LLM(..., worker_extension_cls=
"mergetune.eval.backends.vllm_worker.MergeExtension")`); the driver calls its
methods on every worker with `LLM.collective_rpc`. In vLLM's default mode the
engine core runs in another process and utility-call arguments are msgpack-encoded
and decoded untyped (vLLM 0.33 `v1/serial_utils.py`, `v1/engine/core.py`): a tensor
arrives as a list `[dtype, shape, frame]`, not a tensor. So nothing tensor-sized is
ever sent: the driver sends model paths once and, per candidate, the recipe's YAML
text and its seed; each worker builds the merged tensors with mergetune's own merge
code, from source tensors resident on its GPU, and loads them through the model's
`load_weights` (HF names; vLLM fuses and, under tensor parallelism, shards them).
Every rank builds the same seeded tensors, so every rank holds the same candidate.

This module is imported inside vLLM's worker processes, so it imports mergetune
only inside the methods.
"""

from __future__ import annotations

from typing import Any, Optional


class MergeExtension:
    """Methods vLLM adds to its worker (which provides `get_model()`)."""

    def mergetune_parameter_names(self) -> list[str]:
        """Names of the engine model's parameters (fused qkv_proj / gate_up_proj included)."""
        return [name for name, _ in self.get_model().named_parameters()]

    def mergetune_load_sources(self, references: list[str], dtype: str) -> int:
        """Keep every source model's tensors resident on this worker's device; returns how many models.

        `references` are local checkpoint directories (plain strings survive the
        engine's serializer); `dtype` is the study's ("bfloat16", ...), which the
        merged tensors are cast to before loading.
        """
        from mergetune.merge_ops.inmemory import InMemoryBuilder
        from mergetune.merge_ops.plan import DTYPES
        from mergetune.merge_ops.sources import open_source

        device = str(next(self.get_model().parameters()).device)
        sources = {reference: open_source(reference) for reference in references}
        self._mergetune_builder = InMemoryBuilder(sources, model=None, device=device)
        self._mergetune_dtype = DTYPES[dtype]
        return len(sources)

    def mergetune_build(self, recipe_yaml: str, seed: Optional[int]) -> list[str]:
        """Merge the recipe on this worker and load the result into the engine; returns the parameters loaded.

        Tensors are built and loaded one at a time, so the extra memory is one
        tensor, not a model. A non-finite tensor is refused before it is loaded.
        """
        from mergetune.merge_ops.recipe import parse_recipes

        builder: Any = getattr(self, "_mergetune_builder", None)
        if builder is None:
            raise RuntimeError("mergetune_build before mergetune_load_sources")
        recipe = parse_recipes(recipe_yaml, source="candidate recipe")
        model = self.get_model()
        loaded: set[str] = set()
        for name, tensor in builder.stream(recipe, seed=seed, dtype=self._mergetune_dtype):
            loaded.update(model.load_weights(weights=iter([(name, tensor)])) or ())
        return sorted(loaded)
