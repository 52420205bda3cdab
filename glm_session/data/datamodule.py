"""The LightningDataModule: ``DialogueData`` with Lightning's hooks."""

from __future__ import annotations

import lightning as L
import torch

from glm_session.data.pipeline import SPLITS, DialogueData


class DialogueDataModule(DialogueData, L.LightningDataModule):
    """Split or session samples of dialogue files, padded or packed, for ChatGLM2.

    Takes ``DialogueData``'s arguments. Samples are built (or read from the cache) once, in ``prepare_data`` on
    the first process, and read from the cache by the others in ``setup``. Each process trains on its own share
    of every epoch's batches (Lightning's distributed sampler is not used: set ``use_distributed_sampler=False``).
    """

    _resume_state: dict[str, int] | None = None

    def prepare_data(self) -> None:
        for split in SPLITS:
            self.prepared(split)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.world_size, self.rank = self.trainer.world_size, self.trainer.global_rank
        for split in SPLITS:
            self.prepared(split)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        self._train_loader = self.dataloader("train")
        if self._resume_state is not None:
            self._train_loader.load_state_dict(self._resume_state)
        return self._train_loader

    # Lightning restores a stateful train loader itself only if it has not built it before the checkpoint is
    # loaded, and it has when the LR schedule asks for ``estimated_stepping_batches``; the DataModule's own state
    # covers both orders. The loader starts reading lazily, so setting its state before the first batch works.
    def state_dict(self) -> dict[str, int]:
        loader = getattr(self, "_train_loader", None)
        return loader.state_dict() if loader is not None else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if not state_dict:
            return
        self._resume_state = dict(state_dict)
        loader = getattr(self, "_train_loader", None)
        if loader is not None:
            loader.load_state_dict(self._resume_state)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.dataloader("validation")

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self.dataloader("test")
