"""Backends: what turns tokenized log-likelihood requests into (logprob, is_greedy).

Each backend wraps an lm-eval `TemplateLM` (HFLM for `hf`, local-completions for
`server`, mergetune's own vLLM LM for `vllm`), so tokenization and batching are
lm-eval's. Requests are tokenized once through `encode` and scored many times
through `loglikelihood`; `forward_seconds` adds up the time spent in forward
passes (or, for a server, in requests), which the benchmark reports.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import TemplateLM

from mergetune.eval.requests import TokenRequest

BACKENDS = ("hf", "vllm", "server")


def encode_request(lm: TemplateLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of one request, split as lm-eval's `TemplateLM.loglikelihood` splits them.

    An empty context is replaced by the model's prefix token (BOS, else EOS),
    unless the continuation already starts with it.
    """
    if context:
        return lm._encode_pair(context, continuation)
    tokens = lm.tok_encode(continuation, add_special_tokens=False)
    prefix = lm.prefix_token_id
    if tokens[0] == prefix:
        return tokens[:1], tokens[1:]
    return [prefix], tokens


class Backend:
    """Scores requests with `self.lm`; subclasses set `name` and `lm`."""

    name: str
    lm: TemplateLM

    def __init__(self) -> None:
        self._forward_seconds = 0.0

    @property
    def forward_seconds(self) -> float:
        """Seconds spent in forward passes since this backend was made."""
        return self._forward_seconds

    def encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_request(self.lm, context, continuation)

    def loglikelihood(self, requests: Sequence[TokenRequest]) -> list[tuple[float, bool]]:
        """(sum of continuation logprobs, whether every continuation token is the argmax)."""
        batch = [(r.args, list(r.context), list(r.continuation)) for r in requests]
        return self.lm._loglikelihood_tokens(batch, disable_tqdm=True, **self._call_options(requests))

    def _call_options(self, requests: Sequence[TokenRequest]) -> dict[str, Any]:
        """Extra keyword arguments for `_loglikelihood_tokens` (e.g. a batch size)."""
        return {}

    def sync_weights(self) -> None:
        """Make the next scores reflect the live model's current weights.

        Backends that score the live model object itself have nothing to do.
        """

    def describe(self) -> dict[str, Any]:
        """What to record about this backend next to its scores."""
        return {"backend": self.name}

    def close(self) -> None:
        """Release engines, sessions or processes the backend started."""
