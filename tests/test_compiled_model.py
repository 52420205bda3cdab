"""``model.compile_scope=model``: the whole decoder compiled as one graph (issue 23, item 1: with
``model.compile_mode=reduce-overhead`` its forward and backward are each one CUDA graph on a GPU; on a CPU torch
skips the graphs). The same losses and gradients as the eager model on packed rows, on both loss paths; a run trains,
and its test evaluation runs uncompiled; the settings it cannot take are refused."""

from __future__ import annotations

import functools

import pytest
import torch

from glm_session.config import RESOURCES_DIR, compose_config
from glm_session.data import DialogueDataModule
from glm_session.errors import ConfigError
from glm_session.model import chatglm2_config, padded_vocab_size
from glm_session.model.module import ChatGLM2Module
from glm_session.train import train


@pytest.fixture(scope="module")
def packed_rows(tokenizer, cache_dir):
    data = DialogueDataModule(tokenizer, "chatglm2", "session", train_path=str(RESOURCES_DIR / "kdconv/validation.jsonl"),
                              limit=16, max_seq_len=1024, packing=True, batch_size=2, pad_to="max_seq_len",
                              cache_dir=cache_dir)  # fmt: skip
    batches = [b for b in data.dataloader("train") if (b["position_ids"] == 0).sum(-1).max() > 1][:2]
    assert len(batches) == 2  # rows that hold several samples
    return batches


def modules(tokenizer, **options) -> tuple[ChatGLM2Module, ChatGLM2Module]:
    torch.manual_seed(0)
    config = chatglm2_config("chatglm2-tiny", vocab_size=padded_vocab_size(len(tokenizer)))
    optimizer = functools.partial(torch.optim.AdamW)
    eager = ChatGLM2Module(config, optimizer=optimizer, **options)
    compiled = ChatGLM2Module(config, optimizer=optimizer, compile_layers=True, compile_scope="model",
                              compile_dynamic=False, **options)  # fmt: skip
    eager.configure_model()
    compiled.configure_model()
    compiled.model.load_state_dict(eager.model.state_dict())
    return eager, compiled


