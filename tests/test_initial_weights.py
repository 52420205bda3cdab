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


def test_a_folder_whose_config_describes_another_model_is_refused(tmp_path):
    """The folder's config.json was never read: a garbage one, or another epsilon or rotary base, trained with the
    preset's values and the folder's weights (session 18's audit)."""
    import json
    import re

    from transformers import GlmForCausalLM

    from glm_session.model import chatglm2_config, padded_vocab_size
    from glm_session.tokenizer import ChatGLM2Tokenizer

    vocab = padded_vocab_size(len(ChatGLM2Tokenizer.from_pretrained(None)))
    folder = tmp_path / "base"
    GlmForCausalLM(chatglm2_config("chatglm2-tiny", vocab_size=vocab)).save_pretrained(folder)
    cfg = compose_config("train", [*FAST, f"model.init_from={folder}"])

    def build() -> None:
        instantiate(cfg.model, _partial_=True)(tokenizer_size=vocab, optimizer=torch.optim.AdamW)

    build()  # as saved: the run's own model
    saved = json.loads((folder / "config.json").read_text())
    for edit, difference in (({"rms_norm_eps": 1e-6}, "rms_norm_eps 1e-06 there, 1e-05 here"),
                             ({"rope_parameters": {**saved["rope_parameters"], "rope_theta": 500000.0}},
                              "rope_theta 500000.0 there, 10000.0 here")):  # fmt: skip
        (folder / "config.json").write_text(json.dumps({**saved, **edit}))
        with pytest.raises(CheckpointError, match=re.escape(f"model.init_from={folder}: its config.json describes "
                                                            f"another model than this run's ({difference})")):  # fmt: skip
            build()
    (folder / "config.json").write_text('{"hidden_size": "x"')
    with pytest.raises(CheckpointError, match=re.escape(f"model.init_from={folder}: config.json is not readable JSON")):
        build()
