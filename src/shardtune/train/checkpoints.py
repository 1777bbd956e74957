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


def restore_fsdp1_optimizer(load):
    """Wrap Trainer._load_optimizer_and_scheduler: Accelerate reads an FSDP1 sharded optimizer
    checkpoint into a template built from the optimizer's current state, which a fresh
    optimizer does not have yet, so it loads nothing and the resumed run goes on with zero
    Adam moments (FSDP2's loader creates the state first; this does the same for FSDP1, with
    torch's own zero-gradient, zero-learning-rate step, which changes no parameter)."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    def wrapped(trainer, checkpoint):
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # inside Accelerate's wrapper
        if checkpoint is not None and trainer.is_fsdp_enabled and trainer.accelerator.state.fsdp_plugin.fsdp_version == 1:
            _init_optim_state(optimizer)
        load(trainer, checkpoint)
        if checkpoint is not None and not optimizer.state:
            raise RuntimeError(f"resuming from {checkpoint} restored no optimizer state")

    return wrapped


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
    """Checkpoint the last step, exactly once: the Trainer saves it itself with save_strategy
    steps (at max_steps) and epoch (the last step ends an epoch); with `no` and `best` this
    forces it. A step is never saved twice: with epoch saving, a forced step-end save and the
    epoch's would both write checkpoint-N, the second into a directory already marked
    complete. The decision uses what this rank saw, never the file system, so that every rank
    takes it alike (a save is collective)."""

    def __init__(self):
        self.saved_step = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps and args.save_strategy not in ("steps", "epoch"):
            control.should_save = True
        return self._once(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        return self._once(state, control)

    def on_save(self, args, state, control, **kwargs):
        self.saved_step = state.global_step
        return control

    def _once(self, state, control):
        if control.should_save and state.global_step == self.saved_step:
            control.should_save = False
        return control
