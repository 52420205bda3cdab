"""Where a training step's time goes: the project's step and ``reference_step.py``'s, profiled the same way.

    python experiments/bench/profile_step.py --of project --out OUT.json [--steps 4] -- [train overrides]
    python experiments/bench/profile_step.py --of reference --out OUT.json --baselines DIR --rows ROWS.jsonl [--variant base]

``--of project`` trains with ``python -m glm_session.train``'s code (``profile=throughput``) and profiles ``--steps``
training batches after ``--skip`` warm-up batches; ``--of reference`` runs ``reference_step.py``'s variant once to warm
up (kernel selection, compilation), then again under the profiler for ``--steps`` steps (its own loop, with a
synchronisation around every step). Both write the same summary:

- ``wall_ms_per_step`` and ``kernel_ms_per_step`` (the GPU's kernel time; their ratio is how busy the GPU was);
- kernel time by kind (matrix products, attention, loss, optimizer, copies and casts, other element-wise work);
- host synchronisations per step (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``)
  and the CPU time of the step's Python and launches;
- the 25 kernels that take longest, and the 25 CPU operators with the most self time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

KINDS = (  # the first kind whose words occur in a kernel's name (lower case)
    ("attention", ("flash", "fmha", "attention", "flex", "triton_tem_fused")),
    ("matrix products", ("gemm", "nvjet", "cutlass", "sm90_xmma", "sm80_xmma", "cublas", "splitk")),
    ("loss (softmax, cross-entropy)", ("softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("optimizer", ("adam", "multi_tensor_apply", "foreach", "norm")),
    ("copies and casts", ("copy", "memcpy", "memset", "cat", "index", "scatter", "gather", "fill")),
)
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def kind(name: str) -> str:
    lower = name.lower()
    return next((k for k, words in KINDS if any(w in lower for w in words)), "other element-wise")


def summarise(prof: profile, wall_seconds: float, steps: int) -> dict:
    averages = prof.key_averages()
    kernels = [
        e
        for e in averages
        if e.device_type == DeviceType.CUDA
        and e.self_device_time_total > 0
        and not (e.is_user_annotation or "#" in e.key)
    ]  # fmt: skip  (annotations span whole steps)
    kernel_us = sum(e.self_device_time_total for e in kernels)
    by_kind: dict[str, float] = {}
    for e in kernels:
        by_kind[kind(e.key)] = by_kind.get(kind(e.key), 0.0) + e.self_device_time_total
    cpu_ops = [e for e in averages if e.device_type == DeviceType.CPU]
    syncs = {name: sum(e.count for e in cpu_ops if e.key == name) / steps for name in SYNCS}
    return {
        "steps": steps,
        "wall_ms_per_step": 1e3 * wall_seconds / steps,
        "kernel_ms_per_step": kernel_us / 1e3 / steps,
        "gpu_busy_fraction": kernel_us / 1e6 / wall_seconds,
        "kernel_ms_per_step_by_kind": {
            k: v / 1e3 / steps for k, v in sorted(by_kind.items(), key=lambda x: -x[1])
        },
        "kernel_launches_per_step": sum(e.count for e in kernels) / steps,
        "host_synchronisations_per_step": syncs,
        "top_kernels": _top(kernels, "self_device_time_total", "ms_per_step", steps),
        "top_cpu_ops": _top(cpu_ops, "self_cpu_time_total", "self_cpu_ms_per_step", steps),
    }


def _top(events: list, time: str, name: str, steps: int, count: int = 25) -> list[dict]:
    """The ``count`` events with the most ``time`` (microseconds), per step."""
    ranked = sorted(events, key=lambda e: -getattr(e, time))[:count]
    return [{"name": e.key[:120], name: getattr(e, time) / 1e3 / steps, "calls_per_step": e.count / steps}
            for e in ranked]  # fmt: skip


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class ProfileSteps(L.Callback):
    """Profile training batches ``skip`` .. ``skip + steps - 1`` (the device waited for at both ends)."""

    def __init__(self, skip: int, steps: int) -> None:
        self.skip, self.steps, self.summary = skip, steps, None
        self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.fit_loop.total_batch_idx == self.skip:
            _synchronize()
            self.prof.start()
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.total_batch_idx == self.skip + self.steps - 1:
            _synchronize()
            wall = time.perf_counter() - self.started
            self.prof.stop()
            self.summary = summarise(self.prof, wall, self.steps)


def project(args: argparse.Namespace) -> dict:
    from glm_session.config import compose_config
    from glm_session.train import train

    callback = ProfileSteps(args.skip, args.steps)
    steps = f"trainer.max_steps={args.skip + args.steps}"
    cfg = compose_config("train", ["profile=throughput", *args.overrides, steps, f"output_dir={args.runs}"])
    train(cfg, extra_callbacks=[callback])
    return {"what": "project", "overrides": args.overrides, **callback.summary}


def reference(args: argparse.Namespace) -> dict:
    spec = importlib.util.spec_from_file_location("reference_step", args.baselines / "reference_step.py")
    ref = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(args.baselines))
    spec.loader.exec_module(ref)
    from shapes import chatglm2_config

    batches, _ = ref.pack(ref.read_samples(str(args.rows)), 6)
    ref.register_flexdoc(compile_flex=True)

    def config():
        return chatglm2_config("chatglm2-1b", vocab_size=65024)

    ref.run_variant(args.variant, config, batches, 3, 2, "cuda", use_autocast=True)  # warm-up
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    torch.cuda.synchronize()
    with prof:
        result = ref.run_variant(args.variant, config, batches, args.steps, 0, "cuda", use_autocast=True)
    wall = sum(result["step_seconds"])  # the steps only (model creation left out)
    return {"what": f"reference_step {args.variant}", **summarise(prof, wall, args.steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--of", choices=("project", "reference"), required=True, help="whose step")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip", type=int, default=6, help="project: warm-up batches before the profiled ones")
    parser.add_argument("--runs", type=Path, default=Path("/tmp/profile_runs"), help="project: the run folder")
    parser.add_argument("--baselines", type=Path, help="reference: the folder of reference_step.py")
    parser.add_argument(
        "--rows", type=Path, help="reference: the session rows (python -m glm_session.data export)"
    )
    parser.add_argument("--variant", default="base", help="reference: reference_step.py's variant")
    parser.add_argument("overrides", nargs="*", help="project: train overrides (after --)")
    args = parser.parse_args()
    summary = project(args) if args.of == "project" else reference(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("top")}, indent=1))


if __name__ == "__main__":
    main()
