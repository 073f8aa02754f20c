"""Every use of lm-eval's private API, in one place.

mergetune tokenizes each request once and scores it many times, which lm-eval's
public `LM.loglikelihood` (tokenize, then score, in one call) cannot do. So it
calls the two halves lm-eval keeps private, probes and times HFLM's forward
passes through its private hooks, quiets one private module's logger and one
module's progress bars, and
re-reads the task files the private task index skips (to name them). Those
names may change in any lm-eval release without notice; nothing else in
mergetune touches them, and tests/test_lm_eval_adapter.py fails, naming what
changed, when they do.

Checked against lm-eval 0.4.13 (`CHECKED_VERSIONS`). On a version outside that
range a warning is logged at import; after running tests/test_lm_eval_adapter.py
(and the test_eval_* parity tests) on a new version, widen the range.
"""

from __future__ import annotations

import abc
import importlib
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lm_eval.api.model import TemplateLM
from packaging.version import Version

if TYPE_CHECKING:  # importing HFLM loads torch, transformers and accelerate
    import torch
    from lm_eval.models.huggingface import HFLM

log = logging.getLogger(__name__)

#: lm-eval versions (inclusive) whose private API this module was checked against.
CHECKED_VERSIONS = (Version("0.4.13"), Version("0.4.13"))

#: The module whose `tqdm` draws a bar per `Task.build_all_requests` call: in a study, one per trial step,
#: interleaved with the study's own bar. lm-eval offers no switch for it.
REQUEST_PROGRESS_MODULE = "lm_eval.api.task"

#: The logger of lm-eval's private task-index module; it warns once per task a user's YAML shadows.
TASK_INDEX_LOGGER = "lm_eval.tasks._index"

#: One token-level request as `_loglikelihood_tokens` takes it: ((context, continuation), context ids, continuation ids).
TokenBatchItem = tuple[tuple[str, str], list[int], list[int]]
#: HFLM's forward pass: (input ids, attention mask, labels) -> logits.
ModelCall = Callable[..., "torch.Tensor"]


@contextmanager
def no_request_progress() -> Iterator[None]:
    """Inside the block, lm-eval's request building draws no progress bar (its module's `tqdm` replaced)."""
    module = importlib.import_module(REQUEST_PROGRESS_MODULE)
    original = module.tqdm
    module.tqdm = partial(original, disable=True)
    try:
        yield
    finally:
        module.tqdm = original


def installed_version() -> Version:
    """The installed lm-eval's version, from its package metadata."""
    return Version(version("lm_eval"))


def is_checked(installed: Version) -> bool:
    """Whether `installed` lies in `CHECKED_VERSIONS`."""
    low, high = CHECKED_VERSIONS
    return low <= installed <= high


def _warn_if_unchecked() -> None:
    installed = installed_version()
    if not is_checked(installed):
        low, high = CHECKED_VERSIONS
        log.warning(
            "lm-eval %s is installed; mergetune uses private lm-eval APIs checked against %s to %s only: "
            "if scoring fails or scores look wrong, run tests/test_lm_eval_adapter.py",
            installed, low, high,
        )


_warn_if_unchecked()


def encode_request(lm: TemplateLM, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of one request, split as lm-eval's `TemplateLM.loglikelihood` splits them.

    An empty context is replaced by the model's prefix token (BOS, else EOS),
    unless the continuation already starts with it (that branch is inlined in
    `loglikelihood`, not a method of its own); otherwise `_encode_pair`.
    """
    if context:
        return lm._encode_pair(context, continuation)
    tokens = lm.tok_encode(continuation, add_special_tokens=False)
    prefix = lm.prefix_token_id
    if tokens[0] == prefix:
        return tokens[:1], tokens[1:]
    return [prefix], tokens


def loglikelihood_tokens(lm: TemplateLM, batch: Sequence[TokenBatchItem], **options: Any) -> list[tuple[float, bool]]:
    """(sum of continuation logprobs, all greedy) per pre-tokenized request, without a progress bar.

    `options` go to the LM's own `_loglikelihood_tokens` (HFLM: `override_bs`).
    """
    return lm._loglikelihood_tokens(list(batch), disable_tqdm=True, **options)


def detect_batch_size(lm: HFLM, request: TokenBatchItem) -> int:
    """The largest batch HFLM's probe fits on its device for requests as long as `request`."""
    return lm._detect_batch_size([request])


def wrap_model_call(lm: HFLM, wrap: Callable[[ModelCall], ModelCall]) -> None:
    """Route every forward pass of `lm` (scoring and batch-size probes alike) through `wrap(original)`."""
    lm._model_call = wrap(lm._model_call)


def wrap_every_model_call(wrap: Callable[[ModelCall], ModelCall]) -> None:
    """Route the forward passes of every HFLM made from now on in this process (the `lm_eval` CLI's own,
    which a benchmark times) through `wrap(original)`."""
    from lm_eval.models.huggingface import HFLM

    HFLM._model_call = wrap(HFLM._model_call)


def declared_output_type(manager: Any, name: str) -> str | None:
    """The output type a task's YAML declares (the index resolves its `include`s), read from the task index
    (`Entry.cfg`) without loading its data, which for a hub dataset offline means half a minute of retries; None
    for a group, a tag or a task defined by a Python class."""
    entry = manager.task_index.get(name)
    config = getattr(entry, "cfg", None)
    return config.get("output_type") if isinstance(config, dict) else None


def skipped_task_files(root: str | Path) -> dict[Path, str]:
    """The YAML files under `root` that lm-eval's task index skips, with why (one line each).

    The index (`TaskIndex.build`) walks `root` as `_iter_yaml_files` does, loads each
    file with the private `load_yaml` and files it with `process_cfg`; a file that
    fails any step is dropped with a debug log line, so its task reads as unknown.
    This repeats those steps to say which file failed and how.
    """
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    skipped: dict[Path, str] = {}
    for path in TaskIndex._iter_yaml_files(Path(root)):
        try:
            TaskIndex.process_cfg(load_yaml(path, resolve_func=False, recursive=True), path, {})
        except Exception as error:  # the index skips a file whatever it raised
            skipped[path] = " ".join(f"{type(error).__name__}: {error}".split())
    return skipped


class TokenScoringLM(TemplateLM):
    """A `TemplateLM` whose token-level scoring is `score_tokens`, so subclasses need no private names."""

    def _loglikelihood_tokens(self, requests: list[TokenBatchItem], disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        return self.score_tokens(requests)

    @abc.abstractmethod
    def score_tokens(self, requests: Sequence[TokenBatchItem]) -> list[tuple[float, bool]]:
        """(sum of continuation logprobs, all greedy) per request; what `_loglikelihood_tokens` must return."""
