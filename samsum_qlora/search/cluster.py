"""Where trials run: a Dask cluster. On this machine, dask-cuda's LocalCUDACluster (one worker per GPU, pinned with
CUDA_VISIBLE_DEVICES, running as many trials side by side as the memory rule allows) or, without GPUs, a
LocalCluster of worker processes; anywhere else, the scheduler of any Dask cluster (--scheduler tcp://...)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from samsum_qlora.errors import PipelineError

log = logging.getLogger(__name__)

# The memory rule (docs/memory.md): a run needs its peak times HEADROOM (fragmentation, longer steps than the
# baseline's) plus CONTEXT_GIB for its CUDA context; each run keeps about CORES_PER_RUN cores busy.
HEADROOM = 1.25
CONTEXT_GIB = 1.0
CORES_PER_RUN = 2


def runs_that_fit(free_gib: float, peak_gib: float) -> int:
    """How many runs of `peak_gib` fit side by side in `free_gib` of one GPU (at least one)."""
    return max(1, math.floor(free_gib / (peak_gib * HEADROOM + CONTEXT_GIB)))


def gpus_free_gib() -> list[float]:
    """Free memory of each visible GPU, through NVML (no CUDA context in the driver); [] without GPUs."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return []
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        free = [pynvml.nvmlDeviceGetMemoryInfo(h).free / 2**30 for h in handles]
    finally:
        pynvml.nvmlShutdown()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [int(i) for i in visible.split(",") if i.strip().isdigit()]
        free = [free[i] for i in ids if i < len(free)]
    return free


def trials_per_gpu(asked: int | None, peak_gib: float | None, free: list[float]) -> tuple[int, str]:
    """Trials side by side on each GPU: as asked, else the memory rule on the baseline's training peak, capped
    by the cores."""
    if asked:
        return asked, "as asked (workers_per_gpu)"
    cap = max(1, (os.cpu_count() or 1) // CORES_PER_RUN // max(1, len(free)))
    if not peak_gib:
        return 1, "one per GPU: the baseline's metrics/train.json has no peak_memory_gib to apply the memory rule"
    fits = runs_that_fit(min(free), peak_gib)
    return min(fits, cap), (f"memory rule: floor({min(free):.1f} GiB free / ({peak_gib:.2f} GiB x {HEADROOM} + "
                            f"{CONTEXT_GIB} GiB)) = {fits}, at most {cap} for the cores")


@contextmanager
def dask_client(scheduler: str | None, workers: int | None, per_gpu: int | None,
                peak_gib: float | None) -> Iterator[Any]:
    """A Dask client: to `scheduler`, or to a cluster started here and closed on the way out."""
    import dask
    from distributed import Client, LocalCluster

    logging.getLogger("distributed").setLevel(logging.WARNING)  # its INFO lines are about its own machinery

    if scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as err:
            raise PipelineError(f"--scheduler {scheduler}: no Dask scheduler answers there ({err}); start one "
                                f"with `dask scheduler`, or leave --scheduler out to run on this machine") from None
        with client:
            log.info("Dask scheduler %s: %d workers, %d trial slots", scheduler, len(client.nthreads()),
                     sum(client.nthreads().values()))
            yield client
        return
    free = gpus_free_gib()
    # a worker that dies mid-trial: its trial runs once more on another worker, then is reported failed
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        if free and not workers:
            try:
                from dask_cuda import LocalCUDACluster
            except ImportError:
                raise PipelineError(f"{len(free)} GPUs are visible but dask-cuda is not installed: pip install "
                                    f"dask-cuda (one Dask worker per GPU), or give --workers N") from None
            threads, rule = trials_per_gpu(per_gpu, peak_gib, free)
            log.info("%d GPUs, %d trials side by side on each (%s)", len(free), threads, rule)
            cluster = LocalCUDACluster(threads_per_worker=threads, dashboard_address=":0", silence_logs=logging.ERROR)
        else:
            count = workers or 1
            if free:
                log.warning("--workers %d with %d GPUs: every trial sees all of them and trains on the first; "
                            "leave --workers out for one Dask worker per GPU", count, len(free))
            log.info("%d local Dask workers, one trial each%s", count, "" if free else " (no GPU)")
            cluster = LocalCluster(n_workers=count, threads_per_worker=1, processes=True, dashboard_address=":0",
                                   silence_logs=logging.ERROR)
        with cluster, Client(cluster) as client:
            yield client
