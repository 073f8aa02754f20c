"""Embedding rows re-indexed onto one output vocabulary (`tokenizer_source`).

Models with different tokenizers have embedding / lm_head matrices whose rows
mean different tokens. Before merging, each model's matrix is rebuilt in the
output tokenizer's order, with mergekit's rules for tokens a model lacks: a
token only one model has takes that model's row for everyone; a token the base
has takes the base's row; otherwise the average of the models that have it; a
token nobody has gets zeros.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch

from mergetune.errors import MergetuneError
from mergetune.merge_ops.plan import MergePlan, TensorInput
from mergetune.merge_ops.recipe import Recipe
from mergetune.merge_ops.sources import TensorSource, resolve_model_directory

log = logging.getLogger(__name__)


def tokenizer_vocab(directory: Optional[Path], label: str) -> dict[str, int]:
    from transformers import AutoTokenizer

    if directory is None:
        raise MergetuneError(f"model {label}: has no tokenizer files to align vocabularies with")
    try:
        return AutoTokenizer.from_pretrained(str(directory)).get_vocab()
    except Exception as error:  # tokenizer loading fails in many ways; all mean "unusable"
        raise MergetuneError(f"model {label}: cannot load its tokenizer from {directory}: {error}") from None


@dataclass
class VocabAlignment:
    """For each model, the row of every output token in that model's matrix (-1: absent)."""

    size: int
    rows: dict[str, torch.Tensor]
    model_vocab_sizes: dict[str, int]
    base: Optional[str]

    @classmethod
    def build(
        cls,
        output_vocab: dict[str, int],
        model_vocabs: dict[str, dict[str, int]],
        model_vocab_sizes: dict[str, int],
        base: Optional[str],
    ) -> "VocabAlignment":
        size = max(output_vocab.values()) + 1
        rows = {}
        for model, vocab in model_vocabs.items():
            index = torch.full((size,), -1, dtype=torch.long)
            for token, token_id in output_vocab.items():
                row = vocab.get(token, -1)
                index[token_id] = row if row < model_vocab_sizes[model] else -1
            rows[model] = index
        return cls(size, rows, model_vocab_sizes, base)

    def applies(self, inputs: Sequence[TensorInput], shapes: Sequence[tuple[int, ...]]) -> bool:
        """Embedding-like: every input's first axis is its model's vocabulary size."""
        return all(
            len(shape) >= 1 and shape[0] == self.model_vocab_sizes.get(item.model, -1)
            for item, shape in zip(inputs, shapes)
        )

    def align(self, models: Sequence[str], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        present = torch.stack([self.rows[model] >= 0 for model in models])  # [models, tokens]
        count = present.sum(dim=0)
        fallback = torch.zeros((self.size, *tensors[0].shape[1:]), dtype=tensors[0].dtype)
        averaged = torch.zeros_like(fallback, dtype=torch.float32)
        for position, (model, tensor) in enumerate(zip(models, tensors)):
            has = present[position]
            averaged[has] += tensor[self.rows[model][has]].float()
        has_any = count > 0
        fallback[has_any] = (averaged[has_any] / count[has_any].unsqueeze(-1)).to(fallback.dtype)
        if self.base in models:
            base_position = list(models).index(self.base)
            base_has = present[base_position]
            fallback[base_has] = tensors[base_position][self.rows[self.base][base_has]]
        for position, (model, tensor) in enumerate(zip(models, tensors)):
            only = (count == 1) & present[position]
            fallback[only] = tensor[self.rows[model][only]]
        missing = int((count == 0).sum())
        if missing:
            log.warning("%d token(s) of the output vocabulary are in no input model; their rows are zero", missing)
        aligned = []
        for position, (model, tensor) in enumerate(zip(models, tensors)):
            out = fallback.clone()
            has = present[position]
            out[has] = tensor[self.rows[model][has]]
            aligned.append(out)
        return aligned


def vocab_alignment(recipe: Recipe, sources: Mapping[str, TensorSource]) -> Optional[VocabAlignment]:
    """The alignment `tokenizer_source` asks for, or None when tokenizers are kept as they are."""
    choice = recipe.tokenizer_source
    if choice is None:
        return None
    donor = recipe.base_model if choice == "base" else choice
    if donor is None:
        raise MergetuneError("tokenizer_source: 'base' needs a base_model")
    vocabs = {name: tokenizer_vocab(source.directory, name) for name, source in sources.items()}
    sizes = {name: int(source.config.get("vocab_size", len(vocabs[name]))) for name, source in sources.items()}
    output_vocab = vocabs[donor] if donor in sources else tokenizer_vocab(tokenizer_directory(donor, sources), donor)
    return VocabAlignment.build(output_vocab, vocabs, sizes, recipe.base_model)


def tokenizer_donor(recipe: Recipe, plan: MergePlan) -> str:
    """The model whose tokenizer the output carries (and later stages align their vocabularies to)."""
    choice = recipe.tokenizer_source
    if choice and choice != "base":
        return choice
    return recipe.base_model or plan.donor


def tokenizer_directory(reference: str, sources: Mapping[str, TensorSource]) -> Optional[Path]:
    """Where `reference`'s tokenizer files are: a merged model's folder, or, as mergekit allows, that of a
    model merged nowhere (`tokenizer_source: org/other`) whose tokenizer alone the output takes."""
    if reference in sources:
        return sources[reference].directory
    try:
        return resolve_model_directory(reference)
    except MergetuneError as error:
        raise MergetuneError(f"tokenizer_source: {error}") from None
