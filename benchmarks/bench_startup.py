"""Stage start-up: how long each stage takes from process start to its first line of output, what its imports cost,
and whether it loads torch or transformers at all.

    python -m benchmarks.bench_startup [--runs 3] [--stages prepare,tokenize_mask,...] [--out benchmarks/results]
                                       [--label NAME]

Runs every stage of the pipeline (or those --stages names) in order, as `python -m stages.<name>` in a project
copy on the offline profile (the bundled dialogues, the tiny model), `--runs` times, and reports per stage the
median of: seconds from starting the interpreter to the first non-blank byte it writes (a log line, or a progress
bar), and seconds to its exit. One further run per stage under `python -X importtime` says what the imports cost,
by top-level package (the sum of each module's own import time), and which of torch, transformers, datasets,
peft, bitsandbytes, matplotlib and scipy it loaded. The model is tiny, so what is left is mostly start-up itself:
the interpreter, imports, CUDA initialisation, reading params and data.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.harness import report
from benchmarks.harness.stage_runs import stage_env
from offline.project import make_project
from offline.run import profile_over_defaults

log = logging.getLogger(__name__)

STAGES = {"prepare": ("prepare",), "tokenize_mask": ("tokenize_mask",), "train": ("train",),
          "evaluate_baseline": ("evaluate", "baseline"), "evaluate_adapter": ("evaluate", "adapter"),
          "compare": ("compare",), "card": ("card",)}
WATCHED = ("torch", "transformers", "datasets", "peft", "bitsandbytes", "matplotlib", "scipy")
IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)")


def timed_run(project: Path, env: dict[str, str], stage: tuple[str, ...]) -> dict[str, float]:
    """One run of `stage`: seconds to its first non-blank output byte, and to its exit."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", f"stages.{stage[0]}", *stage[1:]], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    first, tail = None, b""
    fd = proc.stdout.fileno()
    while True:
        chunk = os.read(fd, 65536)  # what the stage has written so far; b"" once it has closed its output
        if not chunk:
            break
        if first is None and chunk.strip():
            first = time.perf_counter() - start
        tail = (tail + chunk)[-4000:]
    if proc.wait():
        raise RuntimeError(f"stages.{stage[0]} failed ({proc.returncode}): {tail.decode(errors='replace')}")
    return {"first_output_s": first, "exit_s": time.perf_counter() - start}


def imported_modules(project: Path, env: dict[str, str], stage: tuple[str, ...]) -> dict[str, int]:
    """Every module the stage imports, with its own import time in microseconds (`python -X importtime`)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", f"stages.{stage[0]}", *stage[1:]],
                          cwd=project, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"stages.{stage[0]} failed under -X importtime: {proc.stderr[-2000:]}")
    return {match[2]: int(match[1]) for match in IMPORT_LINE.finditer(proc.stderr)}


def import_costs(modules: dict[str, int]) -> dict[str, Any]:
    """What imported `modules` cost: their total own time, the costliest top-level packages, and which watched
    packages were loaded."""
    own: Counter[str] = Counter()
    for name, microseconds in modules.items():
        own[name.split(".")[0]] += microseconds
    return {"imports_s": round(sum(own.values()) / 1e6, 3),
            "costliest": {name: round(us / 1e6, 3) for name, us in own.most_common(8)},
            "loads": sorted(name for name in WATCHED if name in own)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per stage (the median is reported)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="the stages to time, as dvc.yaml names them; each needs what the ones before it write")
    parser.add_argument("--out", default=str(report.RESULTS))
    parser.add_argument("--label", default=None, help="added to the results file's name")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    names = args.stages.split(",")
    if unknown := [name for name in names if name not in STAGES]:
        parser.error(f"--stages: unknown stage {unknown[0]!r}; the stages are {', '.join(STAGES)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = profile_over_defaults()
    out = report.header("startup", {"runs": args.runs, "stages": names, "params": params})
    out["stages"] = {}
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        project = make_project(work / "project", params)
        env = stage_env(project, work / "compile-cache")
        for name in sorted(names, key=list(STAGES).index):  # in pipeline order: each reads what those before wrote
            stage = STAGES[name]
            runs = [timed_run(project, env, stage) for _ in range(args.runs)]
            firsts = [r["first_output_s"] for r in runs if r["first_output_s"] is not None]
            out["stages"][name] = {
                "first_output_s": round(statistics.median(firsts), 3) if firsts else None,
                "exit_s": round(statistics.median(r["exit_s"] for r in runs), 3),
                "runs": [{k: round(v, 3) if v is not None else None for k, v in r.items()} for r in runs],
                **import_costs(imported_modules(project, env, stage)),
            }
            log.info("%s: %s", name, {k: v for k, v in out["stages"][name].items() if k != "runs"})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    path = report.write_results(out, args.out, label=args.label)
    columns = [("stage", "stage"), ("first output s", "first_output_s"), ("exit s", "exit_s"),
               ("imports s", "imports_s"), ("loads", "loads")]
    rows = [{"stage": name, **{k: v for k, v in r.items() if k != "loads"}, "loads": ", ".join(r["loads"]) or "-"}
            for name, r in out["stages"].items()]
    print(report.table(columns, rows), f"\nwritten to {path}")
    return out


if __name__ == "__main__":
    main()
