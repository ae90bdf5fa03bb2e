"""Resuming the train stage: which run a checkpoint folder belongs to, and whether and where to resume it.

models/checkpoints/ holds the Trainer's `checkpoint-<step>` folders and a marker (run.json) with the fingerprint
of the params and data they were trained with. A run finds checkpoints with its own fingerprint and resumes the
newest; any other folder is cleared.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import Trainer
from transformers.trainer_utils import TrainOutput

from samsum_qlora import distributed
from samsum_qlora.errors import PipelineError
from samsum_qlora.files import disk_full, free_space, size_text
from samsum_qlora.params import Params
from samsum_qlora.paths import CHECKPOINTS

log = logging.getLogger(__name__)

RUN_FINGERPRINT = "run.json"  # inside CHECKPOINTS: which params and data its checkpoints belong to

# training.* switches that change only speed or memory, not what is optimised (the same losses and gradients up to
# float rounding; tests/test_microbatch.py, test_objective.py, test_train.py and test_distributed.py check it):
# changing one keeps the checkpoints, so a run stopped for lack of memory resumes after its cap is lowered, and a
# run on N processes can resume on another number of them.
SPEED_AND_MEMORY_SWITCHES = ("max_tokens_per_micro_batch", "gradient_checkpointing", "compile", "dequantize",
                             "padding_free", "per_device_eval_batch_size", "num_processes", "max_memory_gib")


def run_fingerprint(params: Params, data_dir: str | Path) -> str:
    """A hash of everything a checkpoint depends on: the training params (less the speed and memory switches)
    and the tokenized data files."""
    h = hashlib.sha256()
    relevant = {k: asdict(getattr(params, k)) for k in ("model", "quantization", "lora", "training")}
    for switch in SPEED_AND_MEMORY_SWITCHES:
        del relevant["training"][switch]
    h.update(json.dumps({"seed": params.seed, **relevant}, sort_keys=True, allow_nan=False).encode())
    for path in sorted(p for p in Path(data_dir).rglob("*") if p.is_file()):
        h.update(path.relative_to(data_dir).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _marked_fingerprint(marker: Path) -> str | None:
    try:
        return json.loads(marker.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):  # damaged marker: whose checkpoints these are is unknown
        return None


def _finished(checkpoint: str) -> bool:
    """Whether the checkpoint is the end of its run (a forced re-run must then train anew, not resume)."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False  # damaged: resuming will say so
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def _last_of_run(fingerprint: str, checkpoints: Path) -> str | None:
    """The newest complete checkpoint in `checkpoints` if its marker holds `fingerprint`, else None."""
    marker = checkpoints / RUN_FINGERPRINT
    same_run = marker.is_file() and _marked_fingerprint(marker) == fingerprint
    return last_checkpoint(checkpoints) if same_run else None


def resumable_checkpoint(fingerprint: str, checkpoints: str | Path = CHECKPOINTS) -> str | None:
    """The newest checkpoint of an interrupted run with the same fingerprint, if any; changes nothing (the workers
    of a run of several processes read it after the launching process prepared the folder)."""
    last = _last_of_run(fingerprint, Path(checkpoints))
    return last if last and not _finished(last) else None


def checkpoint_to_resume(fingerprint: str, checkpoints: str | Path = CHECKPOINTS) -> str | None:
    """The newest checkpoint of an interrupted run with the same fingerprint; otherwise clear the folder."""
    checkpoints = Path(checkpoints)
    last = _last_of_run(fingerprint, checkpoints)
    if last and not _finished(last):
        return last
    marker = checkpoints / RUN_FINGERPRINT
    if checkpoints.exists():
        if last:
            log.info("%s holds a finished run: training anew", checkpoints)
        elif marker.is_file() and _marked_fingerprint(marker) == fingerprint:
            log.info("%s holds no complete checkpoint of this run: starting clean", checkpoints)
        elif any(p.name != RUN_FINGERPRINT for p in checkpoints.iterdir()):
            log.info("%s holds checkpoints of other params or data: starting clean", checkpoints)
        shutil.rmtree(checkpoints)
    checkpoints.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"fingerprint": fingerprint}, allow_nan=False) + "\n")
    return None


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """What keeps a `checkpoint-<step>` folder from being resumed ("optimizer.pt is missing", …), or None when
    every file a resume reads is there and parses."""
    folder = Path(checkpoint)
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except FileNotFoundError:
        return "trainer_state.json is missing"
    except (OSError, ValueError) as err:
        return f"trainer_state.json does not parse ({type(err).__name__})"
    if not isinstance(state, dict) or "global_step" not in state:
        return "trainer_state.json has no global_step"
    # The Trainer loads the optimizer only when scheduler.pt is there too, and silently goes on without both.
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (folder / name).is_file() or (folder / name).stat().st_size == 0:
            return f"{name} is missing or empty"
    try:
        with safe_open(folder / "adapter_model.safetensors", framework="pt"):
            pass
    except Exception as err:  # missing, cut off or not safetensors: safetensors raises its own error types
        return f"adapter_model.safetensors does not open ({type(err).__name__})"
    rng = list(folder.glob("rng_state*.pth"))  # rng_state.pth, or rng_state_<rank>.pth for several processes
    if not rng or any(p.stat().st_size == 0 for p in rng):
        return "the random state (rng_state*.pth) is missing or empty"
    return None


