"""Flex attention's mask of packed rows, built on the device from the position ids (``model/packed_mask.py``): the
same logits as transformers' own packed-row path, without its host-side check (issue 23)."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers.masking_utils

from glm_session.config import RESOURCES_DIR
from glm_session.data import DialogueDataModule
from glm_session.model import chatglm2_config, padded_vocab_size
from glm_session.model.module import ChatGLM2Module
from glm_session.model.packed_mask import packed_block_mask, sample_ids


def test_sample_ids_start_where_positions_restart():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [5, 6, 0, 1, 2, 3]])
    assert sample_ids(positions).tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]]


def test_the_block_mask_is_causal_within_each_sample():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    dense = packed_block_mask(positions).to_dense()  # (B, H, Q blocks, KV blocks): one block of 128 here
    mask = torch.tensor([[packed_block_mask(positions).mask_mod(torch.tensor(0), torch.tensor(0), torch.tensor(q),
                                                                torch.tensor(k)).item() for k in range(6)]
                         for q in range(6)])  # fmt: skip
    assert dense.shape == (1, 1, 1, 1)
    assert mask.int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


@pytest.fixture(scope="module")
def packed_batches(tokenizer, cache_dir):
    data = DialogueDataModule(tokenizer, "chatglm2", "session", train_path=str(RESOURCES_DIR / "kdconv/validation.jsonl"),
                              limit=8, max_seq_len=1024, packing=True, batch_size=2, cache_dir=cache_dir)  # fmt: skip
    batches = list(data.dataloader("train"))
    assert any((b["position_ids"] == 0).sum(-1).max() > 1 for b in batches)  # rows really hold several samples
    return batches


def test_flex_with_the_device_mask_gives_transformers_packed_logits(tokenizer, packed_batches, monkeypatch):
    torch.manual_seed(0)
    config = chatglm2_config("chatglm2-tiny", vocab_size=padded_vocab_size(len(tokenizer)))
    optimizer = functools.partial(torch.optim.AdamW)
    reference = ChatGLM2Module(config, optimizer=optimizer, attn_implementation="sdpa")
    flex = ChatGLM2Module(config, optimizer=optimizer, attn_implementation="flex_attention")
    for module in (reference, flex):
        module.configure_model()
        module.eval()
    flex.model.load_state_dict(reference.model.state_dict())
    with torch.no_grad():
        expected = [reference(b["input_ids"], b["position_ids"]) for b in packed_batches]

        def host_check(*args, **kwargs):
            raise AssertionError("transformers inspected the position ids on the host")

        monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", host_check)
        for batch, logits in zip(packed_batches, expected, strict=True):
            assert (flex(batch["input_ids"], batch["position_ids"]) - logits).abs().max() < 1e-5
            flex.loss_chunk_tokens = 64  # the chunked loss's own forward takes the mask too
            chunked = flex.token_losses(batch)
            flex.loss_chunk_tokens = None
            assert (chunked - reference.token_losses(batch)).abs().max() < 1e-5
