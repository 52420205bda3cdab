"""Generation metrics of given answers, and of two fixed answers on the same prompts: the references every
generation metric is read beside.

A model's ROUGE or BLEU means little alone: a fixed answer (the training split's most frequent answer, or the
question copied back) scored by the same metric on the same prompts says how much of the score needs no model at
all. A metric that a fixed answer reaches does not measure quality on that corpus.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from glm_session.config import build, compose_config
from glm_session.evaluation.official import official_scores
from glm_session.evaluation.rouge import RougeByTurn


def generation_scores(predictions: list[dict]) -> dict:
    """torchmetrics ROUGE (jieba words) and ChatGLM2's official ROUGE/BLEU of ``predictions`` (records with
    ``prediction``, ``reference`` and ``turn``), with the mean answer lengths in characters."""
    answers, references = [p["prediction"] for p in predictions], [p["reference"] for p in predictions]
    rouge = RougeByTurn()
    rouge.update(answers, references, [p["turn"] for p in predictions])
    return {
        "rouge": rouge.compute()["overall"],
        "chatglm2_official": official_scores(answers, references),
        "prediction_chars_mean": sum(map(len, answers)) / len(answers),
        "reference_chars_mean": sum(map(len, references)) / len(references),
    }


def fixed_answers(data_overrides: Sequence[str], predictions: list[dict]) -> dict:
    """The generation metrics of two fixed answers on the prompts of ``predictions`` (records with
    ``session_id`` and ``turn``): the training split's most frequent answer, and the question copied back.
    ``data_overrides`` choose the corpus and its split (``data=smile_by_opening data.path=...``)."""
    data = build(compose_config("data_tool", list(data_overrides)).data)
    train_answers = collections.Counter(t.answer for s in data.read("train").sessions for t in s.turns)
    frequent, count = train_answers.most_common(1)[0]
    questions = {(s.id, k + 1): t.question for s in data.read("test").sessions for k, t in enumerate(s.turns)}
    out = {}
    for name, answer in (
        ("most_frequent_answer", lambda p: frequent),
        ("question_copy", lambda p: questions[(p["session_id"], p["turn"])]),
    ):
        out[name] = generation_scores([{**p, "prediction": answer(p)} for p in predictions])
    out["most_frequent_answer"]["answer"] = frequent
    out["most_frequent_answer"]["count_in_training"] = count
    return out
