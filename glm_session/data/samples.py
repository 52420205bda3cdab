"""Encode template segments into training samples: ids, labels and the turn of every token.

``SessionLayout`` knows the token counts of one session as a template writes it, so that strategies can
decide which turns go into which sample (``View``) without building them; ``build_sample`` then builds one.
Every text is encoded once per session (``SegmentEncoder`` memoises), and a segment's ids never depend on its
neighbours, so a turn has the same ids in every sample that contains it. The layout carries the supervision policy's
weight of every turn: a turn of weight 0 is context only, in every sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from glm_session.constants import IGNORE_INDEX
from glm_session.data.session import Session, Turn
from glm_session.data.template import EOS, Segment, Template
from glm_session.tokenizer import ChatGLM2Tokenizer


@dataclass(frozen=True)
class View:
    """A contiguous run of turns ``[start, end)`` (0-based) of which those in ``[trained_start, end)`` with a
    weight above 0 are trained.

    ``answer_limit``: keep only this many answer tokens of the last turn and no stop (a turn too long for
    ``max_seq_len`` is truncated at its answer's tail).
    ``every_token``: train the trained turns' questions and role markers too, not only their answers (plain
    language modelling).
    """

    start: int
    trained_start: int
    end: int
    answer_limit: int | None = None
    every_token: bool = False


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids, as in Hugging Face: the loss shifts
    turn_ids: list[int]  # 1-based session turn of every token; 0 for the prefix and the system text
    turn_weights: list[float]  # the supervision weight of every turn of the session, by turn id (0: the prefix's)


class SegmentEncoder:
    """Ids of segments, each distinct text encoded once."""

    def __init__(self, tokenizer: ChatGLM2Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self._cache: dict[str, list[int]] = {}

    def __call__(self, segment: Segment) -> list[int]:
        if segment.token is not None:
            return [self.eos_id if segment.token == EOS else self.tokenizer.convert_tokens_to_ids(segment.token)]
        ids = self._cache.get(segment.text)
        if ids is None:
            ids = self._cache[segment.text] = self.tokenizer.encode(segment.text, add_special_tokens=False)
        return ids


class SessionLayout:
    """Token counts of ``session`` written by ``template``, for any run of its turns, and the supervision weight of
    each turn (``weights[i]`` of turn i + 1; default 1 for all)."""

    def __init__(
        self, session: Session, template: Template, encoder: SegmentEncoder, weights: Sequence[float] | None = None
    ) -> None:
        self.session, self.template, self.encode = session, template, encoder
        self.num_turns = len(session.turns)
        self.weights = tuple(weights) if weights is not None else (1.0,) * self.num_turns
        if len(self.weights) != self.num_turns:
            raise ValueError(
                f"{len(self.weights)} weights for the {self.num_turns} turns of session {session.id!r}"
            )
        self.base = sum(len(encoder(s)) for s in template.prefix() + template.system(session.system))
        self._lengths: dict[int, tuple[list[int], list[int], list[int]]] = {}

    def _turn_lengths(self, start: int) -> tuple[list[int], list[int], list[int]]:
        """For turns ``start..T-1`` written from round 0 at ``start``, cumulative token counts:
        (questions and open answers of turns before each turn, its question, its closed answer)."""
        if start in self._lengths:
            return self._lengths[start]
        before, questions, closed = [0], [], []
        for i, turn in enumerate(self.session.turns[start:]):
            index = start + i + 1
            question = len(self.encode(self.template.user(turn.question, index, i)))
            open_ = sum(len(self.encode(s)) for s in self.template.answer(turn.answer, index, last=False))
            questions.append(question)
            closed.append(sum(len(self.encode(s)) for s in self.template.answer(turn.answer, index, last=True)))
            before.append(before[-1] + question + open_)
        self._lengths[start] = before, questions, closed
        return self._lengths[start]

    def trained(self, turn: int) -> bool:
        """Whether turn ``turn`` (0-based) is supervised (its weight is above 0)."""
        return self.weights[turn] > 0

    def length(self, start: int, end: int) -> int:
        """Tokens of the sample holding turns ``[start, end)``."""
        before, questions, closed = self._turn_lengths(start)
        last = end - start - 1
        return self.base + before[last] + questions[last] + closed[last]

    def prompt_length(self, start: int, turn: int) -> int:
        """Tokens of the inference prompt of ``turn`` with the history turns ``[start, turn)``: everything before
        its answer."""
        before, questions, _ = self._turn_lengths(start)
        return self.base + before[turn - start] + questions[turn - start]

    def question_length(self, turn: int) -> int:
        """Tokens before the answer when ``turn`` stands alone: prefix, system and question."""
        return self.base + self._turn_lengths(turn)[1][0]


def build_sample(layout: SessionLayout, view: View) -> Sample:
    """The sample of ``view``: labels on the answers (and stops) of its trained turns, or on all their tokens; turns
    of weight 0 are context only."""
    session, template, encode = layout.session, layout.template, layout.encode
    segments = template.render_turns(session.turns[view.start : view.end], session.system, view.start + 1)
    input_ids: list[int] = []
    labels: list[int] = []
    turn_ids: list[int] = []
    for segment in segments:
        ids = encode(segment)
        if view.answer_limit is not None and segment.turn == view.end:
            if segment.role == "stop":
                continue
            if segment.role == "assistant":
                ids = ids[: view.answer_limit]
        trained = (
            segment.turn > view.trained_start
            and layout.trained(segment.turn - 1)
            and (segment.label != "none" or view.every_token)
        )
        if not trained:
            labels += [IGNORE_INDEX] * len(ids)
        elif segment.label in ("self", "none"):
            labels += ids
        else:  # eos_first
            labels += [encode.eos_id] + [IGNORE_INDEX] * (len(ids) - 1)
        input_ids += ids
        turn_ids += [segment.turn] * len(ids)
    return Sample(input_ids, labels, turn_ids, [0.0, *layout.weights])


def _shortest(tokenizer: ChatGLM2Tokenizer, template: Template) -> SessionLayout:
    return SessionLayout(Session("shortest", (Turn("?", "?"),)), template, SegmentEncoder(tokenizer))


def shortest_sample(tokenizer: ChatGLM2Tokenizer, template: Template) -> int:
    """Tokens of the shortest sample ``template`` can write: one turn of a one-character question and answer."""
    return _shortest(tokenizer, template).length(0, 1)


def shortest_prompt(tokenizer: ChatGLM2Tokenizer, template: Template) -> int:
    """Tokens of the shortest inference prompt ``template`` can write: a one-character question."""
    return _shortest(tokenizer, template).prompt_length(0, 0)
