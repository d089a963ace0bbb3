"""SIGTERM ends a command like Ctrl-C (issue 16).

``docker stop``, systemd and batch schedulers send SIGTERM, then SIGKILL after a grace period. Python's
default for SIGTERM is to die at once, leaving the MLflow run, the Optuna trial and the study's parent
run RUNNING. :func:`terminate_like_ctrl_c` turns it into :class:`Terminated`, a ``KeyboardInterrupt``,
so every ``except KeyboardInterrupt`` cleanup runs for both; the runs end KILLED with an
``end_reason`` tag saying which signal it was. A leaf module: it imports nothing of reslab.
"""

from __future__ import annotations

import signal
import threading

END_REASON_TAG = "end_reason"  # MLflow tag on a run (train run, trial, parent) that a signal ended
EXIT_SIGTERM = 128 + signal.SIGTERM  # the shell's code for "terminated by SIGTERM"
EXIT_SIGINT = 128 + signal.SIGINT


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises KeyboardInterrupt."""


def terminate_like_ctrl_c() -> None:
    """Raise :class:`Terminated` on SIGTERM (main thread only). The handler is one-shot: a second
    SIGTERM while the first one's cleanup runs (a tracking server that does not answer) kills at once."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated("SIGTERM")

    signal.signal(signal.SIGTERM, handler)


def end_reason(e: BaseException) -> str:
    """What ended a run, for its END_REASON_TAG."""
    return "SIGTERM" if isinstance(e, Terminated) else "KeyboardInterrupt (Ctrl-C)"
