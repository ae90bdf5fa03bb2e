"""The GPU's link to host memory: what copies to and from pinned host memory sustain, alone and beside compute.

    python -m benchmarks.bench_host_link [--sizes-mib 16,256,1024] [--repeats 10] [--out benchmarks/results]

What offloading saved activations to host memory could cost: per size, the GB/s of device-to-host and
host-to-device copies (pinned host buffers, on a side stream, timed with CUDA events), of both directions at
once, and how much a bf16 matrix multiply loop on the default stream slows down while both copies run beside
it (the overlap an offloading pass relies on). Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from typing import Any

import torch

from benchmarks.harness import report

log = logging.getLogger(__name__)

MATMUL = 8192  # a square bf16 matrix multiply of this size: some 1 ms of tensor-core work on a current GPU


def _timed(work, repeats: int, stream: torch.cuda.Stream) -> float:
    """Median seconds of `work()` queued on `stream`, by CUDA events."""
    seconds = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            work()
            end.record(stream)
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    return statistics.median(seconds)


def copy_rates(mib: int, repeats: int) -> dict[str, Any]:
    """GB/s of device-to-host, host-to-device and both at once, for `mib` MiB, on side streams."""
    n = mib * 2**20
    device = torch.empty(n, dtype=torch.uint8, device="cuda")
    device_in = torch.empty_like(device)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host_out = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    out_stream, in_stream = torch.cuda.Stream(), torch.cuda.Stream()
    to_host = _timed(lambda: host_out.copy_(device, non_blocking=True), repeats, out_stream)
    to_device = _timed(lambda: device_in.copy_(host, non_blocking=True), repeats, in_stream)

    def both() -> None:  # queued on out_stream, which holds the start event: the in-copy starts after it too
        in_stream.wait_stream(out_stream)
        host_out.copy_(device, non_blocking=True)
        with torch.cuda.stream(in_stream):
            device_in.copy_(host, non_blocking=True)
        torch.cuda.current_stream().wait_stream(in_stream)

    together = _timed(both, repeats, out_stream)
    gb = n / 1e9
    return {"mib": mib, "to_host_gb_s": round(gb / to_host, 2), "to_device_gb_s": round(gb / to_device, 2),
            "both_directions_gb_s": round(2 * gb / together, 2)}


def overlap(mib: int, repeats: int) -> dict[str, Any]:
    """Seconds of a matmul loop alone and with both copies of `mib` MiB running on side streams."""
    a = torch.randn(MATMUL, MATMUL, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    n = mib * 2**20
    device, host = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, pin_memory=True)
    device_in, host_out = torch.empty_like(device), torch.empty(n, dtype=torch.uint8, pin_memory=True)
    compute, out_stream, in_stream = torch.cuda.current_stream(), torch.cuda.Stream(), torch.cuda.Stream()
    loops = 20

    def matmuls() -> None:
        for _ in range(loops):
            a @ b

    alone = _timed(matmuls, repeats, compute)

    def with_copies() -> None:
        for stream in (out_stream, in_stream):
            stream.wait_stream(compute)
        with torch.cuda.stream(out_stream):
            host_out.copy_(device, non_blocking=True)
        with torch.cuda.stream(in_stream):
            device_in.copy_(host, non_blocking=True)
        matmuls()
        compute.wait_stream(out_stream)
        compute.wait_stream(in_stream)

    beside = _timed(with_copies, repeats, compute)
    return {"mib": mib, "matmul_loop_s": round(alone, 5), "with_copies_s": round(beside, 5),
            "slowdown": round(beside / alone, 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", default="16,256,1024", help="copy sizes in MiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per measurement (median reported)")
    parser.add_argument("--out", default=str(report.RESULTS))
    parser.add_argument("--label", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        sizes = [int(size) for size in args.sizes_mib.split(",")]
    except ValueError:
        parser.error(f"--sizes-mib {args.sizes_mib!r}: whole numbers of MiB, comma-separated, e.g. 16,256,1024")
    if not torch.cuda.is_available():
        sys.exit("bench_host_link: no CUDA device here; it measures a GPU's link to host memory, run it on one")
    out = report.header("host-link", {"sizes_mib": sizes, "repeats": args.repeats, "matmul": MATMUL})
    torch.cuda.synchronize()
    out["copies"] = [copy_rates(mib, args.repeats) for mib in sizes]
    out["overlap"] = [overlap(mib, args.repeats) for mib in sizes]
    path = report.write_results(out, args.out, label=args.label)
    print(report.table([("MiB", "mib"), ("to host GB/s", "to_host_gb_s"), ("to device GB/s", "to_device_gb_s"),
                        ("both GB/s", "both_directions_gb_s")], out["copies"]))
    print(report.table([("MiB", "mib"), ("matmuls s", "matmul_loop_s"), ("with copies s", "with_copies_s"),
                        ("slowdown", "slowdown")], out["overlap"]), f"\nwritten to {path}")
    return out


if __name__ == "__main__":
    main()
