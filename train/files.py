"""Files that other processes or a later command read: a lock file shared by processes on one host (tune
workers, torchrun ranks, two studies), a text file replaced whole or not at all, and an --out path checked
before the work that fills it.

The kernel drops a killed process's lock, so nothing is left to clean up. Where no lock can be taken (no
``fcntl``, a read-only folder, a file system without locks) the block runs unlocked, as it would without
this module: a lock here narrows a race, it never stops the work.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: Path | None) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (created if missing) for the block; yields whether it is held."""
    fh = None
    if path is not None:
        try:
            import fcntl

            fh = open(path, "a")
            fcntl.flock(fh, fcntl.LOCK_EX)  # a file system without locks raises here
        except (ImportError, OSError):
            if fh is not None:
                fh.close()
            fh = None
    try:
        yield fh is not None
    finally:
        if fh is not None:
            fh.close()  # releases the lock


def write_text_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temp file of this writer's own, renamed over it: a Ctrl-C or a full
    disk leaves the old file (a results file, docs/performance.md), never a truncated one that the next
    ``reslab results docs`` cannot parse."""
    path = Path(path).resolve()  # a symlinked page stays a link: its target is replaced
    if path.exists() and not path.is_file():  # /dev/stdout, a FIFO: nothing to replace, write through
        path.write_text(text)
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def output_path(path: str, flag: str = "--out") -> Path:
    """``path`` as a file to write at the end of a command, checked (and its folder made) at the start: a folder
    or an unwritable place found only after minutes of evaluation lost them. A ValueError names the flag."""
    out = Path(path)
    if out.is_dir() or path.endswith(("/", os.sep)):
        raise ValueError(f"{flag} {path} is a folder: give a file name")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot make its folder ({e.strerror})") from None
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"{flag} {path}: not writable")
    return out
