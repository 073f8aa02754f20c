"""Disk merge: a recipe file → a complete model directory (`mergetune merge`).

Stages run in order; a named stage is written under the output's temporary
directory and read back lazily by the stages after it. Tensors stream from
memory-mapped inputs through the method into pre-sized safetensors shards, so
peak memory is a few tensors. The directory is renamed into place only when
everything (weights, config, tokenizer, recipe, model card) is written.
"""

from __future__ import annotations

import json
import logging
import secrets
import shutil
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional

from mergetune import interrupts
from mergetune.devices import check_device
from mergetune.errors import MergetuneError
from mergetune.merge_ops.card import RECIPE_FILE, model_card
from mergetune.merge_ops.execute import fetch_inputs, run_op
from mergetune.merge_ops.plan import MergePlan, validate_recipe
from mergetune.merge_ops.recipe import Recipe, RecipeFile
from mergetune.merge_ops.sources import (
    TOKENIZER_FILES,
    CheckpointSource,
    TensorSource,
    open_source,
    read_json_object,
)
from mergetune.merge_ops.stages import final_stage, in_recipe
from mergetune.merge_ops.vocab import tokenizer_directory, tokenizer_donor
from mergetune.outputs import check_output_apart
from mergetune.merge_ops.writer import DEFAULT_SHARD_BYTES, ShardedWriter, TensorEntry, atomic_directory

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PREFETCH = 2  # operations whose inputs are read ahead: bounds memory to a few tensors
Progress = Callable[[str, int, int], None]  # (stage, tensors done, tensors in stage)


@dataclass
class MergeResult:
    output: Path
    tensors: int
    layers: int
    seed: Optional[int]
    warnings: list[str]


class SourceCache:
    """Opens each referenced model once, whichever stages use it."""

    def __init__(self, allow_pickle: bool):
        self.allow_pickle = allow_pickle
        self.opened: dict[str, CheckpointSource] = {}

    def get(self, reference: str) -> CheckpointSource:
        if reference not in self.opened:
            self.opened[reference] = open_source(reference, allow_pickle=self.allow_pickle)
        return self.opened[reference]


#: Templates mergekit 0.1.5 ships by name; mergetune carries only ChatML's text.
MERGEKIT_TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


def resolve_chat_template(value: str, sources: Mapping[str, TensorSource]) -> Optional[str]:
    """The template text the recipe's `chat_template` names, or None ('auto' with no template among the inputs,
    where mergekit writes none either)."""
    if value == "auto":
        found = []
        for source in sources.values():
            config = (source.directory / "tokenizer_config.json") if source.directory else None
            if config and config.exists():
                template = read_json_object(config, f"model {source.label}").get("chat_template")
                if isinstance(template, str):
                    found.append(template.strip())
            jinja = source.directory / "chat_template.jinja" if source.directory else None
            if jinja and jinja.exists():
                found.append(jinja.read_text(encoding="utf-8").strip())
        if not found:
            log.warning("chat_template: 'auto' but none of the input models has a chat template; none is written")
            return None
        return Counter(found).most_common(1)[0][0]
    if value == "chatml":
        return CHATML
    if value in MERGEKIT_TEMPLATE_NAMES:
        raise MergetuneError(
            f"chat_template: '{value}' is one of mergekit's built-in templates; mergetune ships only 'chatml': "
            "give the template's Jinja text, or 'auto' to take the input models' own"
        )
    if "{" not in value:
        raise MergetuneError(f"chat_template: '{value}' is neither a Jinja template, 'auto' nor 'chatml'")
    return value


