"""Which exceptions are the user's input problems (shown as one line) rather than bugs."""

from __future__ import annotations

import os


def user_errors() -> tuple[type[BaseException], ...]:
    """Set RESLAB_DEBUG=1 to see full tracebacks instead."""
    if os.environ.get("RESLAB_DEBUG"):
        return ()
    from mlflow.exceptions import MlflowException

    from .data import DataError
    from .engine import DivergedError
    from .tracking import TrackingError

    return (DataError, TrackingError, DivergedError, FileNotFoundError, ValueError, MlflowException, PermissionError)
