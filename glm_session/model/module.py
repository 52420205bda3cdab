"""The LightningModule: transformers' GlmForCausalLM configured as ChatGLM2, and the loss of ``loss.py``.

The model is called for logits only (no labels, ``use_cache=False``: with packed rows transformers then keeps
attention block-diagonal from the position ids). The loss is normalised over all micro-batches of one optimizer
step and all devices: each micro-batch backpropagates its numerator, and before the optimizer step the
accumulated gradient is rescaled by the step's global denominator (``on_before_optimizer_step``, which Lightning
calls after the last backward and before gradient clipping).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from transformers import GlmConfig, GlmForCausalLM

from glm_session.constants import IGNORE_INDEX
from glm_session.model.initial_weights import read_initial_weights
from glm_session.model.loss import REDUCTIONS, denominator, loss_terms, token_losses
from glm_session.model.presets import chatglm2_config, padded_vocab_size

MAX_TURNS = 64  # turn indices above this are logged together with it


class ChatGLM2Module(L.LightningModule):
    """Causal-LM fine-tuning of a ChatGLM2-shaped ``GlmForCausalLM``.

    Args:
        config: the model's ``GlmConfig`` (see ``glm_session.model.presets``).
        optimizer: a partial taking the parameter groups (e.g. ``torch.optim.AdamW`` with lr).
        scheduler: a partial taking the optimizer and ``num_training_steps``; stepped every optimizer step.
        reduction: ``token``, ``sample``, ``turn`` or ``sum`` (see ``loss.py``).
        weight_decay: AdamW decay of the matrices (biases and norm weights get none).
        init_from: initial weights instead of a random init: a folder that ``GlmForCausalLM.from_pretrained`` loads
            (converted or exported), or a glm_session run's single-file checkpoint (``*.ckpt``).
        attn_implementation: ``sdpa``, ``eager`` or ``flex_attention``.
        compile_layers: ``torch.compile`` each decoder layer (fuses the norms, rotary and SwiGLU element-wise work;
            shapes stay static with ``data.pad_to=max_seq_len``).
    """

    def __init__(
        self,
        config: GlmConfig,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        reduction: str = "token",
        weight_decay: float = 0.0,
        init_from: str | None = None,
        attn_implementation: str = "sdpa",
        compile_layers: bool = False,
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown loss reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)}")
        self.config, self.reduction = config, reduction
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.weight_decay, self.init_from = weight_decay, init_from
        self.compile_layers = compile_layers
        self.config._attn_implementation = attn_implementation
        self.model: GlmForCausalLM | None = None
        # Step accumulators: numerator and (tokens, samples, turns) of the micro-batches since the last step.
        self.register_buffer("_step_numerator", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_step_counts", torch.zeros(3, dtype=torch.float64), persistent=False)
        # Per-turn token-loss sums and counts (index = turn, capped at MAX_TURNS), for train and validation.
        for split in ("train", "val"):
            self.register_buffer(
                f"_{split}_turn_sum", torch.zeros(MAX_TURNS + 1, dtype=torch.float64), persistent=False
            )
            self.register_buffer(
                f"_{split}_turn_count", torch.zeros(MAX_TURNS + 1, dtype=torch.float64), persistent=False
            )
        # One entry per epoch and split: {"epoch", "step", "split", "loss", "loss_by_turn", "tokens"}.
        self.history: list[dict[str, Any]] = []
        # What a checkpoint must say to be evaluated as it was trained (template, tokenizer, ...): set by train().
        self.run_info: dict[str, Any] = {}

    @classmethod
    def from_preset(
        cls,
        preset: str,
        tokenizer_size: int,
        optimizer: Callable[..., torch.optim.Optimizer],
        vocab_size: int | None = None,
        config_overrides: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> ChatGLM2Module:
        """The module of a ``presets.PRESETS`` model; the vocabulary defaults to the tokenizer's, padded to 64."""
        vocab_size = vocab_size or padded_vocab_size(tokenizer_size)
        if vocab_size < tokenizer_size:
            raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({tokenizer_size} tokens)")
        config = chatglm2_config(preset, vocab_size=vocab_size, **dict(config_overrides or {}))
        return cls(config=config, optimizer=optimizer, **kwargs)

    def configure_model(self) -> None:
        """Create the model here, so that a sharding strategy creates it sharded (never whole on one device)."""
        if self.model is not None:
            return
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:  # FSDP2: on the meta device, sharded per decoder layer, then materialised
            from glm_session.training.fsdp import load_full_weights, shard_model

            strategy = self.trainer.strategy
            with torch.device("meta"):
                model = GlmForCausalLM(self.config)
            self._compile(model)
            self.model = shard_model(
                model, mesh, strategy.root_device, strategy.param_dtype, strategy.activation_checkpointing
            )
            if self.init_from:
                load_full_weights(self.model, self.init_from)
            return
        if self.init_from and Path(self.init_from).is_file():  # a run's checkpoint
            self.model = GlmForCausalLM(self.config)
            self.model.load_state_dict(read_initial_weights(self.init_from))
        elif self.init_from:
            self.model = GlmForCausalLM.from_pretrained(
                self.init_from,
                config=self.config,
                dtype=torch.float32,
                attn_implementation=self.config._attn_implementation,
            ).train()  # from_pretrained returns the model in eval mode
        else:
            self.model = GlmForCausalLM(self.config)
        self._compile(self.model)

    def _compile(self, model: GlmForCausalLM) -> None:
        if self.compile_layers:
            for layer in model.model.layers:
                layer.compile()

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of rows of packed or padded samples."""
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits

    # training ------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self(batch["input_ids"], batch["position_ids"])  # (B, T, V)
        terms = loss_terms(logits, batch["labels"], batch["turn_ids"], batch["sample_index"], self.reduction)
        self._step_numerator += terms.numerator.detach()
        self._step_counts += terms.counts
        self._add_turn_losses("train", terms.losses, terms.turns)
        return terms.numerator

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the accumulated gradient of ``sum(numerators) / (accumulation * world_size)`` (what Lightning and
        the distributed gradient averaging make of it) into ``sum(numerators) / global D``."""
        counts = self.trainer.strategy.reduce(self._step_counts.clone(), reduce_op="sum")
        numerator = self.trainer.strategy.reduce(self._step_numerator.clone(), reduce_op="sum")
        d = denominator(counts, self.reduction)
        scale = (self.trainer.accumulate_grad_batches * self.trainer.world_size / d).item()
        for parameter in self.parameters():
            if parameter.grad is not None:
                parameter.grad.mul_(scale)
        self.log("train/loss", (numerator / d).float(), on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/supervised_tokens", counts[0].float(), on_step=True, on_epoch=False, reduce_fx="sum")
        self._step_numerator.zero_()
        self._step_counts.zero_()

    def on_train_epoch_end(self) -> None:
        self._log_turn_losses("train")

    # validation ----------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["position_ids"])
        losses = token_losses(logits, batch["labels"])
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        self._add_turn_losses("val", losses[mask], batch["turn_ids"][:, 1:][mask])

    def on_validation_epoch_end(self) -> None:
        self._log_turn_losses("val")

    # per-turn losses -----------------------------------------------------------------------------

    def _add_turn_losses(self, split: str, losses: torch.Tensor, turns: torch.Tensor) -> None:
        index = turns.clamp(max=MAX_TURNS)
        getattr(self, f"_{split}_turn_sum").index_add_(0, index, losses.detach().double())
        getattr(self, f"_{split}_turn_count").index_add_(0, index, torch.ones_like(losses, dtype=torch.float64))

    def _log_turn_losses(self, split: str) -> None:
        """Log ``{split}/loss`` (token mean) and ``{split}/loss_turn_k`` over the epoch, on all devices."""
        sums = self.trainer.strategy.reduce(getattr(self, f"_{split}_turn_sum").clone(), reduce_op="sum")
        counts = self.trainer.strategy.reduce(getattr(self, f"_{split}_turn_count").clone(), reduce_op="sum")
        getattr(self, f"_{split}_turn_sum").zero_()
        getattr(self, f"_{split}_turn_count").zero_()
        if counts.sum() == 0:
            return
        by_turn = {int(k): (sums[k] / counts[k]).item() for k in torch.nonzero(counts).flatten()}
        mean = (sums.sum() / counts.sum()).item()
        if not self.trainer.sanity_checking:
            self.history.append(
                {"epoch": self.current_epoch, "step": self.global_step, "split": split, "loss": mean,
                 "loss_by_turn": by_turn, "tokens": int(counts.sum().item())}
            )  # fmt: skip
        if split == "val":  # the training loss per step is logged by on_before_optimizer_step
            self.log("val/loss", mean, prog_bar=True, sync_dist=True)
        for turn, value in by_turn.items():
            self.log(f"{split}/loss_turn_{turn}", value, sync_dist=True)  # already global: syncing keeps it

    # optimizer -----------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for parameter in self.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        groups = [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(
            optimizer, num_training_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["loss_history"] = self.history
        checkpoint["glm_session"] = {"model_config": self.config.to_dict(), **self.run_info}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("loss_history", []))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the model as a Hugging Face folder (config.json + model.safetensors)."""
        self.model.save_pretrained(directory, safe_serialization=True)