def losses_and_grads(module: ChatGLM2Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.model.zero_grad()
    losses = module.token_losses(batch)
    losses.sum().backward()
    return losses.detach(), {name: p.grad.clone() for name, p in module.model.named_parameters() if p.grad is not None}


OPTIONS = {
    "whole logits": {},
    "chunked loss": {"loss_chunk_tokens": 64},
    "recomputed layers": {"activation_checkpointing": True},  # transformers' checkpointing inside the graph
    "lora": {"peft": {"method": "lora", "rank": 4}},  # peft's adapters inside the graph, the base frozen
}


@pytest.mark.slow
@pytest.mark.parametrize("options", list(OPTIONS))
def test_the_whole_model_as_one_graph_gives_the_eager_losses_and_gradients(tokenizer, packed_rows, options):
    eager, compiled = modules(tokenizer, **OPTIONS[options])
    assert compiled.model.model._compiled_call_impl is not None  # the decoder, not its layers
    assert all(layer._compiled_call_impl is None for layer in compiled.model.model.layers)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for batch in packed_rows:
        expected_losses, expected_grads = losses_and_grads(eager, batch)
        losses, grads = losses_and_grads(compiled, batch)
        assert (losses - expected_losses).abs().max() < 1e-5
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert (grad - expected_grads[name]).abs().max() <= 1e-5 * expected_grads[name].abs().max(), name
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # one graph, both batches


@pytest.mark.slow
def test_a_run_with_the_whole_model_compiled_trains_as_the_eager_run_and_evaluates_uncompiled(tmp_path, cache_dir):
    base = ["model=chatglm2-tiny", "data.limit=12", "data.max_seq_len=512", "data.batch_tokens=1024",
            "data.pad_to=max_seq_len", "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu", "trainer.precision=32-true", "evaluate.enabled=true", "evaluate.limit=2",
            "generation.max_new_tokens=4", f"data.cache_dir={cache_dir}"]  # fmt: skip
    histories = []
    for name, extra in (("eager", []), ("compiled", ["model.compile_layers=true", "model.compile_scope=model"])):
        torch._dynamo.reset()
        _, objects = train(compose_config("train", [*base, f"output_dir={tmp_path / name}", *extra]))
        module = objects["module"]
        assert all(m._compiled_call_impl is None for m in module.model.modules())  # evaluation ran uncompiled
        histories.append([(h["split"], h["loss"]) for h in module.history])
    (eager, compiled) = histories
    assert [split for split, _ in compiled] == [split for split, _ in eager] and compiled
    assert all(abs(a - b) < 1e-4 for (_, a), (_, b) in zip(eager, compiled, strict=True)), histories


def test_what_the_whole_model_graph_cannot_take_is_refused(tokenizer):
    config = chatglm2_config("chatglm2-tiny", vocab_size=256)
    make = functools.partial(ChatGLM2Module, config, optimizer=functools.partial(torch.optim.AdamW))
    with pytest.raises(ConfigError, match=r"model.compile_scope='graph': must be layers .* or model"):
        make(compile_scope="graph")
    module = make(compile_layers=True, compile_scope="model")
    module._device_mesh = object()  # as trainer=fsdp sets it
    with pytest.raises(ConfigError, match=r"model.compile_scope='model': must be layers with trainer=fsdp"):
        module.configure_model()
    with pytest.raises(ConfigError, match=r"model.kernels='liger': must be torch with model.compile_scope=model"):
        make(compile_layers=True, compile_scope="model", kernels="liger")
    make(compile_scope="model")  # not compiled: nothing to refuse


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [64, None], ids=["chunked loss", "whole logits (speed=graphs)"])
def test_flex_attention_inside_the_one_graph_gives_the_eager_losses(tokenizer, packed_rows, monkeypatch, chunk):
    """The fast path's attention in the graph, forward only (torch has no flex backward on a CPU): the packed rows'
    block mask is built inside the graph from the position ids (none is passed in: built outside, its tensors moved
    every step and made CUDA graph trees record the backward again), and transformers never looks at the rows on the
    host (its own packed-mask inference would)."""
    import transformers.masking_utils

    eager, _ = modules(tokenizer)
    _, compiled = modules(tokenizer, attn_implementation="flex_attention", loss_chunk_tokens=chunk)
    compiled.model.load_state_dict(eager.model.state_dict())

    def host_check(*args, **kwargs):
        raise AssertionError("transformers inspected the position ids on the host")

    with torch.no_grad():
        expected = [eager.token_losses(batch) for batch in packed_rows]  # SDPA: transformers' own packed mask
        monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", host_check)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        for batch, losses in zip(packed_rows, expected, strict=True):
            assert compiled.attention_mask(batch["position_ids"]) is None  # the graph builds it
            assert (compiled.token_losses(batch) - losses).abs().max() < 1e-5
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # one graph, mask included


def test_speed_graphs_is_speed_fast_with_the_whole_decoder_as_cuda_graphs():
    """``speed=graphs`` (conf/speed/graphs.yaml) is what experiments/bench measured as ``fast+whole_cudagraphs``:
    speed=fast, transformers' kernels, the whole logits, the whole decoder compiled statically and replayed."""
    graphs = compose_config("train", ["model=chatglm2-small", "speed=graphs"])
    fast = compose_config("train", ["model=chatglm2-small", "speed=fast", "model.kernels=torch",
                                    "model.loss_chunk_tokens=null", "model.compile_scope=model",
                                    "model.compile_mode=reduce-overhead", "model.compile_dynamic=false"])  # fmt: skip
    assert graphs == fast
    assert graphs.model.attn_implementation == "flex_attention" and graphs.optimizer.fused
