"""The README's main job: a complete study on tiny models built offline, in a few minutes on a CPU.

A tiny base model and two specialists fine-tuned from it on two different skills
(built once, deterministically, then cached), an lm-eval task per skill, and a
study that searches SLERP t-curves and DARE TIES weights/densities for the merge
that is good at both — compared on held-out documents with the hand-written
recipes people publish.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mergetune.search.study_file import Study, load_study
from mergetune.demo.skills import HELDOUT_TASKS, SEARCH_TASKS, build_demo_models, write_task_dir

DEMO_STUDY: dict[str, Any] = {
    "name": "demo",
    "methods": ["slerp", "dare_ties"],
    "dtype": "float32",
    "space": {"slerp": {"filters": ["self_attn", "mlp"], "control_points": 5}},
    "evaluation": {
        "tasks": list(SEARCH_TASKS),
        "limit": 90,  # pruning rungs at 10 and 30 documents per task (the defaults for 90)
        "final": {"tasks": list(HELDOUT_TASKS), "limit": 200, "finalists": 3},
    },
    "budget": {"n_trials": 24},
    "sampler": "tpe",
    "seed": 0,
}


def storage_file(study: Study) -> Path:
    """The demo study's SQLite file (the default storage, beside the study file)."""
    from mergetune.search.storage import local_file

    return local_file(study)


def outdated_trials(study: Study) -> bool:
    """Whether the demo's storage holds trials of a different demo study (one written by an earlier version)."""
    if not storage_file(study).is_file():
        return False
    import optuna

    from mergetune.search.trials import DEFINITION, stored_definition_hash

    summaries = optuna.get_all_study_summaries(storage=study.storage_url)
    stored = [(stored_definition_hash(s.user_attrs), s.user_attrs.get(DEFINITION, {})) for s in summaries]
    return any(found is not None and not study.spec.has_definition(found, definition) for found, definition in stored)


def prepare_demo(out_dir: Path, n_trials: int | None = None) -> Study:
    """Build (or reuse) the models and tasks and write the demo's study file into `out_dir`."""
    out_dir = out_dir.resolve()
    models = build_demo_models(out_dir / "models")
    task_dir = write_task_dir(out_dir / "tasks")
    skills = [name for name in models if name != "base"]
    spec = {
        **DEMO_STUDY,
        "models": [str(models[skill]) for skill in skills],
        "base_model": str(models["base"]),
        "evaluation": {**DEMO_STUDY["evaluation"], "include_paths": [str(task_dir)]},
    }
    if n_trials is not None:
        spec["budget"] = {"n_trials": n_trials}
    path = out_dir / "demo-study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_study(path)


def tiny_study(name: str, family: Mapping[str, Path], task_dir: Path, **fields: Any) -> dict[str, Any]:
    """A study spec for a `mergetune.tiny` family (`model_a` × `model_b`, and `base` if given) on the demo tasks.

    About half a second a trial on a CPU: tests and benchmarks of the study
    machinery. `fields` replace the defaults (a SLERP search of 4 trials on 4
    documents per task); an `evaluation` dict is merged into the default one.
    """
    evaluation = {
        "tasks": list(SEARCH_TASKS),
        "include_paths": [str(task_dir)],
        "limit": 4,
        "first_limit": 2,
        "final": {"limit": 4, "finalists": 1},
        **fields.pop("evaluation", {}),
    }
    spec: dict[str, Any] = {
        "name": name,
        "models": [str(family["model_a"]), str(family["model_b"])],
        "methods": ["slerp"],
        "dtype": "float32",
        "budget": {"n_trials": 4},
        "space": {"slerp": {"control_points": 2}},
    }
    if "base" in family:
        spec["base_model"] = str(family["base"])
    return {**spec, "evaluation": evaluation, **fields}
