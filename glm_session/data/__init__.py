"""Dialogue data: source (readers, holdout), samples (templates, strategies), rows (packing), batches (samplers,
collator, loader), chained by ``DialoguePipeline`` and held by the LightningDataModule ``DialogueDataModule``."""

from glm_session.data.datamodule import DialogueDataModule
from glm_session.data.session import DataError, Session, Turn
from glm_session.data.template import CHATGLM2, CHATGLM2_ARTICLE, Template, get_template

__all__ = [
    "CHATGLM2",
    "CHATGLM2_ARTICLE",
    "DataError",
    "DialogueDataModule",
    "Session",
    "Template",
    "Turn",
    "get_template",
]
