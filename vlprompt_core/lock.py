"""One run per results folder.

``vlprompt run`` holds an exclusive ``flock`` on ``<output>/.vlprompt.lock`` for as
long as it runs, and writes who it is (process id, host, command, start time) into
the file. A second run on the same folder finds the lock held and stops with one
line naming that process. The kernel releases a ``flock`` when its process dies,
however it dies (``kill -9`` included), so a lock left behind by a dead run is
simply taken by the next one, which says so.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

try:
    import fcntl
except ImportError:  # not on Windows: one run per folder is then not enforced
    fcntl = None

LOCK_NAME = ".vlprompt.lock"


class FolderLock:
    """``with FolderLock(folder):`` the folder is this process's until the block ends."""

    def __init__(self, folder: Path, log: Callable[[str], None] = lambda msg: None,
                 elsewhere: str = "give this run another output folder (--output)"):
        self.folder = Path(folder)
        self.elsewhere = elsewhere  # how to go elsewhere, said when the folder is in use
        self.path = self.folder / LOCK_NAME
        self.log = log
        self.fd: int | None = None

    def holder(self) -> dict:
        """Who wrote the lock file last (empty when unreadable)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> FolderLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        if fcntl is None:
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            h = self.holder()
            who = f"process {h.get('pid', '?')} on {h.get('host', '?')}"
            what = f" ({h['command']}, started {h.get('started', '?')})" if h.get("command") else ""
            raise UserError(f"{self.folder}: in use by {who}{what}; wait for it to finish, stop it, or "
                            f"{self.elsewhere}") from None
        previous = self.holder()
        if previous.get("pid") and previous.get("pid") != os.getpid():
            self.log(f"{self.folder}: taking over the lock of process {previous['pid']}, which is no longer running")
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv) or "python",
              "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(me).encode(), 0)
            os.fsync(fd)
        except OSError as exc:  # a full disk: the lock is let go, the error names its file
            os.close(fd)
            raise OSError(exc.errno, exc.strerror, str(self.path)) from exc
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a clean exit leaves no holder behind
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
