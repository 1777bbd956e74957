"""The training launch: resources from the config, and the per-node `accelerate launch` of a
multi-node allocation, rendered from fake SLURM variables."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shardtune.config import load_schema, validate
from shardtune.launch import launcher as launch
from shardtune.launch import resources as cluster

from conftest import plain_shell_env

SCHEMA = load_schema()


def resources(**overrides):
    return validate({"resources": {"fsdp_train": overrides}}, SCHEMA)["resources"]["fsdp_train"]


def fsdp(**overrides):
    return validate({"fsdp": overrides}, SCHEMA)["fsdp"]


BASE = {"distributed_type": "FSDP", "num_processes": 2, "num_machines": 1, "machine_rank": 0, "use_cpu": True}


@pytest.mark.parametrize(
    "gres, gpus",
    [(None, 0), ("gpu", 1), ("gpu:8", 8), ("gpu:h100:4", 4), ("nvme:1,gpu:a100:2", 2), ("nvme:1", 0)],
)
def test_gpus_in_gres(gres, gpus):
    assert cluster.gres_gpus(gres) == gpus


def test_cpu_job_on_one_node_asks_for_threads_and_no_gpu():
    r = cluster.job_resources(resources(), threads=2)
    assert r["nodes"] == 1 and r["cpus_per_task"] == 2 and r["gpus_per_node"] == 0
    assert r["mem_mb"] == 16000 and r["runtime"] == 720
    unset = ("gpu", "gpu_model", "gres", "mpi", "tasks", "tasks_per_gpu", "slurm_partition", "constraint")
    assert all(r[key] is None for key in unset)


def test_one_node_gpus_become_gpus_option():
    r = cluster.job_resources(
        resources(gpu=8, gpu_model="h100", cpus_per_task=64, partition="gpu", account="proj", constraint="ib"),
        threads=2,
    )
    assert (r["gpu"], r["gpu_model"], r["gres"], r["gpus_per_node"]) == (8, "h100", None, 8)
    assert (r["cpus_per_task"], r["slurm_partition"], r["slurm_account"], r["constraint"]) == (64, "gpu", "proj", "ib")
    assert r["mpi"] is None


def test_several_nodes_ask_gpus_per_node_as_gres_and_one_task_per_node():
    r = cluster.job_resources(resources(nodes=2, gpu=8, gpu_model="h100"), threads=2)
    # --gpus would be a total over the nodes; gres counts per node
    assert (r["gpu"], r["gpu_model"], r["gres"], r["gpus_per_node"]) == (None, None, "gpu:h100:8", 8)
    assert (r["nodes"], r["mpi"], r["tasks"], r["tasks_per_gpu"]) == (2, "srun", 2, 0)


def test_a_gpu_job_asks_cpus_and_memory_per_gpu_unless_given():
    r = cluster.job_resources(resources(gpu=8), threads=2)
    assert (r["cpus_per_task"], r["mem_mb"]) == (8 * 8, 8 * 64000)
    r = cluster.job_resources(resources(nodes=2, gres="gpu:h100:4", cpus_per_gpu=12, mem_mb_per_gpu=100000), threads=2)
    assert (r["cpus_per_task"], r["mem_mb"]) == (48, 400000)  # per node
    r = cluster.job_resources(resources(gpu=8, cpus_per_task=32, mem_mb=250000), threads=2)
    assert (r["cpus_per_task"], r["mem_mb"]) == (32, 250000)


def test_explicit_gres_is_passed_as_is():
    r = cluster.job_resources(resources(gres="gpu:a100:4"), threads=2)
    assert (r["gres"], r["gpu"], r["gpus_per_node"]) == ("gpu:a100:4", None, 4)


@pytest.mark.parametrize(
    "res, fsdp_settings, key",
    [
        ({"gpu": 2, "gres": "gpu:2"}, {}, "gpu"),
        ({"gpu_model": "h100"}, {}, "gpu_model"),
        ({"nodes": 2}, {"num_machines": 3, "main_process_ip": "x"}, "nodes"),
        ({"gpu": 4}, {"num_processes": 8}, "gpu"),
        ({"nodes": 2, "gres": "gpu:2"}, {"num_processes": 8, "num_machines": 2, "main_process_ip": "x"}, "gpu"),
    ],
)
def test_impossible_resources_are_refused_naming_the_key(res, fsdp_settings, key):
    with pytest.raises(launch.LaunchError, match=f"'runs.demo.resources.fsdp_train.{key}'"):
        cluster.check_resources(resources(**res), fsdp(**fsdp_settings), "runs.demo.resources.fsdp_train")


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[07-08,10],login1", ["gpu07", "gpu08", "gpu10", "login1"]),
        ("a[9-11]-ib", ["a9-ib", "a10-ib", "a11-ib"]),
        ("x[1,3],y", ["x1", "x3", "y"]),
    ],
)
def test_hostlist_expansion(nodelist, hosts):
    assert launch.expand_hostlist(nodelist) == hosts


def test_first_host_without_scontrol(monkeypatch):
    monkeypatch.setattr(launch.shutil, "which", lambda name: None)
    assert launch.first_host("gpu[07-08]") == "gpu07"


# --- rendering the launch of a 2-node x 8-GPU allocation ------------------------------------


@pytest.fixture
def job(tmp_path, monkeypatch):
    """A run's files and a fake 8-GPU CUDA."""
    config = tmp_path / "accelerate.yaml"
    config.write_text(yaml.safe_dump(BASE))
    settings = tmp_path / "train_settings.json"
    settings.write_text(json.dumps({"fsdp": fsdp()}))
    monkeypatch.setattr(launch, "cuda_device_count", lambda: 8)
    monkeypatch.setattr(launch.tempfile, "tempdir", str(tmp_path))
    argv = ["--config-file", str(config), "--nodes", "2", "--gpus-per-node", "8", "--cpus-per-task", "64"]
    argv += ["--", "-m", "shardtune.train", "--settings", str(settings), "--output", "out"]
    return argv


