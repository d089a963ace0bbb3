"""SIGTERM ends a command like Ctrl-C (issue 16), and neither cuts a tracking write in half.

``docker stop``, systemd and batch schedulers send SIGTERM, then SIGKILL after a grace period. Python's
default for SIGTERM is to die at once, leaving the MLflow run, the Optuna trial and the study's parent
run RUNNING. :func:`terminate_like_ctrl_c` turns it into :class:`Terminated`, a ``KeyboardInterrupt``,
so every ``except KeyboardInterrupt`` cleanup runs for both; the runs end KILLED with an
``end_reason`` tag saying which signal it was. A leaf module: it imports nothing of reslab.

A signal's exception raised inside an MLflow (SQLite) write leaves the interrupted statement's cursor
alive in the traceback, holding the database's write lock: the cleanup's own ``set_tag`` then waited
20 s and failed with "database is locked" (CI, once). Code that writes to a store runs inside
:func:`signals_deferred`; a signal that arrives there is raised when the block ends.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

END_REASON_TAG = "end_reason"  # MLflow tag on a run (train run, trial, parent) that a signal ended
EXIT_SIGTERM = 128 + signal.SIGTERM  # the shell's code for "terminated by SIGTERM"
EXIT_SIGINT = 128 + signal.SIGINT


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises KeyboardInterrupt."""


_pending: type[KeyboardInterrupt] | None = None  # a signal arrived and its exception has not been raised yet
_deferring = 0  # depth of signals_deferred() blocks in the main thread


def terminate_like_ctrl_c() -> None:
    """Raise :class:`Terminated` on SIGTERM and ``KeyboardInterrupt`` on Ctrl-C (main thread only), or at
    the end of a :func:`signals_deferred` block. The SIGTERM handler is one-shot: a second SIGTERM while
    the first one's cleanup runs (a tracking server that does not answer) kills at once; a second Ctrl-C
    inside a deferred block raises at once.

    A signal handler's exception raised while Python runs a ``__del__`` or a weakref callback (garbage
    collection, at any moment) is printed as "Exception ignored" and dropped: seen here once in six
    SIGTERMs, and the run then trained to the end. So the signal is also remembered, such dropped
    exceptions are not printed, and the training loop raises it at its next step (:func:`raise_if_terminated`)."""
    global _pending, _deferring
    _pending, _deferring = None, 0
    if threading.current_thread() is not threading.main_thread():
        return

    def on_sigterm(signum: int, frame: object) -> None:
        global _pending
        _pending = Terminated
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if not _deferring:
            raise Terminated("SIGTERM")

    def on_sigint(signum: int, frame: object) -> None:
        global _pending
        again = _pending is not None
        _pending = _pending or KeyboardInterrupt
        if not _deferring or again:
            raise KeyboardInterrupt

    def unraisable(u: sys.UnraisableHookArgs, previous=sys.unraisablehook) -> None:  # noqa: ANN001
        if not isinstance(u.exc_value, Terminated):  # a dropped Terminated is raised again by the loop
            previous(u)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigint)
    sys.unraisablehook = unraisable


@contextmanager
def signals_deferred() -> Iterator[None]:
    """Let the block (a write to the tracking store or the study) finish before a SIGTERM or Ctrl-C that
    arrives during it is raised. Without :func:`terminate_like_ctrl_c` (a library caller) it changes nothing."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring:
        raise_if_terminated()


def raise_if_terminated() -> None:
    """Raise the exception of a signal that arrived while deferred, or whose exception Python dropped
    (see above). Cheap: the training loop calls it every step."""
    global _pending
    if _pending is not None:
        exc, _pending = _pending, None
        raise exc("SIGTERM") if exc is Terminated else exc()


def handled() -> None:
    """The signal's exception reached its handler: nothing is pending any more."""
    global _pending
    _pending = None


def end_reason(e: BaseException) -> str:
    """What ended a run, for its END_REASON_TAG."""
    return "SIGTERM" if isinstance(e, Terminated) else "KeyboardInterrupt (Ctrl-C)"
