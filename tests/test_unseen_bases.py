"""experiments/unseen_base/bases.py: the pretrained bases packed into pieces on one device session and restored on the
next, bit for bit, and found by the driver as done and restored (not pretrained again, not reported as pretrained)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
HERE = ROOT / "experiments" / "unseen_base"


def load(name: str, file: str):
    spec = importlib.util.spec_from_file_location(name, HERE / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


driver = load("unseen_run_for_bases", "run.py")
bases = load("unseen_bases", "bases.py")


@pytest.fixture
def pretrained(tmp_path) -> Path:
    """Two completed pretraining runs: a record and a last.ckpt with weights and an optimizer state."""
    root = tmp_path / "there"
    generator = torch.Generator().manual_seed(0)
    for seed in (0, 1):
        folder = root / f"pretrain/seed{seed}"
        (folder / "checkpoints").mkdir(parents=True)
        info = {"model_config": {"num_hidden_layers": 8}, "seed": seed}
        (folder / "metrics.json").write_text(json.dumps({"status": "completed", "global_steps": 2064 + seed,
                                                         "run_info": info}))  # fmt: skip
        state = {"model.w": torch.randn(300_000, generator=generator), "model.b": torch.arange(7)}
        torch.save({"state_dict": state, "glm_session": info, "optimizer_states": [{"exp_avg": torch.ones(300_000)}]},
                   folder / "checkpoints" / "last.ckpt")  # fmt: skip
    return root


def test_packed_bases_come_back_bit_for_bit_and_the_driver_finds_them_restored(tmp_path, pretrained, monkeypatch):
    monkeypatch.setattr(bases, "PIECE_MIB", 1)  # 2 bases of 1.2 MB of weights each: 3 pieces
    pieces = tmp_path / "pieces"
    manifest = bases.pack(pretrained, pieces, [0, 1])
    assert manifest["pieces"] == ["bases.tar.000", "bases.tar.001", "bases.tar.002"]
    assert all((pieces / name).stat().st_size <= 1 << 20 for name in manifest["pieces"])
    originals = {f"pretrain/seed{s}": pretrained / f"pretrain/seed{s}/checkpoints/last.ckpt" for s in (0, 1)}
    assert manifest["bases"] == {name: driver.base_fingerprint(path) for name, path in originals.items()}

    root = tmp_path / "next_session"
    assert bases.restore(pieces, root, pieces / "bases.json") == ["pretrain/seed0", "pretrain/seed1"]
    for name, original in originals.items():
        restored = torch.load(root / name / "checkpoints/last.ckpt", weights_only=True)
        assert set(restored) == {"state_dict", "glm_session"}  # the optimizer's state stays behind
        for key, tensor in torch.load(original, weights_only=True)["state_dict"].items():
            assert torch.equal(restored["state_dict"][key], tensor)
        assert (root / name / "metrics.json").read_text() == (pretrained / name / "metrics.json").read_text()
        assert driver.done(root, driver.Job(name, []))  # not pretrained again

    seeds = driver.Job("seeds/smile_session+token_seed1", [], init=root / "pretrain/seed1/checkpoints/last.ckpt")
    summary = driver.summary([driver.Job("pretrain/seed0", []), seeds], root)
    assert summary["bases"] == manifest["bases"]  # every base on the machine, whether a job of this call made it
    assert set(summary["restored"]) == {"pretrain/seed0", "pretrain/seed1"}
    assert "pretrain/seed0" not in summary["runs"]  # its pretraining is the earlier session's record

    for name in manifest["pieces"]:  # restored once: the pieces are not read again
        (pieces / name).unlink()
    assert bases.restore(pieces, root, pieces / "bases.json") == ["pretrain/seed0", "pretrain/seed1"]


def test_a_missing_or_damaged_piece_is_refused(tmp_path, pretrained, monkeypatch):
    monkeypatch.setattr(bases, "PIECE_MIB", 1)
    pieces = tmp_path / "pieces"
    bases.pack(pretrained, pieces, [0, 1])
    (pieces / "bases.tar.001").rename(tmp_path / "kept_aside")
    with pytest.raises(SystemExit, match="1 of 3 pieces missing \\(bases.tar.001\\)"):
        bases.restore(pieces, tmp_path / "root", pieces / "bases.json")
    data = bytearray((tmp_path / "kept_aside").read_bytes())
    data[1000] ^= 1
    (pieces / "bases.tar.001").write_bytes(bytes(data))
    with pytest.raises(SystemExit, match="a piece is damaged"):
        bases.restore(pieces, tmp_path / "root", pieces / "bases.json")
    assert not (tmp_path / "root").exists()


def test_an_unfinished_pretraining_is_not_packed(tmp_path, pretrained):
    (pretrained / "pretrain/seed1/metrics.json").write_text(json.dumps({"status": "stopped"}))
    with pytest.raises(SystemExit, match="seed1: its pretraining has not completed"):
        bases.pack(pretrained, tmp_path / "pieces", [0, 1])


def test_bases_packed_with_their_weights_only_get_their_run_info_back_and_evaluate_reads_them(tmp_path, tiny_checkpoint):
    """Session 9 packed the reference bases' state_dict alone; glm_session.evaluate (the bases' step-0 evaluation)
    builds the model from the checkpoint's run info, which restore takes from the run record beside it."""
    from glm_session.checkpoints import load_model

    there = tmp_path / "there"
    record = json.loads((tiny_checkpoint.parents[1] / "metrics.json").read_text())
    for seed in (0, 1):
        folder = there / f"pretrain/seed{seed}"
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({**record, "status": "completed"}))
        saved = torch.load(tiny_checkpoint, weights_only=False)
        torch.save({"state_dict": saved["state_dict"]}, folder / "checkpoints" / "last.ckpt")  # as session 9's
    pieces = tmp_path / "pieces"
    manifest = bases.pack(there, pieces, [0, 1])
    root = tmp_path / "next_session"
    bases.restore(pieces, root, pieces / "bases.json")
    restored = root / "pretrain/seed1/checkpoints/last.ckpt"
    assert driver.base_fingerprint(restored) == manifest["bases"]["pretrain/seed1"]  # the weights did not change
    model, info = load_model(restored)
    assert info.to_dict() == record["run_info"]
    original, _ = load_model(tiny_checkpoint)
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
