"""The exceptions that are the user's input or machine problems (shown as one line by the CLI)
rather than bugs. A leaf module: it imports nothing of reslab, so every layer can raise these."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Bad input data; the message is one line naming the path and what was expected."""


class TrackingError(RuntimeError):
    """The MLflow store cannot be used; raised before any training starts."""


class DivergedError(RuntimeError):
    """The loss became NaN, infinite or absurdly large: training cannot go on from here."""


class ReslabWarning(UserWarning):
    """Something the user should know that does not stop the command (images skipped, a checkpoint fallen
    back from); the CLI shows it as one ``reslab: warning:`` line."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Set RESLAB_DEBUG=1 to see full tracebacks instead."""
    if os.environ.get("RESLAB_DEBUG"):
        return ()
    from mlflow.exceptions import MlflowException

    return (DataError, TrackingError, DivergedError, FileNotFoundError, ValueError, MlflowException, PermissionError)
