"""The interface every evaluation backend implements (registered by name in `mergetune.eval.backends`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mergetune.errors import MergetuneError
from mergetune.eval.backends import live_backend_names
from mergetune.eval.lm_eval_adapter import encode_request, loglikelihood_tokens
from mergetune.merge_ops.sources import WEIGHT_FILES

if TYPE_CHECKING:
    from lm_eval.api.model import TemplateLM

    from mergetune.eval.requests import TokenRequest


class Backend:
    """Scores requests with `self.lm`; subclasses set `name` and `lm`."""

    name: str
    lm: TemplateLM
    #: The `mergetune eval` options (keyword names of `for_directory`) this backend takes.
    command_options: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self._forward_seconds = 0.0

    @classmethod
    def check_live(cls, checkpoint_dir: str | Path | None) -> None:
        """Refuse, before anything slow starts, to score a live model this backend cannot score."""
        raise MergetuneError(
            f"backend {cls.name!r} cannot score a live model; use one of {', '.join(live_backend_names())}"
        )

    @classmethod
    def check_directory(cls, model_dir: Path, **options: Any) -> None:
        """Refuse, before anything slow starts (the task index, the model), a directory or options
        `for_directory` cannot load: by default, a checkpoint without its config or weights."""
        if not (model_dir / "config.json").is_file():
            raise MergetuneError(f"model directory {model_dir} has no config.json")
        if not any(next(model_dir.glob(pattern), None) for pattern in WEIGHT_FILES):
            raise MergetuneError(f"model directory {model_dir} has no weights ({' or '.join(WEIGHT_FILES)} files)")

    @classmethod
    def for_live_model(cls, model: Any, tokenizer: Any, checkpoint_dir: str | Path | None, **options: Any) -> Backend:
        """A backend whose every score reflects `model`'s current weights (rewritten in place by a search).

        `checkpoint_dir`: a checkpoint of the model's architecture, for backends
        that cannot score the object itself and must start an engine from disk.
        Only called once `check_live` has passed.
        """
        raise NotImplementedError

    @classmethod
    def for_candidates(cls, skeleton_dir: str | Path, sources: list[str], dtype: str, **options: Any) -> Backend:
        """A backend whose engine holds `sources` and merges each candidate given to `build` (engine backends).

        `options` are the study file's `engine:` settings and its `evaluation.shared_prefix`.
        """
        raise MergetuneError(f"backend {cls.name!r} cannot merge candidates in its engine")

    def build(self, recipe: Any, seed: int | None = None) -> None:
        """Make the engine's weights `recipe`'s merge (engine backends only)."""
        raise MergetuneError(f"backend {self.name!r} cannot merge candidates in its engine")

    @classmethod
    def for_directory(cls, model_dir: Path, **options: Any) -> Backend:
        """A backend scoring the checkpoint in `model_dir` (or, for a server, whatever it serves); only called
        once `check_directory` has passed."""
        raise NotImplementedError

    @property
    def forward_seconds(self) -> float:
        """Seconds spent in forward passes since this backend was made."""
        return self._forward_seconds

    @property
    def forward_tokens(self) -> int | None:
        """Token positions run through the model since this backend was made (None: this backend does not count)."""
        return None

    def encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_request(self.lm, context, continuation)

    def loglikelihood(self, requests: Sequence[TokenRequest]) -> list[tuple[float, bool]]:
        """(sum of continuation logprobs, whether every continuation token is the argmax)."""
        batch = [(r.args, list(r.context), list(r.continuation)) for r in requests]
        return loglikelihood_tokens(self.lm, batch, **self._call_options(requests))

    def _call_options(self, requests: Sequence[TokenRequest]) -> dict[str, Any]:
        """Extra keyword arguments for the LM's token-level scoring (e.g. a batch size)."""
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
