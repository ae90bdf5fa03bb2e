"""Running a stage as several data-parallel processes (training.num_processes), through accelerate's launcher.

`python -m stages.train` (or `dvc repro`) with training.num_processes = N > 1 starts N copies of the stage module
with `accelerate launch --multi_gpu` (torch's elastic launcher underneath): one process per GPU, or N gloo
processes on a machine without CUDA. The copies are the workers; the launching process waits for them, and when
any of them fails the launcher stops the others and this module turns the failure into one line.

Several machines (training): run `accelerate config` on each (this machine's rank, the number of machines, the
main process's address and port); the launcher reads that file, and training.num_processes is then the number of
processes on all machines together (docs/multi-gpu.md). Evaluation merges its parts on one machine, so it
runs on this machine's GPUs alone (local_processes).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import torch

from samsum_qlora.errors import PipelineError

log = logging.getLogger(__name__)


def in_worker() -> bool:
    """Whether this process is one of several started by a distributed launcher (torchrun, accelerate launch)."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank among all processes (0 outside a distributed launch)."""
    return int(os.environ.get("RANK", "0")) if in_worker() else 0


def local_rank() -> int:
    """This process's rank on its machine, which is also its GPU (0 outside a distributed launch)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if in_worker() else 0


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1")) if in_worker() else 1


def is_main() -> bool:
    return rank() == 0


def quiet_replicas() -> None:
    """Log progress from the main process only: N copies of every line and progress bar say nothing more."""
    if is_main():
        return
    logging.getLogger().setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_warning()
    transformers_logging.disable_progress_bar()


def accelerate_config_file() -> Path | None:
    """The accelerate config that `accelerate config` wrote for this user, if any (it holds multi-machine settings)."""
    from accelerate.commands.config.config_args import default_config_file

    path = Path(default_config_file)
    return path if path.is_file() else None


def _config_value(name: str, default: int) -> int:
    path = accelerate_config_file()
    if path is None:
        return default
    from accelerate.commands.config.config_args import load_config_from_file

    return int(getattr(load_config_from_file(str(path)), name, default) or default)


def machines() -> int:
    """How many machines the processes are spread over: accelerate's config says, else one."""
    return _config_value("num_machines", 1)


def main_machine() -> bool:
    """Whether this is the machine of rank 0 (the only one, without accelerate's multi-machine config)."""
    return machines() == 1 or _config_value("machine_rank", 0) == 0


def check_devices(num_processes: int, param: str = "training.num_processes") -> None:
    """On CUDA, one process per GPU: fail before launching when this machine has too few."""
    if not torch.cuda.is_available() or machines() > 1:  # CPU, or processes spread over machines
        return
    gpus = torch.cuda.device_count()
    if num_processes > gpus:
        raise PipelineError(
            f"params.yaml: {param} is {num_processes} but this machine has {gpus} GPU{'s' * (gpus != 1)}; "
            f"set it to at most {gpus} (`dvc exp run -S {param}={gpus}`)"
        )


def one_gpu_per_process(args) -> None:
    """A Trainer in a process of its own spreads over every visible GPU with torch's DataParallel, which splits a
    batch by rows: a packed batch is one row, and the loss would be scaled by the GPU count. Each process of this
    project uses one GPU; more GPUs are used through training.num_processes."""
    if args.n_gpu > 1:
        log.info("%d GPUs visible: this process uses one (training.num_processes uses more)", args.n_gpu)
        args._n_gpu = 1  # read by the Trainer through args.n_gpu; there is no public setter


def check_training_processes(training) -> None:
    """Each training batch is split evenly between the processes: its size must divide by their number (the
    validation loss shares out examples, not batches: any per_device_eval_batch_size works); one GPU each."""
    size, n = training.per_device_train_batch_size, training.num_processes
    if size % n:
        raise PipelineError(
            f"params.yaml: training.per_device_train_batch_size ({size}) must divide by training.num_processes ({n}): "
            f"each batch is split evenly between the processes; set it to a multiple of {n}"
        )
    check_devices(n)


def gather(values: list) -> list:
    """`values` of every process, in rank order (just `values` in a run of one process)."""
    if not in_worker():
        return values
    from accelerate.utils import gather_object

    return gather_object(values)


class WorkerFailed(PipelineError):
    """A worker process failed; the launcher has stopped the others."""


def _describe(failure) -> str:
    code = failure.exitcode
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def local_processes(num_processes: int) -> int:
    """How many processes a stage that runs on this machine alone uses (evaluation: its parts are merged here):
    training.num_processes on one machine; this machine's GPUs, at most that many, when spread over several."""
    if machines() == 1:
        return num_processes
    return max(1, min(num_processes, torch.cuda.device_count()))


def launch(module: str, args: list[str], num_processes: int, what: str, this_machine: bool = False) -> None:
    """Run `python -m module *args` as `num_processes` processes and wait for them all; `this_machine`: on this
    machine only, whatever accelerate's config says. A failure of any raises WorkerFailed naming the first process
    that failed (its own error line was printed above)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = ["--multi_gpu", "--num_processes", str(num_processes)]
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # CPU processes share the cores (the launcher would give each one thread).
        argv += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // num_processes))]
    if accelerate_config_file() is None or this_machine:  # one machine: the launcher's defaults, said here
        argv += ["--num_machines", "1", "--machine_rank", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
                 "--main_process_port", "0"]  # 0: a free port, so that queued experiments can run side by side
    argv += ["--module", module, *args]
    log.info("%s: starting %d processes (accelerate launch)", what, num_processes)
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except ChildFailedError as err:
        # The launcher stops the other processes with SIGTERM once one has failed: the first other failure is the
        # cause. Failures are keyed by global rank.
        failures = sorted(err.failures.items(), key=lambda item: (item[1].exitcode == -signal.SIGTERM,
                                                                   item[1].timestamp))
        process, cause = failures[0]
        raise WorkerFailed(f"{what} stopped: process {process} of {num_processes} {_describe(cause)} "
                           "and the others were stopped") from None
