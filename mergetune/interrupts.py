"""A Ctrl-C (or SIGTERM) that is never lost, and one that waits for the end of a step that must not be cut.

Python raises KeyboardInterrupt wherever the main thread is when SIGINT arrives. When that is a weakref
callback or a `__del__` (garbage collected inside datasets, lm-eval or torch while a study prepares its
tasks), Python prints "Exception ignored in ..." and carries on: a study interrupted then would run to its
budget and exit 0. So the commands run under `noticed()`, whose handler records the interrupt as it
raises it, and long loops call `check()` at their safe points, which raises a recorded one again.

Only the first signal raises. A second one (Ctrl-C pressed twice, a scheduler or `timeout` signalling again)
would otherwise land in the cleanup the first one started (storing the trial in flight and queueing its
parameters again, removing a merge's partial output) and cut it short.

SIGTERM is what a cluster scheduler's preemption, `kill`, `timeout` or `docker stop` sends. Python's default
ends the process on the spot, leaving a merge's partial output behind and a running trial to the reaper's
grace period; under `noticed()` it raises `Terminated`, a KeyboardInterrupt, and takes the Ctrl-C path.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, NoReturn, Optional

#: The signals a command stops on, handled alike.
SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: What a signal is set back to where its handler before was none Python can set back (one set from C).
_DEFAULT = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

_received: Optional[int] = None  # the first signal received inside `noticed()`
_raised = False  # whether it has been raised: the command is stopping, and cleans up


class Terminated(KeyboardInterrupt):
    """SIGTERM: stops a command as a Ctrl-C does (stored trials, no partial output), with its own name and exit code."""


def interruption(signum: int) -> KeyboardInterrupt:
    """The exception a signal of `SIGNALS` stops a command with."""
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def describe(interrupt: KeyboardInterrupt) -> str:
    """How the user and a stored failed trial name the stop: `terminated` (SIGTERM) or `interrupted` (Ctrl-C)."""
    return "terminated" if isinstance(interrupt, Terminated) else "interrupted"


@dataclass
class Held:
    signum: Optional[int] = None

    def raise_if_received(self) -> None:
        """Raise what was held in the block, now that the step is whole."""
        if self.signum is not None:
            _stop(self.signum)


def _stop(signum: int) -> NoReturn:
    """Raise `signum`'s interruption, marking the command as stopping (later signals are dropped)."""
    global _raised
    _raised = True
    raise interruption(signum)


def _record(signum: int) -> None:
    global _received
    if _received is None:
        _received = signum


def _record_and_raise(signum: int, frame: object) -> None:
    """The first signal raises; the next ones, arriving while the command cleans up after it, are dropped."""
    _record(signum)
    if not _raised:
        _stop(_received)


@contextlib.contextmanager
def _handling(handler: Callable[[int, object], None]) -> Iterator[None]:
    """`SIGNALS` go to `handler` inside the block. Nothing changes off the main thread, the only one that receives
    signals, nor for a signal that is ignored: a shell starts a background job (`mergetune study run … &`) with
    SIGINT ignored, to keep Ctrl-C at the terminal for the foreground, as Python does; `nohup` ignores none of these."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for signum, before in previous.items():
            signal.signal(signum, before if before is not None else _DEFAULT[signum])


@contextlib.contextmanager
def noticed() -> Iterator[None]:
    """Record every Ctrl-C or SIGTERM inside the block, for `check()`; one Python drops is not printed as a traceback."""
    global _received, _raised
    _received, _raised = None, False
    previous_hook = sys.unraisablehook

    def quiet_when_recorded(unraisable: "sys.UnraisableHookArgs") -> None:
        global _raised
        if not (_received is not None and isinstance(unraisable.exc_value, KeyboardInterrupt)):
            previous_hook(unraisable)
        else:  # lost, so nothing is stopping: the next signal raises again (and `check()` raises this one)
            _raised = False

    sys.unraisablehook = quiet_when_recorded
    try:
        with _handling(_record_and_raise):
            yield
    finally:
        sys.unraisablehook = previous_hook
        _received, _raised = None, False


def check() -> None:
    """Raise the Ctrl-C or SIGTERM received inside `noticed()` if it got lost on its way (see the module's docstring)
    or was held (`held`)."""
    if _received is not None:
        _stop(_received)


@contextlib.contextmanager
def held() -> Iterator[Held]:
    """Hold a Ctrl-C or SIGTERM that arrives inside the block and say so afterwards (`Held.raise_if_received`),
    instead of raising in the middle of it: the caller raises it once the step is whole, or the next `check()`
    does (inside `noticed()`, where it is recorded)."""
    state = Held()

    def hold(signum: int, frame: object) -> None:
        _record(signum)
        if state.signum is None:
            state.signum = signum

    with _handling(hold):
        yield state
