"""Dialogue data: readers, templates, sample strategies, packing, batching and the LightningDataModule.

``DialogueDataModule`` is imported on first use, so that the command-line tools start without Lightning.
"""

from glm_session.data.pipeline import DialogueData
from glm_session.data.session import DataError, Session, Turn
from glm_session.data.template import CHATGLM2, CHATGLM2_ARTICLE, Template, get_template

__all__ = [
    "CHATGLM2",
    "CHATGLM2_ARTICLE",
    "DataError",
    "DialogueData",
    "DialogueDataModule",
    "Session",
    "Template",
    "Turn",
    "get_template",
]


def __getattr__(name: str):
    if name == "DialogueDataModule":
        from glm_session.data.datamodule import DialogueDataModule

        return DialogueDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
