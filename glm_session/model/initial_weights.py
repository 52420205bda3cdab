"""Initial weights for ``model.init_from``: a Hugging Face folder (converted or exported) or a run's checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

PREFIX = "model."  # ChatGLM2Module keeps the GlmForCausalLM as ``self.model``


def read_initial_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``GlmForCausalLM`` state dict in ``path``: a folder's ``*.safetensors``, or a single-file Lightning
    checkpoint of a glm_session run (``<run>/checkpoints/*.ckpt``, loaded with ``weights_only=True``)."""
    path = Path(path)
    if path.is_dir():
        from safetensors.torch import load_file

        state: dict[str, torch.Tensor] = {}
        for file in sorted(path.glob("*.safetensors")):
            state.update(load_file(file))
        if not state:
            raise FileNotFoundError(
                f"{path}: no *.safetensors weights (init_from takes a converted or exported folder)"
            )
        return state
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such folder or checkpoint file (model.init_from)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable checkpoint ({type(err).__name__}: {err})") from None
    weights = checkpoint.get("state_dict", {}) if isinstance(checkpoint, dict) else {}
    state = {k.removeprefix(PREFIX): v for k, v in weights.items() if k.startswith(PREFIX)}
    if not state:
        raise ValueError(
            f"{path}: no model weights (expected a glm_session run's checkpoint, state_dict['model.*'])"
        )
    return state
