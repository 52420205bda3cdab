"""The LightningModule: transformers' GlmForCausalLM configured as ChatGLM2, and the loss of ``loss.py``.

The model is called for logits only (no labels, ``use_cache=False``: with packed rows transformers then keeps
attention block-diagonal from the position ids). The loss is normalised over all micro-batches of one optimizer
step and all devices: each micro-batch backpropagates its numerator, and before the optimizer step the
accumulated gradient is rescaled by the step's global denominator (``on_before_optimizer_step``, which Lightning
calls after the last backward and before gradient clipping).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import lightning as L
import torch
from torch.nn.attention.flex_attention import BlockMask
from transformers import GlmConfig, GlmForCausalLM

from glm_session.adapters import QUANTIZE_ON_ONE_DEVICE, add_lora, check_peft, is_adapter_key, load_adapter_folder
from glm_session.checkpoints import (
    BUILTIN_ATTENTION,
    check_init_config,
    check_init_from,
    initial_state,
    load_weights_into,
    weights_fingerprint,
)
from glm_session.errors import ConfigError, UserError, check_choice, check_int
from glm_session.model.compiled_layers import (
    check_compile_dynamic,
    check_compile_mode,
    check_compile_scope,
    compile_layers,
    compile_model,
)
from glm_session.model.kernels import KERNELS, use_liger_kernels
from glm_session.model.loss import REDUCTIONS, chunked_token_losses, denominator, reduce, token_losses
from glm_session.model.packed_mask import packed_block_mask
from glm_session.model.presets import chatglm2_config, padded_vocab_size
from glm_session.model.turn_losses import TurnLossMeter, summarise
from glm_session.run_info import RunInfo
from glm_session.supervision import LossWeights, supervised


def _check_kernels(kernels: str) -> str:
    check_choice("model.kernels", kernels, KERNELS)
    if kernels == "liger":
        try:
            import liger_kernel.ops  # noqa: F401  (Triton kernels: a CUDA GPU and triton)
        except ImportError as err:
            raise ConfigError(
                "model.kernels", kernels, f"torch here: liger-kernel cannot be imported ({err}); it needs a CUDA GPU, "
                "triton and `pip install liger-kernel` (the gpu extra of glm_session)"
            ) from None  # fmt: skip
    return kernels


NONFINITE_HINT = "(lower optimizer.lr, or look for a corrupt checkpoint or bad data)"


class NonFiniteError(UserError):
    """Training met a NaN or infinite loss or gradient: the run stops and no checkpoint is written from here on."""


def _step_skipper(optimizer: Any, grads: list[torch.Tensor], scaler: Any) -> torch.optim.Optimizer | None:
    """The optimizer itself when it can skip a step from a device flag and scale the gradients as it reads them (a
    fused AdamW reads ``found_inf`` and ``grad_scale``, as a gradient scaler sets them; FSDP2's sharded gradients
    too) and no gradient scaler (fp16) sets those flags itself; else ``None`` (the guard then reads the flag on the
    host)."""
    raw = getattr(optimizer, "optimizer", optimizer)  # under Lightning's LightningOptimizer
    if not getattr(raw, "_step_supports_amp_scaling", False) or not grads or scaler is not None:
        return None
    return raw


def use_deterministic_compile(inductor: Any = None) -> None:
    """Inductor's deterministic mode for everything this process compiles (the decoder layers of
    ``model.compile_layers``, transformers' flex attention): Triton reduction configs come from heuristics, not from
    timing them on the device, since a reduction's block size and warps change its summation order, and a timing
    depends on what else runs on the GPU. Without it, two runs of one config can differ in the last bits, which
    thousands of steps make visible (a suspected cause of experiments/unseen_base's base that did not reproduce)."""
    if inductor is None:  # (a test passes a stand-in for torch's inductor config)
        import torch._inductor.config as inductor

    if not hasattr(inductor, "deterministic"):
        raise ConfigError(
            "model.compile_deterministic",
            True,
            f"false here: inductor's deterministic mode needs torch 2.10 or newer (this is torch {torch.__version__})",
        )
    inductor.deterministic = True


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This device's shard of a sharded (FSDP2 ``DTensor``) tensor; the tensor itself otherwise."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
         "head_dim", "max_position_embeddings")  # fmt: skip


