"""The LightningDataModule: the data group's settings, built into a ``DialoguePipeline`` it holds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch

from glm_session.data.batching import Batching
from glm_session.data.build import SampleSpec
from glm_session.data.pipeline import DialoguePipeline
from glm_session.data.samples import shortest_sample
from glm_session.data.source import SPLITS, DialogueSource
from glm_session.data.strategy import STRATEGIES, Strategy, get_strategy
from glm_session.data.template import Template, get_template
from glm_session.errors import ConfigError, check_bool, check_choice, check_int
from glm_session.supervision import Supervision, get_supervision
from glm_session.tokenizer import ChatGLM2Tokenizer


class DialogueDataModule(L.LightningDataModule):
    """Split or session samples of dialogue files, padded or packed, for ChatGLM2 (``conf/data/*.yaml``).

    Args:
        tokenizer: a ``ChatGLM2Tokenizer``.
        template: a ``Template`` or its name; ``strategy``: a strategy or its name.
        supervision: which answers of the training samples are trained and how much each turn weighs (a
            ``Supervision`` policy or its name). Validation and test samples train every answer with weight 1, so
            that a run is scored on every turn whatever its policy.
        train_path, validation_path, test_path, path, holdout, holdout_by, format, role_map, on_error,
            drop_trailing_question, limit, normalize: where the sessions come from and how they are read
            (``DialogueSource``). ``format=text`` reads plain-text documents, for ``template=plain strategy=lm``.
        max_seq_len: the most tokens in a sample (and in a packed row).
        validation_strategy: the strategy of the validation and test samples (``None``: the training strategy).
            ``session`` gives split runs the same validation loss at a third of the compute (Invariant 1: every
            answer token has the same logits in both).
        packing, batch_size, batch_tokens, batch_sessions, batch_supervised_tokens, pad_to, shuffle, seed: rows and
            batches (``Batching``).
        num_workers, pin_memory, cache_dir, num_proc: ``DialoguePipeline``'s.

    Samples are built (or read from the cache) once, in ``prepare_data`` on the first process, and read from the cache
    by the others in ``setup``. Each process trains on its own share of every epoch's batches (Lightning's
    distributed sampler is not used: set ``use_distributed_sampler=False``).
    """

    def __init__(
        self,
        tokenizer: ChatGLM2Tokenizer,
        template: Template | str = "chatglm2",
        strategy: Strategy | str = "session",
        supervision: Supervision | str = "all",
        train_path: str | None = None,
        validation_path: str | None = None,
        test_path: str | None = None,
        path: str | Sequence[str] | None = None,
        holdout: Mapping[str, float] | None = None,
        holdout_by: str = "id",
        format: str = "auto",
        role_map: Mapping[str, str] | None = None,
        on_error: str = "raise",
        drop_trailing_question: bool = False,
        limit: int | None = None,
        normalize: str | None = None,
        max_seq_len: int = 2048,
        validation_strategy: str | None = None,
        packing: bool = False,
        batch_size: int | None = 8,
        batch_tokens: int | None = None,
        batch_sessions: int | None = None,
        batch_supervised_tokens: int | None = None,
        pad_to: str = "longest",
        shuffle: bool = True,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        cache_dir: str | None = None,
        num_proc: int | None = None,
    ) -> None:
        super().__init__()
        template = get_template(template) if isinstance(template, str) else template
        strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
        supervision = get_supervision(supervision) if isinstance(supervision, str) else supervision
        check_int("data.max_seq_len", max_seq_len, minimum=shortest_sample(tokenizer, template))
        samples = SampleSpec(tokenizer, template, strategy, max_seq_len, supervision)
        if validation_strategy is not None:
            check_choice("data.validation_strategy", validation_strategy, tuple(STRATEGIES))
        evaluation_strategy = strategy if validation_strategy is None else get_strategy(validation_strategy)
        evaluation = SampleSpec(tokenizer, template, evaluation_strategy, max_seq_len)  # every answer, weight 1
        if (format == "text") != (template.name == "plain") or format == "text" and strategy.name != "lm":
            raise ConfigError(
                "data.format", format, f"text exactly when template=plain and strategy=lm, here template="
                f"{template.name} and strategy={strategy.name} (plain-text documents are language-modelled, "
                "dialogues are written by a dialogue template)"
            )  # fmt: skip
        source = DialogueSource(train_path, validation_path, test_path, path, holdout, holdout_by, format, role_map,
                                on_error, drop_trailing_question, limit, normalize)  # fmt: skip
        batching = Batching(batch_size, batch_tokens, batch_sessions, batch_supervised_tokens, pad_to, max_seq_len,
                            packing, shuffle, seed)  # fmt: skip
        self.pipeline = DialoguePipeline(
            source, samples, evaluation, batching, check_int("data.num_workers", num_workers, minimum=0),
            check_bool("data.pin_memory", pin_memory), cache_dir, check_int("data.num_proc", num_proc, minimum=1, optional=True),
        )  # fmt: skip
        self.world_size, self.rank = 1, 0  # this process's share of the batches, known in setup
        self._resume_state: dict[str, int] | None = None

    # what the run's other parts read
    @property
    def tokenizer(self) -> ChatGLM2Tokenizer:
        return self.pipeline.samples.tokenizer

    @property
    def template(self) -> Template:
        return self.pipeline.samples.template

    @property
    def strategy(self) -> Strategy:
        return self.pipeline.samples.strategy

    @property
    def supervision(self) -> Supervision:
        return self.pipeline.samples.supervision

    @property
    def max_seq_len(self) -> int:
        return self.pipeline.samples.max_seq_len

    @property
    def packing(self) -> bool:
        return self.pipeline.batching.packing

    def read(self, split: str):
        return self.pipeline.source.read(split)

    def statistics(self, split: str = "train") -> dict[str, Any]:
        return self.pipeline.statistics(split)

    def dataloader(self, split: str) -> torch.utils.data.DataLoader:
        """``split``'s batches, this process's share of them."""
        return self.pipeline.dataloader(split, self.world_size, self.rank)

    # Lightning's hooks ---------------------------------------------------------------------------

    def prepare_data(self) -> None:
        for split in SPLITS:
            self.pipeline.prepared(split)

    def setup(self, stage: str | None = None) -> None:
        if self.trainer is not None:
            self.world_size, self.rank = self.trainer.world_size, self.trainer.global_rank
        for split in SPLITS:
            self.pipeline.prepared(split)

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
