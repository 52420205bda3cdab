"""Read dialogue files (.json, .jsonl, .json.gz, .jsonl.gz) in the three common record shapes.

- ShareGPT: ``{"conversations": [{"from": "human"|"gpt"|..., "value": str}], "system"?: str}``
- OpenAI messages: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}]}``
- ChatGLM: ``{"prompt": str, "response": str, "history": [[q, a], ...], "system"?: str}``

Every problem is a ``DataError`` naming the file, the record and the reason. With ``on_error="skip"`` a bad
record is skipped and counted instead; a file that cannot be parsed at all (a .json file with broken JSON or
bytes that are not UTF-8, a truncated gzip stream) always raises.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from glm_session.data.session import DataError, Session, session_from_messages

Format = Literal["auto", "sharegpt", "openai", "chatglm"]
OnError = Literal["raise", "skip"]

DEFAULT_ROLE_MAP = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
}


@dataclass
class ReadResult:
    """Sessions in file order, and the records skipped under ``on_error="skip"`` (as their errors)."""

    sessions: list[Session] = field(default_factory=list)
    skipped: list[DataError] = field(default_factory=list)

    @property
    def dropped_trailing_questions(self) -> int:
        return sum(s.dropped_trailing_question for s in self.sessions)


def read_sessions(
    paths: str | Path | list[str | Path],
    format: Format = "auto",
    role_map: Mapping[str, str] | None = None,
    on_error: OnError = "raise",
    limit: int | None = None,
    drop_trailing_question: bool = False,
) -> ReadResult:
    """Read every session of ``paths`` in order (the first ``limit`` valid ones if given).

    Args:
        paths: one file or several, read in order.
        format: record shape, or ``auto`` to detect it per record.
        role_map: extra role names -> system/user/assistant (e.g. ``{"client": "user"}``).
        on_error: ``raise`` the first ``DataError``, or ``skip`` bad records and count them.
        limit: stop after this many sessions.
        drop_trailing_question: drop (and count) a final unanswered user message instead of failing.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    roles = {**DEFAULT_ROLE_MAP, **{k.lower(): v for k, v in (role_map or {}).items()}}
    result = ReadResult()
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for record_number, record in _records(Path(path)):
            if limit is not None and len(result.sessions) >= limit:
                return result
            try:
                if isinstance(record, DataError):
                    raise record
                result.sessions.append(
                    parse_record(record, format, roles, str(path), record_number, drop_trailing_question)
                )
            except DataError as err:
                if on_error == "raise":
                    raise
                result.skipped.append(err)
    return result


def parse_record(
    record: Any,
    format: Format,
    roles: Mapping[str, str],
    path: str,
    record_number: int | str,
    drop_trailing_question: bool = False,
) -> Session:
    """One JSON record -> ``Session``."""
    if not isinstance(record, dict):
        raise DataError(path, record_number, f"a record must be a JSON object, got {_type(record)}")
    if format == "auto":
        format = _detect(record, path, record_number)
    raw_id = record.get("id")
    session_id = str(raw_id) if isinstance(raw_id, (str, int)) else f"{Path(path).name}:{record_number}"
    parse = {"sharegpt": _sharegpt, "openai": _openai, "chatglm": _chatglm}.get(format)
    if parse is None:
        raise ValueError(f"unknown data format {format!r}: use auto, sharegpt, openai or chatglm")
    messages = parse(record, path, record_number)
    try:
        mapped = [(roles[role.lower()], text) for role, text in messages]
    except KeyError:
        number, role = next((n, r) for n, (r, _) in enumerate(messages, 1) if r.lower() not in roles)
        known = ", ".join(sorted(roles))
        raise DataError(
            path, record_number, f"message {number}: unknown role {role!r} (role map: {known})"
        ) from None
    return session_from_messages(mapped, session_id, path, record_number, drop_trailing_question)


def _detect(record: dict, path: str, record_number: int | str) -> Format:
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "prompt" in record or "response" in record:
        return "chatglm"
    raise DataError(
        path, record_number, "missing field: expected 'conversations', 'messages' or 'prompt'/'response'"
    )


