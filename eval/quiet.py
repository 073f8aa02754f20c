"""Silence a library's logger or progress bars for the duration of a call.

lm-eval logs warnings that are expected in mergetune's use of it (shadowed task
names, an already-loaded model passed to HFLM); they would bury real ones. Its
`Task.build_all_requests` draws a progress bar for every document subset, which
in a study means one per trial step, interleaved with the study's own bar.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import lm_eval.api.task
from tqdm import tqdm


@contextmanager
def quieted(logger_name: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise `logger_name`'s level to `level` inside the block, then restore it."""
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextmanager
def no_request_progress() -> Iterator[None]:
    """Inside the block, lm-eval's request building draws no progress bar (it offers no switch for it)."""
    original = lm_eval.api.task.tqdm
    lm_eval.api.task.tqdm = partial(tqdm, disable=True)
    try:
        yield
    finally:
        lm_eval.api.task.tqdm = original
