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

1. write a `Backend` subclass (`mergetune.eval.backends.base`) with `name`, `lm`, the classmethods
   `for_directory` and `check_directory`, `command_options` (the `mergetune eval` options it takes),
   and either `for_live_model` and `check_live` (it scores a model object whose weights change in
   place) or `for_candidates` and `build` (its own engine merges each candidate);
2. add its line to `_BACKENDS` below, with which of the two it does (`candidates`).

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
    # How it scores a search's candidates: "live" (a transformers model the search rewrites in place,
    # `for_live_model`), "engine" (its own engine merges each candidate, `for_candidates`), or "none".
    candidates: str


_BACKENDS = {
    "hf": _Entry("mergetune.eval.backends.hf:HFBackend", candidates="live"),
    "vllm": _Entry("mergetune.eval.backends.vllm:VLLMBackend", candidates="engine"),
    "server": _Entry("mergetune.eval.backends.server:ServerBackend", candidates="none"),
}

_REGISTRY: Registry[type["Backend"]] = Registry("backend")
for _name, _entry in _BACKENDS.items():
    _REGISTRY.register(_name, _entry.target)


def backend_names() -> list[str]:
    """Every registered backend, in registration order."""
    return _REGISTRY.names()


def live_backend_names() -> list[str]:
    """The backends that can score a live in-memory transformers model."""
    return [name for name, entry in _BACKENDS.items() if entry.candidates == "live"]


def engine_backend_names() -> list[str]:
    """The backends whose engine merges each candidate itself (nothing tensor-sized is sent to it)."""
    return [name for name, entry in _BACKENDS.items() if entry.candidates == "engine"]


def search_backend_names() -> list[str]:
    """The backends a study can score its candidates with."""
    return [*live_backend_names(), *engine_backend_names()]


def get_backend_class(name: str) -> type["Backend"]:
    """The class registered as `name`, importing its module on first use; an unknown name lists the known ones."""
    return _REGISTRY.get(name)
