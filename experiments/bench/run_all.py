"""Every speed figure of issue 13 in one GPU call, beside the yardsticks measured in the same call.

    python experiments/bench/run_all.py --out OUT --baselines DIR [--budget 540]

On a host of 2 GPUs, three lanes (each step a subprocess with its own time limit, results written as they come):

- GPU 0: ``bench.py`` on chatglm2-1b (KdConv rows of 2,048 tokens, 16,384 tokens a step): split+padding, and
  session+packing on the reference path and on the fast path (``FAST``); then chatglm2-small on SMILE, session+packing,
  both paths (the overhead of a step, not its arithmetic);
- GPU 1: the yardsticks of ``DIR`` (``../shared/baselines``): ``reference_step.py`` (base and its best variant,
  flex_liger) and ``trl_peer.py`` on the project's own session rows;
- then both GPUs: ``fsdp_step.py`` (plain FSDP2, 6B shape) and ``experiments/scale/run.py`` (the project's
  ``trainer=fsdp``, chatglm2-6b) on 2 GPUs.

It writes ``OUT/results.json`` (the project's runs, the yardsticks, and ``ratios``: ``session_packing_over_reference_best``
in tokens/s, ``session_packing_answer_over_trl`` in answer tokens/s, ``mfu_session_packing``,
``small_session_packing_tokens_per_second``) and ``OUT/scale.json`` (each GPU count with ``over_baseline``: tokens/s
per GPU over ``fsdp_step.py``'s).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The fast path: attention that skips other samples' blocks, logits only at the trained positions, fused AdamW,
# data loading in worker processes.
FAST = ["model.attn_implementation=flex_attention", "model.loss_chunk_tokens=8192", "+optimizer.fused=true",
        "data.num_workers=2", "data.pin_memory=true", "data.pad_to=max_seq_len"]  # fmt: skip


def step(name: str, command: list[str], gpus: str, limit: float, log: Path) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    try:
        result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        output, code = result.stdout + result.stderr, result.returncode
    except subprocess.TimeoutExpired as err:
        output, code = (err.stdout or b"").decode() + (err.stderr or b"").decode(), "timeout"
    (log / f"{name}.log").write_text(output)
    record = {"step": name, "returncode": code, "seconds": round(time.perf_counter() - started, 1)}
    print(json.dumps(record), flush=True)
    return record


def lane(steps: list[tuple[str, list[str], float]], gpus: str, log: Path) -> list[dict]:
    return [step(name, command, gpus, limit, log) for name, command, limit in steps]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--baselines", type=Path, required=True)
    args = parser.parse_args()
    out, log = args.out, args.out / "logs"
    log.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    rows = out / "rows.jsonl"
    bench = "experiments/bench/bench.py"
    fast = ",".join(FAST)
    chunked = ",".join(o for o in FAST if "flex" not in o)  # the fast path with SDPA: in case flex attention fails
    one_b = ["model=chatglm2-1b", "data.max_seq_len=2048", "data.batch_tokens=16384", "trainer.max_steps=25",
             "metrics.warmup_batches=5"]  # fmt: skip
    small = ["model=chatglm2-small", "data=smile", "data.max_seq_len=2048", "data.batch_tokens=16384",
             "trainer.max_steps=120", "metrics.warmup_batches=20"]  # fmt: skip
    step("rows", [py, "-m", "glm_session.data", "export", "strategy=session", "data.packing=false", "template=chatglm2",
                  "data.max_seq_len=2048", f"out={rows}"], "", 120, log)  # fmt: skip
    gpu0 = [
        ("bench_1b", [py, bench, "--out", str(out / "bench_1b"), "--only", "split+padding", "session+packing",
                      "--variant", f"session+packing fast={fast}", "--variant", f"session+packing chunked={chunked}",
                      "--", *one_b], 270),
        ("bench_small", [py, bench, "--out", str(out / "bench_small"), "--only", "session+packing",
                         "--variant", f"session+packing fast={fast}", "--", *small], 130),
    ]  # fmt: skip
    gpu1 = [
        ("reference_step", [py, str(args.baselines / "reference_step.py"), "--rows", str(rows), "--out",
                            str(out / "reference_step.json"), "--variants", "base,flex_liger", "--steps", "10",
                            "--attention-bench", "0"], 170),
        ("trl_peer", [py, str(args.baselines / "trl_peer.py"), "--rows", str(rows), "--out", str(out / "trl_peer.json"),
                      "--steps", "30"], 130),
    ]  # fmt: skip
    processes = []
    for steps, gpus in ((gpu0, "0"), (gpu1, "1")):  # two lanes side by side
        code = f"import json,sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import run_all; from pathlib import Path; run_all.lane({steps!r}, {gpus!r}, Path({str(log)!r}))"
        processes.append(subprocess.Popen([py, "-c", code], cwd=ROOT))
    for process in processes:
        process.wait()
    env_steps = {"MB": "4", "STEPS": "10"}
    os.environ.update(env_steps)
    step("fsdp_step", [py, "-m", "torch.distributed.run", "--nproc_per_node=2", str(args.baselines / "fsdp_step.py")],
         "0,1", 110, log)  # fmt: skip
    step("scale_2gpu", [py, "experiments/scale/run.py", "--out", str(out / "scale_project.json"), "--runs",
                        str(out / "scale_runs"), "--gpus", "2", "--steps", "16", "--warmup", "4", "--batch-tokens",
                        "16384", "model.loss_chunk_tokens=8192"], "0,1", 160, log)  # fmt: skip
    summarise(out)


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def summarise(out: Path) -> None:
    one_b, small = _json(out / "bench_1b" / "results.json"), _json(out / "bench_small" / "results.json")
    reference, trl = _json(out / "reference_step.json"), _json(out / "trl_peer.json")
    runs = {r["name"]: r for r in (one_b or {}).get("results", []) if "error" not in r}
    packing = [r for name, r in runs.items() if name.startswith("session+packing")]
    best = max(packing, key=lambda r: r["tokens_per_second"], default=None)
    ref_ok = [v for v in (reference or {}).get("variants", []) if "error" not in v]
    ref_best = max(ref_ok, key=lambda v: v["real_tokens_per_second"], default=None)
    small_runs = [r for r in (small or {}).get("results", []) if "error" not in r]
    ratios = {
        "session_packing_over_reference_best": best["tokens_per_second"] / ref_best["real_tokens_per_second"]
        if best and ref_best else None,
        "session_packing_answer_over_trl": best["answer_tokens_per_second"] / trl["answer_tokens_per_second"]
        if best and trl and trl.get("answer_tokens_per_second") else None,
        "mfu_session_packing": best["mfu"] if best else None,
        "small_session_packing_tokens_per_second": max((r["tokens_per_second"] for r in small_runs), default=None),
        "best_session_packing": best["name"] if best else None,
        "reference_best_variant": ref_best["variant"] if ref_best else None,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps({"ratios": ratios, "project_1b": one_b, "project_small": small,
                                                "reference_step": reference, "trl_peer": trl}, indent=1) + "\n")  # fmt: skip
    fsdp_log = out / "logs" / "fsdp_step.log"
    lines = (
        [line for line in fsdp_log.read_text().splitlines() if line.startswith("{")] if fsdp_log.exists() else []
    )
    baseline = json.loads(lines[-1]) if lines else None
    project = _json(out / "scale_project.json")
    scale = []
    for r in (project or {}).get("results", []):
        if r.get("tokens_per_second_per_gpu") and baseline:
            r["over_baseline"] = r["tokens_per_second_per_gpu"] / baseline["tok_s_per_gpu"]
        scale.append(r)
    (out / "scale.json").write_text(json.dumps({"results": scale, "fsdp_step": baseline}, indent=1) + "\n")
    print(json.dumps(ratios, indent=1))
    print(json.dumps([{k: r.get(k) for k in ("gpus", "tokens_per_second_per_gpu", "mfu", "peak_memory_gib",
                                             "over_baseline", "batch_tokens")} for r in scale], indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
