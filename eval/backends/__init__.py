"""Backends: what turns tokenized log-likelihood requests into (logprob, is_greedy).

Each backend wraps an lm-eval `TemplateLM` (HFLM for `hf`, local-completions for
`server`, mergetune's own vLLM LM for `vllm`), so tokenization and batching are
lm-eval's. Requests are tokenized once through `encode` and scored many times
through `loglikelihood`; `forward_seconds` adds up the time spent in forward
passes (or, for a server, in requests), which the benchmark reports.

Backends are found by name in a registry, as lm-eval finds its models
(`lm_eval/models/__init__.py`): each name maps to a "module:Class" string that
is imported the first time the backend is used, so naming vLLM costs nothing
until an engine starts. To add a backend:

1. write a `Backend` subclass (`mergetune.eval.backends.base`) with `name`, `lm`, the classmethods `for_directory`
   (and `for_live_model` if it can score a model object whose weights change in
   place) and `command_options` (the `mergetune eval` options it takes);
2. add its line to `_BACKENDS` below.

`Evaluator.from_model` / `from_dir`, `mergetune eval --backend` and study files need
nothing else. This module imports no backend (nor lm-eval): study files check
their `backend` against it on the read side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from mergetune.registry import Registry

if TYPE_CHECKING:
    from mergetune.eval.backends.base import Backend


class _Entry(NamedTuple):
    target: str  # "module:Class", imported on first use
    live: bool  # whether `for_live_model` can score a live in-memory transformers model


_BACKENDS = {
    "hf": _Entry("mergetune.eval.backends.hf:HFBackend", live=True),
    "vllm": _Entry("mergetune.eval.backends.vllm:VLLMBackend", live=True),
    "server": _Entry("mergetune.eval.backends.server:ServerBackend", live=False),
}

_REGISTRY: Registry[type["Backend"]] = Registry("backend")
for _name, _entry in _BACKENDS.items():
    _REGISTRY.register(_name, _entry.target)


def backend_names() -> list[str]:
    """Every registered backend, in registration order."""
    return _REGISTRY.names()


def live_backend_names() -> list[str]:
    """The backends that can score a live in-memory model (what a search needs)."""
    return [name for name, entry in _BACKENDS.items() if entry.live]


def get_backend_class(name: str) -> type["Backend"]:
    """The class registered as `name`, importing its module on first use; an unknown name lists the known ones."""
    return _REGISTRY.get(name)
