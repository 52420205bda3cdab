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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, cache_dir):
    """last.ckpt of a two-step chatglm2-tiny run on 8 KdConv sessions (the export and chat tests read it)."""
    from glm_session.config import compose_config
    from glm_session.train import train

    run = tmp_path_factory.mktemp("tiny-run")
    overrides = [
        "model=chatglm2-tiny", "data.limit=8", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", f"output_dir={run}",
        f"data.cache_dir={cache_dir}",
    ]  # fmt: skip
    train(compose_config("train", overrides))
    return run / "checkpoints" / "last.ckpt"
