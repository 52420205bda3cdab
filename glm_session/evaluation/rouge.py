"""ROUGE-1/2/L on jieba words, as ChatGLM2's official evaluation scores Chinese (rouge_chinese on jieba tokens).

torchmetrics' ``ROUGEScore`` is used (it syncs across devices), with both a normaliser and a tokenizer: its
default normaliser keeps only [a-z0-9] and so deletes every Chinese character (given only a tokenizer, two
unrelated Chinese sentences then score 0, or 1.0 in other versions), and rouge-score's default tokenizer does the
same. Here the text is kept as it is and cut into jieba words.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jieba
from torchmetrics.text.rouge import ROUGEScore

jieba.setLogLevel(logging.WARNING)
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def jieba_words(text: str) -> list[str]:
    """jieba's words of ``text``, whitespace dropped."""
    return [word for word in jieba.lcut(text) if word.strip()]


def keep_text(text: str) -> str:
    return text


def chinese_rouge() -> ROUGEScore:
    """ROUGE-1/2/L (precision, recall, F) on jieba words, averaged over pairs."""
    return ROUGEScore(rouge_keys=ROUGE_KEYS, normalizer=keep_text, tokenizer=jieba_words)


class RougeByTurn:
    """ROUGE F-scores x 100, overall and by turn index."""

    def __init__(self) -> None:
        self.overall = chinese_rouge()
        self.by_turn: dict[int, ROUGEScore] = {}

    def update(self, predictions: Sequence[str], references: Sequence[str], turns: Sequence[int]) -> None:
        self.overall.update(list(predictions), list(references))
        for prediction, reference, turn in zip(predictions, references, turns, strict=True):
            self.by_turn.setdefault(turn, chinese_rouge()).update([prediction], [reference])

    @staticmethod
    def _f_scores(metric: ROUGEScore) -> dict[str, float]:
        scores = metric.compute()
        return {key: 100 * scores[f"{key}_fmeasure"].item() for key in ROUGE_KEYS}

    def compute(self) -> dict:
        return {
            "overall": self._f_scores(self.overall),
            "by_turn": {turn: self._f_scores(m) for turn, m in sorted(self.by_turn.items())},
        }
