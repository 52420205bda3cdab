"""The model side: ChatGLM2 presets on transformers' GlmForCausalLM, the loss, the LightningModule."""

from glm_session.model.module import ChatGLM2Module
from glm_session.model.presets import PRESETS, chatglm2_config, padded_vocab_size

__all__ = ["PRESETS", "ChatGLM2Module", "chatglm2_config", "padded_vocab_size"]
