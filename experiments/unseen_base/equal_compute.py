"""The training FLOPs of one epoch as session samples and as split samples, and the steps of split_equal_compute.

    python experiments/unseen_base/equal_compute.py --data DIR

FLOPs as ``glm_session.model.flops.training_flops`` counts them (6N a token plus causal attention within each
sample; chatglm2-small with the zhbase tokenizer). split_equal_compute trains split samples for the FLOPs of one
session epoch: ``ratio x`` the split arm's steps an epoch, with its own schedule.
"""

from __future__ import annotations

import argparse
import json
import math

from glm_session.config import build, compose_config
from glm_session.model.flops import training_flops
from glm_session.model.presets import chatglm2_config, padded_vocab_size

CORPORA = {
    "smile": ["experiment=unseen/smile_split_shuffled", "data.path={data}/smile_20k.jsonl.gz"],
    "cpsycoun": ["experiment=unseen/cpsycoun_split_shuffled", "data.path={data}/cpsycound.jsonl.gz"],
}


def epoch_flops(overrides: list[str], strategy: str) -> tuple[float, int, int]:
    """FLOPs, samples and batches of one training epoch."""
    cfg = compose_config("train", [*overrides, f"strategy={strategy}", "model.init_from=null"])
    datamodule = build(cfg.data)
    prepared = datamodule.pipeline.prepared("train")
    lengths = [len(ids) for ids in prepared.samples["input_ids"]]
    config = chatglm2_config(cfg.model.preset, vocab_size=padded_vocab_size(len(datamodule.tokenizer)))
    parameters = config_parameters(config)
    batches = len(datamodule.pipeline.batch_sampler("train"))
    return training_flops(config, parameters, lengths), len(lengths), batches


def config_parameters(config) -> int:
    import torch
    from transformers import GlmForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in GlmForCausalLM(config).parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    args = parser.parse_args()
    result = {}
    for corpus, overrides in CORPORA.items():
        overrides = [o.format(data=args.data) for o in overrides]
        session, _, session_steps = epoch_flops([*overrides, "data.batch_supervised_tokens=null",
                                                 "data.batch_sessions=16"], "session")  # fmt: skip
        split, samples, split_steps = epoch_flops(overrides, "split")
        ratio = session / split
        result[corpus] = {"session_flops": session, "split_flops": split, "ratio": ratio, "session_steps": session_steps,
                          "split_steps": split_steps, "split_samples": samples,
                          "equal_compute_steps": math.floor(ratio * split_steps + 0.5)}  # fmt: skip
        print(corpus, json.dumps(result[corpus]), flush=True)


if __name__ == "__main__":
    main()
