"""Prompt templates: the one place that knows how a dialogue is written for ChatGLM2.

A template renders turns into ``Segment``s (a text or a special token, with its role, its turn and how it is
labelled when its turn is trained). Segments are encoded one by one and concatenated, so a turn's tokens never
depend on what follows it. Training samples and inference prompts both come from ``render_turns``, so a model is
always prompted in the format it was trained on.

- ``chatglm2``: ChatGLM2's own format (``tokenization_chatglm.py`` ``build_prompt``): ``[Round k]`` counted from
  1, ``"\\n\\n"`` between turns, no eos inside the context. The answer's stop is taught by labelling eos at the
  position after the answer: on the first token of the ``"\\n\\n"`` separator, or on an eos token appended
  after the last answer of a sample.
- ``chatglm2_article``: the article's reference code (SpongebBob/Finetune-ChatGLM2-6B ``preprocess_function``),
  byte for byte: ``[Round i]`` counted from 0, answers written as ``a + "\\n\\n"`` and followed by an eos token
  that stays in the context.
- ``plain``: plain-text documents (``data.format=text``), each written as it is after ``[gMASK] sop`` and followed
  by eos: language modelling of text (``strategy=lm``), e.g. to pretrain a base on text that holds no dialogue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from glm_session.data.session import Turn

Role = Literal["prefix", "system", "user", "assistant", "stop"]
# How a segment is labelled when its turn is trained: not at all, with its own ids, or with eos on its first
# token only (the position right after an answer, when eos is not part of the context).
Label = Literal["none", "self", "eos_first"]
EOS = "eos"  # a special segment that stands for the tokenizer's eos id


@dataclass(frozen=True)
class Segment:
    role: Role
    turn: int  # 1-based turn index in the session; 0 for the prefix and the system text
    text: str = ""
    token: str | None = None  # a special token ("[gMASK]", "sop", "eos") instead of text
    label: Label = "none"


@dataclass(frozen=True)
class Template:
    """A ChatGLM2 prompt format. Use ``get_template(name)`` or one of the two instances below.

    Args:
        name: the name used in configs.
        first_round: the number of the first ``[Round n]``.
        answer_suffix: text written after each answer, as part of the answer.
        eos_in_context: True: every answer is followed by an eos token that stays in the context.
            False: answers are separated by ``separator`` and eos is only a label (and the input after the
            last answer of a sample).
        separator: text between a (non-last) answer and the next question when ``eos_in_context`` is False.
    """

    name: str
    first_round: int
    answer_suffix: str
    eos_in_context: bool
    separator: str = "\n\n"
    user_format: str = "[Round {round}]\n\n问：{question}\n\n答："
    system_format: str = "{system}\n\n"

    def prefix(self) -> list[Segment]:
        return [Segment("prefix", 0, token="[gMASK]"), Segment("prefix", 0, token="sop")]

    def system(self, text: str | None) -> list[Segment]:
        return [Segment("system", 0, text=self.system_format.format(system=text))] if text else []

    def user(self, question: str, turn: int, round_index: int) -> Segment:
        """The question of ``turn``, written as round ``first_round + round_index``."""
        text = self.user_format.format(round=self.first_round + round_index, question=question)
        return Segment("user", turn, text=text)

    def answer(self, answer: str, turn: int, last: bool) -> list[Segment]:
        """The answer of ``turn`` and its stop; ``last``: nothing follows in this sample."""
        segments = [Segment("assistant", turn, text=answer + self.answer_suffix, label="self")]
        if self.eos_in_context or last:
            segments.append(Segment("stop", turn, token=EOS, label="self"))
        else:
            segments.append(Segment("stop", turn, text=self.separator, label="eos_first"))
        return segments

    def render_turns(
        self, turns: Sequence[Turn], system: str | None = None, first_turn: int = 1, closed: bool = True
    ) -> list[Segment]:
        """Prefix, system and ``turns`` (session turns ``first_turn``, ``first_turn + 1``, ...).

        Rounds are numbered from the first rendered turn, as ``build_prompt`` numbers a (possibly shortened)
        history. ``closed``: the last turn ends the sample (eos after it); otherwise a question follows.
        """
        segments = self.prefix() + self.system(system)
        for i, turn in enumerate(turns):
            segments.append(self.user(turn.question, first_turn + i, i))
            segments += self.answer(turn.answer, first_turn + i, last=closed and i == len(turns) - 1)
        return segments

    def render_prompt(self, query: str, history: Sequence[Turn] = (), system: str | None = None) -> list[Segment]:
        """The inference prompt for ``query`` after ``history``: generation continues with the answer."""
        segments = self.render_turns(history, system, closed=False)
        return segments + [self.user(query, len(history) + 1, len(history))]


def prompt_text(segments: Sequence[Segment]) -> str:
    """The text of ``segments`` (special tokens left out): for ``chatglm2`` this is ``build_prompt``'s string."""
    return "".join(s.text for s in segments if s.token is None)


CHATGLM2 = Template(name="chatglm2", first_round=1, answer_suffix="", eos_in_context=False)
CHATGLM2_ARTICLE = Template(name="chatglm2_article", first_round=0, answer_suffix="\n\n", eos_in_context=True)
# Plain text: a document (``data.format=text``: one turn, no question) written as it is, then eos.
PLAIN = Template(name="plain", first_round=1, answer_suffix="", eos_in_context=False, user_format="{question}")
TEMPLATES = {t.name: t for t in (CHATGLM2, CHATGLM2_ARTICLE, PLAIN)}


def get_template(name: str) -> Template:
    """The template called ``name`` (``chatglm2`` or ``chatglm2_article``)."""
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}: choose one of {', '.join(TEMPLATES)}")
    return TEMPLATES[name]
