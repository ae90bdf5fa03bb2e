"""Runs one trial's command in a process group of its own and ends that whole group when asked (SIGINT or SIGTERM)
or when the Dask worker that started it dies, so no training outlives its trial.

    python -m samsum_qlora.search.guard -- dvc exp run -n NAME -S KEY=VALUE ...

A dead worker cannot clean up after itself, and its trial's stage processes are grandchildren it does not know:
Linux's parent-death signal tells this guard instead, which then stops the group. (Elsewhere the guard still
forwards signals, but a worker killed outright leaves its trial running.)
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

GRACE_S = 30.0  # after SIGINT, how long the group may take to stop cleanly before it is killed
PR_SET_PDEATHSIG = 1


def _hear_of_parent_death() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop_group(child: subprocess.Popen) -> int:
    """SIGINT to the whole group (dvc and its stage), then SIGKILL after GRACE_S; the command's exit code."""
    try:
        os.killpg(child.pid, signal.SIGINT)
        return child.wait(GRACE_S)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        return child.wait()
    except ProcessLookupError:
        return child.wait()


def main(argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("usage: python -m samsum_qlora.search.guard -- COMMAND [ARG ...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    _hear_of_parent_death()
    stop = {"asked": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["asked"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    child = subprocess.Popen(argv, start_new_session=True)
    while True:
        if stop["asked"] or os.getppid() != parent:  # the parent died before prctl took hold
            return _stop_group(child)
        try:
            return child.wait(0.2)
        except subprocess.TimeoutExpired:
            continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
