"""Shared fixtures: tiny model families built offline, once per test session."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from mergetune.demo.tiny import TinySpec, build_family  # noqa: E402

SHARED_BENCHMARKS = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def family_f32(tmp_path_factory) -> dict[str, Path]:
    """base, model_a, model_b, model_c: float32, untied embeddings, sharded into several files."""
    return build_family(
        tmp_path_factory.mktemp("f32"), names=("base", "model_a", "model_b", "model_c"), max_shard_size="100KB"
    )


@pytest.fixture(scope="session")
def family_bf16_tied(tmp_path_factory) -> dict[str, Path]:
    """base, model_a, model_b, model_c: bfloat16, tied embeddings (no lm_head tensor), one file each."""
    return build_family(
        tmp_path_factory.mktemp("bf16"),
        names=("base", "model_a", "model_b", "model_c"),
        spec=TinySpec(tie_word_embeddings=True),
        dtype=torch.bfloat16,
        seed=1,
    )


@pytest.fixture
def as_a_scheduled_job():
    """SIGTERM ends the process, as it does a job a scheduler (SLURM, Kubernetes, `timeout`) will preempt, unless
    mergetune handles it: a test that sends one without mergetune's handler in place dies."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, previous)
