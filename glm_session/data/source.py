"""Where the sessions come from: the files, how they are read, and how they are split into train, validation and test.

``DialogueSource`` reads each split once (``readers.read_sessions``) and keys what it reads (``key``: the files'
bytes and the settings), so that the samples built from it are cached under that key, and keeps a summary of each
read (sessions, turns, skipped records) beside the cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from glm_session.data.readers import ReadResult, read_sessions
from glm_session.data.session import ROLES
from glm_session.errors import ConfigError, check_bool, check_choice, check_fraction, check_int

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")
SKIPS_KEPT = 20  # skipped records whose messages the summary keeps


class DialogueSource:
    """The sessions of every split.

    Args:
        train_path, validation_path, test_path: one file per split.
        path: one file, or a list of files read in order, whose sessions are all used (the split files are then not
            used); ``holdout`` moves a deterministic share of them (by a hash, ``holdout_by``) to validation and test,
            e.g. ``{"validation": 0.05, "test": 0.05}``.
        holdout_by: what the holdout hashes: ``id`` (each session on its own) or ``opening`` (the session's first
            question: every session with the same opening lands in the same split, so a test session never opens
            as a training session does).
        format, role_map, on_error, drop_trailing_question, normalize: how files are read
            (``readers.read_sessions``).
        limit: the first ``limit`` sessions of each file.

    ``key`` hashes the files' names and content, not their folders: the same data at another path (another clone,
    another environment's copy of the bundled KdConv) is the same data, for the sample cache and for resuming a run.
    (The name is part of it: it decides how the file is read, and it names the sessions of a file without ids, which
    ``holdout`` hashes.)
    """

    def __init__(
        self,
        train_path: str | None = None,
        validation_path: str | None = None,
        test_path: str | None = None,
        path: str | Sequence[str] | None = None,
        holdout: Mapping[str, float] | None = None,
        holdout_by: str = "id",
        format: str = "auto",
        role_map: Mapping[str, str] | None = None,
        on_error: str = "raise",
        drop_trailing_question: bool = False,
        limit: int | None = None,
        normalize: str | None = None,
    ) -> None:
        self.files = {"train": train_path, "validation": validation_path, "test": test_path}
        for split, file in self.files.items():
            if file is not None and not (isinstance(file, str | os.PathLike) and str(file).strip()):
                raise ConfigError(f"data.{split}_path", file, "a file, or null")
        self.path, self.holdout = _check_path(path), _check_holdout(holdout)
        if self.holdout and self.path is None:  # the split files are used as they are: a holdout would do nothing
            raise ConfigError(
                "data.holdout", dict(self.holdout), "null without data.path: it splits the sessions of data.path, "
                "while data.train_path, data.validation_path and data.test_path are used as they are"
            )  # fmt: skip
        self.holdout_by = check_choice("data.holdout_by", holdout_by, ("id", "opening"))
        self.read_options = {
            "format": check_choice("data.format", format, ("auto", "sharegpt", "openai", "chatglm", "text")),
            "role_map": _check_role_map(role_map),
            "on_error": check_choice("data.on_error", on_error, ("raise", "skip")),
            "limit": check_int("data.limit", limit, minimum=1, optional=True),
            "drop_trailing_question": check_bool("data.drop_trailing_question", drop_trailing_question),
            "normalize": _check_normalize(normalize),
        }
        if self.holdout_by == "opening" and self.read_options["format"] == "text":
            # a document is one turn with an empty question: every document would open alike, in one split
            raise ConfigError(
                "data.holdout_by", holdout_by, "id with data.format=text (documents have no opening)"
            )
        self._reads: dict[str, ReadResult] = {}

    def read(self, split: str) -> ReadResult:
        """The sessions of ``split`` (``train``, ``validation``, ``test``, or ``all`` of them)."""
        if split == "all":
            parts = [self.read(s) for s in SPLITS]
            return ReadResult([x for p in parts for x in p.sessions], [x for p in parts for x in p.skipped])
        if split not in SPLITS:
            raise ConfigError("split", split, f"one of {', '.join(SPLITS)} or all")
        if split not in self._reads:
            if self.path is not None:
                self._reads.update(self._split_by_holdout(read_sessions(self.path, **self.read_options)))
            else:
                path = self.files[split]
                self._reads[split] = read_sessions(path, **self.read_options) if path else ReadResult()
        return self._reads[split]

    def _split_by_holdout(self, result: ReadResult) -> dict[str, ReadResult]:
        splits = {name: ReadResult() for name in SPLITS}
        # What concerns the whole file is counted with the train split.
        splits["train"].skipped = result.skipped
        splits["train"].non_nfc_texts, splits["train"].normalized_texts = (
            result.non_nfc_texts,
            result.normalized_texts,
        )
        validation, test = self.holdout.get("validation", 0.0), self.holdout.get("test", 0.0)
        for session in result.sessions:
            key = session.id if self.holdout_by == "id" else session.turns[0].question
            u = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32
            name = "validation" if u < validation else "test" if u < validation + test else "train"
            splits[name].sessions.append(session)
        return splits

    def key(self) -> str:
        """Hash of the input files' content (by the split each one feeds, whatever its path) and of how they are read
        and split."""
        digest = hashlib.sha256()
        files = [("path", p) for p in self.path] if self.path is not None else list(self.files.items())
        for role, path in files:
            digest.update(role.encode())
            if path is None:
                digest.update(b"none")
            else:  # the name too: it says how the file is read (.json, .jsonl, .gz, .xz) and names records without ids
                file = Path(path)
                digest.update(file.name.encode())
                digest.update(hashlib.sha256(file.read_bytes()).digest() if file.is_file() else b"missing")
        settings = {"one file": self.path is not None, "holdout": self.holdout, "read": self.read_options}
        if self.holdout_by != "id":  # (the key of earlier runs stays what it was)
            settings["holdout_by"] = self.holdout_by
        digest.update(json.dumps(settings, sort_keys=True).encode())
        return digest.hexdigest()[:32]

    def describe(self, split: str) -> str:
        """The file ``split`` comes from, as an error message names it."""
        if self.path is None:
            return str(self.files.get(split))
        files = ", ".join(self.path)
        return files if split == "train" else f"{files} (data.holdout.{split}={self.holdout.get(split, 0.0)})"

    def summary(self, split: str, cache_dir: Path) -> dict[str, Any]:
        """What reading ``split`` found (from the cache when the same files were read before)."""
        path = cache_dir / f"read-{self.key()}-{split}.json"
        if path.exists():
            try:
                summary = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:  # damaged: read the files again
                log.warning("%s: a damaged summary of a read (%s): it is made again", path, err)
                summary = {}
            if isinstance(summary, dict) and "openings" in summary:  # else an earlier version's: read again
                return summary
        read = self.read(split)
        summary = {
            "sessions": len(read.sessions),
            "turns": sum(len(s.turns) for s in read.sessions),
            "max_turns": max((len(s.turns) for s in read.sessions), default=0),
            "openings": len({s.turns[0].question for s in read.sessions}),  # distinct first questions
            "non_nfc_texts": read.non_nfc_texts,
            "normalized_texts": read.normalized_texts,
            "skipped_records": len(read.skipped),
            "skipped": [str(e) for e in read.skipped[:SKIPS_KEPT]],
            "dropped_trailing_questions": read.dropped_trailing_questions,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        temporary.write_text(json.dumps(summary, ensure_ascii=False, indent=1))
        temporary.replace(path)  # whole or absent: runs side by side read it while another writes it
        return summary


def _check_path(path: str | Sequence[str] | None) -> list[str] | None:
    """``data.path`` as a list of files (one file or several)."""
    if path is None:
        return None
    paths = [path] if isinstance(path, str | os.PathLike) else list(path) if isinstance(path, Sequence) else None
    if not paths or not all(isinstance(p, str | os.PathLike) and str(p).strip() for p in paths):
        raise ConfigError("data.path", path, "a file or a non-empty list of files")
    seen: dict[Path, str] = {}
    for p in map(str, paths):
        if Path(p).resolve() in seen:  # its sessions twice: each one trained twice an epoch, or in two splits
            raise ConfigError("data.path", path, f"a list of distinct files ({seen[Path(p).resolve()]} and {p} are one)")
        seen[Path(p).resolve()] = p
    return [str(p) for p in paths]


def _check_normalize(normalize: str | None) -> str | None:
    if normalize not in (None, "NFC", "NFKC"):
        raise ConfigError("data.normalize", normalize, "null (texts as they are), NFC or NFKC")
    return normalize


def _check_holdout(holdout: Mapping[str, float] | None) -> dict[str, float]:
    if holdout is not None and not isinstance(holdout, Mapping):
        raise ConfigError("data.holdout", holdout, "null or a mapping like {validation: 0.05, test: 0.05}")
    holdout = dict(holdout or {})
    for name, fraction in holdout.items():
        if name not in ("validation", "test"):
            raise ConfigError(f"data.holdout.{name}", fraction, "left out: holdout takes validation and test")
        check_fraction(f"data.holdout.{name}", fraction)
    if sum(holdout.values()) >= 1:
        raise ConfigError("data.holdout", holdout, "fractions whose sum is below 1 (some sessions must train)")
    return holdout


def _check_role_map(role_map: Mapping[str, str] | None) -> dict[str, str]:
    if role_map is not None and not isinstance(role_map, Mapping):
        raise ConfigError("data.role_map", role_map, "null or a mapping like {client: user, counselor: assistant}")
    role_map = dict(role_map or {})
    for name, role in role_map.items():
        if not isinstance(name, str) or not name.strip():
            raise ConfigError("data.role_map", role_map, "a mapping from role names (strings) to system, user or assistant")
        check_choice(f"data.role_map.{name}", role, ROLES)
    return role_map