def write_side_files(
    directory: Path,
    recipe: Recipe,
    plan: MergePlan,
    sources: Mapping[str, TensorSource],
    recipe_yaml: str,
    seed: Optional[int],
    chat_template: Optional[str],
    card_extra: str = "",
) -> None:
    """config.json, generation config, tokenizer, chat template, recipe and model card."""
    (directory / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    donor_dir = sources[plan.donor].directory
    if donor_dir and (donor_dir / "generation_config.json").exists():
        shutil.copy(donor_dir / "generation_config.json", directory / "generation_config.json")
    tokenizer_source = tokenizer_donor(recipe, plan)
    tokenizer_dir = tokenizer_directory(tokenizer_source, sources)
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, directory / name)
    if chat_template is not None:
        (directory / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
        if tokenizer_dir is not None and (tokenizer_dir / "tokenizer_config.json").exists():
            tokenizer_config = read_json_object(tokenizer_dir / "tokenizer_config.json", f"model {tokenizer_source}")
            tokenizer_config["chat_template"] = chat_template
            (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
    (directory / RECIPE_FILE).write_text(recipe_yaml, encoding="utf-8")
    (directory / "README.md").write_text(model_card(recipe, plan, recipe_yaml, seed, card_extra), encoding="utf-8")


def merge_stage(
    recipe: Recipe,
    plan: MergePlan,
    sources: Mapping[str, TensorSource],
    directory: Path,
    recipe_yaml: str,
    seed: Optional[int],
    device: str = "cpu",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Optional[Progress] = None,
    card_extra: str = "",
) -> None:
    """Stream one planned stage's tensors, and its side files, into `directory`."""
    # Resolved before the tensors, so a bad template fails in seconds, not after the whole merge.
    chat_template = resolve_chat_template(recipe.chat_template, sources) if recipe.chat_template else None
    writer = ShardedWriter(directory, [TensorEntry(op.output, op.shape, op.dtype) for op in plan.ops], shard_bytes)

    def fetch(item):
        return sources[item.model].get(item.name, device)

    label = recipe.name or "merge"
    try:
        # Reading the next inputs and writing the last output overlap with the math.
        with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as output:
            upcoming = deque(reader.submit(fetch_inputs, op, fetch, device) for op in plan.ops[:PREFETCH])
            pending_write = None
            for index, op in enumerate(plan.ops):
                interrupts.check()
                tensors = upcoming.popleft().result()
                if index + PREFETCH < len(plan.ops):
                    upcoming.append(reader.submit(fetch_inputs, plan.ops[index + PREFETCH], fetch, device))
                merged = run_op(op, plan.method, tensors, seed, device)
                del tensors
                if pending_write is not None:
                    pending_write.result()
                pending_write = output.submit(writer.write, op.output, merged)
                if progress:
                    progress(label, index + 1, len(plan.ops))
            if pending_write is not None:
                pending_write.result()
        writer.close()
    except BaseException:
        writer.abort()
        raise
    write_side_files(directory, recipe, plan, sources, recipe_yaml, seed, chat_template, card_extra)


def merge_recipe_file(
    recipe_file: RecipeFile,
    out_dir: Path,
    seed: Optional[int] = None,
    device: str = "cpu",
    allow_pickle: bool = False,
    overwrite: bool = False,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: Optional[Progress] = None,
    card_extra: str = "",
    protected: Optional[Mapping[str, Path]] = None,
) -> MergeResult:
    """Run every stage of a recipe file; the last stage's output becomes `out_dir`.

    Everything is checked before anything is written: the device, the recipe, every
    input model (opened here), and that `out_dir` overlaps none of them nor any
    `protected` path (such as the recipe file). Stage outputs go inside the
    output's own hidden partial directory, so they are apart from the inputs too.
    """
    check_device(device)
    for stage in recipe_file.stages:
        try:
            validate_recipe(stage)
        except MergetuneError as error:
            raise in_recipe(recipe_file.source, recipe_file.stages, stage, error) from None
    if not any(_randomized(stage) for stage in recipe_file.stages):
        seed = None  # it would change nothing: not in the card, not in the command that reproduces the merge
    elif seed is None:
        seed = secrets.randbelow(2**31)
        log.warning("no --seed given for a random method; using seed %d (recorded in the model card)", seed)
    cache = SourceCache(allow_pickle)
    stage_names = set(recipe_file.stage_names())
    inputs = {
        f"input model {ref}": cache.get(ref).directory
        for stage in recipe_file.stages
        for ref in stage.referenced_models()
        if ref not in stage_names
    }
    for stage in recipe_file.stages:  # a model whose tokenizer alone is taken is an input too
        donor = stage.tokenizer_source
        if donor not in (None, "base", *stage_names) and f"input model {donor}" not in inputs:
            inputs[f"tokenizer source {donor}"] = tokenizer_directory(donor, {})
    check_output_apart(out_dir, {**inputs, **(protected or {})})
    warnings: list[str] = []
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as partial:

            def write_intermediate(stage: Recipe, plan: MergePlan, sources: Mapping[str, TensorSource]) -> TensorSource:
                directory = partial / ".stages" / stage.name
                directory.mkdir(parents=True, exist_ok=True)
                merge_stage(stage, plan, sources, directory, stage.to_yaml(), seed, device, shard_bytes, progress)
                warnings.extend(plan.warnings)
                return CheckpointSource(stage.name, directory)

            plan, sources = final_stage(recipe_file.stages, cache.get, write_intermediate, recipe_file.source)
            final_yaml = recipe_file.to_yaml()
            merge_stage(
                recipe_file.final, plan, sources, partial, final_yaml, seed, device, shard_bytes, progress, card_extra
            )
            warnings.extend(plan.warnings)
            del sources  # the stage outputs' open files, before their directory goes
            shutil.rmtree(partial / ".stages", ignore_errors=True)
    except OSError as error:  # a full disk, a lost mount: atomic_directory has already removed the partial output
        raise MergetuneError(f"cannot write {out_dir}: {error.strerror or error}; nothing was written there") from None
    return MergeResult(out_dir, len(plan.ops), int(plan.config.get("num_hidden_layers", 0)), seed, warnings)


def _randomized(recipe: Recipe) -> bool:
    return validate_recipe(recipe).randomized
