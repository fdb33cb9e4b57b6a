"""Helpers shared by the terminal scripts: argument types, the error wrapper, progress."""
from __future__ import annotations

import argparse
import logging
import os
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


def run_main(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> None:
    """Run a script's main; turn UserError into one line on stderr and exit 2."""
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        main(argv)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
