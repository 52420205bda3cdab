"""One error style for every command-line tool: bad input ends with one line on stderr and exit code 2.

Library code raises ``UserError`` (or a subclass: ``DataError``, ``ConfigError``, ``CheckpointError``, ...) for
anything its user can fix: a bad file, record, value or checkpoint, each named in the message. ``cli_errors``
turns these, and the configuration errors of Hydra, OmegaConf and Lightning, into ``error: <message>`` on one line
and exit code 2. Any other exception is a bug in glm_session and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

EXIT_BAD_INPUT = 2
PLUGIN_EXTRAS = {  # the Hydra plugins whose configs the project names -> the extra that installs each
    "hydra/sweeper/optuna": "sweep",
    "hydra/launcher/submitit": "slurm",
}
QUOTING_HINT = (
    "quote a value holding spaces, non-ASCII characters or Hydra's special characters, "
    """e.g. 'data.path="my data/对话.jsonl"'"""
)


class UserError(Exception):
    """Bad input that the user can fix; the message names what is wrong (file, record, key, value) and why."""


class ConfigError(UserError, ValueError):
    """A configuration value outside its allowed range.

    Args:
        key: the config key, as typed on the command line (``data.max_seq_len``).
        value: the value given.
        requirement: what the key takes, in words (``an integer >= 1``).
    """

    def __init__(self, key: str, value: Any, requirement: str) -> None:
        self.key, self.value, self.requirement = key, value, requirement
        super().__init__(f"{key}={_yaml(value)}: must be {requirement}")


def _yaml(value: Any) -> str:
    """A value as a YAML override writes it (``true``, ``null``, ``'abc'``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else repr(value)


# checks of config values ---------------------------------------------------------------------------


def file_in_the_way(folder: str | os.PathLike) -> str | None:
    """The file that keeps ``folder`` from being a folder or from being made (itself, or the first of its parents
    that exists), or ``None``: where ``mkdir`` would say only "File exists" or "Not a directory"."""
    path = Path(folder)
    found = next((p for p in (path, *path.parents) if p.exists()), None)
    return str(found) if found is not None and not found.is_dir() else None



def check_int(key: str, value: Any, minimum: int | None = None, optional: bool = False) -> int | None:
    """``value`` as an int (not a bool, float or string), at least ``minimum``; ``None`` if ``optional``."""
    if value is None and optional:
        return None
    requirement = (
        "an integer" + (f" >= {minimum}" if minimum is not None else "") + (" or null" if optional else "")
    )
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        raise ConfigError(key, value, requirement)
    return value


def check_bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, value, "true or false")
    return value


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(key, value, "one of " + ", ".join(choices))
    return value


def check_fraction(key: str, value: Any) -> float:
    """A finite number in [0, 1)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(key, value, "a number in [0, 1)")
    if not 0 <= value < 1:
        raise ConfigError(key, value, "a number in [0, 1)")
    return float(value)


def check_number(key: str, value: Any, minimum: float, exclusive: bool = False) -> float:
    """A finite number above (``exclusive``) or at least ``minimum``."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad or value < minimum or (exclusive and value == minimum):
        raise ConfigError(key, value, f"a number {'>' if exclusive else '>='} {minimum}")
    return float(value)


# the command-line side -----------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return "; ".join(line.strip() for line in str(text).strip().splitlines() if line.strip())


def user_message(err: BaseException) -> str | None:
    """The one-line message of an error its user can fix, or ``None`` for a bug (which keeps its traceback)."""
    from hydra.errors import HydraException, InstantiationException, OverrideParseException
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from omegaconf.errors import OmegaConfBaseException

    cause = err.__cause__ or err.__context__
    if isinstance(err, InstantiationException) and cause is not None:
        inner = user_message(cause)
        if inner is not None:
            return inner
        if isinstance(cause, TypeError):  # an unknown or missing argument of a config group's constructor
            return _one_line(f"{_one_line(str(err)).split(';')[0]} {cause}")
    if isinstance(err, UserError | MisconfigurationException):
        return _one_line(str(err))
    if isinstance(err, OverrideParseException):
        return f"cannot read the override {err.override!r} ({QUOTING_HINT})"
    if isinstance(err, HydraException | OmegaConfBaseException):
        message = _one_line(str(err))
        plugin = next((name for name in PLUGIN_EXTRAS if f"Could not find '{name}" in message), None)
        if plugin is not None:  # a Hydra plugin that is not installed: say which extra installs it, not the search path
            return (f"{message.split('; Available options')[0]}: Hydra's {plugin.split('/')[-1]} plugin is not "
                    f"installed; pip install 'glm_session[{PLUGIN_EXTRAS[plugin]}]'")  # fmt: skip
        if isinstance(cause, OmegaConfBaseException):
            message += "; " + _one_line(str(cause))
        return message
    if isinstance(err, ValueError) and str(err).strip().startswith("`val_check_interval` ("):  # Lightning's
        return "trainer." + _one_line(str(err)).replace("`", "").split(". ")[0]
    if isinstance(err, ValueError) and str(err).startswith("Config group override must be"):  # group=null
        return f"{_one_line(str(err))}: leave a config group out with ~GROUP (e.g. ~scheduler), not GROUP=null"
    if isinstance(err, OSError) and err.filename is not None:  # FileNotFoundError, IsADirectoryError, ...
        return f"{err.filename}: {err.strerror or err}"
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):  # the disk, not a bug
        return f"a file could not be written: {err.strerror}"
    return None


@contextmanager
def cli_errors() -> Iterator[None]:
    """Report a user error as ``error: <message>`` on stderr and exit with code 2; let bugs raise."""
    try:
        yield
    except Exception as err:
        message = user_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None


class CommandLineParser(argparse.ArgumentParser):
    """``argparse``, whose errors are the project's one line (``error: ...``, exit code 2), not its usage lines and
    the script's name before the message."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (python -m {self.prog} --help says what it takes)", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)
