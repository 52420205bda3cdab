"""Checkpoints: every command reads them through one reader with one error style; a run never trains on from
non-finite weights or saves them; resuming checks that the run is the checkpoint's (issue 11, items 9-12, 14)."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from glm_session.checkpoints import CheckpointError, check_init_from, load_model
from glm_session.config import compose_config
from glm_session.evaluate import evaluate
from glm_session.model.module import NonFiniteError
from glm_session.train import train
from glm_session.training.checkpoint_io import remove_stale_saves

TESTS = Path(__file__).parent
FAST = ["model=chatglm2-tiny", "data.limit=6", "trainer.max_steps=2", "trainer.limit_train_batches=1.0",
        "trainer.enable_progress_bar=false", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "data.batch_tokens=1024", "callbacks.last_checkpoint.every_n_train_steps=1"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run: <run>/checkpoints/last.ckpt."""
    folder = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    train(compose_config("train", [*FAST, f"output_dir={folder}", f"data.cache_dir={cache}"]))
    return folder


def first_tensor_bytes(path: Path) -> tuple[str, int]:
    """The first tensor record (``<archive>/data/0``) of a ``torch.save`` file and the offset of its first byte."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("/data/0"))
    with path.open("rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)  # a zip local file header: its name and extra field lengths at bytes 26-29
    name_length, extra_length = struct.unpack("<HH", header[26:30])
    return info.filename, info.header_offset + 30 + name_length + extra_length


def bad_checkpoints(run: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the reason its error gives)."""
    good = run / "checkpoints" / "last.ckpt"
    data = good.read_bytes()
    folder.mkdir(exist_ok=True)
    files = {}

    def write(name: str, content: bytes, reason: str) -> None:
        (folder / name).write_bytes(content)
        files[name] = (folder / name, reason)

    write("truncated.ckpt", data[: len(data) // 2], "not a complete checkpoint (truncated or corrupt)")
    record, offset = first_tensor_bytes(good)
    flipped = bytearray(data)
    flipped[offset] ^= 1  # the lowest bit of a weight's mantissa: still finite, and torch.load took it unnoticed
    write("damaged.ckpt", bytes(flipped), f"a damaged checkpoint: the bytes of its record {record} do not match")
    write("empty.ckpt", b"", "an empty file, not a checkpoint")
    write("text.ckpt", b"epoch: 3\n", "not a readable checkpoint (not a file that torch.save wrote)")
    write("random.ckpt", os.urandom(4096), "not a ")
    (folder / "folder.ckpt").mkdir(exist_ok=True)
    files["folder"] = (folder / "folder.ckpt", "a folder, not a checkpoint file")
    torch.save({"optimizer": torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)}, folder / "x.ckpt")
    files["pickled"] = (
        folder / "x.ckpt",
        "holds Python objects (torch.optim.sgd.SGD) that a weights-only load refuses",
    )
    torch.save({"model.weight": torch.ones(2)}, folder / "plain.ckpt")
    files["plain dict"] = (folder / "plain.ckpt", "not a glm_session training checkpoint (no 'glm_session' entry")
    content = torch.load(good, weights_only=True)
    first = next(iter(content["state_dict"]))
    content["state_dict"][first] = content["state_dict"][first].clone()
    content["state_dict"][first].view(-1)[3] = float("nan")  # a flipped bit
    torch.save(content, folder / "nan.ckpt")
    files["non-finite"] = (folder / "nan.ckpt", f"{first.removeprefix('model.')} holds 1 non-finite values")
    return files


def test_every_command_names_the_file_and_the_reason(run, tmp_path, cache_dir):
    for name, (path, reason) in bad_checkpoints(run, tmp_path / "bad").items():
        with pytest.raises(CheckpointError) as err:
            load_model(path)  # evaluate, export and analysis read through it
        assert str(err.value).startswith(f"{path}: ") and reason in str(err.value), name
        cfg = compose_config("train", [*FAST, f"ckpt_path={path}", f"output_dir={tmp_path / name}",
                                       f"data.cache_dir={cache_dir}"])  # fmt: skip
        with pytest.raises(CheckpointError) as err:
            train(cfg)
        assert str(err.value).startswith(f"{path}: ") and reason in str(err.value), name
        cfg = compose_config("evaluate", [f"ckpt_path={path}", f"output_dir={tmp_path / name}"])
        with pytest.raises(CheckpointError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            evaluate(cfg)


def test_another_model_size_or_tokenizer(run, tmp_path, cache_dir):
    last = run / "checkpoints" / "last.ckpt"
    cfg = compose_config("train", [*FAST, "model=chatglm2-small", f"ckpt_path={last}",
                                   f"output_dir={tmp_path / 'a'}", f"data.cache_dir={cache_dir}"])  # fmt: skip
    with pytest.raises(
        CheckpointError, match=r"a checkpoint of another model \(model_shape.hidden_size: 64 -> 512"
    ):
        train(cfg)
    cfg = compose_config("train", [*FAST, "model=chatglm2-small", f"model.init_from={last}",
                                   f"output_dir={tmp_path / 'b'}", f"data.cache_dir={cache_dir}"])  # fmt: skip
    with pytest.raises(
        CheckpointError, match=r"model.init_from=.*: weights of another model: \d+ tensors of other"
    ):
        train(cfg)
    content = torch.load(last, weights_only=True)
    content["glm_session"]["tokenizer_fingerprint"] = "0123456789abcdef"
    torch.save(content, tmp_path / "other.ckpt")
    cfg = compose_config("evaluate", [f"ckpt_path={tmp_path / 'other.ckpt'}", f"output_dir={tmp_path / 'e'}"])
    with pytest.raises(CheckpointError, match=r"other.ckpt: trained with tokenizer 0123456789abcdef, not with"):
        evaluate(cfg)


def test_the_command_line_says_it_in_one_line(run, tmp_path):
    path, reason = bad_checkpoints(run, tmp_path / "bad")["truncated.ckpt"]
    for tool in (
        ["glm_session.evaluate", f"ckpt_path={path}"],
        ["glm_session.export", str(path), str(tmp_path / "x")],
    ):
        result = subprocess.run([sys.executable, "-m", *tool], capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert result.stderr.strip().splitlines()[-1] == f"error: {path}: {reason}"


def test_resuming_another_run_is_refused_unless_allowed(run, tmp_path, cache_dir):
    last = run / "checkpoints" / "last.ckpt"
    changed = ["strategy=split", "model.reduction=turn", "data.packing=false"]
    cfg = compose_config("train", [*FAST, *changed, f"ckpt_path={last}", f"output_dir={tmp_path / 'a'}",
                                   f"data.cache_dir={cache_dir}"])  # fmt: skip
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    message = str(err.value)
    assert "this run differs from the checkpoint's" in message and "resume_allow_changes=true" in message
    for difference in ("strategy: 'session' -> 'split'", "reduction: 'token' -> 'turn'", "packing: True -> False"):
        assert difference in message
    allowed = compose_config("train", [*FAST, *changed, f"ckpt_path={last}", "trainer.max_steps=3",
                                       "resume_allow_changes=true", f"output_dir={tmp_path / 'b'}",
                                       f"data.cache_dir={cache_dir}"])  # fmt: skip
    metrics, _ = train(allowed)
    assert metrics["global_steps"] == 3


def test_a_missing_init_from_is_an_error_at_once_and_hub_ids_are_explicit(tmp_path, cache_dir):
    start = time.perf_counter()
    cfg = compose_config("train", [*FAST, f"model.init_from={tmp_path / 'no-such-folder'}",
                                   f"output_dir={tmp_path / 'a'}", f"data.cache_dir={cache_dir}"])  # fmt: skip
    with pytest.raises(
        CheckpointError, match=r"no-such-folder: no such folder or checkpoint file \(for a Hugging"
    ):
        train(cfg)
    assert time.perf_counter() - start < 30  # no network attempts (they took ~100 s)
    assert check_init_from("hf://THUDM/chatglm2-6b") == "hf://THUDM/chatglm2-6b"  # read only when training


@pytest.mark.parametrize("mmap", [False, True])
def test_a_checkpoint_cut_anywhere_says_it_is_incomplete(run, tmp_path, mmap):
    """Some cuts failed inside the zip reader with OSError EINVAL: "not a readable checkpoint (OSError: [Errno 22]
    Invalid argument)" did not say what was wrong."""
    from glm_session.checkpoints import read_checkpoint

    data = (run / "checkpoints" / "last.ckpt").read_bytes()
    for cut in [*range(100, 40_000, 997), *range(40_000, len(data), len(data) // 20)]:  # EINVAL: 5,085 to 40,000
        path = tmp_path / f"cut{cut}.ckpt"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"not a complete checkpoint \(truncated or corrupt\)"):
            read_checkpoint(path, mmap=mmap)


def test_a_hub_id_that_cannot_be_fetched_is_one_error():
    """Offline (as every test is), an unknown id, no access: an OSError without a file name was a traceback."""
    from glm_session.checkpoints import initial_state

    with pytest.raises(CheckpointError, match=r"model.init_from=hf://nobody/nothing: not loadable from the Hugging "):
        initial_state("hf://nobody/nothing")


def test_a_sharded_checkpoint_folder_does_not_resume_a_run_on_one_device(run, tmp_path, cache_dir):
    """Lightning said only "Is a directory"."""
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    shutil.copy(run / "checkpoints" / "last.ckpt", folder / "meta.pt")  # what Lightning writes beside the shards
    cfg = compose_config("train", [*FAST, f"ckpt_path={folder}", f"output_dir={tmp_path / 'r'}",
                                   f"data.cache_dir={cache_dir}"])  # fmt: skip
    with pytest.raises(CheckpointError, match=f"{folder}: a sharded \\(trainer=fsdp\\) checkpoint folder: resume it "
                                              "with trainer=fsdp, or make it one file"):  # fmt: skip
        train(cfg)


def test_training_into_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    folder = tmp_path / "run"
    cfg = compose_config("train", [*FAST, "trainer.max_steps=5", "+callbacks.poison._target_=helpers.PoisonAtStep",
                                   "+callbacks.poison.step=3", f"output_dir={folder}",
                                   f"data.cache_dir={cache_dir}"])  # fmt: skip
    sys.path.insert(0, str(TESTS))
    with pytest.raises(NonFiniteError, match=r"step 4: the training loss is nan .* stopped before the optimizer"):
        train(cfg)
    last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3  # written after step 3; step 4 never was
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_a_fused_optimizer_skips_the_step_on_the_device_and_the_run_stops_as_before(tmp_path, cache_dir):
    """With fused AdamW the guard reads no flag on the host each step: the optimizer skips the step from a device flag
    (``found_inf``), and the run stops with the step's error before the next checkpoint is written."""
    folder = tmp_path / "run"
    cfg = compose_config("train", [*FAST, "trainer.max_steps=5", "optimizer.fused=true",
                                   "+callbacks.poison._target_=helpers.PoisonAtStep", "+callbacks.poison.step=3",
                                   f"output_dir={folder}", f"data.cache_dir={cache_dir}"])  # fmt: skip
    sys.path.insert(0, str(TESTS))
    with pytest.raises(NonFiniteError, match=r"step 4: the training loss is nan .* its optimizer step was skipped"):
        train(cfg)
    last = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_a_skipped_step_leaves_weights_and_optimizer_state_untouched(tmp_path, cache_dir):
    """A one-off NaN gradient at step 2 (fused AdamW, nothing read on the host until the end): step 2 changes
    nothing, steps 1 and 3 train, and the run still ends with the error naming step 2."""
    sys.path.insert(0, str(TESTS))
    from helpers import PoisonGradientAtStep

    cfg = compose_config("train", [*FAST, "trainer.max_steps=3", "optimizer.fused=true", "trainer.log_every_n_steps=50",
                                   "callbacks.last_checkpoint.every_n_train_steps=50", f"output_dir={tmp_path}",
                                   f"data.cache_dir={cache_dir}"])  # fmt: skip
    snapshots = []

    class Snapshot(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            optimizer = trainer.optimizers[0]
            steps = [float(s["step"]) for s in optimizer.state.values()]
            snapshots.append(([p.detach().clone() for p in pl_module.parameters()], steps))

    with pytest.raises(NonFiniteError, match=r"step 2: the training loss is .* gradient norms sum to nan; its "
                                             r"optimizer step was skipped and the run stopped after step 3"):  # fmt: skip
        train(cfg, extra_callbacks=[PoisonGradientAtStep(2), Snapshot()])
    (after1, steps1), (after2, steps2), (after3, steps3) = snapshots
    assert all(torch.equal(a, b) for a, b in zip(after1, after2, strict=True))  # step 2: nothing moved
    assert not all(torch.equal(a, b) for a, b in zip(after2, after3, strict=True))  # step 3 trained
    assert set(steps1) == set(steps2) == {1.0} and set(steps3) == {2.0}  # AdamW's step count skipped step 2 too


def test_non_finite_weights_are_never_saved(run, tmp_path, cache_dir):
    cfg = compose_config("train", [*FAST, "trainer.max_steps=1", f"output_dir={tmp_path}",
                                   f"data.cache_dir={cache_dir}"])  # fmt: skip
    _, objects = train(cfg)
    module, trainer = objects["module"], objects["trainer"]
    next(module.parameters()).data[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"model.model.embed_tokens.weight holds non-finite values"):
        trainer.save_checkpoint(tmp_path / "inf.ckpt")
    assert not (tmp_path / "inf.ckpt").exists()


def test_stale_saves_are_removed_at_start_and_after_a_good_save(run, tmp_path, cache_dir):
    folder = tmp_path / "run"
    shutil.copytree(run / "checkpoints", folder / "checkpoints")
    stale = folder / "checkpoints" / ".saving-0123abcd.tmp"
    stale.write_bytes(b"half a checkpoint")
    cfg = compose_config("train", [*FAST, "trainer.max_steps=3", f"ckpt_path={folder / 'checkpoints' / 'last.ckpt'}",
                                   f"output_dir={folder}", f"data.cache_dir={cache_dir}"])  # fmt: skip
    train(cfg)
    assert not stale.exists()
    assert not list((folder / "checkpoints").glob(".saving-*"))


def test_a_sharded_save_killed_between_its_renames_is_put_right(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".replaced-t1-last.ckpt").mkdir()  # the previous last.ckpt, renamed away
    (folder / ".saving-t1-last.ckpt").mkdir()  # the new one, complete, not yet renamed
    (folder / ".saving-t1-last.ckpt" / "meta.pt").write_bytes(b"new")
    (folder / ".saving-t0-best.ckpt").mkdir()  # a save killed while writing: never renamed
    assert remove_stale_saves(folder) == [".replaced-t1-last.ckpt", ".saving-t0-best.ckpt"]
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert (folder / "last.ckpt" / "meta.pt").read_bytes() == b"new"


def test_a_flipped_bit_in_a_weight_is_refused_where_torch_load_takes_it(run, tmp_path):
    from glm_session.checkpoints import read_checkpoint

    path, reason = bad_checkpoints(run, tmp_path / "bad")["damaged.ckpt"]
    good = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    taken = torch.load(path, weights_only=True)["state_dict"]  # no error: one weight silently other
    assert sum(int((good[k] != taken[k]).sum()) for k in good) == 1
    for mmap in (False, True):
        with pytest.raises(CheckpointError, match=reason):
            read_checkpoint(path, mmap=mmap)
    cfg = compose_config("train", [*FAST, f"model.init_from={path}", f"output_dir={tmp_path / 'i'}"])
    with pytest.raises(CheckpointError, match=reason):
        train(cfg)


def test_resuming_with_other_optimizer_settings_is_refused_not_dropped(run, tmp_path, cache_dir):
    """Lightning restores the optimizer's state, hyperparameters included: optimizer.lr=0.05 trained at the
    checkpoint's rate, betas likewise, with nothing said (session 18's audit)."""
    last = run / "checkpoints" / "last.ckpt"
    for override, change in (("optimizer.lr=0.05", "optimizer.lr: 0.001 -> 0.05"),
                             ("optimizer.betas=[0.5,0.5]", "optimizer.betas: [0.9, 0.95] -> [0.5, 0.5]"),
                             ("optimizer.weight_decay=0.0", "optimizer.weight_decay: 0.1 -> 0.0")):  # fmt: skip
        cfg = compose_config("train", [*FAST, "trainer.max_steps=3", override, f"ckpt_path={last}",
                                       f"output_dir={tmp_path / 'r'}", f"data.cache_dir={cache_dir}",
                                       "resume_allow_changes=true"])  # fmt: skip
        with pytest.raises(CheckpointError, match=re.escape(f"{last}: its optimizer state holds other settings "
                                                            f"({change}), and resuming restores them")):  # fmt: skip
            train(cfg)
    metrics, _ = train(compose_config("train", [*FAST, "trainer.max_steps=3", "optimizer.lr=1e-3", f"ckpt_path={last}",
                                                f"output_dir={tmp_path / 'same'}", f"data.cache_dir={cache_dir}"]))  # fmt: skip
    assert metrics["global_steps"] == 3  # the same settings, written otherwise: resumed


def test_resuming_a_run_that_reached_max_steps_is_refused(run, tmp_path, cache_dir):
    """It trained nothing and ended "completed", printing the checkpoint's figures as this run's."""
    last = run / "checkpoints" / "last.ckpt"
    cfg = compose_config("train", [*FAST, f"ckpt_path={last}", f"output_dir={tmp_path}", f"data.cache_dir={cache_dir}"])
    with pytest.raises(CheckpointError, match=re.escape(f"{last}: saved after optimizer step 2, and "
                                                        "trainer.max_steps=2: nothing left to train")):  # fmt: skip
        train(cfg)
