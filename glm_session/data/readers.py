"""Read dialogue files (.json, .jsonl, each also as .gz or .xz) in the three common record shapes, or plain text.

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
import lzma
import unicodedata
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from glm_session.data.session import (
    DataError,
    Message,
    Session,
    Turn,
    check_control,
    check_unicode,
    session_from_messages,
    visible,
)

Format = Literal["auto", "sharegpt", "openai", "chatglm", "text"]
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
    non_nfc_texts: int = 0  # texts (questions, answers, system texts) not in Unicode's NFC form as read
    normalized_texts: int = 0  # texts that ``normalize`` changed

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
    normalize: str | None = None,
) -> ReadResult:
    """Read every session of ``paths`` in order (the first ``limit`` valid ones if given).

    Args:
        paths: one file or several, read in order.
        format: record shape, or ``auto`` to detect it per record.
        role_map: extra role names -> system/user/assistant (e.g. ``{"client": "user"}``).
        on_error: ``raise`` the first ``DataError``, or ``skip`` bad records and count them.
        limit: stop after this many sessions.
        drop_trailing_question: drop (and count) a final unanswered user message instead of failing.
        normalize: ``NFC`` or ``NFKC``: every text in that Unicode normalization form (the texts it changes are
            counted); ``None``: texts as they are (those not in NFC are counted, so that mixed forms show).

    A session id given twice (``7`` and ``"7"`` are the same id) is an error naming both records, or a skipped
    record under ``on_error="skip"``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    roles = {**DEFAULT_ROLE_MAP, **{k.lower(): v for k, v in (role_map or {}).items()}}
    result = ReadResult()
    first_seen: dict[str, str] = {}  # explicit session id -> "file, record" where it first came
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        for record_number, record in _records(Path(path)):
            if limit is not None and len(result.sessions) >= limit:
                return result
            try:
                if isinstance(record, DataError):
                    raise record
                session = parse_record(record, format, roles, str(path), record_number, drop_trailing_question)
                if isinstance(record.get("id"), (str, int)):
                    if session.id in first_seen:
                        raise DataError(
                            path,
                            record_number,
                            f"duplicate session id {session.id!r} (first at {first_seen[session.id]})",
                        )
                    first_seen[session.id] = DataError.locate(str(path), record_number)
                result.sessions.append(_normalized(session, normalize, result))
            except DataError as err:
                if on_error == "raise":
                    raise
                result.skipped.append(err)
    return result


def _normalized(session: Session, form: str | None, result: ReadResult) -> Session:
    """``session`` with its texts in ``form`` (``None``: as they are), counting in ``result`` the texts not in NFC
    and those that the form changed."""
    texts = [session.system or "", *(t for turn in session.turns for t in (turn.question, turn.answer))]
    result.non_nfc_texts += sum(not unicodedata.is_normalized("NFC", text) for text in texts)
    if form is None:
        return session
    changed = [text for text in texts if not unicodedata.is_normalized(form, text)]
    if not changed:
        return session
    result.normalized_texts += len(changed)

    def norm(text: str) -> str:
        return unicodedata.normalize(form, text)

    turns = tuple(Turn(norm(turn.question), norm(turn.answer)) for turn in session.turns)
    return replace(session, turns=turns, system=norm(session.system) if session.system else None)


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
    if raw_id is None:
        session_id = f"{Path(path).name}:{record_number}"
    elif isinstance(raw_id, str) and not raw_id.strip():
        raise DataError(path, record_number, "'id': empty (give a session id, or leave 'id' out)")
    elif isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool):
        session_id = str(raw_id)
        check_unicode(session_id, path, record_number, "'id'")
    else:
        raise DataError(path, record_number, f"'id' must be a string or an integer, got {_type(raw_id)}")
    if format == "text":
        return _document(record, session_id, path, record_number)
    parse = {"sharegpt": _sharegpt, "openai": _openai, "chatglm": _chatglm}.get(format)
    if parse is None:
        raise ValueError(f"unknown data format {format!r}: use auto, sharegpt, openai, chatglm or text")
    messages = parse(record, path, record_number)
    mapped = []
    for role, text, where in messages:
        if role.lower() not in roles:
            known = ", ".join(sorted(roles))
            raise DataError(path, record_number, f"{where}: unknown role {role!r} (role map: {known})")
        mapped.append(Message(roles[role.lower()], text, where))
    return session_from_messages(mapped, session_id, path, record_number, drop_trailing_question)


