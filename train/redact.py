"""Passwords out of everything reslab prints or logs (issue 16). A leaf module.

Storage and tracking URLs carry credentials (``postgresql+psycopg://user:secret@host/db``,
``http://user:secret@mlflow:5000``); they reach the console (the storage line of ``reslab tune``,
the MLflow run line, the torchrun command of ``--nproc``, one-line errors) and MLflow params.
Every such string goes through :func:`mask_secrets`.
"""

from __future__ import annotations

import re

# scheme://user:password@ up to the token's last '@' (a URL parser splits there; the user may be empty, the
# password may hold unescaped '/' or '@'): masking errs on the side of hiding too much ('http://h:5000/p@x')
_USERINFO = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s'\"]*):[^\s'\"]*@")
# ?password=... / &token=... in a query string or a key=value command line
_QUERY = re.compile(r"(?P<head>\b(?:password|passwd|pwd|secret|token)=)[^&\s]+", re.IGNORECASE)


def mask_secrets(text: str) -> str:
    """``text`` with the passwords of any URLs in it (and password=/token= values) replaced by ***."""
    return _QUERY.sub(r"\g<head>***", _USERINFO.sub(r"\g<head>:***@", text))