def command(argv, env):
    return launch.job_command(launch.parse_args(argv), env, log=lambda message, console_too=False: None)


ALLOCATION = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NNODES": "2"}


def test_job_starts_one_srun_task_per_node(job):
    srun = command(job, {"SLURM_JOB_ID": "4242"})
    assert srun[:7] == [
        "srun",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=64",
        "--kill-on-bad-exit=1",
        "--label",
    ]
    assert srun[7] == sys.executable
    assert srun[8:11] == ["-m", "shardtune.launch", "--node-task"] and srun[11:] == job


def test_each_node_task_launches_with_its_rank_and_the_first_node_as_main(job):
    rendered = []
    for rank in (0, 1):
        env = {**ALLOCATION, "SLURM_PROCID": str(rank), "SLURM_NODEID": str(rank)}
        args = launch.parse_args(["--node-task", *job])
        launched = launch.node_command(args, env, log=lambda message, console_too=False: None)
        # this interpreter's accelerate, not the first one on PATH
        assert launched[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
        assert launched[5:] == job[job.index("--") + 1 :]
        rendered.append(accelerate_args(launched))
    for rank, args in enumerate(rendered):
        assert args.machine_rank == rank
        assert args.main_process_ip == "gpu07"
        assert args.main_process_port == 29500 + 4242 % 1000
        assert (args.num_machines, args.num_processes, args.use_cpu) == (2, 16, False)
        assert args.use_fsdp


def accelerate_args(command):
    """What `accelerate launch` itself makes of the command and its per-node config file."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    parsed = launch_command_parser().parse_args(command[3:])
    _validate_launch_command(parsed)
    return parsed


def test_more_tasks_than_nodes_is_refused():
    env = {**ALLOCATION, "SLURM_PROCID": "1", "SLURM_NODEID": "0"}
    with pytest.raises(launch.LaunchError, match="one task per node"):
        launch.node_config(BASE, fsdp(), 2, 8, 8, env)


def test_several_nodes_need_an_allocation(job):
    with pytest.raises(launch.LaunchError, match="needs a SLURM allocation"):
        command(job, {})


def test_one_node_uses_the_gpus_cuda_sees_and_a_free_port():
    config = launch.node_config(BASE, fsdp(), 1, 0, 4, {})
    assert (config["num_processes"], config["num_machines"], config["machine_rank"], config["use_cpu"]) == (4, 1, 0, False)
    assert 0 < config["main_process_port"] < 65536


def test_a_config_written_without_gpus_is_corrected_on_a_gpu_node():
    # write_accelerate_config may run on a CPU node: use_cpu true, 2 ranks
    config = launch.node_config(BASE, fsdp(), 1, 8, 8, {})
    assert (config["num_processes"], config["use_cpu"]) == (8, False)


def test_explicit_num_processes_is_kept_and_checked():
    assert launch.node_config(BASE, fsdp(num_processes=4), 1, 8, 8, {})["num_processes"] == 4
    with pytest.raises(launch.LaunchError, match="exceeds the 8 GPU"):
        launch.node_config(BASE, fsdp(num_processes=16), 1, 8, 8, {})
    with pytest.raises(launch.LaunchError, match="multiple of the 2 nodes"):
        launch.node_config(BASE, fsdp(num_processes=3), 2, 8, 8, {**ALLOCATION, "SLURM_PROCID": "0"})


def test_fewer_gpus_than_asked_for_is_an_error():
    with pytest.raises(launch.LaunchError, match="asked for 8 GPU.*CUDA sees 4"):
        launch.node_config(BASE, fsdp(), 1, 8, 4, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})


def test_gpus_cuda_cannot_use_are_an_error_unless_cpu_training_is_allowed():
    env = {"CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(launch.LaunchError, match="CUDA sees none"):
        launch.node_config(BASE, fsdp(), 1, 2, 0, env)
    config = launch.node_config(BASE, fsdp(), 1, 2, 0, {**env, launch.ALLOW_CPU_ENV: "1"})
    assert (config["num_processes"], config["use_cpu"]) == (2, True)


def test_cpu_only_job_keeps_two_ranks():
    config = launch.node_config(BASE, fsdp(), 1, 0, 0, {})
    assert (config["num_processes"], config["use_cpu"], config["num_machines"]) == (2, True, 1)


# --- what the pinned SLURM plugin makes of these resources ---------------------------------


class _Resources(dict):
    __getattr__ = dict.__getitem__


def sbatch_line(res, threads=2):
    """The sbatch command the SLURM executor plugin builds for a job with these resources
    (Snakemake drops resources that are None before the plugin sees them)."""
    # importing the plugin runs `scontrol show config`, which waits 9 s for an absent controller
    # where a SLURM client is installed: the plain shell's scontrol fails at once
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", plain_shell_env()["PATH"])
        submit_string = pytest.importorskip("snakemake_executor_plugin_slurm.submit_string")
    from snakemake_executor_plugin_slurm.utils import set_gres_string

    values = {k: v for k, v in cluster.job_resources(res, threads).items() if v is not None}
    job = type("Job", (), {"resources": _Resources(values), "threads": threads, "name": "fsdp_train"})()
    params = {"run_uuid": "u", "slurm_logfile": "l", "comment_str": "c", "account": "", "partition": "", "workdir": "."}
    return (submit_string.get_submit_command(job, params) + set_gres_string(job)).split()


def test_plugin_asks_one_node_for_its_gpus():
    line = sbatch_line(resources(gpu=8, gpu_model="h100", cpus_per_task=64, mem_mb=500000))
    assert {"--gpus=h100:8", "--cpus-per-task=64", "--nodes=1"} <= set(line)
    assert line[line.index("--mem") + 1] == "500000" and line[line.index("-t") + 1] == "720"
    assert not any(arg.startswith(("--gres", "--ntasks-per-gpu")) for arg in line)


def test_plugin_asks_two_nodes_for_one_task_and_eight_gpus_each():
    line = sbatch_line(resources(nodes=2, gpu=8, gpu_model="h100", cpus_per_task=96, constraint="ib"))
    assert {"--nodes=2", "--ntasks=2", "--cpus-per-task=96", "--gres=gpu:h100:8", "-C", "ib"} <= set(line)
    # a total --gpus, or tasks per GPU, would break one task per node with 8 GPUs each
    assert not any(arg.startswith(("--gpus", "--ntasks-per-gpu")) for arg in line)


def test_plugin_asks_cpu_job_for_one_task_with_the_rule_threads():
    line = sbatch_line(resources(), threads=2)
    assert {"--ntasks=1", "--cpus-per-task=2", "--nodes=1"} <= set(line)
    assert not any(arg.startswith(("--gpus", "--gres")) for arg in line)


# --- what a failed training shows on the console --------------------------------------------

RANK_FAILURE = """launch: machine 0 of 1
[rank0]: Traceback (most recent call last):
[rank0]:   File "trainer.py", line 1303, in create_optimizer
[rank0]:     raise ImportError("You need to install `galore_torch`")
[rank0]: ImportError: You need to install `galore_torch`
[rank1]: Traceback (most recent call last):
[rank1]: ImportError: You need to install `galore_torch`
Traceback (most recent call last):
  File "torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
"""


def test_error_line_is_the_first_ranks_exception_not_the_launchers():
    assert launch.error_line(RANK_FAILURE) == "ImportError: You need to install `galore_torch`"


def test_error_line_prefers_a_ranks_own_error_line():
    text = RANK_FAILURE.replace("launch: machine 0 of 1", "[rank1]: ERROR: lora.r: too large for the model")
    assert launch.error_line(text) == "lora.r: too large for the model"
    assert launch.error_line("launch: machine 0 of 1\nKilled\n") is None


def test_a_failed_launch_names_this_attempts_error_only(tmp_path, monkeypatch):
    """The log keeps earlier attempts; the console line must come from this one."""
    log = tmp_path / "train.log"
    log.write_text("[rank0]: ERROR: from an earlier attempt\n")
    config = tmp_path / "accelerate.yaml"
    config.write_text(yaml.safe_dump(BASE))
    settings = tmp_path / "train_settings.json"
    settings.write_text(json.dumps(validate({"model": {"attn_implementation": "eager"}}, SCHEMA)))
    monkeypatch.setattr(launch, "cuda_device_count", lambda: 0)
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint(open(sys.argv[1]).read(), end='')\nsys.exit(1)\n")
    failure = tmp_path / "failure.txt"
    failure.write_text(RANK_FAILURE)
    # instead of accelerate: a script that prints a real launcher's failure and exits 1
    monkeypatch.setattr(launch, "accelerate_command", lambda path, args: [sys.executable, str(script), str(failure)])
    argv = ["--config-file", str(config), "--", "-m", "shardtune.train", "--settings", str(settings)]
    with pytest.raises(launch.LaunchError) as raised:
        launch.run(argv, log)
    assert str(raised.value) == f"training failed (exit 1): ImportError: You need to install `galore_torch` (full output: {log})"
    assert "ChildFailedError" in log.read_text()  # the whole output stays in the log


def test_a_cancelled_job_passes_the_signal_to_the_launch(tmp_path):
    """SIGTERM to the job's process (Snakemake or SLURM cancelling it) reaches the launch."""
    script = tmp_path / "job.py"
    marker = tmp_path / "got-sigterm"
    child = tmp_path / "child.py"
    child.write_text(
        "import signal, sys, time\n"
        f"signal.signal(signal.SIGTERM, lambda *a: (open({str(marker)!r}, 'w').close(), sys.exit(3)))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(launch.__file__).parents[2])!r})\n"
        "from shardtune.launch.launcher import _run_forwarding_signals\n"
        f"sys.exit(_run_forwarding_signals([sys.executable, {str(child)!r}], open({str(tmp_path / 'log')!r}, 'w'), None))\n"
    )
    job = subprocess.Popen([sys.executable, str(script)])
    log, deadline = tmp_path / "log", time.time() + 30
    while not (log.exists() and "ready" in log.read_text()):
        assert time.time() < deadline, "the launch never started"
        time.sleep(0.1)
    job.send_signal(signal.SIGTERM)
    assert job.wait(timeout=30) == 3 and marker.exists()


def test_cpu_ranks_replace_only_the_gpu_only_fsdp_settings_and_say_so():
    preset = {
        "fsdp_sync_module_states": True,
        "fsdp_cpu_ram_efficient_loading": True,
        "fsdp_offload_params": True,
        "fsdp_sharding_strategy": "FULL_SHARD",
        "fsdp_use_orig_params": False,
    }
    replaced, notes = launch.cpu_substitutes(preset)
    off = {"fsdp_sync_module_states": False, "fsdp_cpu_ram_efficient_loading": False, "fsdp_offload_params": False}
    assert replaced == {**preset, **off}
    assert len(notes) == 2 and "every rank loads the whole model" in notes[0] and "page-locked" in notes[1]
    fsdp2 = {"fsdp_version": 2, "fsdp_cpu_ram_efficient_loading": True, "fsdp_offload_params": True}
    assert launch.cpu_substitutes(fsdp2)[0] == {**fsdp2, "fsdp_offload_params": False}  # FSDP2 broadcasts on CPU
    # on GPUs the run's own settings stay
    base = {**BASE, "fsdp_config": preset}
    assert launch.node_config(base, fsdp(), 1, 2, 2, {})["fsdp_config"] == preset
    assert launch.node_config(base, fsdp(), 1, 0, 0, {})["fsdp_config"] == {**preset, **off}
