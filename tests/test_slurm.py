"""The SLURM profile on a real SLURM on this machine (tests/slurm/start.sh: slurmctld, two
slurmd and munge from Debian's packages; fake GPUs as gres).

The default workflow, made small, runs end to end with `--workflow-profile profiles/slurm`,
its training job on both nodes (one task per node, each running `accelerate launch` with its
machine rank). The training job is cancelled right after its first complete checkpoint: the
profile's retries resubmit it and it resumes from that checkpoint. SLURM's own records say
what the training job asked for, and a local run of the same config (2 ranks on one
machine) gives the same adapter, bit for bit.

Skipped when SLURM cannot be started here (not root, no apt-get, the plugin missing); with
CI=true that is a failure instead.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from shardtune.train.checkpoints import checkpoints, is_complete

from conftest import copy_workflow, default_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START, STOP = REPO / "tests/slurm/start.sh", REPO / "tests/slurm/stop.sh"
STATE = Path(os.environ.get("SHARDTUNE_SLURM_STATE", "/tmp/shardtune-slurm"))
CI = os.environ.get("CI") == "true"
# the training job's request, checked against SLURM's record of it
TRAIN_RESOURCES = {"nodes": 2, "gpu": 1, "cpus_per_task": 2, "mem_mb": 3000, "runtime": 20}
ENV = {"SHARDTUNE_ALLOW_CPU_TRAINING": "1"}  # the fake GPUs have no CUDA behind them


def unavailable(reason):
    if CI:
        pytest.fail(f"the SLURM test must run in CI, but: {reason}")
    pytest.skip(reason)


def small_config(nodes):
    """The default config with a small data set, six training steps (a checkpoint every
    three), two ranks in all and a short evaluation; the training job on `nodes` nodes."""
    config = default_config()
    config["dataset"].setdefault("builtin", {})["conversations"] = 100
    config["data"]["max_seq_len"] = 256
    config.setdefault("evaluate", {}).update(per_task=0, samples=1)
    for run in config["runs"].values():
        run.setdefault("training", {}).update(max_steps=6, save_steps=3, eval_strategy="no")
    # the test nodes' names do not resolve; they all are this machine
    config["fsdp"].update(num_processes=2, main_process_ip="127.0.0.1")
    # two ranks in all: one GPU per node on two nodes, two GPUs on one
    config["resources"] = {"fsdp_train": {**TRAIN_RESOURCES, "nodes": nodes, "gpu": 2 // nodes}}
    return config


def daemon_running():
    pid = STATE / "slurmctld.pid"
    try:
        os.kill(int(pid.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


@pytest.fixture(scope="module")
def slurm():
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        unavailable("snakemake-executor-plugin-slurm is not installed")
    was_running = daemon_running()
    started = subprocess.run(["bash", str(START), str(STATE)], capture_output=True, text=True, timeout=900)
    if started.returncode == 3:
        unavailable(started.stderr.strip().splitlines()[-1])
    assert started.returncode == 0, f"tests/slurm/start.sh failed:\n{started.stderr}"
    yield STATE
    # a SLURM that was already running keeps running; its jobs of this test do not
    subprocess.run(["bash", str(STOP), *(["--jobs-only"] if was_running else []), str(STATE)], timeout=120)


def slurm_jobs(since):
    """{job id: (state, comment)} of the jobs after `since`, as squeue still lists them."""
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%i|%T|%k"], capture_output=True, text=True, check=True
    ).stdout
    jobs = {}
    for line in out.splitlines():
        job, state, comment = line.split("|", 2)
        if job.isdigit() and int(job) > since:
            jobs[int(job)] = (state, comment)
    return jobs


def last_job_id():
    return max(slurm_jobs(0), default=0)


def show_job(job):
    """`scontrol show job` as a dict."""
    out = subprocess.run(["scontrol", "-o", "show", "job", str(job)], capture_output=True, text=True, check=True)
    return dict(item.split("=", 1) for item in out.stdout.split() if "=" in item)


def start(workdir, args):
    log = open(workdir / "snakemake.out", "w")
    env = {**os.environ, **ENV, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    # the SLURM plugin can hang (docs/slurm.md): a hard limit on every run
    command = ["timeout", "-k", "30", "900", str(BIN / "snakemake"), *args]
    return subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)


def finished(proc, workdir, what):
    proc.wait()
    output = (workdir / "snakemake.out").read_text()
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{output[-8000:]}"
    return output


@pytest.fixture(scope="module")
def slurm_run(slurm, tmp_path_factory):
    """The workflow through the SLURM profile, its first training job cancelled once it has a
    complete checkpoint; beside it, the same config run locally up to the adapter (at the same
    time: the SLURM run mostly waits between status checks)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("slurm"), small_config(nodes=2))
    local = copy_workflow(tmp_path_factory.mktemp("local"), small_config(nodes=1))
    since = last_job_id()
    started = time.monotonic()
    on_slurm = start(
        workdir,
        # no accounting here: job states from squeue, and soon after submission
        ["--workflow-profile", "profiles/slurm", "--slurm-status-command", "squeue"]
        + ["--slurm-init-seconds-before-status-checks", "1"],
    )
    here = start(local, ["--cores", "2", "convert"])
    cancelled = None
    while on_slurm.poll() is None:
        time.sleep(0.5)
        if cancelled is None and any(is_complete(c) for c in checkpoints(workdir / "results/demo/train")):
            running = [j for j, (_, comment) in slurm_jobs(since).items() if comment.startswith("rule_fsdp_train")]
            if running:
                cancelled = max(running)
                subprocess.run(["scancel", str(cancelled)], check=True)
    output = finished(on_slurm, workdir, "snakemake --workflow-profile profiles/slurm")
    print(f"\nthe workflow with the SLURM profile took {time.monotonic() - started:.0f} s", file=sys.stderr)
    finished(here, local, "the local run")
    return {"workdir": workdir, "local": local, "output": output, "since": since, "cancelled": cancelled}


