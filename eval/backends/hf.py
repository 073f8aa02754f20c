"""`hf` backend: lm-eval's HFLM around the live transformers model, in process.

The search writes each candidate's weights into the model's parameters in
place; HFLM holds the model object itself and keeps nothing derived from its
weights between calls, so every call scores the current weights.

With `shared_prefix` (the default), requests whose inputs share a prefix (a
document's answer choices, documents with the same shots) are scored through the
model's key/value cache, the prefix computed once (`mergetune.eval.prefix`,
`hf_prefix`), and the rest as whole sequences, all with logits only at the
positions read and batches sized to the free memory; without it (or for an
architecture the cache path does not support) every request goes through HFLM.
The switch is a backend option, not part of `EvalConfig`: it changes how the
scores are computed, not which (they are lm-eval's either way), and only this
backend has it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from mergetune.errors import MergetuneError
from mergetune.eval.backends.base import Backend
from mergetune.eval.backends.hf_prefix import PrefixScorer, sliding_window, unsupported_reason
from mergetune.eval.lm_eval_adapter import ModelCall, detect_batch_size, wrap_model_call
from mergetune.eval.prefix import PrefixPlan, model_input, plan_prefixes, within_window
from mergetune.eval.quiet import quieted
from mergetune.eval.requests import TokenRequest

log = logging.getLogger(__name__)

#: Request lists whose prefix plans are kept (a search scores a few document sets, one per pruning rung).
PLANS_KEPT = 8


class HFBackend(Backend):
    """Scores the live model; `batch_size="auto"` picks one batch size per request length.

    On a GPU the largest batch that fits is probed once (lm-eval's probe) for the
    longest request seen so far; on a CPU there is nothing to probe and
    `max_batch_size` is used. Shared-prefix batches take at most the batch size
    (or `max_batch_size`) rows, fewer when `memory_budget` bytes (default: half of
    the memory free on the device) would not hold them.
    """

    name = "hf"
    command_options = ("device", "batch_size", "shared_prefix", "dtype")

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        batch_size: int | str = "auto",
        max_batch_size: int = 64,
        shared_prefix: bool = True,
        memory_budget: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size != "auto" and not (isinstance(batch_size, int) and batch_size > 0):
            raise MergetuneError(f"batch size must be a positive integer or 'auto', not {batch_size!r}")
        self.model = model.eval()
        # HFLM warns that a pre-loaded model skips its device and parallel options: intended here.
        with quieted("lm_eval.models.huggingface"):
            self.lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_batch_size=max_batch_size)
        wrap_model_call(self.lm, self._timed)
        self._auto = batch_size == "auto"
        self._max_batch_size = max_batch_size
        self._probed: dict[int, int] = {}  # longest request length -> batch size
        self._forward_tokens = 0
        max_rows = max_batch_size if self._auto else int(batch_size)
        self._scorer = self._prefix_scorer(max_rows, memory_budget) if shared_prefix else None
        self._window = sliding_window(model)
        self._plans: OrderedDict[tuple[TokenRequest, ...], PrefixPlan] = OrderedDict()

    def _prefix_scorer(self, max_rows: int, memory_budget: int | None) -> PrefixScorer | None:
        """A scorer of shared prefixes, or None (with a warning) for a model the cache path cannot score exactly."""
        reason = unsupported_reason(self.model)
        if reason is not None:
            log.warning("shared prefixes off (%s): every request goes through lm-eval's path", reason)
            return None
        return PrefixScorer(self.model, max_rows=max_rows, memory_budget=memory_budget)

    @classmethod
    def check_live(cls, checkpoint_dir: str | Path | None) -> None:
        """Any live transformers model will do."""

    @classmethod
    def for_live_model(
        cls, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, checkpoint_dir: str | Path | None, **options: Any
    ) -> HFBackend:
        """Scores the model object itself, so its in-place updates need no copy; `checkpoint_dir` is not needed."""
        return cls(model, tokenizer, **options)

    @classmethod
    def for_directory(
        cls, model_dir: str | Path, *, device: str | None = None, dtype: str = "auto", **options: Any
    ) -> HFBackend:
        """Load a checkpoint the way `lm_eval --model hf --model_args pretrained=DIR` does (its config and weights
        checked by `check_directory`)."""
        model_dir = Path(model_dir)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        try:  # a checkpoint's defects surface as whatever transformers, safetensors or tokenizers raise
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).to(device)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        except (OSError, ValueError, RuntimeError, SafetensorError) as error:
            first = (str(error).strip() or type(error).__name__).splitlines()[0]
            raise MergetuneError(f"model directory {model_dir}: transformers cannot load it: {first}") from None
        return cls(model, tokenizer, **options)

    @property
    def forward_seconds(self) -> float:
        return self._forward_seconds + (self._scorer.forward_seconds if self._scorer else 0.0)

    @property
    def forward_tokens(self) -> int:
        """Token positions run through the model (padding included) since this backend was made."""
        return self._forward_tokens + (self._scorer.forward_tokens if self._scorer else 0)

    def _timed(self, model_call: ModelCall) -> ModelCall:
        """`model_call`, adding the wall time of each call (finished on the GPU) to `forward_seconds`."""

        def timed(inputs: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            start = perf_counter()
            logits = model_call(inputs, *args, **kwargs)
            if logits.is_cuda:
                torch.cuda.synchronize(logits.device)
            self._forward_seconds += perf_counter() - start
            self._forward_tokens += inputs.numel()
            return logits

        return timed

    def loglikelihood(self, requests: Sequence[TokenRequest]) -> list[tuple[float, bool]]:
        """Shared prefixes through the cache, the other requests as whole sequences, logits only where read (or every
        request through lm-eval's path, without shared prefixes)."""
        if self._scorer is None:
            return super().loglikelihood(requests)
        scores = self._scorer.score(self._plan(requests), [r.continuation for r in requests])
        return [scores[i] for i in range(len(requests))]

    def _plan(self, requests: Sequence[TokenRequest]) -> PrefixPlan:
        """The prefix plan of these requests, made once: their tokens never change."""
        key = tuple(requests)
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        inputs = [model_input(r.context, r.continuation, self.lm.max_length) for r in requests]
        plan = within_window(plan_prefixes(inputs, [len(r.continuation) for r in requests]), self._window)
        shared = len(requests) - len(plan.alone)
        log.debug("%d of %d requests share a prefix, in %d groups", shared, len(requests), len(plan.groups))
        self._plans[key] = plan
        if len(self._plans) > PLANS_KEPT:
            self._plans.popitem(last=False)
        return plan

    def _call_options(self, requests: Sequence[TokenRequest]) -> dict[str, Any]:
        if not self._auto or not requests:
            return {}
        longest = max(len(r.context) + len(r.continuation) for r in requests)
        if self.lm.device.type != "cuda":
            return {"override_bs": self._max_batch_size}
        # A batch size that fits longer requests fits these too.
        covering = [length for length in self._probed if length >= longest]
        if covering:
            return {"override_bs": self._probed[min(covering)]}
        probe = max(requests, key=lambda r: len(r.context) + len(r.continuation))
        self._probed[longest] = detect_batch_size(self.lm, (probe.args, list(probe.context), list(probe.continuation)))
        log.info("batch size %d for requests up to %d tokens", self._probed[longest], longest)
        return {"override_bs": self._probed[longest]}

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model": self.model.name_or_path,
            "device": str(self.lm.device),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "shared_prefix": self._scorer is not None,
        }
