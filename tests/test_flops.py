"""Training FLOPs: 6 × parameters per real token plus causal attention per packed sample, by hand."""

import torch

from glm_session.model import chatglm2_config
from glm_session.model.flops import segment_lengths, training_flops


def test_segment_lengths_split_packed_rows_and_skip_padding():
    sample_index = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 2, 2, 2, -1, -1], [3, 4, 4, 4, 4, 4]])
    assert segment_lengths(sample_index).tolist() == [3, 2, 4, 1, 5]


def test_training_flops_by_hand():
    config = chatglm2_config("chatglm2-tiny", vocab_size=256)  # 2 layers, 4 heads of 16: width 64
    sample_index = torch.tensor([[0, 0, 0, 1, 1, -1]])  # samples of 3 and 2 tokens, one pad
    # 6 × 1000 × 5 tokens + 6 × 2 layers × 64 × (3² + 2²)
    assert training_flops(config, 1000, segment_lengths(sample_index).tolist()) == 30_000 + 768 * 13


def test_frozen_parameters_cost_four_flops_a_token():
    config = chatglm2_config("chatglm2-tiny", vocab_size=256)
    # a LoRA run: 400 of 1,000 parameters frozen (no weight gradient): (6 × 600 + 4 × 400) × 5 tokens + attention
    assert training_flops(config, 1000, [3, 2], frozen_parameters=400) == 26_000 + 768 * 13
