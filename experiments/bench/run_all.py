"""Every speed figure of issue 13 in one GPU call, beside the yardsticks measured in the same call.

    python experiments/bench/run_all.py --out OUT --baselines DIR [--parts PART ...] [--variants-1b NAME ...]
                                        [--variants-small NAME ...] [--fsdp-variants NAME ...] [--deadline SECONDS]
                                        [--profile-steps N] [--profile-skip N] [--work DIR]

Parts (each step a subprocess with its own time limit; results are written as they come):

- ``tests``: ``tests/test_gpu_kernels.py`` (the fast paths' loss and gradients against the reference path's) and
  ``tests/test_host_reads.py`` (no host synchronisation inside a fast-path step, torch's sync debug mode);
- ``variants``: ``bench.py`` on chatglm2-1b (KdConv session rows of 2,048 tokens, 16,384 tokens a step),
  session+packing on the reference path, on ``speed=fast`` and on it with parts taken away (``VARIANTS_1B``), then
  chatglm2-small on SMILE, session+packing, likewise (``VARIANTS_SMALL``: a step's overhead, not its arithmetic);
- ``profile_*``: ``profile_step.py`` on ``reference_step.py``'s base variant (``profile_reference``), the project's
  1b step on the same rows on its reference path (``profile_1b_reference``), its fast path (``profile_1b_fast``) and
  its whole decoder as CUDA graphs (``profile_1b_graphs``),
  and the small model's fast path (``profile_small_fast``) and its whole decoder as CUDA graphs
  (``profile_small_whole_cudagraphs``), and the 6B's ``trainer=fsdp speed=fast`` step on one GPU (``profile_6b_fast``,
  an H200: its states are 93 GiB) and that step as the fsdp part's ``scale_fast_recompute_half`` runs it
  (``profile_6b_recompute_half``);
- ``yardsticks``: ``reference_step.py`` (base and its best variant, flex_liger) and ``trl_peer.py`` on the project's
  own session rows;
- ``fsdp``: ``fsdp_step.py`` (plain FSDP2, 6B shape) and ``experiments/scale/run.py`` (the project's
  ``trainer=fsdp``, chatglm2-6b) on all GPUs (one included), with the chunked loss, with ``speed=fast`` and with
  FSDP2's options on top of it (``FSDP_VARIANTS``).

With two GPUs, the project's single-GPU runs go to GPU 0 while the yardsticks run on GPU 1; with one, in turn.
Rows, runs and logs stay in ``--work``; ``OUT`` gets ``results.json``, ``steps.json``, ``logs.tgz`` and ``scale.json``.
``results.json`` holds the project's runs, the yardsticks, the profiles and ``ratios``
(``session_packing_over_reference_best`` in tokens/s, ``session_packing_answer_over_trl`` in answer tokens/s,
``mfu_session_packing``, ``small_session_packing_tokens_per_second``, ``small_over_its_reference_path``);
``OUT/scale.json`` each GPU count with ``over_baseline`` (tokens/s per GPU over ``fsdp_step.py``'s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# The fast path is conf/speed/fast.yaml (flex attention, the chunked loss, liger's RMSNorm and SwiGLU, compiled
# decoder layers, fused AdamW, 4 loader workers into pinned memory, rows of one width); the variants take parts away.
FAST = ["speed=fast"]
NO_COMPILE, NO_LIGER, WHOLE_LOGITS = (
    ["model.compile_layers=false"],
    ["model.kernels=torch"],
    ["model.loss_chunk_tokens=null"],
)
ONE_B = [
    "model=chatglm2-1b",
    "data.max_seq_len=2048",
    "data.batch_tokens=16384",
    "trainer.max_steps=60",
    "metrics.warmup_batches=42",
]  # fmt: skip
# An epoch is 20 batches, its last one smaller: a new shape, compiled at batch 20 and, for CUDA graphs, recorded at its
# second call (batch 40; session 26's profile of batches 23-40). The timed batches (43-60) come after both.
SMALL = ["model=chatglm2-small", "data=smile", "data.max_seq_len=2048", "data.batch_tokens=16384",
         "trainer.max_steps=150", "metrics.warmup_batches=30"]  # fmt: skip
# FSDP2 on one GPU: its mixed precision casts each layer's fp32 weights to a bf16 copy once a step and keeps it from
# forward to backward (reshard_after_forward=false), where autocast casts at each call; nothing sharded, nothing
# recomputed (the fast path's 1B step keeps its activations). Last in a bench process: it starts a process group.
BF16_COPIES = ["trainer=fsdp", "trainer.devices=1", "trainer.strategy.activation_checkpointing=false",
               "trainer.strategy.reshard_after_forward=false"]  # fmt: skip
# The 6B as experiments/scale/run.py trains it, in this process on one GPU (a profile): FSDP2 on one device
SIX_B = ["trainer=fsdp", "model=chatglm2-6b", "trainer.devices=1", "data.max_seq_len=2048", "data.batch_tokens=8192"]
VARIANTS_1B = {  # name: overrides on top of session+packing ("reference": none)
    "reference": [],
    "fast": FAST,
    "fast-compile": FAST + NO_COMPILE,
    "fast-compile-liger": FAST + NO_COMPILE + NO_LIGER,
    "fast+bf16_copies": FAST + BF16_COPIES,
    # the whole decoder as one graph, liger's kernels left to inductor's fusion (it refuses them inside one graph):
    # the casts, norms, SwiGLU and residuals fused across layer boundaries too
    "fast+whole_graph": FAST + NO_LIGER + ["model.compile_scope=model"],
    # ... and replayed as CUDA graphs (speed=graphs), the chunked loss kept (it computes the 65,024-token output layer
    # only at the trained positions, 36% of KdConv's tokens); what it takes is a GPU-bound step's gaps (run 6: 93% busy)
    "fast+whole_cudagraphs": ["speed=graphs", "model.loss_chunk_tokens=8192"],
}
# chatglm2-small's vocabulary of 6,144: its whole logits cost less than the chunked loss's host work; liger left out
VARIANTS_SMALL = {
    "reference": [],
    "fast": FAST + NO_LIGER + WHOLE_LOGITS,
    "fast+chunked": FAST + NO_LIGER,
    # each layer's forward and backward replayed as CUDA graphs, one per batch shape (static: a few row counts)
    "fast+cudagraphs": FAST + NO_LIGER + WHOLE_LOGITS + ["model.compile_mode=reduce-overhead",
                                                         "model.compile_dynamic=false"],  # fmt: skip
    # the whole decoder as one graph (embedding, mask, layers, norm): transformers' forward runs at compilation only
    "fast+whole_graph": FAST + NO_LIGER + WHOLE_LOGITS + ["model.compile_scope=model"],
    # ... and its forward and backward each replayed as one CUDA graph (static: a graph per row count): speed=graphs
    # is FAST + NO_LIGER + WHOLE_LOGITS + compile_scope=model, compile_mode=reduce-overhead, compile_dynamic=false
    "fast+whole_cudagraphs": ["speed=graphs"],
    "fast+batch_65536": FAST
    + NO_LIGER
    + WHOLE_LOGITS
    + ["data.batch_tokens=65536", "trainer.max_steps=60", "metrics.warmup_batches=15"],  # fmt: skip
}
FSDP_VARIANTS = {  # name: overrides of experiments/scale/run.py's trainer=fsdp chatglm2-6b run
    "scale": [],  # the chunked loss alone
    "scale_fast": FAST,
    "scale_fast_keep_gathered": FAST + ["trainer.strategy.reshard_after_forward=false"],  # one gather a step
    "scale_fast_prefetch2": FAST + ["trainer.strategy.prefetch=2"],
    # selective activation checkpointing: every second layer recomputed, the others keep their activations (7N
    # instead of 8N FLOPs a token, at the memory of 14 layers' activations; an out-of-memory run is tried again with
    # half the micro-batch by experiments/scale/run.py)
    "scale_fast_recompute_half": FAST + ["trainer.strategy.checkpoint_every_n_layers=2"],
    # nothing recomputed (6N FLOPs a token instead of 8N): every layer's activations kept, about 1.2 GB a layer at
    # 4,096 tokens on top of the 93 GiB of states; two micro-batches a step keep 8,192 tokens a step
    "scale_fast_no_recompute": FAST + ["trainer.strategy.activation_checkpointing=false",
                                       "trainer.accumulate_grad_batches=2"],  # fmt: skip
}
FSDP_BATCH_TOKENS = {"scale_fast_no_recompute": 4096}  # the first micro-batch tried (halved if out of memory): 16,384
PARTS = ["tests", "variants", "profile_reference", "profile_1b_reference", "profile_1b_fast", "profile_1b_graphs",
         "profile_small_fast",
         "profile_small_whole_cudagraphs", "profile_6b_fast", "profile_6b_recompute_half", "yardsticks",
         "fsdp"]  # fmt: skip


class Steps:
    """Runs steps as subprocesses, each within its limit and the call's deadline; logs to ``log``."""

    def __init__(self, log: Path, deadline: float) -> None:
        self.log, self.deadline, self.records = log, deadline, []

    def __call__(
        self, name: str, command: list[str], limit: float, gpus: str = "0", env: dict | None = None
    ) -> None:
        left = self.deadline - time.monotonic()
        if left < 20:
            self.records.append({"step": name, "returncode": "skipped: the call's deadline"})
            print(json.dumps(self.records[-1]), flush=True)
            return
        environment = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus, "PYTHONUNBUFFERED": "1", **(env or {})}
        started = time.perf_counter()
        # Its own process group: past its limit the step is killed with everything it started (torchrun's workers
        # would otherwise keep the GPU's memory and the rendezvous port from the next step)
        process = subprocess.Popen(command, cwd=ROOT, env=environment, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
        try:
            stdout, stderr = process.communicate(timeout=min(limit, left))
            code = process.returncode
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            code = "timeout"
        output = stdout + stderr
        (self.log / f"{name}.log").write_text(output)
        self.records.append({"step": name, "returncode": code, "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(self.records[-1]), flush=True)


def check_variants(variants: dict[str, list[str]], chosen: list[str]) -> None:
    """Every chosen name is one of ``variants``, or the call stops before it spends GPU time."""
    unknown = set(chosen) - set(variants)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}: choose from {list(variants)}")


def bench_arguments(variants: dict[str, list[str]], chosen: list[str]) -> list[str]:
    """``bench.py``'s ``--only`` and ``--variant`` arguments for the chosen variants ("reference": the plain run)."""
    check_variants(variants, chosen)
    only = ["--only", *(["session+packing"] if "reference" in chosen else [])]
    # What a run leaves in bench.py's process goes last: CUDA graphs' memory pools (held to the process's end: the
    # 1B's fast+whole_graph ran out of memory after fast+whole_cudagraphs on 2026-12-06), then a process group
    last = sorted(chosen, key=lambda n: ("trainer=fsdp" in variants[n], "speed=graphs" in variants[n]))
    extra = [("--variant", f"session+packing {n}={','.join(variants[n])}") for n in last if n != "reference"]
    return only + [a for pair in extra for a in pair]


def project_steps(
    out: Path,
    parts: list[str],
    one_b: list[str],
    small: list[str],
    profile_steps: int = 4,
    profile_skip: int | None = None,
) -> list[tuple[str, str, list[str], float]]:
    py, bench, profile = sys.executable, "experiments/bench/bench.py", "experiments/bench/profile_step.py"
    steps = []
    if "tests" in parts:
        test = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_kernels.py",
                "tests/test_host_reads.py", "--junitxml", str(out / "gpu_tests.xml")]  # fmt: skip
        steps.append(("tests", "gpu_tests", test, 240))
    if "variants" in parts and one_b:
        arguments = bench_arguments(VARIANTS_1B, one_b)
        steps.append(
            ("variants", "bench_1b", [py, bench, "--out", str(out / "bench_1b"), *arguments, "--", *ONE_B], 420)
        )
    if "variants" in parts and small:
        arguments = bench_arguments(VARIANTS_SMALL, small)
        steps.append(("variants", "bench_small", [py, bench, "--out", str(out / "bench_small"), *arguments, "--", *SMALL],
                      200))  # fmt: skip
    profiles = {  # name: (warm-up batches, overrides, seconds)
        "profile_1b_reference": (6, ONE_B, 120),
        "profile_1b_fast": (6, ONE_B + FAST, 120),
        "profile_1b_graphs": (6, ONE_B + VARIANTS_1B["fast+whole_cudagraphs"], 240),
        "profile_small_fast": (20, SMALL + VARIANTS_SMALL["fast"], 120),
        "profile_small_whole_cudagraphs": (20, SMALL + VARIANTS_SMALL["fast+whole_cudagraphs"], 150),
        "profile_6b_fast": (4, SIX_B + FAST, 240),
        # the fsdp part's best run on one H200 (2026-12-06): its micro-batch (the later data.batch_tokens wins over
        # SIX_B's), the chunked loss, half the layers recomputed
        "profile_6b_recompute_half": (4, SIX_B + ["data.batch_tokens=16384", "model.loss_chunk_tokens=8192",
                                                  *FSDP_VARIANTS["scale_fast_recompute_half"]], 240),  # fmt: skip
    }
    for name, (skip, overrides, seconds) in profiles.items():
        if name in parts:
            steps.append((name, name, [py, profile, "--of", "project", "--out", str(out / f"{name}.json"), "--skip",
                                       str(skip if profile_skip is None else profile_skip), "--steps",
                                       str(profile_steps), "--", *overrides,
                                 "strategy=session", "data.packing=true"], seconds))  # fmt: skip
    return steps


def yardstick_steps(out: Path, baselines: Path, parts: list[str]) -> list[tuple[str, str, list[str], float]]:
    py, rows = sys.executable, str(out / "rows.jsonl")
    steps = []
    if "profile_reference" in parts:
        steps.append(("profile_reference", "profile_reference", [py, "experiments/bench/profile_step.py", "--of", "reference", "--out",
                                            str(out / "profile_reference.json"), "--baselines", str(baselines),
                                            "--rows", rows], 150))  # fmt: skip
    if "yardsticks" in parts:
        steps.append(("yardsticks", "reference_step", [py, str(baselines / "reference_step.py"), "--rows", rows, "--out",
                                         str(out / "reference_step.json"), "--variants", "base,flex_liger", "--steps",
                                         "10", "--attention-bench", "0"], 170))  # fmt: skip
        steps.append(("yardsticks", "trl_peer", [py, str(baselines / "trl_peer.py"), "--rows", rows, "--out",
                                   str(out / "trl_peer.json"), "--steps", "30"], 130))  # fmt: skip
    return steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--baselines", type=Path, required=True)
    parser.add_argument("--parts", nargs="*", default=PARTS, help=f"any of {', '.join(PARTS)}")
    parser.add_argument("--variants-1b", nargs="*", default=list(VARIANTS_1B), help=f"of {list(VARIANTS_1B)}")
    parser.add_argument(
        "--variants-small", nargs="*", default=list(VARIANTS_SMALL), help=f"of {list(VARIANTS_SMALL)}"
    )
    parser.add_argument("--fsdp-variants", nargs="*", default=list(FSDP_VARIANTS), help=f"of {list(FSDP_VARIANTS)}")
    parser.add_argument("--deadline", type=float, default=560, help="seconds for the whole call")
    parser.add_argument("--profile-steps", type=int, default=4, help="training batches each profile covers")
    parser.add_argument(
        "--profile-skip", type=int, default=None, help="warm-up batches before each profile (default: its own)"
    )
    parser.add_argument("--work", type=Path, default=None, help="rows, runs and logs (empty; default: a new folder)")
    args = parser.parse_args()
    check_variants(FSDP_VARIANTS, args.fsdp_variants)
    # summarise() gathers every run in the work folder: a folder kept from an earlier call (a warm machine keeps
    # /tmp) would mix that call's runs, measured beside other yardsticks, into this call's results
    if args.work is None:
        args.work = Path(tempfile.mkdtemp(prefix="glm_session_bench_"))
    elif args.work.exists() and any(args.work.iterdir()):
        parser.error(f"--work {args.work} is not empty: its runs would be gathered into this call's results")
    out, log = args.work, args.work / "logs"  # results.json, scale.json, steps.json and logs.tgz go to --out
    log.mkdir(parents=True, exist_ok=True)
    run = Steps(log, time.monotonic() + args.deadline)
    os.environ["GLM_SESSION_KERNEL_REPORT"] = str(out / "gpu_kernels.jsonl")  # tests/test_gpu_kernels.py's errors
    py, gpus = sys.executable, torch.cuda.device_count()
    run("rows", [py, "-m", "glm_session.data", "export", "strategy=session", "data.packing=false", "template=chatglm2",
                 "data.max_seq_len=2048", f"out={out / 'rows.jsonl'}"], 120, gpus="")  # fmt: skip
    project, yardsticks = (
        project_steps(out, args.parts, args.variants_1b, args.variants_small, args.profile_steps, args.profile_skip),
        yardstick_steps(out, args.baselines, args.parts),
    )
    if gpus >= 2:  # two lanes side by side
        lanes = [subprocess.Popen([py, "-c", _lane_code(steps, gpu, log, run.deadline)], cwd=ROOT)
                 for steps, gpu in ((project, "0"), (yardsticks, "1"))]  # fmt: skip
        for lane, gpu in zip(lanes, "01", strict=True):
            lane.wait()
            run.records += _json(log / f"lane{gpu}.json") or []
    else:  # in the order of --parts
        for part in args.parts:
            for _, name, command, limit in [s for s in project + yardsticks if s[0] == part]:
                run(name, command, limit)
    if "fsdp" in args.parts:
        all_gpus = ",".join(map(str, range(gpus)))
        run("fsdp_step", [py, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}",
                          str(args.baselines / "fsdp_step.py")], 110, gpus=all_gpus, env={"MB": "4", "STEPS": "10"})  # fmt: skip
        for name in args.fsdp_variants:
            extra = FSDP_VARIANTS[name]
            run(name, [py, "experiments/scale/run.py", "--out", str(out / f"{name}_project.json"), "--runs",
                       str(out / f"{name}_runs"), "--gpus", str(gpus), "--steps", "16", "--warmup", "4", "--batch-tokens",
                       str(FSDP_BATCH_TOKENS.get(name, 16384)), "model.loss_chunk_tokens=8192", *extra], 200,
                 gpus=all_gpus)  # fmt: skip
    (out / "steps.json").write_text(json.dumps(run.records, indent=1) + "\n")
    summarise(out)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "scale.json", "steps.json"):
        if (out / name).exists():
            shutil.copy(out / name, args.out / name)
    subprocess.run(["tar", "czf", str(args.out / "logs.tgz"), "-C", str(out), "logs"], check=False)