def test_workflow_runs_end_to_end_as_slurm_jobs(slurm_run):
    workdir, output = slurm_run["workdir"], slurm_run["output"]
    assert (workdir / "results/summary.tsv").is_file()
    assert (workdir / "results/demo/eval/metrics.json").is_file()
    comments = {comment for _, comment in slurm_jobs(slurm_run["since"]).values()}
    for rule in ("prepare_data", "fsdp_train", "convert_checkpoint", "evaluate_run"):
        assert any(c.startswith(f"rule_{rule}") for c in comments), (rule, comments)
    # fetching runs on the submit host, not as a job
    assert not any(c.startswith("rule_fetch") for c in comments)
    assert "localrule fetch_dataset:" in output and "localrule fetch_model:" in output


def test_training_job_asked_slurm_for_the_configured_resources(slurm_run):
    train_jobs = [j for j, (_, comment) in slurm_jobs(slurm_run["since"]).items() if comment.startswith("rule_fsdp_train")]
    assert train_jobs
    for job in train_jobs:
        record = show_job(job)
        assert record["TresPerNode"] in ("gres:gpu:1", "gres/gpu:1"), record.get("TresPerNode")
        assert (record["NumNodes"], record["NumTasks"], record["CPUs/Task"]) == ("2", "2", "2")
        assert record["MinMemoryNode"] == "3000M"
        assert record["TimeLimit"] == "00:20:00"


def test_training_ran_one_task_per_node_with_its_machine_rank(slurm_run):
    log = (slurm_run["workdir"] / "logs/fsdp_train/demo.log").read_text()
    assert "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=2" in log
    mains = set()
    for task in (0, 1):
        # what each task saw in its allocation, and what it launched
        seen = re.search(rf"^{task}: launch: host \S+: SLURMD_NODENAME=(\S+) SLURM_JOB_ID=\d+ SLURM_PROCID={task} .*"
                         r"CUDA_VISIBLE_DEVICES=0, CUDA sees 0 GPU", log, re.M)  # fmt: skip
        assert seen, log[:3000]
        launched = re.search(rf"^{task}: launch: machine {task} of 2, 2 processes in all, use_cpu=True, main process (\S+);",
                             log, re.M)  # fmt: skip
        assert launched, log[:3000]
        mains.add(launched.group(1))
    assert len(mains) == 1 and mains.pop().startswith("127.0.0.1:")
    done = json.loads((slurm_run["workdir"] / "results/demo/train/done.json").read_text())
    assert (done["num_processes"], done["distributed_type"]) == (2, "DistributedType.FSDP")
    last = slurm_run["workdir"] / "results/demo/train" / done["checkpoint"] / "pytorch_model_fsdp_0"
    # one shard per rank, written from the two nodes
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]


def test_failed_training_job_is_reported_retried_and_resumes_from_its_checkpoint(slurm_run):
    cancelled = slurm_run["cancelled"]
    assert cancelled, "training finished before a checkpoint could be seen: nothing was cancelled"
    assert f"SLURM-job '{cancelled}' failed, SLURM status is: 'CANCELLED'" in slurm_run["output"]
    train_jobs = {
        job: state for job, (state, comment) in slurm_jobs(slurm_run["since"]).items() if comment.startswith("rule_fsdp_train")
    }
    assert train_jobs[cancelled] == "CANCELLED"
    assert [state for job, state in sorted(train_jobs.items()) if job > cancelled] == ["COMPLETED"]
    done = json.loads((slurm_run["workdir"] / "results/demo/train/done.json").read_text())
    assert done["resumed_from"] and re.search(r"checkpoint-[1-5]$", done["resumed_from"]), done["resumed_from"]
    assert done["global_step"] == 6


def test_same_adapter_as_a_local_run(slurm_run):
    """The same config run locally (2 ranks on one machine) trains the same adapter bit for
    bit as the two nodes did (CPU training is deterministic, and resuming is exact)."""
    name = "results/demo/adapter/adapter_model.safetensors"
    on_slurm, here = load_file(slurm_run["workdir"] / name), load_file(slurm_run["local"] / name)
    assert on_slurm.keys() == here.keys() and on_slurm
    for key in on_slurm:
        assert (on_slurm[key] == here[key]).all(), key
