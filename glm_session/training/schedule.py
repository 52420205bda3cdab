"""Linear warmup, then cosine decay to a floor: transformers' schedule, with the warmup as a fraction."""

from __future__ import annotations

import math

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    num_training_steps: int,
    warmup_ratio: float = 0.05,
    min_lr_ratio: float = 0.1,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm up over ``warmup_ratio`` of the steps, then decay to ``min_lr_ratio`` of the peak."""
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=math.ceil(warmup_ratio * num_training_steps),
        num_training_steps=num_training_steps,
        min_lr_rate=min_lr_ratio,
    )
