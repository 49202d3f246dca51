"""One exception type for problems the user can fix, and a lazy importer for optional libraries.

The `viewpipe` command prints a `ViewpipeError` as a single line (what, where, what to do) instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class ViewpipeError(Exception):
    """A user-facing error: the message is one line saying what went wrong, where, and what to do."""


class UnreadableFileError(ViewpipeError):
    """A file that cannot be read; `reason` is the short cause (e.g. "Permission denied").
    The message alone constructs it too, as DataLoader does when it re-raises a worker's exception."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


def import_optional(module: str, extra: str, what: str | None = None) -> ModuleType:
    """Import an optional dependency, or raise a `ViewpipeError` naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ViewpipeError(
            f"{what or module} is not installed ({exc}); install it with: pip install 'viewpipe[{extra}]'"
        ) from exc
