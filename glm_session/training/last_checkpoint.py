"""``last.ckpt`` every N optimizer steps and after every validation, never between an epoch's end and its validation."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint(save_last=True, every_n_train_steps=N)`` that leaves out an epoch's last batch and saves
    after validation instead.

    Lightning (2.6) resumes wrongly from a checkpoint written after an epoch's last training batch but before its
    validation: the restored run validates, then ends without training the remaining epochs. A checkpoint written
    after validation resumes with the next epoch, so that is where the epoch's last step is saved.
    """

    def __init__(self, every_n_train_steps: int, **kwargs: Any) -> None:
        super().__init__(save_last=True, save_top_k=0, every_n_train_steps=every_n_train_steps, **kwargs)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx
    ) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