def _lane_code(steps: list, gpu: str, log: Path, deadline: float) -> str:
    here = str(Path(__file__).parent)
    return (f"import sys; sys.path.insert(0, {here!r}); import run_all; from pathlib import Path; "
            f"run = run_all.Steps(Path({str(log)!r}), {deadline!r}); "
            f"[run(n, c, t, {gpu!r}) for _, n, c, t in {steps!r}]; "
            f"Path({str(log)!r}, 'lane{gpu}.json').write_text(run_all.json.dumps(run.records))")  # fmt: skip


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def summarise(out: Path) -> None:
    one_b, small = _json(out / "bench_1b" / "results.json"), _json(out / "bench_small" / "results.json")
    reference, trl = _json(out / "reference_step.json"), _json(out / "trl_peer.json")
    runs = {r["name"]: r for r in (one_b or {}).get("results", []) if "error" not in r}
    packing = [r for name, r in runs.items() if name.startswith("session+packing") and r["batch_tokens"] == 16384]
    best = max(packing, key=lambda r: r["tokens_per_second"], default=None)
    ref_ok = [v for v in (reference or {}).get("variants", []) if "error" not in v]
    ref_best = max(ref_ok, key=lambda v: v["real_tokens_per_second"], default=None)
    # like for like: the ratios take runs of 16,384 tokens a step, as the yardsticks and the targets
    small_runs = [r for r in (small or {}).get("results", []) if "error" not in r and r["batch_tokens"] == 16384]
    small_best = max(small_runs, key=lambda r: r["tokens_per_second"], default=None)
    small_reference = next((r for r in small_runs if r["name"] == "session+packing"), None)
    ratios = {
        "session_packing_over_reference_best": best["tokens_per_second"] / ref_best["real_tokens_per_second"]
        if best and ref_best else None,
        "session_packing_answer_over_trl": best["answer_tokens_per_second"] / trl["answer_tokens_per_second"]
        if best and trl and trl.get("answer_tokens_per_second") else None,
        "mfu_session_packing": best["mfu"] if best else None,
        "small_session_packing_tokens_per_second": small_best["tokens_per_second"] if small_best else None,
        "small_over_its_reference_path": small_best["tokens_per_second"] / small_reference["tokens_per_second"]
        if small_best and small_reference else None,
        "best_session_packing": best["name"] if best else None,
        "best_small_session_packing": small_best["name"] if small_best else None,
        "reference_best_variant": ref_best["variant"] if ref_best else None,
    }  # fmt: skip
    fsdp_log = out / "logs" / "fsdp_step.log"
    lines = (
        [line for line in fsdp_log.read_text().splitlines() if line.startswith("{")] if fsdp_log.exists() else []
    )
    baseline = json.loads(lines[-1]) if lines else None
    scale = []
    runs = [{**r, "variant": name} for name in FSDP_VARIANTS
            for r in (_json(out / f"{name}_project.json") or {}).get("results", [])]  # fmt: skip
    for r in runs:
        if r.get("tokens_per_second_per_gpu") and baseline:
            r["over_baseline"] = r["tokens_per_second_per_gpu"] / baseline["tok_s_per_gpu"]
        scale.append(r)
    if scale or baseline:
        (out / "scale.json").write_text(json.dumps({"results": scale, "fsdp_step": baseline}, indent=1) + "\n")
    one_gpu = [r for r in scale if r.get("gpus") == 1 and r.get("over_baseline")]
    best_one_gpu = max(one_gpu, key=lambda r: r["over_baseline"], default=None)
    ratios["fsdp_1gpu_over_baseline"] = best_one_gpu["over_baseline"] if best_one_gpu else None
    ratios["mfu_6b_1gpu"] = best_one_gpu["mfu"] if best_one_gpu else None
    ratios["best_fsdp_1gpu_variant"] = best_one_gpu["variant"] if best_one_gpu else None
    profiles = {name: _json(out / f"{name}.json") for name in PARTS if name.startswith("profile_")}
    gpu_tests = (out / "gpu_tests.xml").read_text() if (out / "gpu_tests.xml").exists() else None
    report = out / "gpu_kernels.jsonl"
    kernel_errors = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else None
    (out / "results.json").write_text(json.dumps({
        "machine": f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else None,
        "ratios": ratios, "project_1b": one_b, "project_small": small, "reference_step": reference, "trl_peer": trl,
        "profiles": profiles, "gpu_tests_junit": gpu_tests, "fast_path_errors": kernel_errors, "steps": _json(out / "steps.json"),
    }, indent=1) + "\n")  # fmt: skip
    print(json.dumps(ratios, indent=1))


if __name__ == "__main__":
    main()
