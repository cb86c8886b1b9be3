"""The mark of an error the user can fix: a bad value, a missing file, an unreachable bucket, an unusable run dir.

Each layer raises its own types (ConfigError, DatasetError, WeightsError, EvalError, S3AccessError, ...); they all
derive from `UserError`, so the boundary around every command (dinocell.commands.boundary) prints their message as
one line and exits non-zero, while any other exception is a bug and keeps its traceback. A few operating-system
errors are the user's too (a path that does not exist or cannot be written, a full disk): `is_user_error` says which.
This module is the bottom layer: it imports no other part of dinocell, and every package may import it.
"""

from __future__ import annotations

import errno
import re

# OSErrors about a path the user named (or its storage), which a traceback would not help to fix
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, FileExistsError)
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # disk full, quota exceeded, read-only file system


class UserError(Exception):
    """An error whose message says what was wrong, the value, and the fix; `exit_code` is the process's status."""

    exit_code = 2


class UsageError(UserError, ValueError):
    """A command-line value that cannot work: an option out of range, options that contradict each other."""


class MissingDependencyError(UserError, ImportError):
    """An optional package that a feature needs is not installed; the message names what to install."""


def user_message(error: BaseException) -> str:
    """The message of a user error, without what Python or a DataLoader worker wraps around it."""
    if isinstance(error, OSError) and error.strerror and error.filename:
        return f"{error.strerror}: {error.filename}"
    text = str(error).strip()
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: the original message is the last line
        return re.sub(r"^[\w.]+: ", "", text.splitlines()[-1]) + " (in a data-loading worker)"
    return text


def is_user_error(error: BaseException) -> bool:
    """True for UserErrors and for OSErrors about a path or its storage (the user's to fix); False for bugs."""
    if isinstance(error, (UserError, *PATH_ERRORS)):
        return True
    return isinstance(error, OSError) and error.errno in STORAGE_ERRNOS
