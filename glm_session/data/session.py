"""Sessions: what every reader produces and every template renders.

A session is an optional system text and turns (q_k, a_k), k = 1..T. ``session_from_messages`` turns a list
of messages into one, and raises ``DataError`` (file, record, reason) for every input that is not such a session:
a role that is not system/user/assistant, two user or two assistant messages in a row, an answer without a
question, an empty text or one with nothing visible (only whitespace, zero-width or control characters, NUL
included), a text that is not valid Unicode (a lone surrogate such as ``"\\ud800"``), a control character
in a text (NUL, a terminal's ESC; tab and newline are text), a session that ends with a user
message, a misplaced system message. Nothing is fixed silently.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from glm_session.errors import UserError

ROLES = ("system", "user", "assistant")


class DataError(UserError, ValueError):
    """Bad input data: names the file, the record and the reason.

    Args:
        path: the file.
        record: where in the file: a 1-based record number, or ``"line N"`` for line-based files.
        reason: what is wrong, in words.
    """

    def __init__(self, path: str, record: str | int | None, reason: str) -> None:
        self.path, self.record, self.reason = str(path), record, reason
        super().__init__(f"{self.locate(path, record)}: {reason}")

    @staticmethod
    def locate(path: str, record: str | int | None) -> str:
        """``file``, ``file, record N`` or ``file, line N``."""
        if record is None:
            return f"{path}"
        return f"{path}, record {record}" if isinstance(record, int) else f"{path}, {record}"


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


@dataclass(frozen=True)
class Session:
    """One dialogue. ``id`` is unique within its file (the record number when the file has no ids)."""

    id: str
    turns: tuple[Turn, ...]
    system: str | None = None
    dropped_trailing_question: bool = field(default=False, compare=False)

    def to_record(self) -> dict:
        """Columns for a ``datasets.Dataset``."""
        return {
            "id": self.id,
            "system": self.system or "",
            "questions": [t.question for t in self.turns],
            "answers": [t.answer for t in self.turns],
        }

    @classmethod
    def from_record(cls, record: dict) -> Session:
        turns = tuple(Turn(q, a) for q, a in zip(record["questions"], record["answers"], strict=True))
        return cls(id=record["id"], turns=turns, system=record["system"] or None)


class Message(NamedTuple):
    """One message of a record: its role (system/user/assistant), its text, and where it stands in the record as
    an error message names it (``message 3``, ``history[0][1]``, ``'system'``)."""

    role: str
    text: str
    where: str


def session_from_messages(
    messages: Iterable[Message],
    session_id: str,
    path: str,
    record: str | int,
    drop_trailing_question: bool = False,
) -> Session:
    """Build a session from messages whose roles are already mapped to system/user/assistant.

    ``drop_trailing_question``: a final unanswered user message is dropped (and the session says so) instead
    of being an error.
    """
    system: str | None = None
    turns: list[Turn] = []
    question: str | None = None
    where = ""
    for number, (role, text, where) in enumerate(messages, start=1):
        check_unicode(text, path, record, where)
        if role == "user" and question is None and visible(text):
            question = text
        elif role == "assistant" and question is not None and visible(text):
            turns.append(Turn(question, text))
            question = None
        elif role == "system" and number == 1 and visible(text):
            system = text
        else:
            raise DataError(path, record, f"{where}: {_problem(role, text)}")
        check_control(text, path, record, where)
    if question is not None and not drop_trailing_question:
        raise DataError(path, record, f"{where}: the session ends with a user message (no answer)")
    if not turns:
        raise DataError(path, record, "no answered user message")
    return Session(session_id, tuple(turns), system, dropped_trailing_question=question is not None)


INVISIBLE = ("Cc", "Cf", "Zs", "Zl", "Zp")  # control (NUL, ...), format (zero-width ...) and separator characters


def visible(text: str) -> bool:
    """Whether ``text`` shows anything: a character that is not whitespace, control, zero-width or a separator."""
    return any(not character.isspace() and unicodedata.category(character) not in INVISIBLE for character in text)


def check_unicode(text: str, path: str, record: str | int, where: str) -> None:
    """Raise ``DataError`` if ``text`` holds a lone surrogate (JSON allows ``"\\ud800"``; UTF-8 cannot hold it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        raise DataError(
            path,
            record,
            f"{where}: a lone surrogate \\u{code:04x} at character {err.start + 1} (not valid Unicode)",
        ) from None


CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # C0 and C1 controls, DEL; not tab, newline, CR


def check_control(text: str, path: str, record: str | int, where: str) -> None:
    """Raise ``DataError`` if a text that shows something also holds a control character (NUL, ESC of a terminal
    colour, a bell): not text, and the tokenizer's byte fallback would teach the model to write it."""
    found = CONTROL.search(text)
    if found:
        raise DataError(
            path, record, f"{where}: a control character U+{ord(found.group()):04X} at character {found.start() + 1} "
            "(not text: the model would learn to write it)"
        )  # fmt: skip


def _problem(role: str, text: str) -> str:
    """Why a message cannot come where it stands."""
    if role not in ROLES:
        return f"role {role!r} is not system, user or assistant"
    if not text.strip():
        return f"empty {role} text"
    if not visible(text):
        return f"{role} text with no visible character ({len(text)} whitespace, zero-width or control characters)"
    if role == "system":
        return "a system message may only come first"
    if role == "user":
        return "two user messages in a row"
    return "assistant message without a user message before it"