def _document(record: dict, session_id: str, path: str, record_number: int | str) -> Session:
    """A plain-text record ``{"id", "text"}``: a document, held as one turn whose question is empty (the ``plain``
    template writes its text alone; ``strategy=lm`` trains every token of it)."""
    text = _field(record, "text", str, path, record_number)
    check_unicode(text, path, record_number, "'text'")
    if not visible(text):
        raise DataError(path, record_number, "'text': empty, or no visible character")
    check_control(text, path, record_number, "'text'")
    return Session(session_id, (Turn("", text),))


SHAPE_KEYS: dict[Format, tuple[str, ...]] = {  # the fields that mark a dialogue shape, for data.format=auto
    "sharegpt": ("conversations",),
    "openai": ("messages",),
    "chatglm": ("prompt", "response"),
}


def _detect(record: dict, path: str, record_number: int | str) -> Format:
    shapes = [name for name, keys in SHAPE_KEYS.items() if any(key in record for key in keys)]
    if len(shapes) > 1:  # which dialogue is the record's? Reading one would drop the other without a word
        fields = " and ".join(repr(key) for name in shapes for key in SHAPE_KEYS[name] if key in record)
        raise DataError(path, record_number, f"both {fields}: a record holds one dialogue (or set data.format)")
    if shapes:
        return shapes[0]
    raise DataError(
        path,
        record_number,
        "missing field: expected 'conversations', 'messages' or 'prompt'/'response' "
        "(plain-text documents {'id', 'text'}: data.format=text)",
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


def _system(record: dict, path: str, record_number: int | str) -> list[Message]:
    if record.get("system") in (None, ""):
        return []
    return [Message("system", _field(record, "system", str, path, record_number), "'system'")]


def _sharegpt(record: dict, path: str, record_number: int | str) -> list[Message]:
    items = _message_list(record, "conversations", path, record_number)
    return _system(record, path, record_number) + [
        Message(
            _field(m, "from", str, path, record_number, f"message {n}: "),
            _field(m, "value", str, path, record_number, f"message {n}: "),
            f"message {n}",
        )
        for n, m in enumerate(items, start=1)
    ]


def _openai(record: dict, path: str, record_number: int | str) -> list[Message]:
    try:  # fast path; the checks below say what is wrong
        messages = [Message(m["role"], m["content"], f"message {n}") for n, m in enumerate(record["messages"], 1)]
        if all(type(m.role) is str and type(m.text) is str for m in messages) and not any(
            "weight" in m for m in record["messages"]
        ):
            return messages
    except (KeyError, TypeError):
        pass
    items = _message_list(record, "messages", path, record_number)
    for n, m in enumerate(items, start=1):
        if "weight" in m and (type(m["weight"]) is not int or m["weight"] != 1):
            raise DataError(
                path, record_number, f"message {n}: 'weight': {json.dumps(m['weight'])}: OpenAI's per-message "
                "weight is not read (every answer trains as the supervision policy says, conf/supervision/): "
                "leave it out, or 1; to train only some answers, drop the others' turns or choose a policy"
            )  # fmt: skip
    return [
        Message(
            _field(m, "role", str, path, record_number, f"message {n}: "),
            _field(m, "content", str, path, record_number, f"message {n}: "),
            f"message {n}",
        )
        for n, m in enumerate(items, start=1)
    ]


def _chatglm(record: dict, path: str, record_number: int | str) -> list[Message]:
    prompt = _field(record, "prompt", str, path, record_number)
    response = _field(record, "response", str, path, record_number)
    history = record.get("history")
    if history is None:  # absent or null: no history
        history = []
    if not isinstance(history, list):
        raise DataError(
            path, record_number, f"'history' must be a list of [question, answer], got {_type(history)}"
        )
    messages = _system(record, path, record_number)
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise DataError(path, record_number, f"history[{i}] must be [question, answer], got {_type(pair)}")
        for j, text in enumerate(pair):
            if not isinstance(text, str):
                raise DataError(path, record_number, f"history[{i}][{j}] must be a string, got {_type(text)}")
        messages += [
            Message("user", pair[0], f"history[{i}][0]"),
            Message("assistant", pair[1], f"history[{i}][1]"),
        ]
    return messages + [Message("user", prompt, "'prompt'"), Message("assistant", response, "'response'")]


# files -> records --------------------------------------------------------------------------------


def _records(path: Path) -> Iterator[tuple[int | str, Any]]:
    """(record number, parsed JSON or DataError) for each record; file-level problems raise."""
    if path.is_dir():
        raise DataError(str(path), None, "a folder, not a file (give one .json, .jsonl or .jsonl.gz file)")
    if not path.is_file():
        if path.exists():  # a FIFO, a socket, a device such as /dev/null
            raise DataError(str(path), None, "not a regular file (a pipe, socket or device): give a .json or .jsonl file")
        if path.is_symlink():
            raise DataError(str(path), None, "a symbolic link to nothing (its target is missing, or the links loop)")
        raise DataError(str(path), None, "no such file")
    name = path.name.lower()
    compressed = next((suffix for suffix in (".gz", ".xz") if name.endswith(suffix)), None)
    stem = name.removesuffix(compressed) if compressed else name
    if not (stem.endswith(".jsonl") or stem.endswith(".json")):
        raise DataError(
            str(path), None, "unknown file type: expected .json or .jsonl, optionally compressed (.gz or .xz)"
        )
    data = _read_bytes(path, compressed)
    if stem.endswith(".jsonl"):
        yield from _jsonl_records(path, data)
    else:
        yield from _json_records(path, data)


def _read_bytes(path: Path, compressed: str | None) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(str(path), None, f"cannot be read ({err.strerror or err})") from None
    if compressed is None or not raw:  # an empty file holds no record, compressed or not
        return raw
    try:
        return gzip.decompress(raw) if compressed == ".gz" else _xz_streams(raw, path)
    except (EOFError, OSError, zlib.error, lzma.LZMAError) as err:
        kind = "gzip" if compressed == ".gz" else "xz"
        raise DataError(str(path), None, f"not a complete {kind} file ({err})") from None


def _xz_streams(raw: bytes, path: Path) -> bytes:
    """Every stream of an .xz file end to end. ``lzma.decompress`` drops without a word whatever follows the first
    stream that is not one: a damaged second stream (and the records in it) or appended bytes."""
    parts: list[bytes] = []
    start = 0
    while start < len(raw):
        decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ)
        try:
            part = decompressor.decompress(raw[start:])
            if not decompressor.eof:
                raise EOFError("the file ends inside an xz stream")
        except (lzma.LZMAError, EOFError) as err:
            if not parts:
                raise
            raise DataError(
                str(path), None, f"the bytes after xz stream {len(parts)} (from byte {start:,}) are not a whole xz "
                f"stream ({err}): a damaged or appended file"
            ) from None  # fmt: skip
        parts.append(part)
        rest = decompressor.unused_data
        start = len(raw) - len(rest.lstrip(b"\0"))  # xz allows null padding between and after streams
    return b"".join(parts)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when a key comes twice: ``json.loads`` keeps the last and drops the first silently
    (two ``messages`` lists: one dialogue lost)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(key for key, _ in pairs if key in seen or seen.add(key)))
    return obj


