"""Bad values and typos end with one line naming the key and what it takes, before any work, and a run never trains
on nothing (issue 11, items 3, 6, 8, 15)."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from glm_session.config import build, compose_config
from glm_session.data.pipeline import EmptySplitError
from glm_session.errors import ConfigError
from glm_session.train import train

ROOT = Path(__file__).parent.parent
FAST = ["model=chatglm2-tiny", "trainer.max_steps=1", "trainer.limit_train_batches=1.0",
        "trainer.enable_progress_bar=false"]  # fmt: skip


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.max_seq_len=0", "data.max_seq_len=0: must be an integer >= 18"),
        ("data.max_seq_len=-5", "data.max_seq_len=-5: must be an integer >= 18"),
        ("data.max_seq_len=2", "data.max_seq_len=2: must be an integer >= 18"),  # the prefix alone
        ("data.max_seq_len=512.5", "data.max_seq_len=512.5: must be an integer >= 18"),
        ("data.limit=-1", "data.limit=-1: must be an integer >= 1 or null"),
        ("data.limit=0", "data.limit=0: must be an integer >= 1 or null"),
        ("data.limit=abc", "data.limit='abc': must be an integer >= 1 or null"),
        ("data.batch_size=-1", "data.batch_size=-1: must be an integer >= 1 or null"),
        ("data.batch_tokens=0", "data.batch_tokens=0: must be an integer >= 1 or null"),
        ("data.batch_tokens=null", "data.batch_size=null: must be given when data.batch_tokens is null"),
        ("data.packing=maybe", "data.packing='maybe': must be true or false"),
        ("data.shuffle=1", "data.shuffle=1: must be true or false"),
        ("data.num_workers=-1", "data.num_workers=-1: must be an integer >= 0"),
        ("data.pad_to=widest", "data.pad_to='widest': must be one of longest, max_seq_len"),
        ("data.on_error=ignore", "data.on_error='ignore': must be one of raise, skip"),
        ("data.format=csv", "data.format='csv': must be one of auto, sharegpt, openai, chatglm"),
        ("data.holdout={validation: -0.1}", "data.holdout.validation=-0.1: must be a number in [0, 1)"),
        ("data.holdout={validation: nan}", "data.holdout.validation=nan: must be a number in [0, 1)"),
        ("data.holdout={validation: abc}", "data.holdout.validation='abc': must be a number in [0, 1)"),
        ("data.holdout={validation: 0.6, test: 0.5}", "must be fractions whose sum is below 1"),
        (
            "data.holdout={train: 0.1}",
            "data.holdout.train=0.1: must be left out: holdout takes validation and test",
        ),
        (
            "data.role_map={client: customer}",
            "data.role_map.client='customer': must be one of system, user, assistant",
        ),
    ],
)
def test_bad_data_values_name_the_key_and_the_range(override, message):
    cfg = compose_config("data_tool", [override])
    with pytest.raises(ConfigError) as err:
        build(cfg.data)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "override,message",
    [
        ("generation.max_new_tokens=0", "generation.max_new_tokens=0: must be an integer >= 1"),
        ("generation.batch_size=-2", "generation.batch_size=-2: must be an integer >= 1"),
        ("generation.temperature=0", "generation.temperature=0: must be a number > 0.0"),
        ("generation.top_p=1.5", "generation.top_p=1.5: must be a number in (0, 1]"),
        ("generation.do_sample=yes", "generation.do_sample='yes': must be true or false"),
        # greedy decoding ignored them, and metrics.json recorded them as used
        ("generation.temperature=5.0", "generation.temperature=5.0: must be left at 1.0 without generation.do_sample"),
        ("generation.top_p=0.01", "generation.top_p=0.01: must be left at 1.0 without generation.do_sample=true"),
        # Room for the answer but none for a question: refused, never a prompt of [gMASK] sop alone.
        (
            "generation.max_new_tokens=64",
            "generation.max_new_tokens=64: must be at most 48: data.max_seq_len=64 less the shortest prompt (16",
        ),
    ],
)
def test_bad_generation_values_are_refused_before_training(tmp_path, override, message):
    cfg = compose_config("train", [*FAST, "evaluate.enabled=true", "data.max_seq_len=64", override,
                                   f"output_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert message in str(err.value)
    assert not (tmp_path / "metrics.json").exists()


def write_lines(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


GOOD = {"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]}
TRAILING = {"messages": [{"role": "user", "content": "你好"}]}


@pytest.mark.parametrize(
    "records,extra,message",
    [
        ([], [], "no train sample: 0 sessions read"),
        (
            [TRAILING, TRAILING],
            ["data.on_error=skip"],
            "no train sample: 0 sessions read, 2 records skipped (first: ",
        ),
        ([GOOD], ["data.max_seq_len=18", "data.holdout={validation: 0.5}"], None),
    ],
)
def test_a_run_that_would_train_on_nothing_stops(tmp_path, cache_dir, records, extra, message):
    data = write_lines(tmp_path / "data.jsonl", records)
    cfg = compose_config("train", [*FAST, f"data.path={data}", f"data.cache_dir={cache_dir}", *extra,
                                   f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(EmptySplitError) as err:
        train(cfg)
    if message is None:  # one session: it lands in train or validation, and the other split is empty
        assert "no train sample" in str(err.value) or "no validation sample" in str(err.value)
    else:
        assert str(err.value).startswith(f"{data}: {message}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_question_too_long_is_an_empty_split(tmp_path, cache_dir):
    long_question = {"messages": [{"role": "user", "content": "长" * 200}, {"role": "assistant", "content": "好"}]}
    data = write_lines(tmp_path / "data.jsonl", [long_question] * 3)
    cfg = compose_config("train", [*FAST, f"data.train_path={data}", f"data.cache_dir={cache_dir}",
                                   "data.max_seq_len=64", f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    with pytest.raises(EmptySplitError, match=r"3 sessions read, 3 turns skipped: their question alone is longer"):
        train(cfg)


def test_the_readme_role_map_line_works():
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if "data.role_map={" in line)
    override = line[line.index("data.role_map=") : line.index("}", line.index("data.role_map=")) + 1]
    assert override == "data.role_map={client: user, counselor: assistant}"
    cfg = compose_config("data_tool", [override])
    assert dict(cfg.data.role_map) == {"client": "user", "counselor": "assistant"}


def run_tool(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=env, cwd=ROOT)


def assert_one_line(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]


@pytest.mark.slow
def test_typos_end_with_one_line_and_exit_code_2(tmp_path):
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    assert_one_line(run_tool("glm_session.train", "data.limit=abc", cache), "data.limit='abc': must be an integer")
    assert_one_line(
        run_tool("glm_session.data", "stats", "+data.x=1"),
        "data.x=1: must be left out: the data group has no key 'x'",
    )
    assert_one_line(
        run_tool("glm_session.data", "stats", "data.holdout={validation: abc}"),
        "data.holdout.validation='abc': must be a number in [0, 1)",
    )
    assert_one_line(
        run_tool("glm_session.data", "export", "data.limit=2", cache, f"out={tmp_path}"),
        f"out='{tmp_path}': must be a file, not a folder",
    )
    assert_one_line(run_tool("glm_session.train", "data.x=1"), "Could not override 'data.x'")
    assert_one_line(run_tool("glm_session.train", "scheduler=null"),  # Hydra's ValueError, a traceback before
                    "leave a config group out with ~GROUP (e.g. ~scheduler), not GROUP=null")  # fmt: skip
    # A small data set with the default job's share of it per epoch: Lightning's message, on one line.
    assert_one_line(
        run_tool(
            "glm_session.train", "model=chatglm2-tiny", "data.limit=3", cache, f"hydra.run.dir={tmp_path / 'r'}"
        ),
        "Please increase the `limit_train_batches` argument",
    )
    # Values Hydra's grammar cannot read unquoted: the error says how to quote them.
    result = run_tool("glm_session.data", "stats", "data.path=我的 数据.jsonl")
    assert_one_line(result, "quote a value holding spaces, non-ASCII characters")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("[1, 2]")
    assert_one_line(run_tool("glm_session.convert", str(src), str(tmp_path / "dst")), "holds a JSON list")


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.kernels=triton", "model.kernels='triton': must be one of torch, liger"),
        pytest.param(
            "model.kernels=liger",
            "model.kernels='liger': must be torch here: liger-kernel cannot be imported",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here"
            ),
        ),
    ],
)
def test_bad_model_kernels_are_refused_before_training(tmp_path, override, message):
    cfg = compose_config("train", [*FAST, override, f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as raised:
        train(cfg)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_a_half_precision_model_is_refused_before_training(tmp_path, precision):
    """Lightning's '-true' half precisions cast the whole module: the fp64 loss sums failed at the first step with
    a traceback (index_add_ of a double into a bf16 buffer) before this check."""
    cfg = compose_config("train", [*FAST, f"trainer.precision={precision}", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as raised:
        train(cfg)
    assert str(raised.value).startswith(
        f"trainer.precision='{precision}': must be other than a '-true' half precision"
    )
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        # Each was a traceback inside fit (AdamW's or Lightning's own check) before glm_session.training.checks:
        ("optimizer.lr=abc", "optimizer.lr='abc': must be a number > 0"),
        ("optimizer.lr=-1", "optimizer.lr=-1: must be a number > 0"),
        ("optimizer.lr=nan", "optimizer.lr=nan: must be a number > 0"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay=-1: must be a number >= 0"),
        ("optimizer.betas=[2,3]", "optimizer.betas.0=2: must be a number in [0, 1)"),
        ("optimizer.betas=[0.9]", "optimizer.betas=[0.9]: must be two numbers in [0, 1)"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: must be an integer >= 1"),
        ("trainer.max_steps=abc", "trainer.max_steps='abc': must be an integer >= 1, or -1 for no limit"),
        ("seed=abc", "seed='abc': must be an integer"),
        # ... and each of these trained without a word: nothing, or the wrong way.
        ("optimizer.lr=0", "optimizer.lr=0: must be a number > 0"),  # not one weight moves
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1: must be a number >= 0"),  # every sign flipped
        ("trainer.max_steps=0", "trainer.max_steps=0: must be an integer >= 1, or -1 for no limit"),  # "completed"
        ("trainer.max_epochs=0", "trainer.max_epochs=0: must be an integer >= 1, or -1 for no limit (or null)"),
        ("scheduler.warmup_ratio=2", "scheduler.warmup_ratio=2: must be a number in [0, 1)"),  # never the peak
        ("scheduler.min_lr_ratio=-1", "scheduler.min_lr_ratio=-1: must be a number in [0, 1]"),  # 0 for 40%
        ("metrics.warmup_batches=-1", "metrics.warmup_batches=-1: must be an integer >= 0"),
        # tracebacks (a modulo by zero) ...
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0: must be an integer >= 1"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0: must be a fraction of an epoch in (0, 1]"),
        # ... and errors that came after the whole training
        ("evaluate.enabled=true evaluate.split=foo", "evaluate.split='foo': must be one of train, validation, test"),
        ("evaluate.enabled=true evaluate.limit=0", "evaluate.limit=0: must be an integer >= 1 or null"),
        # session 18's audit: tracebacks (numpy's seed range, a modulo by zero, '<=' between int and str) ...
        ("seed=-1", "seed=-1: must be an integer >= 0"),
        ("seed=99999999999999", "seed=99999999999999: must be an integer from 0 to 4,294,967,295"),
        ("trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0: must be an integer >= 1 or null"),
        ("trainer.limit_train_batches=abc", "trainer.limit_train_batches='abc': must be a fraction of an epoch"),
        # ... and runs that trained nothing, otherwise, or with what was not asked
        ("trainer.limit_train_batches=-1", "trainer.limit_train_batches=-1: must be a fraction of an epoch in [0, 1]"),
        ("resume_allow_changes=maybe", "resume_allow_changes='maybe': must be true or false"),  # taken as true
        ("evaluate.enabled=maybe", "evaluate.enabled='maybe': must be true or false"),
        ("model.compile_layers=maybe", "model.compile_layers='maybe': must be true or false"),
        ("optimizer.fused=maybe", "optimizer.fused='maybe': must be true or false"),
        ("model.init_from=''", "model.init_from='': must be a folder or checkpoint file, or null"),  # the cwd
        ("model.init_adapter=''", "model.init_adapter='': must be a folder or checkpoint file, or null"),
        ("optimizer.eps=0", "optimizer.eps=0: must be a number > 0"),  # NaN at step 2, blamed on the rate
        ("trainer.precision=16-mixed", "trainer.precision='16-mixed': must be 32-true or bf16-mixed on a CPU"),
        ("callbacks.best_checkpoint.monitor=val/los",  # failed after a whole epoch
         "callbacks.best_checkpoint.monitor='val/los': must be a logged metric: val/loss, train/loss"),
        ("stop_after_step=5", "stop_after_step=5: must be at most trainer.max_steps=1, or null"),  # never reached
        ("+model.config_overrides.num_hiden_layers=4",  # stored, and the preset's 2 layers trained
         "model.config_overrides.num_hiden_layers=4: must be left out: GlmConfig has no field 'num_hiden_layers'"),
        ("+model.config_overrides.num_hidden_layers=0",  # a model of embeddings alone
         "model.config_overrides.num_hidden_layers=0: must be an integer >= 1"),
    ],
)  # fmt: skip
def test_bad_training_values_are_refused_before_any_work(tmp_path, override, message):
    cfg = compose_config("train", [*FAST, *override.split(), f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError) as raised:
        train(cfg)
    assert str(raised.value).startswith(message)
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "metrics.json").exists()


def test_flex_attention_is_refused_for_training_on_a_cpu(tmp_path):
    """torch has no FlexAttention backward on a CPU: the run ended with NotImplementedError at its first step."""
    cfg = compose_config("train", [*FAST, "model.attn_implementation=flex_attention", "trainer.accelerator=cpu",
                                   f"output_dir={tmp_path}"])  # fmt: skip
    with pytest.raises(ConfigError, match="model.attn_implementation='flex_attention': must be sdpa or eager when "
                                          "training on a CPU"):  # fmt: skip
        train(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here")
def test_a_gpu_trainer_on_a_machine_without_one_names_the_key(tmp_path):
    """Lightning said "No supported gpu backend found!", naming no key."""
    cfg = compose_config("train", [*FAST, "trainer=fsdp", f"output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="trainer.accelerator='gpu': must be cpu here: this machine has no CUDA GPU"):
        train(cfg)


@pytest.mark.parametrize(
    "tool, argv, message",
    [
        ("export", ["a.ckpt", "out", "--dtype", "fp16"], "error: argument --dtype: invalid choice: 'fp16' (choose from"),
        ("export", [], "error: the following arguments are required: checkpoint, dst"),
        ("convert", ["src"], "error: the following arguments are required: dst"),
        ("report", ["runs", "--outt", "x"], "error: unrecognized arguments: --outt x"),
    ],
)
def test_the_argparse_tools_say_a_bad_argument_in_one_line(tool, argv, message, capsys):
    """argparse printed its usage lines, then ``export.py: error: ...``: two lines and the script's name."""
    import importlib

    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"glm_session.{tool}").main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(message) and err.endswith(f"(python -m glm_session.{tool} --help says what it takes)\n")


def test_step_sizes_beyond_an_epoch_are_named(tmp_path, cache_dir):
    """accumulate_grad_batches=100 with 7 batches an epoch (audit) trained steps of 7 without a word; val_check_interval
    beyond the epoch was Lightning's ValueError, a traceback."""
    from glm_session.errors import user_message

    base = [*FAST, "trainer.limit_train_batches=1.0", f"data.cache_dir={cache_dir}"]
    with pytest.raises(ConfigError, match=r"trainer.accumulate_grad_batches=500: must be at most the (\d+) batches a "
                                          r"process trains an epoch \(a step ends with its epoch: each would hold \1\)"):
        train(compose_config("train", [*base, "trainer.accumulate_grad_batches=500", f"output_dir={tmp_path / 'a'}"]))
    with pytest.raises(ValueError) as raised:
        train(compose_config("train", [*base, "trainer.val_check_interval=1000", f"output_dir={tmp_path / 'v'}"]))
    assert re.fullmatch(r"trainer.val_check_interval \(1000\) must be less than or equal to the number of the "
                        r"training batches \(\d+\)", user_message(raised.value))  # fmt: skip
