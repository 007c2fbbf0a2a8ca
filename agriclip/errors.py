"""The failures the `agriclip` command and the `python -m` scripts report as one line and an exit status, without a
traceback (a traceback means a bug). Imports only the standard library: every entry point uses it before torch loads.
"""

import sys
from collections.abc import Callable
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


class SingleLabelWarning(UserWarning):
    """`ZeroShotClassifier.predict` with one label, whose score is always 1.0 (the `agriclip` command says it itself,
    before the model loads, and hides this one)."""


# Said by `agriclip predict` and `classify-folder` before the model loads, and by `ZeroShotClassifier.predict`.
SINGLE_LABEL_WARNING = (
    "a single label ({label!r}) always scores 1.0: scores are softmax probabilities over the labels given, relative "
    "to those labels only; give the alternatives too"
)


# The scripts' exit statuses (`python -m training.*`, `python -m evaluation.suite`), in their --help.
SCRIPT_EXIT_CODES = """\
exit codes:
  0    success
  1    an unexpected error: a bug, please report it with the traceback
  2    usage error (bad or missing arguments)
  9    an input is not usable, or the run cannot go on: data, a config, a model folder or Hub id, an output folder
       locked by another run, no readable image, a non-finite loss, collapsed outputs; one line on stderr says what
       and what to do
  143  stopped by SIGTERM (a training run says what it kept and how to continue)
"""

# The package's own errors of bad input, or of a run that cannot go on, that are neither ValueErrors nor OSErrors:
# named, not imported, so that this module stays light (a class of a module never imported cannot have been raised).
INPUT_ERROR_CLASSES = {
    "training.runtime": ("UnreadableDataError", "RunLockedError", "NonFiniteLossError"),
    "training.distillation": ("CollapseError",),
}


def _input_error_types() -> tuple[type[BaseException], ...]:
    loaded = [
        getattr(sys.modules[module], name)
        for module, names in INPUT_ERROR_CLASSES.items()
        if module in sys.modules
        for name in names
    ]
    return (ValueError, OSError, *loaded)


# The packages of this distribution: an error raised inside one of them was raised on purpose, with a message.
PACKAGES = ("agriclip", "modeling_agriclip", "training", "evaluation", "model_card")


def _raised_here(error: BaseException) -> bool:
    """Whether `error` was raised by this distribution's own code, where the messages for bad input are written; a
    ValueError from inside a library (a path function, a parser) is a bug or an unforeseen case, not bad input."""
    traceback = error.__traceback__
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback.tb_frame.f_globals.get("__name__", "").partition(".")[0] in PACKAGES


def one_line(error: BaseException) -> str:
    """An error's message on one line: its lines joined by "; " (e.g. a decode summary naming files per reason)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__


def run_command(main: Callable[[], object], module: str) -> None:
    """Runs a script's `main()` as its `if __name__ == "__main__":` entry point (`module`: its `__spec__.name`).

    Bad input (a ValueError or OSError that this package's code raised for data, settings or arguments, and the
    errors of `INPUT_ERROR_CLASSES`) ends the process with one line `python -m MODULE: error: MESSAGE` on stderr and
    exit status 9, a `CLIError` with its own status (`SCRIPT_EXIT_CODES`); anything else, a ValueError raised inside a
    library included, is a bug and keeps its traceback.
    A `main()` called directly (tests, `training.run_all`) raises its errors as they are.
    """
    try:
        main()
    except Exception as error:
        deliberate = isinstance(error, CLIError) or (isinstance(error, _input_error_types()) and _raised_here(error))
        if not deliberate:
            raise
        print(f"python -m {module}: error: {one_line(error)}", file=sys.stderr)
        sys.exit(int(error.code if isinstance(error, CLIError) else ExitCode.INPUT))
