"""Evaluate a run's checkpoint: ``python -m glm_session.evaluate ckpt_path=... [overrides]`` (``conf/evaluate.yaml``).

The model, its template and (unless ``tokenizer.path`` is given) its tokenizer come from the checkpoint's run record
(a base pretrained on plain text is scored in ``template=...``, the dialogue template its fine-tuning uses);
``data.*`` says where the sessions are and how long a prompt may be. The work is ``evaluation.evaluator``'s; the
results land in ``<run>/evaluations/<date>_<time>/`` unless ``hydra.run.dir`` says otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig

from glm_session.checkpoints import load_model, run_tokenizer
from glm_session.config import CONFIG_DIR, build, device_of
from glm_session.data.source import SPLITS
from glm_session.data.strategy import SessionStrategy
from glm_session.data.template import PLAIN, get_template
from glm_session.errors import check_choice, check_int
from glm_session.evaluation.evaluator import evaluate_model
from glm_session.hydra_jobs import job, run_app

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.split``, with the template and tokenizer the run was trained with."""
    split = check_choice("split", cfg.split, SPLITS)
    limit = check_int("limit", cfg.limit, minimum=1, optional=True)  # a negative limit evaluated something
    generation = build(cfg.generation)
    model, info = load_model(cfg.ckpt_path)
    # The run's template and (unless tokenizer.path is given) tokenizer; session samples for the loss.
    tokenizer = run_tokenizer(cfg.ckpt_path, info, build(cfg.tokenizer) if cfg.tokenizer.get("path") else None)
    # A base language-modelled on plain text (template plain) has no dialogue template: it is scored in the one given
    # (template=..., chatglm2 by default), the template its fine-tuning will use.
    template = get_template(info.template) if info.template != PLAIN.name else build(cfg.template)
    data = build(cfg.data, tokenizer=tokenizer, template=template, strategy=SessionStrategy())
    model.to(device_of(cfg.device))
    log.info("evaluating %s (template %s) on %s", cfg.ckpt_path, template.name, split)
    return evaluate_model(model, data, split, cfg.output_dir, generation, limit)


@hydra.main(config_path=str(CONFIG_DIR), config_name="evaluate", version_base="1.3")
@job
def hydra_app(cfg: DictConfig) -> None:
    metrics = evaluate(cfg)
    log.info("ROUGE-1/2/L %.2f / %.2f / %.2f", *metrics["rouge"].values())


def main() -> None:
    """``python -m glm_session.evaluate`` / ``glm-session-evaluate``: bad input ends with one line and exit code 2."""
    run_app(hydra_app)


if __name__ == "__main__":
    main()
