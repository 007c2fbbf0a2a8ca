"""The failures the `agriclip` command reports as one line and an exit status, without a traceback."""

import sys
from enum import IntEnum


class ExitCode(IntEnum):
    """The process exit status of each failure (listed in `agriclip --help`)."""

    OK = 0
    USAGE = 2
    MODEL = 3
    NO_IMAGES = 4
    UNREADABLE = 5
    DEVICE = 6
    LABELS = 7
    OUTPUT = 8
    INPUT = 9
    INTERRUPTED = 130


class CLIError(Exception):
    """A failure reported as one `agriclip: error: ...` message and its exit code."""

    def __init__(self, code: ExitCode, message: str):
        super().__init__(message)
        self.code = code


def warn(message: str) -> None:
    """A warning of the `agriclip` command, on stderr."""
    print(f"agriclip: warning: {message}", file=sys.stderr)