def check_config_overrides(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``model.config_overrides``: ``GlmConfig`` fields only (a misspelt one was stored and trained without a word,
    the preset's value in force), and sizes of at least 1 (0 layers trained a model of embeddings alone)."""
    import inspect

    from transformers import GlmConfig

    known = set(inspect.signature(GlmConfig.__init__).parameters) - {"self"} | {"rope_theta", "partial_rotary_factor"}
    overrides = dict(overrides or {})
    for key, value in overrides.items():
        if key not in known:
            raise ConfigError(f"model.config_overrides.{key}", value, f"left out: GlmConfig has no field {key!r}")
        if key in SIZES:
            check_int(f"model.config_overrides.{key}", value, minimum=1)
    return overrides


class ChatGLM2Module(L.LightningModule):
    """Causal-LM fine-tuning of a ChatGLM2-shaped ``GlmForCausalLM``.

    Args:
        config: the model's ``GlmConfig`` (see ``glm_session.model.presets``).
        optimizer: a partial taking the parameter groups (e.g. ``torch.optim.AdamW`` with lr and weight decay,
            which biases and norm weights do not get).
        scheduler: a partial taking the optimizer and ``num_training_steps``; stepped every optimizer step.
        reduction: ``token``, ``sample``, ``turn`` or ``sum`` (see ``loss.py``).
        init_from: initial weights instead of a random init: a converted or exported Hugging Face folder, a
            glm_session run's single-file checkpoint (``*.ckpt``), or ``hf://<id>`` for the Hugging Face Hub.
        attn_implementation: ``sdpa``, ``eager`` or ``flex_attention``.
        compile_layers: ``torch.compile`` each decoder layer (fuses the norms, rotary and SwiGLU element-wise work;
            shapes stay static with ``data.pad_to=max_seq_len``).
        run_info: how the run was made (template, tokenizer, strategy, data, ...); saved in every checkpoint with
            the model's config.
        kernels: ``torch`` (transformers' own modules) or ``liger``: RMSNorm and SwiGLU as liger-kernel's fused
            Triton kernels (``kernels.py``; GPU).
        loss_chunk_tokens: ``None``: the reference loss (the model's logits, then fp32 cross-entropy). A number:
            logits only at the trained positions, that many at a time, made again in the backward pass
            (``loss.chunked_token_losses``): the (B, T, V) logits never exist, the output layer's work shrinks to
            the trained tokens' share, and the per-token losses are the same.
        peft: ``model.peft`` (``conf/peft/``): ``None`` or ``{method: none}`` trains every weight; ``{method:
            lora, ...}`` injects LoRA adapters (``glm_session/adapters.py``) after the initial weights are loaded, freezes the
            base, and saves the adapters (and their optimizer state) only in checkpoints; with ``quantize: nf4``
            (QLoRA, one device) the base's decoder-layer linear weights are held in 4 bits.
        init_adapter: with LoRA, an adapter folder (``export --adapter``) to start the adapters from.
        activation_checkpointing: on one device, recompute each decoder layer in the backward pass (transformers'
            non-reentrant checkpointing): activations of one layer at a time instead of all (``trainer=fsdp`` has
            its own switch).
        compile_deterministic: inductor's deterministic mode for what the process compiles
            (``use_deterministic_compile``), so that a compiled run repeats bit for bit wherever the rest of it is
            deterministic; its cost in speed is not measured.
        compile_dynamic: which sizes the compiled layers treat as dynamic (``compiled_layers.py``): ``None``
            (torch's choice: a resumed run runs other kernels for a while), ``"rows"`` (the rows of a batch, from the
            first step: a stopped run resumes bit for bit where only the rows vary, ``data.pad_to=max_seq_len``)
            or ``True`` (every size, from the first step); ``False``: a static compilation for every shape.
        compile_mode: ``torch.compile``'s mode for the layers (``compiled_layers.py``): ``None`` (torch's default),
            ``"reduce-overhead"`` (CUDA graphs), ``"max-autotune-no-cudagraphs"`` or ``"max-autotune"`` (kernels
            chosen by timing; refused with ``compile_deterministic``).
        compile_scope: what ``compile_layers`` compiles (``compiled_layers.py``): ``"layers"`` (each decoder layer)
            or ``"model"`` (the whole decoder as one graph; one device, transformers' kernels).
    """

    def __init__(
        self,
        config: GlmConfig,
        optimizer: Callable[..., torch.optim.Optimizer],
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        reduction: str = "token",
        init_from: str | None = None,
        attn_implementation: str = "sdpa",
        compile_layers: bool = False,
        run_info: RunInfo | None = None,
        loss_chunk_tokens: int | None = None,
        kernels: str = "torch",
        peft: dict[str, Any] | None = None,
        init_adapter: str | None = None,
        activation_checkpointing: bool = False,
        compile_deterministic: bool = False,
        compile_dynamic: bool | str | None = None,
        compile_mode: str | None = None,
        compile_scope: str = "layers",
    ) -> None:
        super().__init__()
        if compile_deterministic:
            use_deterministic_compile()
        self.config, self.reduction = config, check_choice("model.reduction", reduction, REDUCTIONS)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.init_from = check_init_from(init_from)
        check_init_config(self.init_from, config)
        self.compile_layers = compile_layers
        self.compile_dynamic = check_compile_dynamic(compile_dynamic)
        self.compile_mode = check_compile_mode(compile_mode, deterministic=compile_deterministic)
        self.compile_scope = check_compile_scope(compile_scope)
        if compile_layers and compile_scope == "model" and kernels != "torch":
            raise ConfigError(
                "model.kernels", kernels, "torch with model.compile_scope=model: the whole decoder is compiled as one "
                "graph, which fuses the norms and SwiGLU itself; liger's kernels inside it are not verified"
            )  # fmt: skip
        self.loss_chunk_tokens = check_int("model.loss_chunk_tokens", loss_chunk_tokens, minimum=1, optional=True)
        # transformers' own attention only: a Hub kernel name would download and run code
        self.config._attn_implementation = check_choice(
            "model.attn_implementation", attn_implementation, BUILTIN_ATTENTION
        )
        self.kernels = _check_kernels(kernels)
        self.lora = check_peft(peft)
        if compile_layers and self.lora is not None and self.lora.quantize:
            raise ConfigError(
                "model.compile_layers", True, "false with model.peft.quantize: torch.compile fails on bitsandbytes' "
                "4-bit layers here (tracing them with their fake kernels; measured on a CPU, torch 2.13, "
                "bitsandbytes 0.50.2), so QLoRA runs its layers uncompiled (speed=fast model.compile_layers=false)"
            )  # fmt: skip
        if init_adapter is not None and self.lora is None:
            raise ConfigError("model.init_adapter", init_adapter, "used with peft=lora (adapters need a LoRA run)")
        self.init_adapter = init_adapter
        self.activation_checkpointing = activation_checkpointing
        # A LoRA run's checkpoints hold the adapters only: loading one leaves the (frozen) base as it is.
        self.strict_loading = self.lora is None
        self.model: GlmForCausalLM | None = None
        # Step accumulators: numerator and (tokens, samples, turns) of the micro-batches since the last step.
        self.register_buffer("_step_numerator", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("_step_counts", torch.zeros(3, dtype=torch.float64), persistent=False)
        # The first optimizer step whose loss or gradient was not finite (-1: none yet), with that loss and gradient
        # norm, kept on the device by the skipping guard (``on_before_optimizer_step``) and read at check points.
        self.register_buffer("_nonfinite", torch.tensor([-1.0, 0.0, 0.0], dtype=torch.float64), persistent=False)
        self._finite_checked_at = -1
        # (fused optimizer, the norm its scaled gradients will have) where it applies the step's 1/D itself
        self._scaled_by_optimizer: tuple[torch.optim.Optimizer, torch.Tensor] | None = None
        # Per-turn token-loss sums and counts, for train and validation.
        self.train_turn_losses, self.val_turn_losses = TurnLossMeter(), TurnLossMeter()
        # One entry per epoch and split: {"epoch", "step", "split", "loss", "loss_by_turn", "tokens"}.
        self.history: list[dict[str, Any]] = []
        self.run_info = replace(run_info, model_config=config.to_dict()) if run_info is not None else None

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
            raise ConfigError("model.vocab_size", vocab_size, f"at least the tokenizer's {tokenizer_size} tokens")
        config = chatglm2_config(preset, vocab_size=vocab_size, **check_config_overrides(config_overrides))
        return cls(config=config, optimizer=optimizer, **kwargs)

    def configure_model(self) -> None:
        """Create the model here, so that a sharding strategy creates it sharded (never whole on one device)."""
        if self.model is not None:
            return
        mesh = self._device_mesh
        if mesh is not None:  # FSDP2: on the meta device, sharded per decoder layer, then materialised
            if self.lora is not None and self.lora.quantize:
                raise ConfigError("model.peft.quantize", self.lora.quantize, QUANTIZE_ON_ONE_DEVICE)
            from glm_session.model.sharding import load_full_weights, shard_model

            if self.compile_layers and self.compile_scope == "model":
                raise ConfigError(
                    "model.compile_scope", "model", "layers with trainer=fsdp: FSDP2 gathers each layer's weights "
                    "around its forward, and a graph of the whole model would hold those hooks"
                )  # fmt: skip
            strategy = self.trainer.strategy
            with torch.device("meta"):
                model = GlmForCausalLM(self.config)
                if self.lora is not None:  # before sharding: each decoder layer's unit holds its adapters
                    add_lora(model, self.lora)
            self._fuse(model)
            self.model = shard_model(
                model,
                mesh,
                strategy.root_device,
                strategy.param_dtype,
                strategy.activation_checkpointing,
                strategy.checkpoint_every_n_layers,
                strategy.reshard_after_forward,
                strategy.prefetch,
            )
            if self.init_from:
                load_full_weights(self.model, self.init_from)
            if self.init_adapter:
                raise ConfigError(
                    "model.init_adapter", self.init_adapter, "used on one device (not with trainer=fsdp)"
                )
            return
        # A LoRA run's frozen bf16 base is created in bf16: created in fp32 and then cast, the 6B would hold
        # 23.4 GiB at its creation, more than a step of the 24 GB card's setting. QLoRA's base is created on the
        # CPU and each decoder linear quantized onto the device (add_lora): its bf16 form (11.7 GiB for the 6B) is
        # never on a card that is meant not to hold it. Lightning moves the rest to the device after this hook.
        bf16_base = self.lora is not None and self._bf16_base()
        quantize = self.lora is not None and self.lora.quantize
        with torch.device("cpu") if quantize else contextlib.nullcontext():
            if bf16_base:
                self.model = GlmForCausalLM._from_config(self.config, dtype=torch.bfloat16)
            else:
                self.model = GlmForCausalLM(self.config)
        if self.init_from:
            load_weights_into(self.model, initial_state(self.init_from), f"model.init_from={self.init_from}")
        if self.lora is not None:
            device = self.trainer.strategy.root_device if self._trainer is not None else None
            add_lora(self.model, self.lora, bf16_base=bf16_base, device=device)
            if self.init_adapter:
                base = self.run_info.base_fingerprint if self.run_info else weights_fingerprint(self.init_from)
                load_adapter_folder(self.model, self.init_adapter, self.lora, base)
        if self.activation_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._fuse(self.model)

    def _bf16_base(self) -> bool:
        """Whether a LoRA run keeps its frozen base in bf16: ``base_dtype=bf16``, or ``auto`` under bf16 training."""
        if self.lora.base_dtype != "auto":
            return self.lora.base_dtype == "bf16"
        return self._trainer is not None and str(self.trainer.precision).startswith("bf16")

    def _fuse(self, model: GlmForCausalLM) -> None:
        """The kernels of ``model.kernels``, then ``torch.compile`` of each decoder layer or of the whole decoder
        (``model.compile_scope``) if asked."""
        if self.kernels == "liger":
            use_liger_kernels(model)
        if self.compile_layers and self.compile_scope == "model":
            flex = self.config._attn_implementation == "flex_attention"
            compile_model(model.model, self.compile_dynamic, self.compile_mode, packed_mask=flex)
        elif self.compile_layers:
            compile_layers(model.model.layers, self.compile_dynamic, self.compile_mode)

    def attention_mask(self, position_ids: torch.Tensor) -> BlockMask | None:
        """Flex attention's mask of packed rows, built on the device (``packed_mask``); ``None`` for sdpa and eager,
        whose mask transformers infers from the position ids, and for a decoder compiled whole, which builds the
        flex mask inside its graph (``compile_model``)."""
        if self.config._attn_implementation != "flex_attention" or self._compiled_whole():
            return None
        return packed_block_mask(position_ids)

    def _compiled_whole(self) -> bool:
        return self.compile_layers and self.compile_scope == "model" and self.model.model._compiled_call_impl is not None

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, V) of rows of packed or padded samples."""
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=self.attention_mask(position_ids),
                          use_cache=False).logits  # fmt: skip

    # training ------------------------------------------------------------------------------------

    def token_losses(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, T-1) the loss of every position's next label, 0 where it is not trained."""
        if self.loss_chunk_tokens is None:
            return token_losses(self(batch["input_ids"], batch["position_ids"]), batch["labels"])  # via (B, T, V)
        # The final hidden states (B, T, d), after the final norm; the output layer is applied to the trained
        # positions chunk by chunk.
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False,
                  "attention_mask": self.attention_mask(batch["position_ids"])}  # fmt: skip
        if self._device_mesh is None:  # one device: the decoder itself (a compiled one is one graph)
            hidden = self.model.model(**inputs).last_hidden_state
        else:  # the model's own forward, so that FSDP gathers and frees the root unit's parameters as usual
            hidden = self.model(**inputs, logits_to_keep=1, output_hidden_states=True).hidden_states[-1]
        return chunked_token_losses(
            hidden,
            self.model.lm_head,  # a module call: an adapter on it (peft) counts
            batch["labels"],
            self.loss_chunk_tokens,
            batch.get("supervised_positions"),
        )

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        if self.compile_layers and self.compile_mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new micro-batch: the CUDA graphs' last outputs are spent

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        weights = LossWeights(
            batch["token_weight"], batch["sample_weight"], batch["turn_weight"], batch["loss_counts"]
        )
        terms = reduce(
            self.token_losses(batch),
            batch["labels"],
            batch["turn_ids"],
            batch["sample_index"],
            self.reduction,
            weights,
        )
        self._step_numerator += terms.numerator.detach()
        self._step_counts += terms.counts
        self.train_turn_losses.add(terms.losses, terms.mask, terms.turns)
        return terms.numerator

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Turn the accumulated gradient of ``sum(numerators) / (accumulation * world_size)`` (what Lightning and
        the distributed gradient averaging make of it) into ``sum(numerators) / global D``; stop on a non-finite
        loss or gradient before the optimizer step."""
        counts = self.trainer.strategy.reduce(self._step_counts.clone(), reduce_op="sum")
        numerator = self.trainer.strategy.reduce(self._step_numerator.clone(), reduce_op="sum")
        d = denominator(counts, self.reduction)
        loss = numerator / d
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        # This device's gradient norms; over all devices their sum (a flag: inf/NaN if any is) and the squared L2
        # norm, which sums over FSDP2's shards and is the local one for gradients that every device holds whole.
        norms = torch.stack(torch._foreach_norm([_local(g) for g in grads])).double() if grads else None
        sums = torch.stack([norms.sum(), norms.square().sum()]) if grads else torch.zeros(2, device=d.device)
        grad_norms, sharded_squares = self.trainer.strategy.reduce(sums.double(), reduce_op="sum")
        squares = sharded_squares if any(hasattr(g, "to_local") for g in grads) else sums[1]
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size / d
        finite = torch.isfinite(loss) & torch.isfinite(grad_norms)
        skipper = _step_skipper(optimizer, grads, getattr(self.trainer.precision_plugin, "scaler", None))
        self._scaled_by_optimizer = None
        if skipper is not None:  # no host synchronisation: the optimizer skips the step from a device flag
            skipper.found_inf = (~finite).float()
            first = (self._nonfinite[0] < 0) & ~finite
            seen = torch.stack([torch.full_like(grad_norms, self.global_step + 1.0), loss.double(), grad_norms])
            self._nonfinite.copy_(torch.where(first, seen, self._nonfinite))
            # The gradients get their 1/D as the fused optimizer reads them (it divides each by grad_scale): no
            # pass of its own over them; clipping multiplies into the same factor (configure_gradient_clipping).
            skipper.grad_scale = (1 / scale).float()
            self._scaled_by_optimizer = (skipper, scale * squares.sqrt())  # the scaled gradients' norm
        else:
            scale_value, finite_value = torch.stack([scale, finite.double()]).tolist()
            if not finite_value:
                raise NonFiniteError(
                    f"step {self.global_step + 1}: the training loss is {loss.item():.4g} and the gradient norms sum "
                    f"to {grad_norms.item():.4g}; stopped before the optimizer step, and checkpoints written before "
                    f"it are kept {NONFINITE_HINT}"
                )
            torch._foreach_mul_(grads, scale_value)
        # The step's loss (global already), at the steps whose values Lightning writes to the loggers only: a call
        # of self.log costs about a millisecond of host time, a step of chatglm2-small on a GPU about 50. The values
        # are copied to the host here, once: Lightning keeps a logged value and turns it into a number again at every
        # later batch's end (the progress bar's values), which for a device tensor waits for the device each step.
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            host_loss, host_tokens = torch.stack([loss.float(), counts[0].float()]).cpu()
            self.log("train/loss", host_loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
            self.log("train/supervised_tokens", host_tokens, on_step=True, on_epoch=False, batch_size=1)
        self._step_numerator.zero_()
        self._step_counts.zero_()

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip by norm directly: Lightning's mixed-precision plugin refuses to clip for a fused optimizer (fused
        AdamW unscales fp16 gradients itself), which bf16 and fp32 training, having no gradient scaler, never need.
        Where the fused optimizer scales the gradients (``on_before_optimizer_step``), the clip joins its factor:
        ``clip_grad_norm_``'s coefficient from the norm the gradients will have, and no pass over them here."""
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and scaler is None:
            if self._scaled_by_optimizer is not None:
                optimizer, norm = self._scaled_by_optimizer
                coefficient = (gradient_clip_val / (norm + 1e-6)).clamp(max=1.0)
                optimizer.grad_scale = optimizer.grad_scale / coefficient.float()
                return
            torch.nn.utils.clip_grad_norm_([p for p in self.parameters() if p.grad is not None], gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_train_epoch_end(self) -> None:
        self._log_turn_losses("train")

    # validation ----------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        losses = self.token_losses(batch)  # (B, T-1), 0 where not trained
        self.val_turn_losses.add(losses, supervised(batch["labels"]), batch["turn_ids"][:, 1:])

    def on_validation_epoch_end(self) -> None:
        self._log_turn_losses("val")

    # per-turn losses -----------------------------------------------------------------------------

    def _log_turn_losses(self, split: str) -> None:
        """Log the epoch's token-mean loss (``val/loss``, ``train/loss_epoch``) and ``{split}/loss_turn_k``, on all
        devices."""
        meter = getattr(self, f"{split}_turn_losses")
        sums = self.trainer.strategy.reduce(meter.sums.clone(), reduce_op="sum")
        counts = self.trainer.strategy.reduce(meter.counts.clone(), reduce_op="sum")
        meter.reset()
        if counts.sum() == 0:
            return
        summary = summarise(sums, counts)
        if not self.trainer.sanity_checking:
            self.history.append(
                {"epoch": self.current_epoch, "step": self.global_step, "split": split, "loss": summary["loss"],
                 "loss_by_turn": summary["loss_by_turn"], "tokens": summary["tokens"]}
            )  # fmt: skip
        if split == "val":
            self.log("val/loss", summary["loss"], prog_bar=True, sync_dist=True, batch_size=1)
        else:  # the token mean of the epoch (the step losses are logged by on_before_optimizer_step)
            self.log("train/loss_epoch", summary["loss"], sync_dist=True, batch_size=1)
        for turn, value in summary["loss_by_turn"].items():
            self.log(f"{split}/loss_turn_{turn}", value, sync_dist=True, batch_size=1)  # already global: kept

    # optimizer -----------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        decay, no_decay = [], []
        for parameter in self.parameters():
            if parameter.requires_grad:
                (decay if parameter.ndim >= 2 else no_decay).append(parameter)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]  # decay: the optimizer's own
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(
            optimizer, num_training_steps=int(self.trainer.estimated_stepping_batches)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def check_finite_steps(self) -> None:
        """Raise ``NonFiniteError`` if an optimizer step was skipped for a non-finite loss or gradient (the guard that
        skips on the device; read here, at the logging interval, before every checkpoint and validation and at the
        end of training)."""
        step, loss, norm = self._nonfinite.tolist()
        if step >= 0:
            raise NonFiniteError(
                f"step {int(step)}: the training loss is {loss:.4g} and the gradient norms sum to {norm:.4g}; its "
                f"optimizer step was skipped and the run stopped after step {self.global_step}, and checkpoints "
                f"written before it are kept {NONFINITE_HINT}"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = self.global_step  # the same for every micro-batch of an accumulated step: read the flag once a step
        if step % self.trainer.log_every_n_steps == 0 and step != self._finite_checked_at:
            self._finite_checked_at = step
            self.check_finite_steps()

    def on_validation_start(self) -> None:
        self.check_finite_steps()

    def on_train_end(self) -> None:
        self.check_finite_steps()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.check_finite_steps()
        for name, parameter in self.named_parameters():  # a NaN run must not replace its last good checkpoint
            if not bool(torch.isfinite(_local(parameter.detach())).all()):
                raise NonFiniteError(
                    f"step {self.global_step}: {name} holds non-finite values; no checkpoint written"
                )
        checkpoint["loss_history"] = self.history
        # The epoch's per-turn training loss so far (all devices), so that a resumed epoch reports all its batches.
        meter = self.train_turn_losses
        checkpoint["train_turn_losses"] = [
            self.trainer.strategy.reduce(buffer.clone(), reduce_op="sum").cpu()
            for buffer in (meter.sums, meter.counts)
        ]
        info = self.run_info.to_dict() if self.run_info is not None else {"model_config": self.config.to_dict()}
        checkpoint["glm_session"] = info
        if self.lora is not None:  # the adapters only: the base is model.init_from (its fingerprint in the record)
            state = checkpoint.get("state_dict", {})
            checkpoint["state_dict"] = {k: v for k, v in state.items() if is_adapter_key(k)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.history = list(checkpoint.get("loss_history", []))
        saved = checkpoint.get("train_turn_losses")
        if saved is not None and (self._trainer is None or self.trainer.is_global_zero):  # others start from 0
            self.train_turn_losses.sums.copy_(saved[0])
            self.train_turn_losses.counts.copy_(saved[1])

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the model as a Hugging Face folder (config.json + model.safetensors)."""
        self.model.save_pretrained(directory, safe_serialization=True)
