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

`Evaluator.from_dir(model_dir, config, backend="hf" | "vllm" | "server", ...)`
serves the `mergetune eval` command. `paired_difference` compares two results
document by document. Results serialize with `EvalResult.write_json` / `read_json`.
"""

from mergetune.eval.evaluator import EvalConfig, Evaluator
from mergetune.eval.results import DocResult, EvalResult, TaskScore, paired_difference
from mergetune.eval.tasks import SUITES, SuiteTask

__all__ = [
    "SUITES",
    "DocResult",
    "EvalConfig",
    "EvalResult",
    "Evaluator",
    "SuiteTask",
    "TaskScore",
    "paired_difference",
]
