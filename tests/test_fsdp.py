"""trainer=fsdp (FSDP2 through Lightning) on 2 CPU processes (gloo, fp32): the same training as one process
accumulating 2 micro-batches, and a run killed after a sharded checkpoint resumes to the same end."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import GlmForCausalLM

from glm_session.config import compose_config
from glm_session.model import chatglm2_config, padded_vocab_size
from glm_session.train import train

TESTS = Path(__file__).parent
COMMON = [
    "model=chatglm2-tiny",
    "data.limit=24",  # 8 batches an epoch: 4 optimizer steps both ways
    "trainer.limit_train_batches=1.0",
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "callbacks.last_checkpoint.every_n_train_steps=2",
]
FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy.param_dtype=float32"]


def torchrun(output_dir: Path, *extra: str, cache: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "glm_session.train",
               *COMMON, *FSDP, f"data.cache_dir={cache}", f"hydra.run.dir={output_dir}", *extra]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def metrics(output_dir: Path) -> dict:
    return json.loads((output_dir / "metrics.json").read_text())


@pytest.fixture
def initial_weights(tmp_path, tokenizer) -> str:
    """One set of initial weights for every run (a sharded init draws other random numbers)."""
    torch.manual_seed(0)
    model = GlmForCausalLM(chatglm2_config("chatglm2-tiny", vocab_size=padded_vocab_size(len(tokenizer))))
    model.save_pretrained(tmp_path / "init")
    return f"model.init_from={tmp_path / 'init'}"


@pytest.mark.slow
def test_fsdp_equals_one_process_and_resumes(tmp_path, cache_dir, initial_weights):
    COMMON.append(initial_weights)
    result = torchrun(tmp_path / "fsdp", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = metrics(tmp_path / "fsdp")
    assert (tmp_path / "fsdp/checkpoints/last.ckpt").is_dir()  # a sharded checkpoint: one file per rank

    single, _ = train(compose_config("train", [*COMMON, "trainer.accumulate_grad_batches=2", f"data.cache_dir={cache_dir}",
                                              f"output_dir={tmp_path / 'single'}"]))  # fmt: skip
    assert sharded["global_steps"] == single["global_steps"] == 8
    assert sharded["input_tokens"] == single["input_tokens"]
    for a, b in zip(sharded["val_loss_by_epoch"], single["val_loss_by_epoch"], strict=True):
        assert abs(a - b) < 1e-4

    # The chunked loss under FSDP2: the output layer used outside its module (after the root's forward) still
    # gets its gradient reduced across the ranks.
    result = torchrun(tmp_path / "chunked", "model.loss_chunk_tokens=64", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(metrics(tmp_path / "chunked")["val_loss_by_epoch"], sharded["val_loss_by_epoch"], strict=True):
        assert abs(a - b) < 1e-4

    # A supervision policy whose weights differ by turn, under the turn reduction: the per-token weights and the
    # global count of turns across the two ranks give one process's training.
    weighted = ["supervision=rising", "model.reduction=turn"]
    result = torchrun(tmp_path / "rising", *weighted, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    single_rising, _ = train(compose_config("train", [*COMMON, *weighted, "trainer.accumulate_grad_batches=2",
                                                      f"data.cache_dir={cache_dir}", f"output_dir={tmp_path / 'single_rising'}"]))  # fmt: skip
    rising = metrics(tmp_path / "rising")
    assert rising["run_info"]["supervision"] == "rising"
    for a, b, c in zip(rising["val_loss_by_epoch"], single_rising["val_loss_by_epoch"], sharded["val_loss_by_epoch"],
                       strict=True):  # fmt: skip
        assert abs(a - b) < 1e-4 and abs(a - c) > 1e-4

    # FSDP2's options for speed: half the layers recomputed, the gathered parameters kept from forward to backward,
    # the next layer gathered ahead: the same training.
    options = ["trainer.strategy.checkpoint_every_n_layers=2", "trainer.strategy.reshard_after_forward=false",
               "trainer.strategy.prefetch=1"]  # fmt: skip
    result = torchrun(tmp_path / "options", *options, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(metrics(tmp_path / "options")["val_loss_by_epoch"], sharded["val_loss_by_epoch"], strict=True):
        assert abs(a - b) < 1e-5

    killed = tmp_path / "killed"
    result = torchrun(
        killed, "+callbacks.kill._target_=helpers.KillAtStep", "+callbacks.kill.step=5", cache=cache_dir
    )
    assert result.returncode != 0
    result = torchrun(killed, f"ckpt_path={killed / 'checkpoints/last.ckpt'}", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = metrics(killed)
    assert resumed["global_steps"] == 8
    for a, b in zip(resumed["val_loss_by_epoch"], sharded["val_loss_by_epoch"], strict=True):
        assert abs(a - b) < 1e-5


def test_every_second_layer_is_recomputed_and_the_gradients_do_not_change():
    from glm_session.model.sharding import checkpoint_layers

    torch.manual_seed(0)
    config = chatglm2_config("chatglm2-tiny", vocab_size=128, num_hidden_layers=4)
    plain, checkpointed = GlmForCausalLM(config), GlmForCausalLM(config)
    checkpointed.load_state_dict(plain.state_dict())
    checkpoint_layers(checkpointed, every_n_layers=2)
    assert [layer.gradient_checkpointing for layer in checkpointed.model.layers] == [True, False, True, False]
    calls = [0] * 4  # attention forwards of each layer: a recomputed layer runs its attention twice
    for index, layer in enumerate(checkpointed.model.layers):
        layer.self_attn.register_forward_hook(lambda *_, i=index: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(0, 128, (2, 12))
    for model in (plain, checkpointed):
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
    assert calls == [2, 1, 2, 1]
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad), name


SHARD = """
import json, os, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import GlmForCausalLM
from glm_session.model import chatglm2_config
from glm_session.model.sharding import shard_model
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
with torch.device("meta"):
    model = GlmForCausalLM(chatglm2_config("chatglm2-tiny", vocab_size=128, num_hidden_layers=4))
