"""Evaluation: lm-eval tasks scored against one live model, again and again.

Typical use by a search (weights rewritten in place between calls)::

    from mergetune.eval import EvalConfig, Evaluator

    evaluator = Evaluator.from_model(model, tokenizer, EvalConfig(suite="leaderboard", data_dir=DIR, limit=50))
    ids = evaluator.sample_doc_ids()          # the same documents for every candidate
    for candidate in candidates:
        write_weights_in_place(model, candidate)
        result = evaluator.score(doc_ids=ids)  # EvalResult
        result.average, result.tasks["mmlu"].value, result.tasks["mmlu"].stderr
        result.tasks["arc_challenge"].docs     # per-document metric values

`Evaluator.from_dir(model_dir, config, backend=NAME, ...)` serves the `mergetune eval`
command (backends: `mergetune.eval.backends`). `paired_difference` compares two
results document by document; `mergetune.eval.evidence` holds the per-document
evidence a study stores. Results serialize with `EvalResult.write_json` / `read_json`.

The names below are imported on first use, so `mergetune.eval.evidence` and
`mergetune.eval.results` load without lm-eval and torch (the read side needs them).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SUITES": "mergetune.eval.tasks",
    "SuiteTask": "mergetune.eval.tasks",
    "EvalConfig": "mergetune.eval.evaluator",
    "Evaluator": "mergetune.eval.evaluator",
    "DocResult": "mergetune.eval.results",
    "EvalResult": "mergetune.eval.results",
    "TaskScore": "mergetune.eval.results",
    "paired_difference": "mergetune.eval.results",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
