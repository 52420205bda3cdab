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

    def prepare_data(self) -> None:
        for split in SPLITS:
            self.prepared(split)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.world_size, self.rank = self.trainer.world_size, self.trainer.global_rank
        for split in SPLITS:
            self.prepared(split)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self.dataloader("train")

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.dataloader("validation")

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self.dataloader("test")