model = shard_model(model, init_device_mesh("cpu", (1,)), torch.device("cpu"), torch.float32, *json.loads(sys.argv[2]))
states = [layer._get_fsdp_state() for layer in model.model.layers]
index = {id(state): i for i, state in enumerate(states)}
print(json.dumps([{"resharded": state._fsdp_param_group.post_forward_mesh_info is not None,
                   "forward": [index[id(s)] for s in state._states_to_forward_prefetch],
                   "backward": [index[id(s)] for s in state._states_to_backward_prefetch],
                   "recomputed": layer.gradient_checkpointing} for layer, state in zip(model.model.layers, states)]))
"""


def test_fsdp_options_reach_each_decoder_layers_unit(tmp_path):
    """One CPU process (gloo): what shard_model sets on each layer's FSDP2 unit (checked on FSDP2's own state)."""

    def shard(*options) -> list[dict]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
        store = tmp_path / f"store{len(options)}"
        result = subprocess.run([sys.executable, "-c", SHARD, str(store), json.dumps(options)], env=env,
                                capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.splitlines()[-1])

    assert shard() == [{"resharded": True, "forward": [], "backward": [], "recomputed": True}] * 4
    assert shard(True, 2, False, 2) == [
        {"resharded": False, "forward": [1, 2], "backward": [], "recomputed": True},
        {"resharded": False, "forward": [2, 3], "backward": [0], "recomputed": False},
        {"resharded": False, "forward": [3], "backward": [1, 0], "recomputed": True},
        {"resharded": False, "forward": [], "backward": [2, 1], "recomputed": False},
    ]


@pytest.mark.parametrize(
    ("override", "message"),
    [("trainer.strategy.checkpoint_every_n_layers=0", "checkpoint_every_n_layers=0: must be an integer >= 1"),
     ("trainer.strategy.prefetch=-1", "prefetch=-1: must be an integer >= 0"),
     ("trainer.strategy.reshard_after_forward=2", "reshard_after_forward=2: must be true or false")],
)  # fmt: skip
def test_fsdp_options_out_of_range_are_refused(override, message):
    from hydra.utils import instantiate

    cfg = compose_config("train", ["trainer=fsdp", override])
    with pytest.raises(Exception, match=message):
        instantiate(cfg.trainer.strategy)


def test_evaluation_after_sharded_training_is_refused_before_training(tmp_path):
    cfg = compose_config("train", ["trainer=fsdp", "trainer.accelerator=cpu", "evaluate.enabled=true",
                                   f"output_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(ValueError, match="evaluate.enabled=true: must be false with trainer=fsdp"):
        train(cfg)
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.slow
def test_lora_under_fsdp_saves_the_adapters_only_and_resumes(tmp_path, cache_dir, initial_weights):
    """peft=lora with trainer=fsdp: the adapters are sharded with their decoder layer; the sharded checkpoint holds
    the adapters (and their optimizer state), not the base; a killed run resumes to the uninterrupted run's end."""
    from torch.distributed.checkpoint import FileSystemReader

    lora = [initial_weights, "peft=lora", "model.peft.rank=4"]
    result = torchrun(tmp_path / "whole", *lora, cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    whole = metrics(tmp_path / "whole")
    # 2 layers x rank 4 x (in + out) of q (64, 64), k and v (64, 32: 2 key-value heads of 16), o (64, 64),
    # gate_up (64, 2 x 128), down (128, 64)
    assert whole["trainable_parameters"] == 2 * 4 * (
        (64 + 64) + 2 * (64 + 32) + (64 + 64) + (64 + 256) + (128 + 64)
    )
    model_keys = [k for k in FileSystemReader(str(tmp_path / "whole/checkpoints/last.ckpt")).read_metadata()
                  .state_dict_metadata if k.startswith("state_dict.")]  # fmt: skip
    assert model_keys and all(".lora_" in k for k in model_keys)
    killed = tmp_path / "killed"
    result = torchrun(killed, *lora, "+callbacks.kill._target_=helpers.KillAtStep", "+callbacks.kill.step=5",
                      cache=cache_dir)  # fmt: skip
    assert result.returncode != 0
    result = torchrun(killed, *lora, f"ckpt_path={killed / 'checkpoints/last.ckpt'}", cache=cache_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    for a, b in zip(metrics(killed)["val_loss_by_epoch"], whole["val_loss_by_epoch"], strict=True):
        assert abs(a - b) < 1e-5


@pytest.mark.slow
def test_fsdp_on_one_process_trains_as_the_plain_path(tmp_path, cache_dir, initial_weights):
    """The 1B benchmark's ``fast+bf16_copies`` (``experiments/bench/run_all.py``): FSDP2 on one device, its
    parameters kept from forward to backward, nothing recomputed; in fp32 on a CPU the plain path's training."""
    one = [*COMMON, initial_weights, f"data.cache_dir={cache_dir}"]
    spec = importlib.util.spec_from_file_location("run_all", TESTS.parent / "experiments" / "bench" / "run_all.py")
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    variant = [*run_all.BF16_COPIES, "trainer.accelerator=cpu", "trainer.strategy.param_dtype=float32"]
    command = [sys.executable, "-m", "glm_session.train", *one, *variant, f"hydra.run.dir={tmp_path / 'fsdp'}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = metrics(tmp_path / "fsdp")
    plain, _ = train(compose_config("train", [*one, f"output_dir={tmp_path / 'plain'}"]))
    assert sharded["global_steps"] == plain["global_steps"] == 16
    assert len(sharded["val_loss_by_epoch"]) == 2
    for a, b in zip(sharded["val_loss_by_epoch"], plain["val_loss_by_epoch"], strict=True):
        assert abs(a - b) < 1e-5


@pytest.mark.slow
def test_a_single_file_lora_checkpoint_does_not_resume_under_fsdp(tmp_path, cache_dir, initial_weights):
    """The sharded LoRA load read <file>/.metadata and ended with an AssertionError traceback."""
    lora = [*COMMON, initial_weights, "peft=lora", "model.peft.rank=4", f"data.cache_dir={cache_dir}",
            "trainer.max_epochs=1"]  # fmt: skip
    train(compose_config("train", [*lora, f"output_dir={tmp_path / 'one'}"]))
    command = [sys.executable, "-m", "glm_session.train", *lora, "trainer=fsdp", "trainer.accelerator=cpu",
               "trainer.devices=1", "trainer.strategy.param_dtype=float32", "trainer.max_epochs=2",
               f"ckpt_path={tmp_path / 'one/checkpoints/last.ckpt'}", f"hydra.run.dir={tmp_path / 'fsdp'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "last.ckpt: a single-file checkpoint; a LoRA run under trainer=fsdp resumes from its own sharded" in (
        result.stderr
    )


@pytest.mark.slow
def test_fused_adamw_under_fsdp_scales_clips_and_skips_from_device_flags(tmp_path, cache_dir, initial_weights):
    """FSDP2's sharded gradients with fused AdamW: the step's 1/D and the clip coefficient (from the L2 norm summed
    over the shards) go into its grad_scale, as on one device; with eps 10 the updates follow the gradients' scale,
    so a wrong factor shows in the losses. A NaN gradient's step is skipped and the run stops naming it."""
    step = [initial_weights, "optimizer.lr=0.5", "optimizer.eps=10.0", "trainer.gradient_clip_val=0.05"]
    fused = torchrun(tmp_path / "fused", *step, "optimizer.fused=true", cache=cache_dir)
    explicit = torchrun(tmp_path / "explicit", *step, "optimizer.fused=false", "+optimizer.foreach=true", cache=cache_dir)
    assert fused.returncode == explicit.returncode == 0, (fused.stderr[-3000:], explicit.stderr[-3000:])
    for a, b in zip(metrics(tmp_path / "fused")["val_loss_by_epoch"], metrics(tmp_path / "explicit")["val_loss_by_epoch"],
                    strict=True):  # fmt: skip
        assert abs(a - b) < 1e-6

    poisoned = torchrun(tmp_path / "poisoned", initial_weights, "optimizer.fused=true", "trainer.log_every_n_steps=50",
                        "+callbacks.poison._target_=helpers.PoisonGradientAtStep", "+callbacks.poison.step=2",
                        cache=cache_dir)  # fmt: skip
    assert poisoned.returncode != 0
    assert re.search(r"step 2: the training loss is .* gradient norms sum to nan; its optimizer step was skipped",
                     poisoned.stderr + poisoned.stdout), poisoned.stderr[-3000:]  # fmt: skip
