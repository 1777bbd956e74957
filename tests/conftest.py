"""Shared fixtures: a copy of the workflow in a temporary directory, run through the
`snakemake` command line exactly as a user runs it."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKFLOW_FILES = ["Snakefile", "config.yaml", "workflow", "src", "profiles", "configs", "envs"]


def copy_workflow(dest, config=None):
    """Copy the workflow into `dest`; `config` (a dict) replaces config.yaml."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        elif src.exists():
            shutil.copy(src, dest / name)
    if config is not None:
        (dest / "config.yaml").write_text(yaml.safe_dump(config))
    return dest


# Commands a job must not take from PATH: in a plain shell (no environment activated) they are
# the machine's, without our packages. Each one on the PATH of the tests fails loudly.
TRAPPED = ("python", "python3", "accelerate", "torchrun", "snakemake")


def plain_shell_env(tmp_root=Path(os.environ.get("TMPDIR", "/tmp"))):
    """The environment of a user who never activated the venv: its bin/ is not on PATH, and
    `python` (and the other commands above) on PATH is a Python without torch."""
    traps = tmp_root / f"shardtune-plain-shell-{os.getuid()}"
    traps.mkdir(exist_ok=True)
    for name in TRAPPED:
        trap = traps / name
        trap.write_text(f'#!/bin/sh\necho "plain shell: a job ran \'{name}\' from PATH ($0 $*)" >&2\nexit 97\n')
        trap.chmod(0o755)
    # The SLURM executor plugin runs `scontrol show config` whenever Snakemake starts; where a
    # SLURM client is installed but no controller runs (after the SLURM tests), that waits 9 s.
    # Local runs need no SLURM: an scontrol that fails at once.
    (traps / "scontrol").write_text("#!/bin/sh\nexit 1\n")
    (traps / "scontrol").chmod(0o755)
    path = [p for p in os.environ["PATH"].split(os.pathsep) if Path(p).resolve() != BIN.resolve()]
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "PATH": os.pathsep.join([str(traps), *path])}


def snakemake(workdir, *args, check=True, timeout=900, env=None):
    """Run the venv's snakemake CLI in `workdir` as a user in a plain shell does (see
    plain_shell_env); returns the CompletedProcess (stdout+stderr merged)."""
    run_env = {**plain_shell_env(), **(env or {})}
    result = subprocess.run(
        [str(BIN / "snakemake"), *args],
        cwd=workdir,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({result.returncode}):\n{result.stdout[-6000:]}")
    return result


def jobs_in_dry_run(output):
    """Rule name -> count from the 'Job stats' table Snakemake prints before running."""
    counts, in_table = {}, False
    for line in output.splitlines():
        if line.startswith("job "):
            in_table = True
            continue
        if in_table:
            parts = line.split()
            if not parts or parts[0] == "total":
                break
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
    return counts


def default_config(workdir=REPO):
    return yaml.safe_load((Path(workdir) / "config.yaml").read_text())


def copy_run(workdir, dest, config=None):
    """A copy of a finished workflow directory (results, resources, Snakemake's records, with
    their times), optionally with another config.yaml: a rerun redoes only what the change
    touches, as it would in the original."""
    shutil.copytree(workdir, dest, symlinks=True)
    if config is not None:
        (Path(dest) / "config.yaml").write_text(yaml.safe_dump(config))
    return Path(dest)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The default workflow, run once end to end: `snakemake --cores 2`."""
    workdir = copy_workflow(tmp_path_factory.mktemp("demo"))
    snakemake(workdir, "--cores", "2")
    return workdir
