"""``model.compile_deterministic``: inductor's deterministic mode (Triton reduction configs from heuristics, not from
timing them on a busy GPU), which the unseen-base comparison needs so that its bases repeat across device sessions."""

from __future__ import annotations

import functools
import types

import pytest
import torch
import torch._inductor.config as inductor
from hydra import compose, initialize_config_dir

from glm_session.config import CONFIG_DIR
from glm_session.errors import ConfigError
from glm_session.model import chatglm2_config
from glm_session.model.module import ChatGLM2Module, use_deterministic_compile


def module(**kwargs) -> ChatGLM2Module:
    optimizer = functools.partial(torch.optim.AdamW, lr=1e-3)
    return ChatGLM2Module(config=chatglm2_config("chatglm2-tiny", vocab_size=256), optimizer=optimizer, **kwargs)


def test_the_switch_turns_inductors_deterministic_mode_on():
    with inductor.patch(deterministic=False):  # inductor's own patch restores it (a monkeypatch would delete it)
        module()
        assert inductor.deterministic is False  # off by default: a run keeps inductor's own choices
        module(compile_deterministic=True)
        assert inductor.deterministic is True


def test_a_torch_without_the_mode_is_a_config_error():
    older_inductor = types.SimpleNamespace()  # the config of a torch before 2.10: no deterministic mode
    with pytest.raises(ConfigError, match=r"compile_deterministic=true: must be false here: .* needs torch 2.10"):
        use_deterministic_compile(older_inductor)
    assert not hasattr(older_inductor, "deterministic")


@pytest.mark.parametrize(
    "experiment", ["unseen/pretrain", "unseen/smile_session", "unseen/cpsycoun_split_shuffled"]
)
def test_the_unseen_base_bases_and_arms_compile_deterministically(experiment):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "speed=fast"])
    assert cfg.model.compile_deterministic is True
    assert cfg.model.compile_dynamic == "rows"  # a stopped and resumed run repeats too (test_compiled_resume.py)
    assert cfg.model.compile_layers is True  # what the switches are for
