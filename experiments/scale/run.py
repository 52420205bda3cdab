"""Full fine-tuning of the chatglm2-6b preset with trainer=fsdp (FSDP2), on 1, 2, 4, ... of this host's GPUs.

    python experiments/scale/run.py --out results.json [--runs DIR] [--gpus 1 2 4] [--steps 30] [-- overrides]

Each run is ``torchrun --nproc_per_node=N -m glm_session.train trainer=fsdp model=chatglm2-6b`` on KdConv with
session samples packed into rows of 2,048 tokens, AdamW, random initialisation (the cost is that of the real
weights), ``--steps`` optimizer steps after which it stops; no validation or checkpoints (a 6B sharded checkpoint
with its optimizer states is ~75 GB). The first ``--warmup`` batches are left out of the rates. It records per run
the metrics.json (tokens/s, answer tokens/s, MFU over 989 TFLOP/s per GPU, peak memory of rank 0's GPU) or, for a
run that fails, its exit status and the end of its log; out of memory, it is tried again with half the micro-batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from transformers import GlmForCausalLM

from glm_session.model import chatglm2_config
from glm_session.run_status import run_status

SCALE = [
    "trainer=fsdp",
    "model=chatglm2-6b",
    "strategy=session",
    "data.packing=true",
    "data.max_seq_len=2048",
    "profile=throughput",
]


# fp32 weights, gradients and AdamW's two moments, sharded over the GPUs: a floor under a run's memory (the
# activations and the gathered bf16 layers come on top; one H200 measured 101.6 GiB for the 6B)
STATE_BYTES_PER_PARAMETER = 16


def states_gib(gpus: int) -> float:
    """The GiB of training state each of ``gpus`` GPUs holds for the chatglm2-6b preset (counted on meta)."""
    with torch.device("meta"):
        model = GlmForCausalLM(chatglm2_config("chatglm2-6b"))
    return sum(p.numel() for p in model.parameters()) * STATE_BYTES_PER_PARAMETER / gpus / 2**30


def why_it_cannot_fit(gpus: int, card_gib: float) -> str | None:
    """Why a run on ``gpus`` cards of ``card_gib`` would be out of memory at any micro-batch, or ``None``."""
    needed = states_gib(gpus)
    if needed <= card_gib:
        return None
    return f"{needed:.1f} GiB of weights, gradients and AdamW states per GPU; this card has {card_gib:.1f} GiB"


def run(gpus: int, steps: int, warmup: int, batch_tokens: int, runs: Path, overrides: list[str]) -> dict:
    folder = runs / f"gpus{gpus}"
    # --standalone: a free port for the rendezvous, whatever else runs on the host
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m",
               "glm_session.train", *SCALE, f"trainer.devices={gpus}", f"trainer.max_steps={steps}",
               f"metrics.warmup_batches={warmup}", f"data.batch_tokens={batch_tokens}", f"hydra.run.dir={folder}",
               *overrides]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ)
    record = {"gpus": gpus, "command": " ".join(["torchrun", *command[3:]]), "returncode": result.returncode,
              "seconds": time.perf_counter() - started}  # fmt: skip
    (runs / f"gpus{gpus}.log").write_text(result.stdout + result.stderr)
    record["status"] = run_status(folder)  # "completed" only from the run's own record, never the exit code alone
    if result.returncode != 0 or record["status"] != "completed":
        record["log_tail"] = (result.stdout + result.stderr)[-4000:]
        return record
    metrics = json.loads((folder / "metrics.json").read_text())
    keep = ("parameters", "devices", "global_steps", "warmup_batches", "input_tokens", "supervised_tokens",
            "train_seconds", "tokens_per_second", "supervised_tokens_per_second", "train_flops", "mfu",
            "peak_memory_gib", "peak_reserved_gib", "accelerator", "train_loss_by_epoch")  # fmt: skip
    record.update({k: metrics.get(k) for k in keep})
    record["tokens_per_second_per_gpu"] = metrics["tokens_per_second"] / gpus
    record["supervised_tokens_per_second_per_gpu"] = metrics["supervised_tokens_per_second"] / gpus
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the JSON results file")
    parser.add_argument("--runs", type=Path, default=Path("outputs/scale"), help="run folders and logs")
    parser.add_argument("--gpus", type=int, nargs="*", help="GPU counts (default: 1, 2, 4, ... up to all)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per micro-batch and GPU")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    # the record and the halving after an out-of-memory run go by --batch-tokens, which such an override would beat
    if any(o.startswith("data.batch_tokens=") for o in args.overrides):
        parser.error("give the micro-batch as --batch-tokens N, not as the override data.batch_tokens=N")
    available = torch.cuda.device_count()
    gpus = args.gpus or [n for n in (1, 2, 4, 8) if n <= available]
    args.runs.mkdir(parents=True, exist_ok=True)
    results = []
    card_gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if available else None
    for n in sorted(gpus, reverse=True):  # the largest first: the headline run
        reason = why_it_cannot_fit(n, card_gib) if card_gib else None
        if reason:  # not worth a launch
            results.append({"gpus": n, "returncode": "skipped", "reason": reason})
            print(json.dumps(results[-1]), flush=True)
            continue
        batch_tokens = args.batch_tokens
        while True:  # out of memory: again with half the micro-batch, down to one row
            print(f"== {n} GPU(s), {batch_tokens} tokens per micro-batch", flush=True)
            results.append(run(n, args.steps, args.warmup, batch_tokens, args.runs, args.overrides))
            results[-1]["batch_tokens"] = batch_tokens
            print(json.dumps({k: v for k, v in results[-1].items() if k != "log_tail"}, indent=1), flush=True)
            if results[-1]["returncode"] == 0:
                break
            print(results[-1]["log_tail"][-2000:], flush=True)
            if "out of memory" not in results[-1]["log_tail"] or batch_tokens <= 2048:
                break
            batch_tokens //= 2
    summary = {
        "date": date.today().isoformat(),
        "machine": f"{available}x {torch.cuda.get_device_name(0)}" if available else "no GPU",
        "torch": torch.__version__,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
