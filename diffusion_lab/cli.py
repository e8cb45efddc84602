"""What train.py / evaluate.py / sample.py do with an error a person can act on: one line on stderr, exit 2
(and, first, diffusion_lab.allocator.keep_freed_memory: the CPU malloc settings every entry point runs with).

    @hydra.main(...)
    def main(cfg): return run(train, cfg)

Bad config values, unusable checkpoints, unreadable data files and a full disk are reported as
`error: <message naming the key or file and what to do>` with exit status 2 (a diverged run: exit 1),
without a traceback; `HYDRA_FULL_ERROR=1` re-raises for the full trace. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import InstantiationException

from .allocator import keep_freed_memory
from .io import DiskFullError
from .lit.checkpointing import NonFiniteCheckpointError, Preempted
from .lit.reliability import NonFiniteLossError

INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, DiskFullError)
RUN_FAILURES = (NonFiniteLossError, NonFiniteCheckpointError, Preempted)


def root_cause(e: BaseException) -> BaseException:
    """The constructor's own error inside Hydra's InstantiationException wrapper(s)."""
    while isinstance(e, InstantiationException) and e.__cause__ is not None:
        e = e.__cause__
    return e


def one_line(e: BaseException) -> str:
    text = str(e)
    if "\nOriginal Traceback" in text:  # torch's re-raise of a DataLoader worker's error: its own message
        own = list(re.finditer(rf"\n(?:[\w.]+\.)?{type(e).__name__}: ", text))
        text = text[own[-1].end() :] if own else text
    text = " ".join(text.split()) or type(e).__name__
    return text if isinstance(e, ValueError | OSError | RuntimeError) else f"{type(e).__name__}: {text}"


def run(task: Callable[[Any], Any], cfg: Any) -> Any:
    keep_freed_memory()
    try:
        return task(cfg)
    except Exception as e:  # noqa: BLE001 - sorted below: user-facing errors get one line, the rest re-raise
        cause = root_cause(e)
        if os.environ.get("HYDRA_FULL_ERROR") == "1" or not isinstance(cause, INPUT_ERRORS + RUN_FAILURES):
            raise
        print(f"error: {one_line(cause)}", file=sys.stderr, flush=True)
        sys.exit(1 if isinstance(cause, RUN_FAILURES) else 2)
