"""What a study's worker loads once: resident source models, the live model, the evaluator, the documents.

Everything here is reused by every trial the process runs; a trial only rewrites
the live model's weights in place and scores them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

from mergetune.eval import EvalConfig, Evaluator
from mergetune.merge_ops.execute import check_device
from mergetune.merge_ops.inmemory import InMemoryBuilder
from mergetune.merge_ops.plan import DTYPES
from mergetune.merge_ops.recipe import recipe_from_dict
from mergetune.merge_ops.sources import open_source
from mergetune.search.documents import Documents, choose_documents, final_only_tasks
from mergetune.search.methods import SEARCHABLE
from mergetune.search.study_file import Study

log = logging.getLogger(__name__)


@dataclass
class Workspace:
    """What a study loads once per process."""

    study: Study
    builder: InMemoryBuilder
    evaluator: Evaluator
    documents: Documents

    @classmethod
    def open(cls, study: Study, say: Callable[[str], None] = log.info) -> "Workspace":
        spec = study.spec
        check_device(spec.device)
        listed = [*spec.models, *([spec.base_model] if spec.base_model else [])]
        references = list(dict.fromkeys(study.resolve(m) for m in listed))
        say(f"loading {len(references)} model(s) onto {spec.device}")
        sources = {reference: open_source(reference) for reference in references}
        # The live model takes its shape from the first method's hand-written recipe.
        first = SEARCHABLE.get(spec.methods[0])
        first_recipe = recipe_from_dict(first.recipe(first.baseline(spec), spec, study.resolve))
        builder = InMemoryBuilder.for_recipe(first_recipe, sources, device=spec.device, dtype=DTYPES[spec.dtype])
        from transformers import AutoTokenizer

        checkpoint_dir = sources[references[0]].directory
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir))
        evaluation = spec.evaluation
        config = EvalConfig(
            suite=evaluation.suite,
            tasks=(*evaluation.tasks, *final_only_tasks(spec)),
            include_paths=tuple(study.resolve(path) for path in evaluation.include_paths),
            data_dir=study.resolve(evaluation.data_dir) if evaluation.data_dir else None,
            num_fewshot=evaluation.num_fewshot,
        )
        say("preparing the evaluation tasks")
        evaluator = Evaluator.from_model(
            builder.model, tokenizer, config, backend=spec.backend, checkpoint_dir=checkpoint_dir
        )
        return cls(study, builder, evaluator, choose_documents(evaluator, spec))
