"""Tiny Llama-architecture models built offline, deterministically, in seconds.

Tests, the demo and the benchmarks need real transformers checkpoints (sharded
safetensors, config, tokenizer) without any hub access; this module makes them
from a seed: a word-level tokenizer trained locally with `tokenizers`, a random
initialisation, and optional perturbations that give "fine-tuned" relatives of
a shared base.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mergetune.merge_ops.sources import CheckpointSource

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# A small embedded corpus: enough words for a usable vocabulary and for the
# demo's skills (arithmetic facts and capital cities) to be expressible.
_WORDS = (
    "the a an is are was of to and in on for with answer question true false yes no "
    "which what who where when how many much plus minus times equals zero one two three "
    "four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty capital city country france paris germany berlin "
    "italy rome spain madrid japan tokyo china beijing egypt cairo canada ottawa brazil "
    "brasilia india delhi kenya nairobi peru lima chile santiago norway oslo sweden "
    "stockholm poland warsaw greece athens turkey ankara mexico russia moscow australia "
    "canberra portugal lisbon austria vienna ireland dublin cuba havana iran tehran "
    "science water fire earth air sun moon star animal plant cell energy light heat cold "
    "big small fast slow good bad old new first last because so but not or if then "
    ". , ? ! : ; ' \" ( ) - A B C D E 1 2 3 4 5"
)


def build_tokenizer(extra_text: str = "") -> PreTrainedTokenizerFast:
    """Train a deterministic word-level tokenizer on the embedded corpus."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    lines = (_WORDS + " " + extra_text).split()
    tokenizer.train_from_iterator(sorted(set(lines)), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


@dataclass(frozen=True)
class TinySpec:
    """Shape of a tiny Llama; defaults keep a model under a megabyte."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 512


def tiny_config(spec: TinySpec, vocab_size: int, tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def random_model(spec: TinySpec, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """A randomly initialised tiny Llama; the same seed gives the same weights."""
    torch.manual_seed(seed)
    config = tiny_config(spec, len(tokenizer), tokenizer)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # Norm weights start at exactly 1.0 in transformers; give them spread so
        # that merges of layernorms are not trivially equal to their inputs.
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def perturbed(model: LlamaForCausalLM, seed: int, scale: float = 0.02) -> LlamaForCausalLM:
    """A relative of `model`: the same weights plus seeded noise (a stand-in fine-tune)."""
    generator = torch.Generator().manual_seed(seed)
    clone = LlamaForCausalLM(model.config)
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        for param in clone.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_(noise.to(param.dtype) * scale)
    return clone.eval()


def save_model(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: str | Path,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | int = "50GB",
) -> Path:
    """Write a checkpoint as safetensors (sharded when large) with config and tokenizer."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    model.config.dtype = dtype
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_family(
    out_dir: str | Path,
    names: tuple[str, ...] = ("base", "model_a", "model_b"),
    spec: TinySpec = TinySpec(),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    max_shard_size: str | int = "50GB",
) -> dict[str, Path]:
    """A base model and relatives of it (seeded perturbations), saved side by side.

    The first name is the base; every later one is the base plus its own noise,
    which is the shape of data task-arithmetic methods expect.
    """
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    base = random_model(spec, tokenizer, seed)
    paths = {names[0]: save_model(base, tokenizer, out_dir / names[0], dtype, max_shard_size)}
    for index, name in enumerate(names[1:], start=1):
        relative = perturbed(base, seed=seed * 1000 + index)
        paths[name] = save_model(relative, tokenizer, out_dir / name, dtype, max_shard_size)
    return paths


def load_state(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory, by name (for checks on small models)."""
    source = CheckpointSource(str(directory), Path(directory))
    return {name: source.get(name) for name in source.names()}
