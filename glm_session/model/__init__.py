"""The model side: ChatGLM2 presets on transformers' GlmForCausalLM."""

from glm_session.model.presets import PRESETS, chatglm2_config, padded_vocab_size

__all__ = ["PRESETS", "chatglm2_config", "padded_vocab_size"]