def _field(obj: dict, key: str, kind: type, path: str, record_number: int | str, where: str = "") -> Any:
    if key not in obj:
        raise DataError(path, record_number, f"{where}missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(path, record_number, f"{where}{key!r} must be {kind.__name__}, got {_type(value)}")
    return value


def _message_list(record: dict, key: str, path: str, record_number: int | str) -> list[dict]:
    items = _field(record, key, list, path, record_number)
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise DataError(path, record_number, f"message {number} must be an object, got {_type(item)}")
    return items


def _system(record: dict, path: str, record_number: int | str) -> list[tuple[str, str]]:
    if record.get("system") in (None, ""):
        return []
    return [("system", _field(record, "system", str, path, record_number))]


def _sharegpt(record: dict, path: str, record_number: int | str) -> list[tuple[str, str]]:
    items = _message_list(record, "conversations", path, record_number)
    return _system(record, path, record_number) + [
        (
            _field(m, "from", str, path, record_number, f"message {n}: "),
            _field(m, "value", str, path, record_number, f"message {n}: "),
        )
        for n, m in enumerate(items, start=1)
    ]


def _openai(record: dict, path: str, record_number: int | str) -> list[tuple[str, str]]:
    try:  # fast path; the checks below say what is wrong
        pairs = [(m["role"], m["content"]) for m in record["messages"]]
        if all(type(role) is str and type(content) is str for role, content in pairs):
            return pairs
    except (KeyError, TypeError):
        pass
    items = _message_list(record, "messages", path, record_number)
    return [
        (
            _field(m, "role", str, path, record_number, f"message {n}: "),
            _field(m, "content", str, path, record_number, f"message {n}: "),
        )
        for n, m in enumerate(items, start=1)
    ]


def _chatglm(record: dict, path: str, record_number: int | str) -> list[tuple[str, str]]:
    prompt = _field(record, "prompt", str, path, record_number)
    response = _field(record, "response", str, path, record_number)
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError(path, record_number, f"'history' must be list, got {_type(history)}")
    messages = _system(record, path, record_number)
    for number, pair in enumerate(history, start=1):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise DataError(path, record_number, f"history item {number} must be [question, answer] strings")
        messages += [("user", pair[0]), ("assistant", pair[1])]
    return messages + [("user", prompt), ("assistant", response)]


# files -> records --------------------------------------------------------------------------------


def _records(path: Path) -> Iterator[tuple[int | str, Any]]:
    """(record number, parsed JSON or DataError) for each record; file-level problems raise."""
    if not path.is_file():
        raise DataError(str(path), None, "no such file")
    name = path.name.lower()
    compressed = name.endswith(".gz")
    stem = name[:-3] if compressed else name
    if not (stem.endswith(".jsonl") or stem.endswith(".json")):
        raise DataError(str(path), None, "unknown file type: expected .json, .jsonl, .json.gz or .jsonl.gz")
    data = _read_bytes(path, compressed)
    if stem.endswith(".jsonl"):
        yield from _jsonl_records(path, data)
    else:
        yield from _json_records(path, data)


def _read_bytes(path: Path, compressed: bool) -> bytes:
    if not compressed:
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (EOFError, OSError, zlib.error) as err:
        raise DataError(str(path), None, f"not a complete gzip file ({err})") from None


def _jsonl_records(path: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    for line_number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"line {line_number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            yield (
                where,
                DataError(
                    str(path),
                    where,
                    f"not valid UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1})",
                ),
            )
            continue
        try:
            yield where, json.loads(text)
        except json.JSONDecodeError as err:
            yield where, DataError(str(path), where, f"invalid JSON: {err.msg} at column {err.colno}")


def _json_records(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            str(path), None, f"not valid UTF-8 (byte 0x{data[err.start]:02x} on line {line})"
        ) from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(
            str(path), None, f"invalid JSON: {err.msg} at line {err.lineno} column {err.colno}"
        ) from None
    if isinstance(parsed, dict):
        parsed = [parsed]
    if not isinstance(parsed, list):
        raise DataError(str(path), None, f"a .json file must hold a list of records, got {_type(parsed)}")
    yield from enumerate(parsed, start=1)


def _type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )
