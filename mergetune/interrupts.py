"""A Ctrl-C that is never lost, and one that waits for the end of a step that must not be cut.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. When that is a weakref
callback or a `__del__` (garbage collected inside datasets, lm-eval or torch while a study prepares its
tasks), Python prints "Exception ignored in ..." and carries on: a study interrupted then would run to its
budget and exit 0. So the commands run under `noticed()`, whose handler records the interrupt as it
raises it, and long loops call `check()` at their safe points, which raises a recorded one again.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

_received = False


@dataclass
class Held:
    received: bool = False


def _record_and_raise(signum: int, frame: object) -> None:
    global _received
    _received = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def _handling(handler: Callable[[int, object], None]) -> Iterator[bool]:
    """SIGINT goes to `handler` inside the block; yields False (and changes nothing) off the main
    thread, the only one that receives signals, and where SIGINT is ignored: a shell starts a background
    job (`mergetune study run … &`) so, to keep Ctrl-C at the terminal for the foreground, as Python does."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        yield False
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield True
    finally:  # None: a handler not set from Python, which Python cannot set back
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


@contextlib.contextmanager
def noticed() -> Iterator[None]:
    """Record every Ctrl-C inside the block, for `check()`; one Python drops is not printed as a traceback."""
    global _received
    _received = False
    previous_hook = sys.unraisablehook

    def quiet_when_recorded(unraisable: "sys.UnraisableHookArgs") -> None:
        if not (_received and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            previous_hook(unraisable)

    sys.unraisablehook = quiet_when_recorded
    try:
        with _handling(_record_and_raise):
            yield
    finally:
        sys.unraisablehook = previous_hook
        _received = False


def check() -> None:
    """Raise the Ctrl-C received inside `noticed()` if it got lost on its way (see the module's docstring)."""
    if _received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def held() -> Iterator[Held]:
    """Hold a Ctrl-C that arrives inside the block and say so afterwards (`Held.received`), instead of
    raising in the middle of it; the caller raises it once the step is whole."""
    state = Held()

    def hold(signum: int, frame: object) -> None:
        state.received = True

    with _handling(hold):
        yield state
