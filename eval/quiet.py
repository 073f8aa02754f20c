"""Silence a library's logger for the duration of a call.

lm-eval logs warnings that are expected in mergetune's use of it (shadowed task
names, an already-loaded model passed to HFLM); they would bury real ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


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