def last_checkpoint(checkpoints: str | Path = CHECKPOINTS, say: bool = True) -> str | None:
    """The newest complete `checkpoint-<step>` folder, if any; newer incomplete ones (cut off while being saved, by
    a kill or a full disk) are passed over, each said in one line unless `say` is False."""
    # Not transformers' get_last_checkpoint: it takes the newest folder whether or not it is complete.
    folder = Path(checkpoints)
    if not folder.is_dir():
        return None
    numbered = [p for p in folder.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and p.is_dir()]
    for candidate in sorted(numbered, key=lambda p: checkpoint_step(str(p)), reverse=True):
        problem = checkpoint_problem(candidate)
        if problem is None:
            return str(candidate)
        if say:
            log.warning("passed over %s, which cannot be resumed: %s", candidate.as_posix(), problem)
    return None


def resume_advice(checkpoints: str | Path = CHECKPOINTS) -> str:
    """What the next `dvc repro` does after a run that stopped: resume from the last checkpoint, or start over."""
    last = last_checkpoint(checkpoints, say=False)
    return (f"the last checkpoint {last} is kept and `dvc repro` resumes from it" if last
            else "no checkpoint had been saved yet, so `dvc repro` starts over")


def interrupted_advice(checkpoints: str | Path = CHECKPOINTS) -> str:
    """What to do after Ctrl-C stopped training: the same command resumes from the last checkpoint, if any."""
    last = last_checkpoint(checkpoints, say=False)
    return (f"run the same command again to resume from the last checkpoint, {last}" if last
            else "no checkpoint had been saved yet, so running the same command again starts over")


def checkpoint_step(checkpoint: str) -> int:
    """The optimizer step a Trainer checkpoint folder (`checkpoint-<step>`) was saved at."""
    return int(Path(checkpoint).name.split("-")[-1])


def tokens_seen(checkpoint: str | None) -> int:
    """Non-padding tokens trained on before `checkpoint` (0 for a fresh run)."""
    if checkpoint is None:
        return 0
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("num_input_tokens_seen", 0)


def _checkpoint_write_failed(err: BaseException, trainer: Trainer) -> PipelineError | None:
    """The one line for a checkpoint that could not be written for lack of disk space (ENOSPC, or torch's
    "unexpected pos" when optimizer.pt was cut short with little space left), after removing the half-written
    folder; None when `err` is something else."""
    output_dir = Path(trainer.args.output_dir)
    writing = output_dir / f"checkpoint-{trainer.state.global_step}"
    free = free_space(output_dir)
    last = last_checkpoint(output_dir, say=False)
    needed = sum(f.stat().st_size for f in Path(last).iterdir() if f.is_file()) if last else None
    # torch's zip writer reports a failed write only as a position mismatch, which a full disk is the usual cause
    # of; with room for a whole checkpoint left, it is some other fault and propagates as it is.
    torch_cut_short = isinstance(err, RuntimeError) and "unexpected pos" in str(err)
    if not (disk_full(err) or (torch_cut_short and free < (needed or 1 << 30))):
        return None
    if writing.is_dir() and checkpoint_problem(writing) is not None:
        shutil.rmtree(writing, ignore_errors=True)  # half-written: no later run may take it for a checkpoint
    wanted = f"a checkpoint needs about {size_text(needed)}, " if needed else ""
    kept = (f"the last complete checkpoint {Path(last).as_posix()} is kept and running again resumes from it"
            if last else "no complete checkpoint had been saved yet, so running again starts over")
    return PipelineError(f"no space left on the device while writing {writing.as_posix()} ({wanted}"
                         f"{size_text(free)} free in {output_dir.as_posix()}/); it was removed and {kept}; "
                         "free some space and run the same command again")


def _set_aside(checkpoint: str) -> str:
    """Rename a checkpoint that failed to restore to `<name>.damaged` (kept for a look, passed over from now on)."""
    aside = Path(f"{checkpoint}.damaged")
    if distributed.is_main():  # one process renames; the others fail on the same files
        shutil.rmtree(aside, ignore_errors=True)
        Path(checkpoint).rename(aside)
    return aside.as_posix()


def train_resuming(trainer: Trainer, resume_from: str | None) -> tuple[TrainOutput, int]:
    """trainer.train(), resumed from `resume_from`: its result and the tokens trained in this run. A checkpoint that
    fails to restore is set aside so the next run resumes from the one before; a checkpoint that cannot be written
    for lack of space is removed, the last complete one kept."""
    try:
        before = tokens_seen(resume_from)
        return trainer.train(resume_from_checkpoint=resume_from), trainer.state.num_input_tokens_seen - before
    except torch.OutOfMemoryError:
        raise  # not the checkpoint's fault, even in the first step after it
    except Exception as err:  # a damaged checkpoint fails in json, safetensors or torch.load
        write_failed = _checkpoint_write_failed(err, trainer)
        if write_failed is not None:
            raise write_failed from None
        # Only a failure while restoring the checkpoint is its fault; later errors propagate.
        if resume_from is None or trainer.state.global_step > checkpoint_step(resume_from):
            raise
        aside = _set_aside(resume_from)
        older = last_checkpoint(Path(resume_from).parent, say=False)
        then = (f"running the same command again resumes from the next older complete checkpoint, {older}" if older
                else "running the same command again starts over, as no older complete checkpoint is left")
        raise PipelineError(
            f"could not resume from {resume_from} ({type(err).__name__}: {' '.join(str(err).split())[:200]}); "
            f"it was moved aside to {aside} and {then}"
        ) from None
