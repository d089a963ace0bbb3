"""SIGTERM ends a command like Ctrl-C (issue 16).

``docker stop``, systemd and batch schedulers send SIGTERM, then SIGKILL after a grace period. Python's
default for SIGTERM is to die at once, leaving the MLflow run, the Optuna trial and the study's parent
run RUNNING. :func:`terminate_like_ctrl_c` turns it into :class:`Terminated`, a ``KeyboardInterrupt``,
so every ``except KeyboardInterrupt`` cleanup runs for both; the runs end KILLED with an
``end_reason`` tag saying which signal it was. A leaf module: it imports nothing of reslab.
"""

from __future__ import annotations

import signal
import sys
import threading

END_REASON_TAG = "end_reason"  # MLflow tag on a run (train run, trial, parent) that a signal ended
EXIT_SIGTERM = 128 + signal.SIGTERM  # the shell's code for "terminated by SIGTERM"
EXIT_SIGINT = 128 + signal.SIGINT


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises KeyboardInterrupt."""


_pending = False  # SIGTERM arrived and its Terminated has not reached a handler yet


def terminate_like_ctrl_c() -> None:
    """Raise :class:`Terminated` on SIGTERM (main thread only). The handler is one-shot: a second
    SIGTERM while the first one's cleanup runs (a tracking server that does not answer) kills at once.

    A signal handler's exception raised while Python runs a ``__del__`` or a weakref callback (garbage
    collection, at any moment) is printed as "Exception ignored" and dropped: seen here once in six
    SIGTERMs, and the run then trained to the end. So the signal is also remembered, such dropped
    exceptions are not printed, and the training loop raises it at its next step (:func:`raise_if_terminated`)."""
    global _pending
    _pending = False
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        global _pending
        _pending = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated("SIGTERM")

    def unraisable(u: sys.UnraisableHookArgs, previous=sys.unraisablehook) -> None:  # noqa: ANN001
        if not isinstance(u.exc_value, Terminated):  # a dropped Terminated is raised again by the loop
            previous(u)

    signal.signal(signal.SIGTERM, handler)
    sys.unraisablehook = unraisable


def raise_if_terminated() -> None:
    """Raise :class:`Terminated` if SIGTERM arrived and its exception was dropped (see above). Cheap:
    the training loop calls it every step."""
    global _pending
    if _pending:
        _pending = False
        raise Terminated("SIGTERM")


def handled() -> None:
    """The Terminated reached its handler: nothing is pending any more."""
    global _pending
    _pending = False


def end_reason(e: BaseException) -> str:
    """What ended a run, for its END_REASON_TAG."""
    return "SIGTERM" if isinstance(e, Terminated) else "KeyboardInterrupt (Ctrl-C)"
