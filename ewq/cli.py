"""Helpers shared by the terminal scripts: argument types, the error wrapper, progress."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import Callable, Sequence

from tqdm import tqdm

from .errors import UserError

EXIT_USAGE = 2


def progress(iterable=None, **kwargs):
    """A progress bar on stderr; silent when EWQ_NO_PROGRESS is set (tests, CI logs)."""
    kwargs.setdefault("disable", bool(os.environ.get("EWQ_NO_PROGRESS")))
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse with the project's exit code for usage errors (2, the argparse default)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message: str):
        """One line, like every other refusal: `error: ...`, exit 2."""
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `with atomic_path(...)` removes its
    temporary file and running llama.cpp tools are killed (subprocess.run does that on any exception)."""


def _on_sigterm(signum, frame):
    raise Terminated()


def run_main(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a script's main; turn UserError into one line on stderr and exit 2; on SIGTERM or
    Ctrl-C leave finished files as they were and no temporary ones."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted; finished files are unchanged (benchmarks: --resume continues)", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated; finished files are unchanged (benchmarks: --resume continues)", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)


def dry_run(lines: list[str]) -> None:
    """What a script would do, on stdout; called after every input was validated."""
    print("dry run: inputs are valid; nothing was written. Would:")
    for line in lines:
        print(f"  - {line}")