_DECODER = json.JSONDecoder(object_pairs_hook=_object)
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which some editors write first: an encoding mark, not text


def _parse_json(text: str) -> tuple[Any, str | None]:
    """(parsed value, None), or (None, why the text is not JSON that can be read)."""
    try:
        return _DECODER.decode(text), None
    except _DuplicateKey as err:
        return None, f"invalid JSON: the key {err.key!r} twice in one object (JSON readers keep only the last)"
    except json.JSONDecodeError as err:
        return None, f"invalid JSON: {err.msg} at line {err.lineno} column {err.colno}"
    except RecursionError:
        return None, "invalid JSON: nested too deeply"
    except ValueError as err:  # e.g. an integer of more than 4,300 digits
        return None, f"invalid JSON: {err}"


def _jsonl_records(path: Path, data: bytes) -> Iterator[tuple[str, Any]]:
    for line_number, line in enumerate(data.removeprefix(BOM).split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"line {line_number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            reason = f"not valid UTF-8 (byte 0x{line[err.start]:02x} at column {err.start + 1})"
            yield where, DataError(str(path), where, reason)
            continue
        parsed, problem = _parse_json(text)
        if problem is not None:
            yield where, DataError(str(path), where, problem.replace(" at line 1 column", " at column"))
        else:
            yield where, parsed


def _json_records(path: Path, data: bytes) -> Iterator[tuple[int, Any]]:
    try:
        text = data.removeprefix(BOM).decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(
            str(path), None, f"not valid UTF-8 (byte 0x{data[err.start]:02x} on line {line})"
        ) from None
    parsed, problem = _parse_json(text)
    if problem is not None:
        raise DataError(str(path), None, problem)
    if isinstance(parsed, dict):
        parsed = [parsed]
    if not isinstance(parsed, list):
        raise DataError(str(path), None, f"a .json file must hold a list of records, got {_type(parsed)}")
    yield from enumerate(parsed, start=1)


def _type(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )
