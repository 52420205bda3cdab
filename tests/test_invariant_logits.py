"""DESIGN Invariant 1: at every answer token, the session sample's logits equal the split sample's (fp32),
with and without packing, through the DataModule's real rows and a 2-layer GlmForCausalLM."""

from collections import Counter

import pytest
import torch
from transformers import GlmForCausalLM

from glm_session.config import RESOURCES_DIR
from glm_session.constants import IGNORE_INDEX
from glm_session.data import DialogueDataModule
from glm_session.model import chatglm2_config, padded_vocab_size


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    config = chatglm2_config("chatglm2-tiny", vocab_size=padded_vocab_size(len(tokenizer)))
    return GlmForCausalLM(config).eval()


def answer_logits(model, datamodule) -> dict[tuple[int, int, int], torch.Tensor]:
    """Logits predicting every supervised label, keyed by (session, turn, j-th label of that turn)."""
    out: dict[tuple[int, int, int], torch.Tensor] = {}
    seen: Counter = Counter()
    with torch.no_grad():
        for batch in datamodule.dataloader("train"):
            logits = model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits  # (B, T, V)
            for b, t in (batch["labels"][:, 1:] != IGNORE_INDEX).nonzero().tolist():
                key = (batch["session_index"][b, t + 1].item(), batch["turn_ids"][b, t + 1].item())
                out[(*key, seen[key])] = logits[b, t]
                seen[key] += 1
    return out


@pytest.mark.parametrize("template", ["chatglm2", "chatglm2_article"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_session_logits_equal_split_logits(model, tokenizer, cache_dir, template, attention):
    model.config._attn_implementation = attention
    results = {}
    for strategy in ("split", "session"):
        for packing in (False, True):
            datamodule = DialogueDataModule(
                tokenizer, template, strategy, train_path=str(RESOURCES_DIR / "kdconv/validation.jsonl"),
                limit=6, max_seq_len=2048, packing=packing, batch_size=4, shuffle=True, cache_dir=cache_dir,
            )  # fmt: skip
            results[strategy, packing] = answer_logits(model, datamodule)
            if packing:  # rows really hold several samples
                assert min(len(r) for r in datamodule.pipeline.prepared("train").rows.samples[:-1]) > 1
    reference = results["split", False]
    assert len(reference) > 500  # every answer token of 6 KdConv sessions
    for key, logits in results.items():
        assert logits.keys() == reference.keys(), key
        worst = max((logits[k] - reference[k]).abs().max().item() for k in reference)
        assert worst < 1e-5, (key, worst)
