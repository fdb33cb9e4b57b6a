"""What the library prints while it works: progress bars and log lines, both on stderr."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress(iterable=None, **kwargs):
    """A progress bar on stderr; silent when EWQ_NO_PROGRESS is set (tests, CI logs)."""
    kwargs.setdefault("disable", bool(os.environ.get("EWQ_NO_PROGRESS")))
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
