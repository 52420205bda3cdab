"""One run per run folder: an advisory lock on ``<run>/.lock`` held while the run lives.

Two runs writing into one folder break each other (one's cleanup of stale saves deletes the other's save in flight,
their files mix). ``RunFolderLock`` takes ``fcntl.flock`` on the folder's lock file; the operating system releases it
when the process ends, however it ends, so a killed run never leaves the folder locked. The lock file says who holds
it (pid, host, start, command), so a second run into the folder ends with one line naming the owner. Only the first
process of a multi-process launch takes it (its other ranks share the folder by design). A process holds each
folder's lock once (taking it again is a no-op): the Hydra callback ``LockRunFolder`` takes it before Hydra writes
the folder's ``.hydra/`` files and log, ``train`` again for callers without Hydra.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from glm_session.errors import UserError
from glm_session.hydra_jobs import AbortRun

LOCK_FILE = ".lock"


class RunFolderBusy(UserError):
    """Another live run owns the run folder."""


def launch_rank() -> int:
    """This process's rank in a multi-process launch (torchrun's ``RANK``, SLURM's ``SLURM_PROCID``, or the
    ``LOCAL_RANK`` that Lightning's own launcher gives the processes it starts for ``trainer.devices=N``), else 0."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", "0"))))


HELD: dict[Path, int] = {}  # this process's locks: lock file -> descriptor


class RunFolderLock:
    """The lock of ``folder``; ``acquire`` raises ``RunFolderBusy`` naming the owner, ``release`` lets it go (if
    this object took it)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.path = (Path(folder) / LOCK_FILE).absolute()
        self._descriptor: int | None = None

    def acquire(self) -> RunFolderLock:
        if launch_rank() != 0 or self.path in HELD:
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
        self._descriptor = HELD[self.path] = descriptor
        return self

    def release(self) -> None:
        if self._descriptor is not None:
            HELD.pop(self.path, None)
            fcntl.flock(self._descriptor, fcntl.LOCK_UN)
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


class LockRunFolder(Callback):
    """Hydra callback: a single run takes its folder's lock before Hydra writes anything into it, and keeps it until
    the process ends."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        from hydra.core.hydra_config import HydraConfig

        HydraConfig.instance().set_config(config)  # what run_job does first: the folder's name may use it
        try:
            RunFolderLock(str(OmegaConf.select(config, "hydra.run.dir"))).acquire()
        except RunFolderBusy as busy:
            raise AbortRun(busy) from None


def _read_owner(descriptor: int) -> str:
    try:
        owner = json.loads(os.pread(descriptor, 4096, 0).decode() or "{}")
        return f"pid {owner['pid']} on {owner['host']} since {owner['started']}: {owner['command']}"
    except (OSError, ValueError, KeyError):
        return "owner unknown"
