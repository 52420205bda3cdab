"""model.init_from takes a run's checkpoint file: the new run starts from exactly its weights."""

import pytest
import torch
from hydra.utils import instantiate

from glm_session.checkpoints import CheckpointError, read_initial_weights
from glm_session.config import compose_config
from glm_session.train import train

FAST = ["model=chatglm2-tiny", "data.limit=4", "trainer.max_steps=1", "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false"]  # fmt: skip


def test_init_from_a_run_checkpoint(tmp_path, cache_dir):
    _, first = train(
        compose_config("train", [*FAST, f"output_dir={tmp_path / 'a'}", f"data.cache_dir={cache_dir}"])
    )
    checkpoint = tmp_path / "a" / "checkpoints" / "last.ckpt"
    trained = {k: v.detach().clone() for k, v in first["module"].model.state_dict().items()}

    cfg = compose_config("train", [*FAST, f"model.init_from={checkpoint}"])
    module = instantiate(cfg.model, _partial_=True)(
        tokenizer_size=len(first["datamodule"].tokenizer), optimizer=torch.optim.AdamW
    )
    module.configure_model()
    loaded = module.model.state_dict()
    assert loaded.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(loaded[name], value), name


def test_init_from_errors_name_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="missing.ckpt: no such checkpoint file"):
        read_initial_weights(tmp_path / "missing.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        read_initial_weights(tmp_path / "empty")
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="bad.ckpt: not a readable checkpoint"):
        read_initial_weights(tmp_path / "bad.ckpt")
