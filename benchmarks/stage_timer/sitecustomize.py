"""Per-process timing for the experiment-loop benchmark: put this folder on PYTHONPATH to switch it on.

When SAMSUM_BENCH_TIMINGS names a file, every Python process started with this folder on its path (each
stage DVC runs, and dvc itself) appends one JSON line to it when it exits: its command line, working
directory, start and end (Unix time: the start is when the interpreter reached this file, before any import),
its peak allocated GPU memory if it used CUDA, and, when it used torch.compile, the seconds torch's own
counters say it spent compiling (forward graphs, backward graphs, and the inductor/Triton part of both), how
many graphs it compiled and its compile caches' hits and misses. Nothing is imported until the process exits,
and no behaviour changes; without the variable the file does nothing. A sitecustomize further down the path
(e.g. the distribution's) still runs.
"""

import atexit
import json
import os
import sys
import time

_PATH = os.environ.get("SAMSUM_BENCH_TIMINGS")
_START = time.time()


def _compile_seconds():
    utils = sys.modules.get("torch._dynamo.utils")
    if utils is None or not hasattr(utils, "calculate_time_spent"):
        return None
    spent = utils.calculate_time_spent()
    if not spent.get("total_wall_time"):
        return None
    return {key: round(value, 3) for key, value in spent.items()}


def _gpu_peak_gib():
    """The process's peak allocated GPU memory, if it used CUDA (torch.cuda.max_memory_allocated)."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    except Exception:
        pass
    return None


def _compile_counters():
    """How many graphs were compiled, and the compile caches' hits and misses (torch._dynamo's counters)."""
    utils = sys.modules.get("torch._dynamo.utils")
    counters = getattr(utils, "counters", None)
    if not counters or not counters.get("stats"):
        return None
    kept = ("stats", "frames", "recompiles", "graph_break", "aot_autograd", "inductor")
    return {key: {str(k): v for k, v in counters[key].items()} for key in kept if counters.get(key)}


def _record():
    try:
        line = json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "pid": os.getpid(), "start": _START,
                           "end": time.time(), "peak_gpu_gib": _gpu_peak_gib(), "compile": _compile_seconds(),
                           "compile_counters": _compile_counters()}, allow_nan=False)
        with open(_PATH, "a", encoding="utf-8") as out:  # one short append per process: lines don't interleave
            out.write(line + "\n")
    except Exception:  # timing must never change how a stage ends
        pass


def _run_shadowed():
    """Run the sitecustomize this file hides (one later on sys.path, e.g. the distribution's), if any."""
    import contextlib
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or "."), "sitecustomize.py")
        if os.path.dirname(candidate) != here and os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_shadowed_sitecustomize", candidate)
            with contextlib.suppress(Exception):
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


if _PATH:
    atexit.register(_record)
_run_shadowed()
