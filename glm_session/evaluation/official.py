"""ChatGLM2's official generation metric, as its evaluation computes it (``ptuning/main.py``, ``compute_metrics``).

For every (prediction, reference) pair:

- ROUGE-1/2/L F × 100 from ``rouge_chinese.Rouge().get_scores`` on the jieba words joined by spaces. rouge_chinese
  counts each distinct n-gram once (set overlap), unlike torchmetrics' ROUGE (``rouge.py``), which counts
  repeats: the two differ on answers that repeat words;
- BLEU-4 × 100 from nltk's ``sentence_bleu([list(reference)], list(prediction),
  smoothing_function=SmoothingFunction().method3)``, on characters;

and the scores are averaged over pairs. The official script crashes on an empty prediction (rouge_chinese raises
"Hypothesis is empty"); here an empty prediction (or reference) scores 0 on every metric and is counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jieba
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

jieba.setLogLevel(logging.WARNING)
OFFICIAL_KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")


def pair_scores(prediction: str, reference: str) -> dict[str, float]:
    """The official scores × 100 of one pair (0 for an empty prediction or reference)."""
    hypothesis, truth = " ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference))
    if not hypothesis.strip() or not truth.strip():
        return dict.fromkeys(OFFICIAL_KEYS, 0.0)
    scores = Rouge().get_scores(hypothesis, truth)[0]
    result = {key: round(scores[key]["f"] * 100, 4) for key in ("rouge-1", "rouge-2", "rouge-l")}
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=SmoothingFunction().method3)
    result["bleu-4"] = round(bleu * 100, 4)
    return result


def official_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float | int]:
    """The mean official scores of the pairs, and how many predictions were empty."""
    pairs = [pair_scores(p, r) for p, r in zip(predictions, references, strict=True)]
    means = {key: sum(p[key] for p in pairs) / len(pairs) if pairs else 0.0 for key in OFFICIAL_KEYS}
    return {**means, "empty_predictions": sum(not p.strip() for p in predictions)}
