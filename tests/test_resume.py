"""A training job killed at any moment resumes, on the same snakemake command, from its
latest complete checkpoint, and ends exactly where an uninterrupted run ends."""

import os
import signal
import subprocess
import time

import torch

from shardtune.export.convert import adapter_state
from shardtune.io import read_json
from shardtune.train.checkpoints import MARKER, checkpoints

from conftest import BIN, copy_workflow, plain_shell_env, snakemake


def training_processes(workdir):
    """PIDs of the training launcher and its ranks started from `workdir`."""
    out = subprocess.run(["pgrep", "-f", "shardtune.train"], capture_output=True, text=True).stdout.split()
    return [int(pid) for pid in out if os.path.realpath(f"/proc/{pid}/cwd") == str(workdir.resolve())]


def test_sigkill_during_training_then_the_same_command_resumes_exactly(demo_run, tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    env = plain_shell_env()
    first = subprocess.Popen(
        [str(BIN / "snakemake"), "--cores", "2", "train"],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    train = workdir / "results/demo/train"
    deadline = time.time() + 600
    while not (train / "checkpoint-10" / MARKER).exists():
        assert first.poll() is None and time.time() < deadline, "training ended before its first checkpoint"
        time.sleep(0.2)
    for pid in training_processes(workdir):  # the job dies hard, as under the OOM killer
        os.kill(pid, signal.SIGKILL)
    assert first.wait(timeout=120) != 0
    assert not (train / "done.json").exists()

    # A checkpoint cut off while being written (no completion marker) must never be used.
    partial = train / "checkpoint-15"
    (partial / "pytorch_model_fsdp_0").mkdir(parents=True, exist_ok=True)
    (partial / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"truncated")

    snakemake(workdir, "--cores", "2", "train")
    assert not partial.exists()
    done = read_json(train / "done.json")
    reference = read_json(demo_run / "results/demo/train/done.json")
    assert done["resumed_from"] is not None and done["resumed_from"].endswith(("checkpoint-10", "checkpoint-20"))
    assert done["global_step"] == reference["global_step"]
    state = read_json(train / f"checkpoint-{done['global_step']}" / "trainer_state.json")
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == sorted(steps) and steps[-1] > 10  # the step count continued
    assert all((c / MARKER).exists() for c in checkpoints(train))

    ours = adapter_state(train / done["checkpoint"])
    theirs = adapter_state(demo_run / "results/demo/train" / reference["checkpoint"])
    assert ours.keys() == theirs.keys()
    diff = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    assert diff <= 1e-6, f"resumed adapter differs from the uninterrupted run's by {diff}"
    assert any(t.abs().sum() > 0 for k, t in ours.items() if "lora_B" in k)  # training moved the adapter
    assert torch.equal(ours[next(iter(ours))], theirs[next(iter(theirs))])
