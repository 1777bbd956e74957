"""What a run's training job asks the cluster for: the config's resources.fsdp_train as the
Snakemake resources the SLURM executor plugin reads."""

from shardtune.errors import UserError


CPU_JOB_MEM_MB = 16000  # a CPU-only training job's memory when resources.*.mem_mb is null


class LaunchError(UserError):
    """The allocation does not match what the run asked for."""


def gres_gpus(gres):
    """GPUs per node in a gres string ('gpu', 'gpu:8', 'gpu:h100:8', 'nvme:1,gpu:4'), else 0."""
    count = 0
    for item in (gres or "").split(","):
        parts = item.strip().split(":")
        if parts[0] == "gpu":
            count += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return count


def gpus_per_node(res):
    return gres_gpus(res["gres"]) or res["gpu"]


def check_resources(res, fsdp, prefix):
    """Reject resources that cannot work, naming the key (prefix: e.g. runs.demo.resources.fsdp_train)."""

    def fail(key, message):
        raise LaunchError(f"config error at '{prefix}.{key}': {message}")

    if fsdp["num_machines"] not in (1, res["nodes"]):
        fail("nodes", f"must equal fsdp.num_machines ({fsdp['num_machines']}): the job starts one machine per node")

    gpus = gpus_per_node(res)
    if gpus and fsdp["num_processes"] != "auto" and fsdp["num_processes"] > gpus * res["nodes"]:
        fail("gpu", f"{gpus} GPU(s) per node on {res['nodes']} node(s) cannot run fsdp.num_processes={fsdp['num_processes']}")
    if res["gres"] and gres_gpus(res["gres"]) and res["gpu"]:
        fail("gpu", "give the GPUs either as gpu (with gpu_model) or inside gres, not both")
    if res["gpu_model"] and not res["gpu"]:
        fail("gpu_model", "needs gpu (the number of GPUs per node)")
    if res["gpu_model"] and res["gres"] and gres_gpus(res["gres"]):
        fail("gpu_model", "put the model inside gres (gpu:MODEL:N) when gres is used")


def job_resources(res, threads):
    """Snakemake resources (as the SLURM executor plugin reads them) for one job; None = unset.

    GPUs are per node: one node asks `--gpus=[MODEL:]N`, several nodes `--gres=gpu:[MODEL:]N`
    (per node, where `--gpus` would be a total). Several nodes make an `mpi` job of one task
    per node, which the plugin starts without wrapping it in srun: `main()` calls srun itself.
    """
    nodes, gpus = res["nodes"], res["gpu"]
    gres = res["gres"]
    if nodes > 1 and gpus and not gres:
        gres = ":".join(["gpu", *([res["gpu_model"]] if res["gpu_model"] else []), str(gpus)])
    one_node = nodes == 1 and not gres
    per_node = gpus_per_node({**res, "gres": gres})
    return {
        "nodes": nodes,
        "gpus_per_node": per_node,
        "gpu": gpus if one_node and gpus else None,
        "gpu_model": res["gpu_model"] if one_node else None,
        "gres": gres,
        "cpus_per_task": res["cpus_per_task"] or (res["cpus_per_gpu"] * per_node if per_node else threads),
        "mem_mb": res["mem_mb"] or (res["mem_mb_per_gpu"] * per_node if per_node else CPU_JOB_MEM_MB),
        "runtime": res["runtime"],
        "slurm_partition": res["partition"],
        "slurm_account": res["account"],
        "constraint": res["constraint"],
        "qos": res["qos"],
        "slurm_extra": res["slurm_extra"],
        "mpi": "srun" if nodes > 1 else None,
        "tasks": nodes if nodes > 1 else None,
        # the plugin would otherwise turn `tasks` of a GPU job into --ntasks-per-gpu
        "tasks_per_gpu": 0 if nodes > 1 else None,
    }
