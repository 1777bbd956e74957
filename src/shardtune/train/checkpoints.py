"""Checkpoints that survive a kill: a checkpoint counts only once every rank has finished
writing it and a completion marker is in place; partial ones are never resumed from."""

import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

MARKER = "shardtune-complete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoints(train_dir):
    """All checkpoint dirs under `train_dir`, by step."""
    found = []
    for path in Path(train_dir).glob("checkpoint-*"):
        match = _CHECKPOINT.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def is_complete(path):
    return (Path(path) / MARKER).is_file()


def latest_complete(train_dir):
    complete = [p for p in checkpoints(train_dir) if is_complete(p)]
    return complete[-1] if complete else None


def remove_incomplete(train_dir, log=print):
    for path in checkpoints(train_dir):
        if not is_complete(path):
            log(f"removing incomplete checkpoint {path} (interrupted while being written)")
            shutil.rmtree(path)


class MarkCompleteCheckpoints(TrainerCallback):
    """After a save, wait for every rank, then mark the checkpoint complete (main process)."""

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        if state.is_world_process_zero:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (path / MARKER).write_text(f"{state.global_step}\n")
        return control


class SaveAtEnd(TrainerCallback):
    """Always checkpoint the last step, so the final state is never only in memory."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = True
        return control
