"""Checkpoints that are either whole or absent: written to a temporary file, synced, then renamed; and the removal
of what a kill during a save leaves behind."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from glm_session.atomic_files import WriteError, describe_os_error, fsync_folder

SAVING, REPLACED = ".saving-", ".replaced-"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose save survives a kill at any moment.

    The checkpoint goes to a hidden temporary file in the same folder (its name has neither "last" nor ".ckpt",
    so ``ckpt_path=last`` never picks it up), is flushed to disk, and replaces the target with one atomic
    ``os.replace``, itself synced: a kill leaves the previous checkpoint (or none), never a partial one. The
    temporary files of saves that a kill interrupted are removed after the next good save (and when a run starts:
    ``remove_stale_saves``). A save that fails (a full disk) is a ``WriteError`` naming the file; the previous
    checkpoint stays.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        if get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f"{SAVING}{uuid.uuid4().hex}.tmp"
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)  # a failed write is an OSError, or torch's RuntimeError of its writer
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
            fsync_folder(path.parent)
        except (OSError, RuntimeError) as err:
            reason = describe_os_error(err)
            if not isinstance(err, OSError):  # torch's writer does not say why: the space left often does
                reason = f"{reason}; {shutil.disk_usage(path.parent).free:,} bytes free on its filesystem"
            raise WriteError(
                f"{path}: the checkpoint could not be written ({reason}); the previous one is kept"
            ) from None
        finally:
            temporary.unlink(missing_ok=True)
        remove_stale_saves(path.parent)


def remove_stale_saves(folder: str | os.PathLike) -> list[str]:
    """Remove what interrupted saves left in ``folder``; return the names removed.

    - ``.saving-*``: a checkpoint being written (a file, or a folder of shards) that was never renamed into place;
    - ``.replaced-<token>-<name>``: the previous ``<name>`` of a sharded save killed between its two renames. If
      ``<name>`` is missing then, the new ``.saving-<token>-<name>`` is complete (it is renamed only after every
      rank wrote its shard) and takes its place.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for replaced in sorted(folder.glob(f"{REPLACED}*")):
        token_and_name = replaced.name.removeprefix(REPLACED)
        saving, target = folder / f"{SAVING}{token_and_name}", folder / token_and_name.partition("-")[2]
        if not target.exists():
            (saving if saving.exists() else replaced).rename(target)
        if replaced.exists():
            _remove(replaced)
            removed.append(replaced.name)
    for stale in sorted(folder.glob(f"{SAVING}*")):
        _remove(stale)
        removed.append(stale.name)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
