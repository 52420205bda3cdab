"""Files a user trusts, written whole or not at all.

Each file goes to a temporary name in its own folder, is flushed to disk, and replaces its target with one atomic
``os.replace``; a folder (an export) is written under a temporary name beside its target and renamed at the end. A
write that fails (a full disk, a read-only folder) is a ``WriteError`` naming the file and the reason: the previous
file stays as it was, and nothing half-written is left behind to block a retry.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from glm_session.errors import UserError

PARTIAL = ".partial-"  # the prefix of what is being written


class WriteError(UserError, OSError):
    """A file or folder could not be written; what was there before is kept."""


def describe_os_error(err: BaseException) -> str:
    """``No space left on device`` for an ``OSError``, else the exception's first line."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return (str(err).strip().splitlines() or [type(err).__name__])[-1][:200]


def fsync_folder(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (the folder's entry list reaches the disk)."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", what: str = "file") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    Raises:
        WriteError: the write, flush or rename failed (``what`` names the file's kind in the message); ``path``
            is untouched and the temporary file removed.
    """
    path = Path(path)
    temporary = path.parent / f"{PARTIAL}{uuid.uuid4().hex}-{path.name}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
        fsync_folder(path.parent)
    except OSError as err:
        raise WriteError(f"{path}: the {what} could not be written ({describe_os_error(err)}); "
                         "what was there before is kept") from None  # fmt: skip
    finally:
        temporary.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, what: str = "file") -> None:
    """Write ``text`` to ``path`` atomically (``atomic_open``)."""
    with atomic_open(path, "w", what) as f:
        f.write(text)


@contextmanager
def new_folder(dst: str | os.PathLike, what: str = "folder") -> Iterator[Path]:
    """A temporary folder beside ``dst`` to write into; renamed to ``dst`` (which must not exist, or be an empty
    folder) when the block ends cleanly, removed when it fails.

    Raises:
        WriteError: an ``OSError`` while writing or renaming; ``dst`` is left as it was.
    """
    dst = Path(dst)
    temporary = dst.parent / f"{PARTIAL}{uuid.uuid4().hex}-{dst.name}"
    try:
        temporary.mkdir(parents=True)
        yield temporary
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        os.replace(temporary, dst)
        fsync_folder(dst.parent)
    except OSError as err:
        raise WriteError(f"{dst}: the {what} could not be written ({describe_os_error(err)}); nothing was left "
                         "there, so the same command can be run again") from None  # fmt: skip
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
