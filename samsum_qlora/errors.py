"""The project's one exception type, and how a stage reports: one line on error, no traceback, and a log
without the library chatter that is not the user's to act on."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable

# Progress bars redraw in place with carriage returns; in a log file (DVC's queue, CI, `dvc repro > log`) every
# redraw lands on the same line, so a bar that is not on a terminal redraws at most this often (seconds).
LOG_FILE_PROGRESS_INTERVAL = "30"


def quiet_libraries() -> None:
    """Silence messages that are about the libraries' internals, not about the run."""
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score announces its tokenizer on every call
    # huggingface_hub and datasets write to stderr through their own handlers and also pass every record up to
    # the root handler configured above: each message would be printed twice.
    for name in ("huggingface_hub", "datasets"):
        logging.getLogger(name).propagate = False
    # peft reads transformers' old name of the checkpointing flag; transformers then warns on every model load.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_MININTERVAL", LOG_FILE_PROGRESS_INTERVAL)


class PipelineError(Exception):
    """A problem the user can act on; the message names the file/row/param and the fix."""


def _end_progress_line() -> None:
    """Start a fresh line if a progress bar was cut off mid-line (it redraws with carriage returns, no newline)."""
    from tqdm import tqdm

    if getattr(tqdm, "_instances", None):
        print(file=sys.stderr)


def run_stage(main: Callable[[], None], on_interrupt: Callable[[], str] | None = None) -> None:
    """Run a stage's main(), turning a PipelineError into one line on stderr and exit code 1, and Ctrl-C into one
    line (with `on_interrupt()`'s advice, when given) and exit code 130; either starts on a line of its own."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_libraries()
    try:
        main()
    except PipelineError as err:
        message = " ".join(line.strip() for line in str(err).splitlines())  # one line, even if a cause had several
        _end_progress_line()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        _end_progress_line()
        advice = on_interrupt() if on_interrupt else "run the same command again to redo it"
        print(f"error: interrupted; outputs written so far are complete, the rest were not written; {advice}",
              file=sys.stderr)
        sys.exit(130)
