"""The project's one exception type, and how a stage reports it: one line, non-zero exit, no traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable


class PipelineError(Exception):
    """A problem the user can act on; the message names the file/row/param and the fix."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(), turning a PipelineError into one line on stderr and exit code 1."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score announces its tokenizer on every call
    try:
        main()
    except PipelineError as err:
        message = " ".join(line.strip() for line in str(err).splitlines())  # one line, even if a cause had several
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted; outputs written so far are complete, the rest were not written", file=sys.stderr)
        sys.exit(130)
