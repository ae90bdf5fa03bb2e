"""What every benchmark reports besides its numbers: the device, library versions, peak memory, the table, the JSON."""

from __future__ import annotations

import gc
import importlib.metadata
import json
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from samsum_qlora.files import finite_or_none
from samsum_qlora.model.loading import peak_memory_gib  # noqa: F401  (the benchmarks report memory as the stages do)

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl")


def device_name() -> str:
    """The GPU's name, or the CPU's model and thread count without CUDA."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), model)
    return f"CPU ({model or platform.machine()}, {torch.get_num_threads()} threads)"


def device_slug() -> str:
    """`nvidia-h200` for an NVIDIA H200, `cpu` without CUDA: the device part of the results file name."""
    if not torch.cuda.is_available():
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")


def package_versions(names: tuple[str, ...]) -> dict[str, str | None]:
    """The installed version of each package (None when it is not installed)."""
    found: dict[str, str | None] = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def versions() -> dict[str, str | None]:
    """Python's, CUDA's and the libraries' versions."""
    return {"python": platform.python_version(), "cuda": torch.version.cuda, **package_versions(LIBRARIES)}


def memory_kind() -> str:
    """What the reported peak memory is on this device."""
    if torch.cuda.is_available():
        return "torch.cuda.max_memory_allocated, reset before each setup"
    return "process peak RSS (no GPU): includes everything loaded before, never reset between setups"


def allocated_gib() -> float:
    """GPU memory allocated now (0 without a GPU): what a setup finds already taken when it starts."""
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def reset_memory() -> None:
    """Free what earlier setups left behind and restart the peak-memory count."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def synchronize() -> None:
    """Wait for the GPU's queued work (nothing without CUDA), before reading a clock."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def top_ops(events, key: str, rows: int = 15) -> list[dict[str, Any]]:
    """The `rows` rows of a torch.profiler key_averages() with the most `key` (e.g. self_device_time_total)."""
    top = sorted(events, key=lambda e: -getattr(e, key))[:rows]
    return [{"name": e.key, "count": e.count, "self_device_ms": round(e.self_device_time_total / 1e3, 2),
             "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2)} for e in top]


def gpu_busy_s(events) -> float | None:
    """Seconds the GPU ran kernels in a torch.profiler key_averages(), from the kernels' own rows only (an
    operator's row repeats the device time of the kernels it launched); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA) / 1e6


def header(benchmark: str, config: dict[str, Any]) -> dict[str, Any]:
    """The report's common fields: benchmark, date, device, versions, peak memory, source, config."""
    now = datetime.now(timezone.utc)
    return {
        "benchmark": benchmark,
        "date": now.strftime("%Y-%m-%d"),
        "time_utc": now.strftime("%H:%M:%S"),
        "device": device_name(),
        "gpus": torch.cuda.device_count(),  # visible to the benchmark
        "versions": versions(),
        "peak_memory": memory_kind(),
        "source": source_commit(),
        "config": config,
    }


def file_label(*parts: str | None) -> str | None:
    """The given labels joined by '-' for a results file name (e.g. a shape and a run's own label), or None."""
    return "-".join(p for p in parts if p) or None


def write_results(report: dict[str, Any], out_dir: str | Path = RESULTS, tiny: bool = False,
                  label: str | None = None) -> Path:
    """Write `report` to <out_dir>/<benchmark>-<device>[-tiny]-<date>[-label].json and return the path."""
    suffix = ("-tiny" if tiny else "", f"-{report['date']}", f"-{label}" if label else "")
    name = f"{report['benchmark']}-{device_slug()}{''.join(suffix)}.json"
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    # A measurement that came out inf/NaN (a diverged loss) is written as null: JSON has neither.
    path.write_text(json.dumps(finite_or_none(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def table(columns: list[tuple[str, str]], rows: list[dict[str, Any]]) -> str:
    """A plain-text table: `columns` are (header, key) pairs; missing values print as '-'."""
    cells = [[h for h, _ in columns]] + [[_cell(row.get(key)) for _, key in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [" | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def source_commit() -> dict[str, Any]:
    """The commit the benchmarked code comes from, and whether its files differ from it."""
    try:
        top = _git("rev-parse", "--show-toplevel").strip()
        if Path(top).resolve() == ROOT:
            changed = _git("status", "--porcelain", "--", "samsum_qlora", "stages", "offline", "benchmarks", "dvc.yaml",
                           "params.yaml").splitlines()
            return {"commit": _git("rev-parse", "HEAD").strip(), "changed_files": changed}
    except (subprocess.CalledProcessError, OSError):
        pass
    marker = ROOT / "COMMIT"  # a `git archive` export carries its commit in this file
    return {"commit": marker.read_text().strip() if marker.is_file() else None, "changed_files": None}
