import os

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from glm_session.data.session import Session, Turn  # noqa: E402
from glm_session.tokenizer import ChatGLM2Tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer() -> ChatGLM2Tokenizer:
    return ChatGLM2Tokenizer.from_pretrained()


@pytest.fixture
def three_turns() -> Session:
    """The hand-written session of the exact-ids tests."""
    return Session(
        id="s0",
        turns=(Turn("你好", "你好！"), Turn("你知道", "知道呀"), Turn("谢谢", "不客气")),
    )


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("samples-cache"))
