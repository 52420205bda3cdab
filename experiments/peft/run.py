"""LoRA on the 6B shape on one GPU (issue 22), beside the yardstick ``lora_step.py`` in the same call.

    python experiments/peft/run.py --out OUT --baselines DIR [--parts bench lifecycle] [--deadline 560] [--cpu]

Parts (each step a subprocess with its own time limit, ``experiments/bench/run_all.Steps``):

- ``bench``: the project's ``peft=lora`` (rank 16 on every decoder linear layer) on chatglm2-6b (random weights,
  65,024-token vocabulary), session samples of KdConv packed into rows of 2,048 tokens, 16,384 tokens a step, in the
  ``VARIANTS`` below; then ``lora_step.py`` (base and flex_liger) on the same session rows. tokens/s and peak memory
  are RunMetrics' (``metrics.json``), MFU counted with 4 FLOPs a token for each frozen weight, 6 for each adapter
  weight, plus causal attention (``glm_session/model/flops.py``), over 989 TFLOP/s;
- ``qlora``: the same LoRA over a 4-bit base (``peft=qlora``: NF4 through bitsandbytes, which the device image lacks:
  carry its wheel), in ``QLORA_VARIANTS``; its layers uncompiled (``model.compile_layers=false``: torch.compile
  fails on bitsandbytes' 4-bit layers, ``glm_session/model/module.py``). Not part of ``ratios`` (another method);
  ``qlora_runs`` in the results;
- ``lifecycle``: a LoRA run of the 6B shape from a base folder (written first, bf16) that is killed after its 6th
  step, resumed from its last checkpoint to step 12, evaluated on 8 test sessions, and exported merged and as
  adapters.

``OUT/results.json``: every run's figures and ``ratios`` (``lora_over_yardstick``: the best variant's tokens/s over
``lora_step.py``'s best; ``mfu_lora``; ``peak_memory_gib_lora``), the lifecycle's step results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from run_all import Steps  # noqa: E402  (subprocess steps within a call's deadline)

ROOT = Path(__file__).resolve().parents[2]
LORA = ["model=chatglm2-6b", "peft=lora", "strategy=session", "data.packing=true", "data.max_seq_len=2048"]
BENCH = [*LORA, "profile=throughput", "speed=fast", "trainer.max_steps=41"]
# KdConv's session rows make 21 steps an epoch, the last one short (a new shape: a recompilation). Each variant's
# timing starts after 22 steps' micro-batches, past that boundary, and stops before the next one.
WARMUP_STEPS = 22
VARIANTS = {  # name: (tokens a micro-batch, micro-batches a step, activation checkpointing); 16,384 tokens a step
    "fast_16k_checkpointing": (16384, 1, True),  # one micro-batch: each layer's forward computed twice
    "fast_4k_x4": (4096, 4, False),  # nothing recomputed: a quarter of the activations alive at a time
    "fast_2k_x8": (2048, 8, False),  # an eighth: the 24 GB card's setting
}
MEMORY_LIMIT_GIB = 30.0  # the target's card: 40 GB
QLORA_VARIANTS = {"qlora_4k_x4": (4096, 4, False), "qlora_2k_x8": (2048, 8, False)}  # as VARIANTS
QLORA = ["peft=qlora", "model.compile_layers=false"]


def variant_overrides(name: str) -> list[str]:
    tokens, micro_batches, checkpointing = {**VARIANTS, **QLORA_VARIANTS}[name]
    return [f"data.batch_tokens={tokens}", f"trainer.accumulate_grad_batches={micro_batches}",
            f"model.activation_checkpointing={str(checkpointing).lower()}",
            f"metrics.warmup_batches={WARMUP_STEPS * micro_batches}"]  # fmt: skip


CPU = ["model=chatglm2-tiny", "trainer.accelerator=cpu", "trainer.precision=32-true", "model.vocab_size=null"]


def bench_steps(work: Path, baselines: Path, cpu: bool, qlora: bool = False) -> list[tuple[str, list[str], float]]:
    """The ``bench`` part's steps (with ``qlora``: the ``qlora`` part's, without the yardstick)."""
    py, steps = sys.executable, []
    for name in QLORA_VARIANTS if qlora else VARIANTS:
        command = [*BENCH, *variant_overrides(name)]
        if qlora:
            command = [o for o in command if o != "peft=lora"] + QLORA
        if cpu:
            command = [o for o in command if o != "speed=fast"]
            command += [*CPU, "trainer.max_steps=3", "metrics.warmup_batches=1", "data.limit=20"]
        steps.append(
            (f"lora_{name}", [py, "-m", "glm_session.train", *command, f"hydra.run.dir={work / name}"], 240)
        )
    if not cpu and not qlora:
        steps.append(("lora_step", [py, str(baselines / "lora_step.py"), "--rows", str(work / "rows.jsonl"), "--out",
                                    str(work / "lora_step.json"), "--variants", "base,flex_liger"], 240))  # fmt: skip
    return steps


def lifecycle_steps(work: Path, cpu: bool) -> list[tuple[str, list[str], float]]:
    py, base, run = sys.executable, work / "base6b", work / "lifecycle"
    preset = "chatglm2-tiny" if cpu else "chatglm2-6b"
    write_base = (f"import torch; from transformers import GlmForCausalLM; from glm_session.model import chatglm2_config; "
                  f"torch.manual_seed(0); device = 'cpu' if {cpu} else 'cuda'; "
                  f"model = GlmForCausalLM(chatglm2_config({preset!r}, vocab_size={6144 if cpu else 65024})"
                  f").to(device=device, dtype=torch.bfloat16); model.save_pretrained({str(base)!r})")  # fmt: skip
    common = [*LORA, "profile=full", "trainer.max_epochs=-1", f"model.init_from={base}", "data.batch_tokens=16384",
              "trainer.max_steps=12",
              "trainer.limit_val_batches=2", "trainer.val_check_interval=6", "callbacks.last_checkpoint.every_n_train_steps=3",
              "trainer.enable_progress_bar=false", "evaluate.enabled=true", "evaluate.limit=8",
              "generation.max_new_tokens=16", f"hydra.run.dir={run}"]  # fmt: skip
    if cpu:
        common += [*CPU, "data.limit=200", "data.batch_tokens=4096"]
    else:
        common += ["speed=fast", "model.activation_checkpointing=true"]
    kill = ["+callbacks.kill._target_=helpers.KillAtStep", "+callbacks.kill.step=7"]
    last = run / "checkpoints" / "last.ckpt"
    return [
        ("write_base", [py, "-c", write_base], 240),
        ("train_killed", [py, "-m", "glm_session.train", *common, *kill], 240),
        ("train_resumed", [py, "-m", "glm_session.train", *common, f"ckpt_path={last}"], 240),
        ("export_merged", [py, "-m", "glm_session.export", str(last), str(work / "merged")], 240),
        ("export_adapter", [py, "-m", "glm_session.export", str(last), str(work / "adapter"), "--adapter"], 60),
    ]


def read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def summarise(work: Path) -> dict:
    keep = ("tokens_per_second", "supervised_tokens_per_second", "mfu", "peak_memory_gib", "peak_reserved_gib",
            "parameters", "trainable_parameters", "global_steps", "train_seconds", "accelerator")  # fmt: skip
    runs, qlora_runs = {}, {}
    for variants, into in ((VARIANTS, runs), (QLORA_VARIANTS, qlora_runs)):
        for name in variants:
            metrics = read(work / name / "metrics.json")
            into[name] = {k: metrics.get(k) for k in keep} if metrics else None
    yardstick = read(work / "lora_step.json")
    results: dict = {"runs": runs, "qlora_runs": qlora_runs, "yardstick": yardstick, "ratios": {},
                     "variants": {n: variant_overrides(n) for n in {**VARIANTS, **QLORA_VARIANTS}}}  # fmt: skip
    measured = {n: r for n, r in runs.items() if r and r.get("tokens_per_second")
                and (r.get("peak_memory_gib") or 0) <= MEMORY_LIMIT_GIB}  # fmt: skip
    best_yardstick = max(
        (v.get("real_tokens_per_second") or 0 for v in (yardstick or {}).get("variants", [])), default=0
    )  # real tokens, padding excluded, as the project counts them
    if measured:
        best = max(measured, key=lambda n: measured[n]["tokens_per_second"])
        results["ratios"] = {
            "best_variant": best,  # the fastest within MEMORY_LIMIT_GIB
            "lora_over_yardstick": measured[best]["tokens_per_second"] / best_yardstick
            if best_yardstick
            else None,
            "mfu_lora": measured[best]["mfu"],
            "peak_memory_gib_lora": measured[best]["peak_memory_gib"],
        }
    lifecycle = read(work / "lifecycle" / "metrics.json")
    results["lifecycle"] = {
        "status": lifecycle.get("status") if lifecycle else None,
        "global_steps": lifecycle.get("global_steps") if lifecycle else None,
        "evaluation": read(work / "lifecycle" / "evaluation" / "metrics.json"),
        "merged_files": sorted(p.name for p in (work / "merged").iterdir())
        if (work / "merged").is_dir()
        else None,
        "adapter_files": sorted(p.name for p in (work / "adapter").iterdir())
        if (work / "adapter").is_dir()
        else None,
    }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--baselines", type=Path, default=ROOT.parent / "shared" / "baselines")
    parser.add_argument("--parts", nargs="*", default=["bench", "lifecycle"])
    parser.add_argument("--deadline", type=float, default=560)
    parser.add_argument("--work", type=Path, default=Path("/tmp/glm_session_peft"))
    parser.add_argument("--cpu", action="store_true", help="a smoke test of every step on chatglm2-tiny, on a CPU")
    args = parser.parse_args()
    work, log = args.work, args.work / "logs"
    log.mkdir(parents=True, exist_ok=True)
    run = Steps(log, time.monotonic() + args.deadline)
    gpus = "" if args.cpu else "0"
    inherited = os.environ.get("PYTHONPATH", "")  # carried wheels on the device (--target /tmp/site)
    env = {
        "PYTHONPATH": ":".join(p for p in (str(ROOT / "tests"), str(ROOT), inherited) if p)
    }  # helpers.KillAtStep
    if "bench" in args.parts:
        run("rows", [sys.executable, "-m", "glm_session.data", "export", "strategy=session", "data.packing=false",
                     "template=chatglm2", "data.max_seq_len=2048", f"out={work / 'rows.jsonl'}"], 120, gpus="")  # fmt: skip
        for name, command, limit in bench_steps(work, args.baselines, args.cpu):
            run(name, command, limit, gpus=gpus, env=env)
    if "qlora" in args.parts:
        for name, command, limit in bench_steps(work, args.baselines, args.cpu, qlora=True):
            run(name, command, limit, gpus=gpus, env=env)
    if "lifecycle" in args.parts:
        for name, command, limit in lifecycle_steps(work, args.cpu):
            run(name, command, limit, gpus=gpus, env=env)
    results = {**summarise(work), "steps": run.records}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    subprocess.run(["tar", "czf", str(args.out / "logs.tgz"), "-C", str(work), "logs"], check=False)
    shutil.rmtree(work / "base6b", ignore_errors=True)
    print(json.dumps(results["ratios"], indent=1))


if __name__ == "__main__":
    main()
