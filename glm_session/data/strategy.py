"""Sample construction strategies: which turns of a session go into which sample.

- ``split``: one sample per answer turn: turns 1..k, trained on turn k only (ChatGLM2's official p-tuning).
- ``session``: one sample per session: turns 1..T, trained on every answer (the article's construction).
- ``lm``: the session's samples trained on every token (questions too): plain-text pretraining.

Only the turns that the supervision policy trains (weight above 0, ``SessionLayout.trained``) get samples: split
builds none for the others, and a session sample ends with its last trained turn (nothing after it is seen by a
trained answer); untrained turns before it are context.

Both keep every sample within ``max_seq_len`` without a silent drop and without cutting a question:

- split drops the oldest history turns of sample k until it fits;
- session cuts the session at turn boundaries into windows; each window starts with as much history (untrained
  turns before its first trained turn) as fits with that turn, then takes as many trained turns as fit;
- a turn that does not fit even alone is truncated at its answer's tail (no stop is taught then); if not even its
  question fits, the turn is skipped. Everything dropped, cut, truncated or skipped is counted.

Inference prompts (evaluation) follow split's rule (``prompt_history_start``): the oldest history turns are dropped
until the prompt leaves room for the answer; a turn whose question alone does not fit is skipped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from glm_session.data.samples import SessionLayout, View


@dataclass
class Plan:
    views: list[View] = field(default_factory=list)
    skipped_turns: int = 0  # turns whose question alone does not fit
    split_tokens: int = 0  # a session cut into windows: the tokens its split samples would take


def view_length(layout: SessionLayout, view: View) -> int:
    """Tokens of the sample of ``view``."""
    if view.answer_limit is not None:  # a turn truncated at its answer's tail, without its stop
        return layout.question_length(view.end - 1) + view.answer_limit
    return layout.length(view.start, view.end)


def _alone(layout: SessionLayout, turn: int, max_seq_len: int, plan: Plan) -> bool:
    """Handle ``turn`` when it does not fit in a sample of its own; True if it did not fit."""
    # With all its history it fits, so alone too: the common case, without rendering a shorter history.
    if layout.length(0, turn + 1) <= max_seq_len or layout.length(turn, turn + 1) <= max_seq_len:
        return False
    room = max_seq_len - layout.question_length(turn)
    if room > 0:
        plan.views.append(View(turn, turn, turn + 1, answer_limit=room))
    else:
        plan.skipped_turns += 1
    return True


def _next_trained(layout: SessionLayout, start: int) -> int | None:
    """The first trained turn (0-based) at or after ``start``; ``None`` if there is none."""
    return next((turn for turn in range(start, layout.num_turns) if layout.trained(turn)), None)


def _history_start(layout: SessionLayout, turn: int, max_seq_len: int) -> int:
    """The earliest start such that turns ``[start, turn]`` fit (``turn`` itself is known to fit)."""
    start = 0
    while layout.length(start, turn + 1) > max_seq_len:
        start += 1
    return start


@dataclass(frozen=True)
class SplitStrategy:
    """One sample per answer turn, trained on that turn, with as much history as fits."""

    name: str = "split"

    def plan(self, layout: SessionLayout, max_seq_len: int) -> Plan:
        plan = Plan()
        for turn in range(layout.num_turns):
            if layout.trained(turn) and not _alone(layout, turn, max_seq_len, plan):
                plan.views.append(View(_history_start(layout, turn, max_seq_len), turn, turn + 1))
        return plan


@dataclass(frozen=True)
class SessionStrategy:
    """One sample per session, trained on every answer; cut into windows when it is too long."""

    name: str = "session"

    def plan(self, layout: SessionLayout, max_seq_len: int) -> Plan:
        plan = Plan()
        turn = _next_trained(layout, 0)
        while turn is not None:
            if _alone(layout, turn, max_seq_len, plan):
                turn = _next_trained(layout, turn + 1)
                continue
            start = _history_start(layout, turn, max_seq_len)
            end = turn + 1
            while end < layout.num_turns and layout.length(start, end + 1) <= max_seq_len:
                end += 1
            while not layout.trained(end - 1):  # no trained answer after these: leave them out
                end -= 1
            plan.views.append(View(start, turn, end))
            turn = _next_trained(layout, end)
        if (
            len(plan.views) > 1
        ):  # what the cut saves over split samples (often little: each window repeats history)
            split = SplitStrategy().plan(layout, max_seq_len)
            plan.split_tokens = sum(view_length(layout, view) for view in split.views)
        return plan


@dataclass(frozen=True)
class LanguageModelStrategy:
    """The session strategy's samples, trained on every token of their trained turns (questions, role markers,
    answers): language modelling of the dialogues' plain text, e.g. to pretrain one shared starting point."""

    name: str = "lm"

    def plan(self, layout: SessionLayout, max_seq_len: int) -> Plan:
        plan = SessionStrategy().plan(layout, max_seq_len)
        plan.views = [replace(view, every_token=True) for view in plan.views]
        return plan


def prompt_history_start(layout: SessionLayout, turn: int, max_prompt_tokens: int) -> int | None:
    """The split strategy's rule for the inference prompt of ``turn`` (its history and question; the answer is to be
    generated within the room left): the earliest history start whose prompt fits ``max_prompt_tokens``, dropping the
    oldest turns first; ``None`` when the question alone does not fit (the turn is skipped, never cut)."""
    if layout.prompt_length(turn, turn) > max_prompt_tokens:
        return None
    start = 0
    while layout.prompt_length(start, turn) > max_prompt_tokens:
        start += 1
    return start


STRATEGIES = {"split": SplitStrategy, "session": SessionStrategy, "lm": LanguageModelStrategy}


Strategy = SplitStrategy | SessionStrategy | LanguageModelStrategy


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}: choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()
