"""A compiled run that is stopped and resumed ends bit for bit as an uninterrupted one: with
``model.compile_dynamic=true`` (each decoder layer compiled for any batch shape from the first step). torch's
default compiles static kernels first and dynamic ones once a batch of another shape comes; a resumed process starts
static again, so its steps run other kernels than the uninterrupted run's at the same steps (found when a base of
experiments/unseen_base, pretrained across two device calls, did not repeat)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from test_deterministic_compile import module
from test_resume import OVERRIDES

from glm_session.config import build, compose_config
from glm_session.errors import ConfigError
from glm_session.run_status import RunStopped, read_record
from glm_session.train import train

# Packed rows padded to 512 tokens, 4 a batch: 23 sessions make batches of 4 rows and one of 3 (at another step in
# each epoch), as the experiments' batches of 16 sessions vary in rows.
COMPILED = [*OVERRIDES, "data.limit=23", "data.max_seq_len=512", "data.batch_tokens=2048",
            "data.pad_to=max_seq_len", "model.compile_layers=true"]  # fmt: skip
STOP_AFTER = 18  # in the second epoch, after the first epoch's batch of 3 rows


def run(folder: Path, cache_dir: str, *extra: str) -> None:
    torch._dynamo.reset()  # a fresh process's compilation state: nothing compiled, no shape seen
    train(compose_config("train", [*COMPILED, f"data.cache_dir={cache_dir}", f"output_dir={folder}", *extra]))


def weights_digest(folder: Path) -> str:
    state = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def stopped_and_resumed(folder: Path, cache_dir: str, *extra: str) -> str:
    with pytest.raises(RunStopped) as stop:
        run(folder, cache_dir, f"stop_after_step={STOP_AFTER}", *extra)
    assert stop.value.asked and stop.value.step == STOP_AFTER
    run(folder, cache_dir, f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}", *extra)
    assert read_record(folder)["status"] == "completed"
    return weights_digest(folder)


def test_the_batches_change_shape_before_the_stop(cache_dir):
    """What the tests below need: rows per batch change during the first epoch, so that torch's default has
    compiled its dynamic kernels before the stop."""
    cfg = compose_config("train", [*COMPILED, f"data.cache_dir={cache_dir}"])
    datamodule = build(cfg.data)
    sampler = datamodule.pipeline.batch_sampler("train")
    rows = [len(batch) for batch in sampler.all_batches(0)]
    assert len(rows) < STOP_AFTER and sorted(set(rows)) == [3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("dynamic", ["rows", "true"])
def test_with_compile_dynamic_a_resumed_run_repeats_bit_for_bit(tmp_path, cache_dir, dynamic):
    setting = f"model.compile_dynamic={dynamic}"
    run(tmp_path / "whole", cache_dir, setting)
    assert stopped_and_resumed(tmp_path / "stopped", cache_dir, setting) == weights_digest(tmp_path / "whole")


@pytest.mark.slow
def test_with_torchs_default_the_resumed_run_runs_other_kernels(tmp_path, cache_dir):
    """Why the switch exists; if a torch makes this equal, its default repeats too and the switch can go."""
    run(tmp_path / "whole", cache_dir)
    assert stopped_and_resumed(tmp_path / "stopped", cache_dir) != weights_digest(tmp_path / "whole")


def test_compile_dynamic_is_null_true_false_or_rows():
    assert module(compile_dynamic=True).compile_dynamic is True
    assert module(compile_dynamic="rows").compile_dynamic == "rows"
    for wrong in ("yes", 1):
        with pytest.raises(ConfigError, match=r"model.compile_dynamic=.*: must be null, true, false or rows"):
            module(compile_dynamic=wrong)


def test_compile_mode_is_torchs_mode_for_each_layer_and_timed_modes_are_refused_with_deterministic(monkeypatch):
    from glm_session.model.compiled_layers import compile_layers, compile_model

    assert module().compile_mode is None and module(compile_mode="reduce-overhead").compile_mode == "reduce-overhead"
    with pytest.raises(ConfigError, match=r"model.compile_mode='cuda-graphs': must be null or one of default, "):
        module(compile_mode="cuda-graphs")
    with pytest.raises(ConfigError, match=r"model.compile_mode='max-autotune': .* chooses kernels by timing them"):
        module(compile_mode="max-autotune", compile_deterministic=True)
    module(compile_mode="reduce-overhead", compile_deterministic=True)  # CUDA graphs replay: no timing
    seen: list[dict] = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or real(fn, **kwargs))
    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)])
    compile_layers(layers, "rows", "reduce-overhead")
    compile_layers(layers, True, "max-autotune-no-cudagraphs")
    compile_model(layers[0], False, "reduce-overhead")  # the whole decoder: one graph, or an error
    assert seen == [{"mode": "reduce-overhead", "fullgraph": False}] * 2 + [
        {"dynamic": True, "mode": "max-autotune-no-cudagraphs", "fullgraph": False}
    ] * 2 + [{"dynamic": False, "mode": "reduce-overhead", "fullgraph": True}]


def test_rows_marks_the_rows_of_every_input_a_layer_gets():
    """Hidden states, rotary tables, position ids, a flex BlockMask's tables and the sample ids its mask function
    reads (one left out, and torch compiles the layer again at the first batch of another size)."""
    from glm_session.model.compiled_layers import mark_rows_dynamic
    from glm_session.model.packed_mask import packed_block_mask

    position_ids = torch.cat([torch.arange(100), torch.arange(156)]).repeat(3, 1)
    block_mask = packed_block_mask(position_ids)
    hidden, cos = torch.zeros(3, 256, 8), torch.zeros(3, 256, 4)
    cache_position = torch.arange(256)
    mark_rows_dynamic(((hidden,), {"attention_mask": block_mask, "position_embeddings": (cos, cos),
                                   "position_ids": position_ids, "cache_position": cache_position}), 3)  # fmt: skip
    closure = block_mask.mask_mod.__closure__[0].cell_contents
    for tensor in (hidden, cos, position_ids, block_mask.kv_indices, block_mask.full_q_indices, closure):
        assert getattr(tensor, "_dynamo_weak_dynamic_indices", set()) == {0}  # what maybe_mark_dynamic sets
    assert not getattr(cache_position, "_dynamo_weak_dynamic_indices", None)  # (T,): no rows dimension


@pytest.mark.slow
def test_the_test_evaluation_after_a_compiled_run_compiles_nothing_and_equals_evaluating_its_checkpoint(
    tmp_path, cache_dir, monkeypatch
):
    """The in-run test evaluation runs the layers uncompiled: its shapes (prompts, KV-cache decode steps, test rows)
    are not training's, and compiling them cost more than running them on the GPU. It then writes what
    ``glm_session.evaluate`` writes for the run's checkpoint (uncompiled too), to the byte."""
    import glm_session.evaluation.evaluator as evaluator
    from glm_session.evaluate import evaluate

    compiled: list[int] = []  # graphs Dynamo compiled during each evaluation
    real = evaluator.evaluate_model

    def counting(*args, **kwargs):
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        metrics = real(*args, **kwargs)
        compiled.append(torch._dynamo.utils.counters["stats"]["unique_graphs"] - before)
        return metrics

    monkeypatch.setattr(evaluator, "evaluate_model", counting)
    folder = tmp_path / "run"
    settings = ["evaluate.limit=3", "generation.max_new_tokens=6"]
    run(folder, cache_dir, "trainer.max_epochs=1", "evaluate.enabled=true", *settings)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # training ran compiled layers
    assert compiled == [0]
    again = tmp_path / "again"
    evaluate(compose_config("evaluate", [f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}", "limit=3",
                                         "generation.max_new_tokens=6", "data.limit=23", "data.max_seq_len=512",
                                         "data.batch_tokens=2048", "data.pad_to=max_seq_len",
                                         f"data.cache_dir={cache_dir}", f"output_dir={again}"]))  # fmt: skip
    for name in ("predictions.jsonl", "test_losses.json"):
        assert (again / name).read_bytes() == (folder / "evaluation" / name).read_bytes()
