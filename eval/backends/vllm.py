"""`vllm` backend: one in-process vLLM engine for the whole search, weights swapped in place.

The engine is started once from a checkpoint of the right architecture. Before
each scoring call, `sync_weights` sends the live transformers model's current
tensors to every worker through `LLM.collective_rpc`, where the model's own
`load_weights` writes them into vLLM's (fused, sharded) parameters; then the
prefix cache is reset, so no KV computed with old weights is reused. The
engine is never restarted. Log-likelihoods come from prompt logprobs.

Needs `pip install 'mergetune[vllm]'` and a GPU vLLM supports; vLLM is imported
only when an engine is started.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mergetune.errors import MergetuneError
from mergetune.eval.backends.base import Backend
from mergetune.eval.lm_eval_adapter import TokenBatchItem, TokenScoringLM

log = logging.getLogger(__name__)

WORKER_EXTENSION = "mergetune.eval.backends.vllm_worker.WeightLoadExtension"

#: HF Llama projections that vLLM stores fused: (HF part, vLLM fused parameter, shard id)
FUSED_PROJECTIONS: tuple[tuple[str, str, str | int], ...] = (
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)
_FUSED_SHARDS = {fused: {s for _, f, s in FUSED_PROJECTIONS if f == fused} for _, fused, _ in FUSED_PROJECTIONS}


def import_vllm() -> Any:
    """The vllm module, or a MergetuneError that says how to get it."""
    try:
        import vllm
    except ImportError as error:
        raise MergetuneError(
            "the vllm backend needs vLLM, which is not installed: pip install 'mergetune[vllm]' "
            "(on a machine with a GPU that vLLM supports)"
        ) from error
    return vllm


def vllm_parameter(hf_name: str) -> tuple[str, str | int | None]:
    """The vLLM parameter an HF Llama tensor is loaded into, and its shard id if fused."""
    module, _, leaf = hf_name.rpartition(".")
    parent, _, projection = module.rpartition(".")
    for part, fused, shard in FUSED_PROJECTIONS:
        if projection == part:
            return f"{parent}.{fused}.{leaf}", shard
    return hf_name, None


def plan_weight_update(hf_names: Iterable[str], engine_parameters: Collection[str]) -> dict[str, list[tuple[str, str | int | None]]]:
    """vLLM parameter -> the HF tensors (and shards) that fill it, for one full update.

    Every HF tensor must land in a parameter the engine has, and every fused
    parameter must receive all of its shards; otherwise part of the engine would
    keep the previous candidate's weights.
    """
    plan: dict[str, list[tuple[str, str | int | None]]] = {}
    for name in hf_names:
        target, shard = vllm_parameter(name)
        if target not in engine_parameters:
            raise MergetuneError(f"tensor {name} maps to {target}, which the vLLM engine's model does not have")
        plan.setdefault(target, []).append((name, shard))
    for target, sources in plan.items():
        wanted = _FUSED_SHARDS.get(target.rsplit(".", 2)[-2])
        got = {shard for _, shard in sources}
        if wanted and got != wanted:
            raise MergetuneError(f"fused parameter {target} would get shards {sorted(map(str, got))} of {sorted(map(str, wanted))}")
    return plan


class _VLLMLM(TokenScoringLM):
    """lm-eval LM over a vLLM engine: HF tokenization, log-likelihoods from prompt logprobs."""

    def __init__(self, llm: Any, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.forward_seconds = 0.0

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # As HFLM: the tokenizer's own special-token default unless told otherwise.
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **options)

    def score_tokens(self, requests: Sequence[TokenBatchItem]) -> list[tuple[float, bool]]:
        vllm = import_vllm()
        from vllm.inputs import TokensPrompt

        # Whole context + continuation, left-truncated to the engine's window.
        sequences = [(list(context) + list(continuation))[-self.max_length :] for _, context, continuation in requests]
        params = vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        start = perf_counter()
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
        self.forward_seconds += perf_counter() - start
        results = []
        for (_, _, continuation), tokens, output in zip(requests, sequences, outputs, strict=True):
            total, greedy = 0.0, True
            for position in range(len(tokens) - len(continuation), len(tokens)):
                candidates = output.prompt_logprobs[position]
                chosen = candidates[tokens[position]].logprob
                total += chosen
                greedy = greedy and chosen >= max(entry.logprob for entry in candidates.values())
            results.append((total, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("mergetune's vLLM backend scores loglikelihood requests only")

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("mergetune's vLLM backend scores loglikelihood requests only")


class VLLMBackend(Backend):
    """Scores with a vLLM engine; with `source`, mirrors that live model's weights before each call."""

    name = "vllm"
    command_options = ("tensor_parallel_size",)

    def __init__(self, llm: Any, tokenizer: PreTrainedTokenizerBase, *, source: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.llm = llm
        self.source = source
        self.lm = _VLLMLM(llm, tokenizer, llm.llm_engine.model_config.max_model_len)
        self._engine_parameters: set[str] | None = None

    @classmethod
    def for_live_model(
        cls, model: torch.nn.Module, tokenizer: Any, checkpoint_dir: str | Path | None, **options: Any
    ) -> VLLMBackend:
        """An engine started from `checkpoint_dir` that is sent `model`'s weights before every score.

        The engine tokenizes with `checkpoint_dir`'s tokenizer, not `tokenizer`.
        """
        return cls.launch(checkpoint_dir, source=model, **options)

    @classmethod
    def check_live(cls, checkpoint_dir: str | Path | None) -> None:
        if checkpoint_dir is None:
            raise MergetuneError("the vllm backend needs checkpoint_dir, a checkpoint to start the engine from")

    @classmethod
    def for_directory(cls, model_dir: str | Path, **options: Any) -> VLLMBackend:
        return cls.launch(model_dir, **options)

    @classmethod
    def launch(
        cls,
        model_dir: str | Path,
        *,
        source: torch.nn.Module | None = None,
        tensor_parallel_size: int = 1,
        dtype: str = "auto",
        gpu_memory_utilization: float = 0.85,
        max_model_len: int | None = None,
        seed: int = 0,
        **engine_options: Any,
    ) -> VLLMBackend:
        """Start the engine once from `model_dir` (any checkpoint of the live model's architecture).

        Prefix caching is off: prompt-logprob requests cannot use it, and a cache
        filled with one candidate's keys must never serve the next.
        """
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise MergetuneError(f"model directory {model_dir} does not exist or has no config.json")
        vllm = import_vllm()
        llm = vllm.LLM(
            model=str(model_dir),
            tokenizer=str(model_dir),
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            enable_prefix_caching=False,
            worker_extension_cls=WORKER_EXTENSION,
            **engine_options,
        )
        return cls(llm, AutoTokenizer.from_pretrained(model_dir), source=source)

    @property
    def forward_seconds(self) -> float:
        return self.lm.forward_seconds

    def sync_weights(self) -> None:
        """Load the source model's current tensors into every worker, then drop cached prefixes."""
        if self.source is None:
            return
        weights = [(name, param.detach()) for name, param in self.source.named_parameters()]
        if self._engine_parameters is None:
            self._engine_parameters = set(self.llm.collective_rpc("mergetune_parameter_names")[0])
        plan = plan_weight_update((name for name, _ in weights), self._engine_parameters)
        for worker, loaded in enumerate(self.llm.collective_rpc("mergetune_load_weights", args=(weights,))):
            skipped = sorted(set(plan) - set(loaded))
            if skipped:
                raise MergetuneError(f"vLLM worker {worker} did not load {len(skipped)} parameters, e.g. {skipped[0]}")
        self.llm.reset_prefix_cache()
        log.debug("loaded %d tensors into %d vLLM parameters", len(weights), len(plan))

    def describe(self) -> dict[str, Any]:
        config = self.llm.llm_engine.model_config
        return {"backend": self.name, "model": str(config.model), "dtype": str(config.dtype).removeprefix("torch.")}
