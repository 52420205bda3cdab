"""Take the pretrained bases of this experiment from one device session to the next (issue 21): the GPU machine and
everything on it are gone after a session, and pretraining both bases again costs about 10 of its 30 device-minutes.

    python experiments/unseen_base/bases.py pack --root ROOT --out DIR      # there: DIR/bases.tar.NNN + bases.json
    python experiments/unseen_base/bases.py restore --pieces DIR --root ROOT --manifest bases.json    # there

``pack`` writes each ``ROOT/pretrain/seed<b>``'s run record (``metrics.json``) and final weights (``last.ckpt``'s
``state_dict`` and run info: all that the arms, ``glm_session.evaluate`` and ``run.py``'s fingerprint read; the
optimizer's state is left out) into one tar
archive cut into pieces of ``PIECE_MIB`` (four of them are what one call returns, and what one call carries beside
the working tree), and ``bases.json``: the archive's sha256, its pieces, and each base's weights sha256 as
``run.py`` computes it. ``restore`` joins the pieces, checks both sha256s, and writes the run folders back into
``ROOT`` with a ``restored.json`` beside each record, so that ``run.py`` finds the pretraining done and starts the
arms from the same weights, bit for bit; the driver's summary then lists those bases as restored, not as pretrained
in that session.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
# The driver (run.py, by its path: other experiments have a run.py too), for its fingerprint of a base.
_spec = importlib.util.spec_from_file_location("unseen_base_run", HERE / "run.py")
driver = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = driver  # dataclasses look their module up
_spec.loader.exec_module(driver)
RESTORED, base_fingerprint = driver.RESTORED, driver.base_fingerprint

PIECE_MIB = 13  # four pieces: what a call returns (64 MiB) and carries beside the ~6 MiB working tree
ARCHIVE = "bases.tar"


def pack(root: Path, out: Path, seeds: list[int]) -> dict:
    """Write the pieces and ``bases.json`` into ``out``; return the manifest."""
    buffer = io.BytesIO()
    bases = {}
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for seed in seeds:
            folder = root / f"pretrain/seed{seed}"
            checkpoint = folder / "checkpoints" / "last.ckpt"
            if driver.run_status(folder) != "completed":
                raise SystemExit(f"{folder}: its pretraining has not completed; nothing to pack")
            weights = io.BytesIO()
            saved = torch.load(checkpoint, map_location="cpu", weights_only=False)  # our own file
            torch.save({k: saved[k] for k in ("state_dict", "glm_session") if k in saved}, weights)  # no optimizer
            for name, data in ((f"pretrain/seed{seed}/metrics.json", (folder / "metrics.json").read_bytes()),
                               (f"pretrain/seed{seed}/checkpoints/last.ckpt", weights.getvalue())):  # fmt: skip
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            bases[f"pretrain/seed{seed}"] = base_fingerprint(checkpoint)
    data = buffer.getvalue()
    size = PIECE_MIB << 20
    pieces = [f"{ARCHIVE}.{i:03d}" for i in range((len(data) + size - 1) // size)]
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(pieces):
        (out / name).write_bytes(data[i * size : (i + 1) * size])
    manifest = {"archive_sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "pieces": pieces,
                "bases": bases}  # fmt: skip
    (out / "bases.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def with_run_info(checkpoint: Path, record: Path) -> None:
    """Give a packed checkpoint that holds weights only (session 9 packed them so) its run's ``glm_session`` entry,
    from the run record beside it (the same ``RunInfo``): ``glm_session.evaluate`` reads it to build the model."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if "glm_session" not in saved:
        saved["glm_session"] = json.loads(record.read_text())["run_info"]
        torch.save(saved, checkpoint)


def restore(pieces: Path, root: Path, manifest_path: Path) -> list[str]:
    """Join the pieces, check them against the manifest, write the run folders into ``root``; return their names.
    Folders restored before are left as they are."""
    manifest = json.loads(manifest_path.read_text())
    if all((root / name / RESTORED).is_file() for name in manifest["bases"]):
        return list(manifest["bases"])
    missing = [name for name in manifest["pieces"] if not (pieces / name).is_file()]
    if missing:
        raise SystemExit(
            f"{pieces}: {len(missing)} of {len(manifest['pieces'])} pieces missing ({', '.join(missing)})"
        )
    data = b"".join((pieces / name).read_bytes() for name in manifest["pieces"])
    if hashlib.sha256(data).hexdigest() != manifest["archive_sha256"]:
        raise SystemExit(f"{pieces}: the joined pieces' sha256 is not {manifest_path}'s (a piece is damaged)")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(root, filter="data")
    for name, sha256 in manifest["bases"].items():
        checkpoint = root / name / "checkpoints" / "last.ckpt"
        with_run_info(checkpoint, root / name / "metrics.json")
        found = base_fingerprint(checkpoint)
        if found != sha256:
            raise SystemExit(f"{root / name}: restored weights' sha256 {found} is not {sha256}")
        (root / name / RESTORED).write_text(json.dumps({"sha256": sha256, "from": str(manifest_path)}) + "\n")
    return list(manifest["bases"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="the bases into pieces and bases.json")
    packing.add_argument("--root", type=Path, required=True)
    packing.add_argument("--out", type=Path, required=True)
    packing.add_argument("--bases", nargs="+", type=int, default=[0, 1])
    restoring = commands.add_parser("restore", help="the pieces back into run folders")
    restoring.add_argument("--pieces", type=Path, required=True)
    restoring.add_argument("--root", type=Path, required=True)
    restoring.add_argument("--manifest", type=Path, default=HERE / "bases.json")
    args = parser.parse_args()
    if args.command == "pack":
        print(json.dumps(pack(args.root, args.out, args.bases), indent=1))
    else:
        print("restored:", " ".join(restore(args.pieces, args.root, args.manifest)))


if __name__ == "__main__":
    main()
