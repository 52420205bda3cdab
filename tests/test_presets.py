"""Model presets: ChatGLM2-6B's shape and parameter count, on the meta device."""

import torch
from transformers import GlmForCausalLM

from glm_session.model import chatglm2_config, padded_vocab_size


def test_chatglm2_6b_shape_and_parameter_count():
    config = chatglm2_config("chatglm2-6b")
    with torch.device("meta"):
        model = GlmForCausalLM(config)
    assert sum(p.numel() for p in model.parameters()) == 6_243_584_000
    layer = model.model.layers[0]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (28, 4096, 13696)
    assert layer.self_attn.q_proj.weight.shape == (4096, 4096)
    assert layer.self_attn.k_proj.weight.shape == (256, 4096)  # multi-query: 2 key/value groups of 128
    assert layer.self_attn.o_proj.bias is None and layer.self_attn.q_proj.bias is not None  # bias on q/k/v only
    assert layer.mlp.gate_up_proj.weight.shape == (2 * 13696, 4096)  # SwiGLU
    assert model.lm_head.weight.shape == (65024, 4096) and not config.tie_word_embeddings
    assert model.model.rotary_emb.inv_freq.shape == (32,)  # rotary on 64 of the 128 dims of each head
    assert config.rms_norm_eps == 1e-5


def test_small_presets_fit_the_tokenizer(tokenizer):
    assert padded_vocab_size(len(tokenizer)) == 6144 and padded_vocab_size(64794) == 65024
    for preset, low, high in (("chatglm2-tiny", 0.5e6, 1.5e6), ("chatglm2-small", 20e6, 60e6)):
        with torch.device("meta"):
            model = GlmForCausalLM(chatglm2_config(preset, vocab_size=6144))
        assert low <= sum(p.numel() for p in model.parameters()) <= high
