"""glm_session: fine-tune ChatGLM2 on multi-turn dialogues, split vs session-level samples, measured."""

from glm_session.tokenizer import ChatGLM2Tokenizer

__all__ = ["ChatGLM2Tokenizer"]
