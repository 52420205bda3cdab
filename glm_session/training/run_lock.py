"""One run per run folder: an advisory lock on ``<run>/.lock`` held while the run lives.

Two runs writing into one folder break each other (one's cleanup of stale saves deletes the other's save in flight,
their files mix). ``RunFolderLock`` takes ``fcntl.flock`` on the folder's lock file; the operating system releases it
when the process ends, however it ends, so a killed run never leaves the folder locked. The lock file says who holds
it (pid, host, start, command), so a second run into the folder ends with one line naming the owner. Only the first
process of a multi-process launch takes it (its other ranks share the folder by design).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from glm_session.errors import UserError

LOCK_FILE = ".lock"


class RunFolderBusy(UserError):
    """Another live run owns the run folder."""


def launch_rank() -> int:
    """This process's rank in a multi-process launch (torchrun's ``RANK``, SLURM's ``SLURM_PROCID``), else 0."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


class RunFolderLock:
    """The lock of ``folder``; ``acquire`` raises ``RunFolderBusy`` naming the owner, ``release`` lets it go."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = Path(folder) / LOCK_FILE
        self._descriptor: int | None = None

    def acquire(self) -> RunFolderLock:
        if launch_rank() != 0:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _read_owner(descriptor)
            os.close(descriptor)
            raise RunFolderBusy(
                f"{self.path.parent}: in use by another run ({owner}); give this run its own folder "
                "(hydra.run.dir=...), or wait for that run to end"
            ) from None
        os.ftruncate(descriptor, 0)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                 "command": " ".join(sys.argv)}  # fmt: skip
        os.write(descriptor, (json.dumps(owner) + "\n").encode())
        self._descriptor = descriptor
        return self

    def release(self) -> None:
        if self._descriptor is not None:
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_owner(descriptor: int) -> str:
    try:
        owner = json.loads(os.pread(descriptor, 4096, 0).decode() or "{}")
        return f"pid {owner['pid']} on {owner['host']} since {owner['started']}: {owner['command']}"
    except (OSError, ValueError, KeyError):
        return "owner unknown"
