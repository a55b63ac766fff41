"""Files readable by their owner only: the registry's and the monitor's SQLite databases, the ingester's dead-letter
file, a gateway's store-and-forward outbox.

Here, in ``devices/`` (which depends on no other component), so that every component uses the one helper. No
third-party import: the ingester imports this module, and SQLAlchemy alone would cost it 11 MB of RSS.

They hold what must not be world-readable on a shared host (physio addresses and names in the e-mail outbox,
patient codes and flags, raw device payloads). Created ``0600`` whatever the process's umask; one found with
group or other bits (left by an older version) is tightened, with a warning.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

PRIVATE_MODE: Final = 0o600
# SQLite's companions of a database file (write-ahead log, shared memory, rollback journal).
SQLITE_SIDE_FILES: Final = ("-wal", "-shm", "-journal")


def tighten(path: Path) -> None:
    """Remove group and other permission bits from an existing file (a warning if that is not allowed)."""
    try:
        current = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    if current & 0o077:
        try:
            path.chmod(current & 0o700)
            log.warning("%s was readable by others (mode %o): now %o", path, current, current & 0o700)
        except OSError as exc:
            log.warning("%s is readable by others (mode %o) and cannot be changed: %s", path, current, exc)


def private_file(path: Path) -> Path:
    """Create ``path`` (and its folder) empty with mode 0600 unless it exists; tighten it if it does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_MODE))
    except FileExistsError:
        tighten(path)
    return path


def private_sqlite_file(path: Path) -> None:
    """Before a SQLite database is first opened: its file created 0600 (SQLite gives its ``-wal``/``-shm`` files the
    database file's mode), or an existing one and its side files tightened. A new folder is made 0700."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    private_file(path)
    for suffix in SQLITE_SIDE_FILES:
        tighten(path.with_name(path.name + suffix))


def open_private_append(path: Path) -> int:
    """A file descriptor appending to ``path``, created 0600 (an existing file is tightened)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tighten(path)
    return os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, PRIVATE_MODE)


__all__ = ["PRIVATE_MODE", "SQLITE_SIDE_FILES", "open_private_append", "private_file", "private_sqlite_file", "tighten"]
