"""ChatGLM2-shaped ``GlmConfig`` presets.

transformers' ``GlmForCausalLM`` has ChatGLM2's structure when configured as below: multi-query attention with
2 key/value groups, rotary embedding on the first half of each head's dims on interleaved pairs, bias on q/k/v
only, RMSNorm, SwiGLU and an untied output layer.
"""

from __future__ import annotations

from transformers import GlmConfig

# ChatGLM2-6B's own numbers (THUDM/chatglm2-6b config.json): 6,243,584,000 parameters.
CHATGLM2_6B = {
    "vocab_size": 65024,
    "hidden_size": 4096,
    "intermediate_size": 13696,
    "num_hidden_layers": 28,
    "num_attention_heads": 32,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "max_position_embeddings": 32768,
}
PRESETS: dict[str, dict] = {
    "chatglm2-6b": CHATGLM2_6B,
    # ChatGLM2's shape, narrower and shallower: 1,502,771,200 parameters with ChatGLM2's 65,024-token vocabulary
    # (1,261,598,720 with the bundled tokenizer's 6,144), for single-GPU benchmarks.
    "chatglm2-1b": {
        "hidden_size": 2048,
        "intermediate_size": 6848,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "max_position_embeddings": 32768,
    },
    # About 29M parameters with the bundled tokenizer: CPU and single-GPU experiments.
    "chatglm2-small": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 4096,
    },
    # Two layers, for tests.
    "chatglm2-tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
    },
}


def padded_vocab_size(tokenizer_size: int, multiple: int = 256) -> int:
    """The tokenizer's size rounded up to a multiple of 256, as ChatGLM2 pads 64,794 to 65,024."""
    return -(-tokenizer_size // multiple) * multiple


def chatglm2_config(preset: str, vocab_size: int | None = None, **overrides) -> GlmConfig:
    """``GlmConfig`` of ``preset`` (``chatglm2-6b``, ``chatglm2-small``, ``chatglm2-tiny``).

    Args:
        preset: the preset's name.
        vocab_size: the model's vocabulary (e.g. ``padded_vocab_size(len(tokenizer))``); the preset's otherwise
            (65,024 for chatglm2-6b).
        overrides: any other ``GlmConfig`` field.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}: choose one of {', '.join(PRESETS)}")
    values = {
        "vocab_size": CHATGLM2_6B["vocab_size"],
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_bias": True,
        "tie_word_embeddings": False,
        "partial_rotary_factor": 0.5,
        "rope_theta": 10000.0,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        **PRESETS[preset],
    }
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    values.update(overrides)
    rope = {"rope_type": "default", "rope_theta": values.pop("rope_theta"),
            "partial_rotary_factor": values.pop("partial_rotary_factor")}  # fmt: skip
    return GlmConfig(rope_parameters=rope, **values)
