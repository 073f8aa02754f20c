"""`server` backend: an OpenAI-compatible /v1/completions endpoint, via lm-eval's local-completions.

For models served elsewhere (e.g. `vllm serve` on a merge written to disk).
Log-likelihoods come from echoed prompt logprobs; requests are sent as token ids,
tokenized locally with the model's tokenizer, `num_concurrent` at a time.
The evaluator cannot change a server's weights: it scores whatever is served.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path
from time import perf_counter
from typing import Any

from lm_eval.models.openai_completions import LocalCompletionsAPI
from lm_eval.models.utils import resolve_max_length
from transformers import AutoConfig, AutoTokenizer

from mergetune.errors import MergetuneError
from mergetune.eval.backends.base import Backend
from mergetune.eval.quiet import quieted
from mergetune.eval.requests import TokenRequest


def completions_url(base_url: str) -> str:
    """The /v1/completions URL for a server root, a /v1 base or the full URL."""
    url = base_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise MergetuneError(f"server URL {base_url!r} must start with http:// or https://")
    if url.endswith("/completions"):
        return url
    if url.endswith("/v1"):
        return url + "/completions"
    return url + "/v1/completions"


class ServerBackend(Backend):
    """Cannot score a live model (the base `for_live_model` says so): the server holds its own weights."""

    name = "server"
    command_options = ("base_url", "model", "num_concurrent")

    def __init__(
        self,
        *,
        base_url: str,
        tokenizer: str | Path,
        model: str | None = None,
        num_concurrent: int = 8,
        batch_size: int = 1,
        max_length: int = 2048,
        max_retries: int = 3,
        timeout: int = 300,
    ) -> None:
        """`tokenizer`: the served model's tokenizer (a directory); `model`: the served model name."""
        super().__init__()
        self.url = completions_url(base_url)
        self.lm = LocalCompletionsAPI(
            base_url=self.url,
            model=model or str(tokenizer),
            tokenizer=str(tokenizer),
            tokenizer_backend="huggingface",
            tokenized_requests=True,
            num_concurrent=num_concurrent,
            batch_size=batch_size,
            max_length=max_length,
            max_retries=max_retries,
            timeout=timeout,
        )

    @classmethod
    def check_directory(cls, model_dir: Path, *, base_url: str | None = None, **options: Any) -> None:
        """MODEL_DIR holds only the served model's tokenizer (and config): no weights to look for."""
        if not base_url:
            raise MergetuneError("the server backend needs the server's URL (--base-url)")

    @classmethod
    def for_directory(
        cls, model_dir: str | Path, *, base_url: str, max_length: int | None = None, **options: Any
    ) -> ServerBackend:
        """The model served at `base_url`; `model_dir` holds its config and tokenizer.

        `max_length` defaults to the model's window, resolved as lm-eval's `hf` model
        resolves it, so long prompts are truncated here exactly as the `hf` backend
        truncates them.
        """
        if max_length is None:
            max_length = resolve_max_length(AutoConfig.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir))
        return cls(base_url=base_url, tokenizer=model_dir, max_length=max_length, **options)

    def loglikelihood(self, requests: Sequence[TokenRequest]) -> list[tuple[float, bool]]:
        start = perf_counter()
        # A server that cannot be reached fails every concurrent request, each retried: lm-eval logs each attempt
        # and asyncio each failed task's traceback when it is collected, a thousand lines burying the one below.
        with quieted("asyncio", logging.CRITICAL), quieted("lm_eval.models.api_models", logging.CRITICAL):
            try:
                return super().loglikelihood(requests)
            except Exception as error:  # aiohttp / requests / tenacity errors, after retries
                failure = f"{type(error).__name__}: {error}"
            finally:
                self._forward_seconds += perf_counter() - start
            gc.collect()  # the failed tasks, while their logger is quiet
        raise MergetuneError(f"completions server {self.url} failed: {failure}")

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "url": self.url, "model": self.lm.model}
