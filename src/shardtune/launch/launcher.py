"""Starts training inside one job allocation: `accelerate launch` per node, sized by what the
allocation really has.

One node: `accelerate launch` over the GPUs CUDA sees (or CPU ranks on a CPU-only job).
Several nodes (`resources.fsdp_train.nodes: K`, inside a SLURM allocation): `srun` starts
one task per node, and each task runs this module again with `--node-task`; it launches
Accelerate with its machine rank (SLURM_PROCID) and the allocation's first node as the main
process. Either way, the run's Accelerate config is copied with the machine-dependent keys
(num_processes, num_machines, machine_rank, main process, use_cpu) set from the allocation,
and the copy is printed to the log: what each node saw and used is on record. The C allocator
of the training processes (`training.allocator`, shardtune.launch.allocator) is preloaded here too.

    python -m shardtune.launch --config-file results/RUN/accelerate.yaml --nodes 1 \
        --gpus-per-node 8 --cpus-per-task 64 -- -m shardtune.train --settings FILE ...

The run settings (a JSON file) are those of the entry point's own `--settings` argument.
"""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import yaml

from shardtune.errors import UserError
from shardtune.launch import allocator
from shardtune.launch.accelerate_config import resolve_num_processes
from shardtune.launch.resources import LaunchError
from shardtune.plan.attention import attention_implementation

# Set where a job's GPUs are fake (a test cluster's gres without devices): train on CPU ranks.
ALLOW_CPU_ENV = "SHARDTUNE_ALLOW_CPU_TRAINING"

DEFAULT_PORT = 29500


def expand_hostlist(nodelist):
    """Host names of a SLURM node list such as 'gpu[07-08,10],login1' (what
    `scontrol show hostnames` prints), without needing scontrol."""
    hosts = []
    for prefix, ranges, suffix in re.findall(r"([^,\[]+)(?:\[([^\]]*)\])?([^,\[]*)", nodelist):
        if not ranges:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            first, _, last = part.partition("-")
            for number in range(int(first), int(last or first) + 1):
                hosts.append(f"{prefix}{number:0{len(first)}d}{suffix}")
    return hosts


def first_host(nodelist):
    """The allocation's first node, as `scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1`
    gives it (scontrol when there, the same expansion in Python otherwise)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
            ).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_hostlist(nodelist)[0]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_port(env):
    """A rendezvous port every node derives alike from the job id, so that two jobs sharing a
    node do not collide."""
    return DEFAULT_PORT + int(env.get("SLURM_JOB_ID", "0")) % 1000


def cuda_device_count():
    import torch

    return torch.cuda.device_count()


def node_config(base, fsdp, nodes, declared_gpus, cuda_gpus, env):
    """The run's Accelerate config with the machine-dependent keys set for this node.

    `declared_gpus` is what the job asked for per node, `cuda_gpus` what CUDA sees here; env
    holds the SLURM variables of this node's task (several nodes) or of the job.
    """
    if cuda_gpus:
        if declared_gpus and cuda_gpus < declared_gpus:
            raise LaunchError(
                f"the job asked for {declared_gpus} GPU(s) per node but CUDA sees {cuda_gpus} on "
                f"{socket.gethostname()} (CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')})"
            )
        gpus = declared_gpus or cuda_gpus
    else:
        if declared_gpus and env.get(ALLOW_CPU_ENV) != "1":
            raise LaunchError(
                f"the job asked for {declared_gpus} GPU(s) per node and got "
                f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES')}, but CUDA sees none on "
                f"{socket.gethostname()}: is torch a CUDA build and the driver loaded? "
                f"(set {ALLOW_CPU_ENV}=1 to train on CPU ranks instead, e.g. with fake test GPUs)"
            )
        gpus = 0
    num_processes = resolve_num_processes({**fsdp, "num_machines": nodes}, gpus)
    if num_processes % nodes:
        raise LaunchError(f"fsdp.num_processes={num_processes} is not a multiple of the {nodes} nodes")
    if gpus and num_processes > gpus * nodes:
        raise LaunchError(f"fsdp.num_processes={num_processes} exceeds the {gpus * nodes} GPU(s) of the allocation")

    config = dict(base)
    config.update(num_processes=num_processes, num_machines=nodes, use_cpu=gpus == 0)
    if not gpus and "fsdp_config" in config:
        config["fsdp_config"], _ = cpu_substitutes(config["fsdp_config"])
    if nodes > 1:
        rank, node = int(env["SLURM_PROCID"]), int(env.get("SLURM_NODEID", env["SLURM_PROCID"]))
        if rank != node:
            raise LaunchError(f"task {rank} runs on node {node}: one task per node is needed")
        nodelist = env.get("SLURM_JOB_NODELIST") or env["SLURM_STEP_NODELIST"]
        config.update(
            machine_rank=rank,
            main_process_ip=fsdp["main_process_ip"] or first_host(nodelist),
            main_process_port=fsdp["main_process_port"] or job_port(env),
        )
    else:
        config.update(machine_rank=0, main_process_port=fsdp["main_process_port"] or free_port())
    return config


def cpu_substitutes(fsdp_config):
    """The FSDP settings that only GPUs can run, replaced for CPU ranks: (new fsdp_config,
    one line per replaced setting saying what the CPU run does instead)."""
    fsdp_config, notes = dict(fsdp_config), []
    if fsdp_config.get("fsdp_version", 1) == 1 and fsdp_config.get("fsdp_sync_module_states"):
        # torch's FSDP1 broadcasts module states from GPU tensors only, and Accelerate turns
        # sync_module_states back on whenever cpu_ram_efficient_loading is on
        fsdp_config.update(fsdp_sync_module_states=False, fsdp_cpu_ram_efficient_loading=False)
        notes.append(
            "fsdp_sync_module_states and fsdp_cpu_ram_efficient_loading off on CPU ranks (FSDP1 broadcasts"
            " module states from GPU memory only): every rank loads the whole model instead"
        )
    if fsdp_config.get("fsdp_offload_params"):
        # both FSDP versions pin offloaded shards in page-locked memory, which needs a GPU
        fsdp_config["fsdp_offload_params"] = False
        notes.append(
            "fsdp_offload_params off on CPU ranks (FSDP pins offloaded shards in page-locked memory,"
            " which needs a GPU): CPU ranks keep their shards in host memory anyway"
        )
    return fsdp_config, notes


def srun_command(nodes, cpus_per_task, argv):
    """The job's step: one task per node, each running this module with --node-task."""
    return [
        "srun",
        f"--nodes={nodes}",
        f"--ntasks={nodes}",
        "--ntasks-per-node=1",
        f"--cpus-per-task={cpus_per_task}",
        "--kill-on-bad-exit=1",
        "--label",
        sys.executable,
        "-m",
        "shardtune.launch",
        "--node-task",
        *argv,
    ]


def accelerate_command(config_path, script_args):
    # This interpreter, not whatever `accelerate` or `python` comes first on PATH: outside an
    # activated environment that is the machine's Python, without torch.
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_path), *script_args]


def describe_node(env, cuda_gpus):
    keys = ("SLURMD_NODENAME", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NODEID", "SLURM_JOB_NODELIST", "SLURM_GPUS_ON_NODE")
    seen = " ".join(f"{k}={env[k]}" for k in keys if k in env)
    return (
        f"host {socket.gethostname()}: {seen} CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '<unset>')}"
        f", CUDA sees {cuda_gpus} GPU(s)"
    )


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m shardtune.launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the run's Accelerate config (accelerate.yaml)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs the job asked for per node")
    parser.add_argument("--cpus-per-task", type=int, default=1, help="CPUs per node (for srun)")
    parser.add_argument("--node-task", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("script", nargs=argparse.REMAINDER, help="-- then accelerate launch's script and its arguments")
    args = parser.parse_args(argv)
    args.argv = list(argv)
    args.script = args.script[1:] if args.script[:1] == ["--"] else args.script
    if not args.script:
        parser.error("missing the script to launch (after --)")
    settings = argparse.ArgumentParser(add_help=False)
    settings.add_argument("--settings", required=True)
    with open(settings.parse_known_args(args.script)[0].settings) as handle:
        args.settings = json.load(handle)
    return args


def node_command(args, env, log):
    """The command that trains on this node: the run's Accelerate config completed for the
    node (written to a temporary file and printed) and `accelerate launch` with the script."""
    cuda_gpus = cuda_device_count()
    log(describe_node(env, cuda_gpus))
    base = yaml.safe_load(open(args.config_file))
    config = node_config(base, args.settings["fsdp"], args.nodes, args.gpus_per_node, cuda_gpus, env)
    if config["use_cpu"]:
        for note in cpu_substitutes(base.get("fsdp_config", {}))[1]:
            log(note, console_too=True)
    fd, path = tempfile.mkstemp(prefix=f"accelerate-{env.get('SLURM_JOB_ID', 'local')}-", suffix=".yaml")
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump(config, handle, sort_keys=False)
    requested = args.settings.get("training", {}).get("allocator", "auto")
    name, updates, why = allocator.select(requested, env, gpus=0 if config["use_cpu"] else cuda_gpus)
    env.update(updates)  # os.environ in a real launch: accelerate and the ranks inherit it
    # a CPU run on glibc's malloc holds up to 1.5x the memory: worth a line on the console
    log(f"allocator: {name} ({why})" + "".join(f"; {k}={v}" for k, v in updates.items()), console_too=requested == "auto" and name == "system" and config["use_cpu"])
    log(
        f"machine {config['machine_rank']} of {config['num_machines']}, {config['num_processes']} processes in all,"
        f" use_cpu={config['use_cpu']}, main process {config.get('main_process_ip', 'localhost')}:"
        f"{config['main_process_port']}; config {path}:\n"
        + yaml.safe_dump(config, sort_keys=False)
    )
    return accelerate_command(path, args.script)


def job_command(args, env, log):
    """What the training job runs: srun over the nodes of the allocation, or this node's launch."""
    if args.nodes == 1:
        return node_command(args, env, log)
    if "SLURM_JOB_ID" not in env:
        raise LaunchError(f"resources.fsdp_train.nodes={args.nodes} needs a SLURM allocation (run with the SLURM profile)")
    command = srun_command(args.nodes, args.cpus_per_task, args.argv)
    log(f"starting one task per node on {args.nodes} nodes: {shlex.join(command)}")
    return command


# A rank's line as torch's launcher prefixes it ("[rank1]: ..."), and the line that ends a
# traceback ("ValueError: ...", "torch.OutOfMemoryError: ...").
_RANK_PREFIX = re.compile(r"^\[[^\]]*\]:\s?")

_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit)\b.*$")

_LAUNCHER_ERRORS = ("ChildFailedError", "CalledProcessError", "SignalException")


def error_line(text):
    """The one line that says why training failed, from the training log: our own `ERROR:`
    line if a rank printed one, else the exception that ended the first rank's traceback
    (not the launcher's own ChildFailedError that wraps it)."""
    lines = [_RANK_PREFIX.sub("", line) for line in text.splitlines()]
    for line in lines:
        if line.startswith("ERROR: "):
            return line[len("ERROR: ") :].strip()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            for later in lines[i + 1 :]:
                if _EXCEPTION_LINE.match(later):
                    if not any(name in later for name in _LAUNCHER_ERRORS):
                        return later.strip()
                    break
    return None


def _run_forwarding_signals(command, log_file, env):
    """Run the launch and wait for it; a SIGTERM or SIGINT sent to this process (Snakemake
    cancelling the job, SLURM ending it) is passed on, so that no rank outlives the job."""
    child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    forward = lambda signum, frame: child.send_signal(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(argv, log_path, env=None, console=None):
    """Start training for the fsdp_train job, its output (every rank's) appended to log_path;
    `console(line)` also shows what the user should see without opening the log. A failure
    ends in a LaunchError holding the one line that says why; the log keeps the rest."""
    env = os.environ if env is None else env
    args = parse_args(argv)
    requested = args.settings["model"]["attn_implementation"]
    attn, why = attention_implementation(args.settings)  # as every rank will decide; fails here first
    with open(log_path, "a", buffering=1) as log_file:
        start = log_file.tell()  # the log keeps earlier attempts: read only this one's for errors

        def log(message, console_too=False):
            if console_too and console:
                console(message)  # to the log as well
            else:
                print(f"launch: {message}", file=log_file, flush=True)

        if requested == "auto" and attn != "flash_attention_2":
            log(f"attention: {attn} ({why})", console_too=True)
        command = job_command(args, env, log)
        log(shlex.join(command[:5]) + " ...")
        code = _run_forwarding_signals(command, log_file, env)
    if code:
        with open(log_path, errors="replace") as handle:
            handle.seek(start)
            why = error_line(handle.read()) or "see the log"
        raise LaunchError(f"training failed (exit {code}): {why} (full output: {log_path})")


def main(argv=None, env=None):
    """A node's task of a multi-node job (srun starts it with --node-task): launch this node."""
    argv = sys.argv[1:] if argv is None else argv
    env = os.environ if env is None else env
    args = parse_args(argv)
    command = node_command(args, env, lambda message, console_too=False: print(f"launch: {message}", flush=True))
    os.execvp(command[0], command)


def cli():
    """`python -m shardtune.launch --node-task ...`, as srun starts it on every node."""
    try:
        main()
    except UserError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        sys.exit(1)
