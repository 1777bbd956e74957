"""The Accelerate config file (`accelerate launch --config_file`) for a run."""

from shardtune.config import ConfigError
from shardtune.io import atomic_file


def resolve_num_processes(fsdp, gpus):
    """`auto` = one process per visible GPU, or 2 ranks on a CPU-only machine (FSDP needs >= 2)."""
    if fsdp["num_processes"] != "auto":
        return fsdp["num_processes"]
    return max(gpus, 1) * fsdp["num_machines"] if gpus else 2 * fsdp["num_machines"]


def visible_gpus():
    import torch

    return torch.cuda.device_count()


def build(settings, gpus):
    """The config as a dict; with the recipe's settings it reproduces the recipe's YAML."""
    f = settings["fsdp"]
    fsdp = {
        "fsdp_auto_wrap_policy": f["auto_wrap_policy"],
        "fsdp_cpu_ram_efficient_loading": f["cpu_ram_efficient_loading"],
        "fsdp_offload_params": f["offload_params"],
        "fsdp_state_dict_type": f["state_dict_type"],
    }
    if f["version"] == 1:
        fsdp |= {
            "fsdp_backward_prefetch": f["backward_prefetch"],
            "fsdp_forward_prefetch": f["forward_prefetch"],
            "fsdp_sharding_strategy": f["sharding_strategy"],
            "fsdp_sync_module_states": f["sync_module_states"],
            "fsdp_use_orig_params": f["use_orig_params"],
        }
    else:
        fsdp |= {
            "fsdp_version": 2,
            # FSDP2 expresses FULL_SHARD / SHARD_GRAD_OP as resharding after forward or not.
            "fsdp_reshard_after_forward": f["sharding_strategy"] == "FULL_SHARD",
        }
    if f["activation_checkpointing"]:
        fsdp["fsdp_activation_checkpointing"] = True
    config = {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "distributed_type": "FSDP",
        "downcast_bf16": f["downcast_bf16"],
        "fsdp_config": dict(sorted(fsdp.items())),
        "machine_rank": f["machine_rank"],
        "main_training_function": "main",
        "mixed_precision": f["mixed_precision"],
        "num_machines": f["num_machines"],
        "num_processes": resolve_num_processes(f, gpus),
        "rdzv_backend": f["rdzv_backend"],
        "same_network": f["same_network"],
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
        "use_cpu": gpus == 0,
    }
    if f["main_process_ip"]:
        config["main_process_ip"] = f["main_process_ip"]
    if f["main_process_port"]:
        config["main_process_port"] = f["main_process_port"]
    return config


def write(settings, path, gpus, planned=False):
    """`planned`: `gpus` is what the training job asks for per node, already checked against
    the job's nodes at validation (the machine count there may exceed fsdp.num_machines,
    which the launcher sets from the allocation); otherwise `gpus` are this machine's."""
    config = build(settings, gpus)
    if gpus and not planned and config["num_processes"] > gpus * config["num_machines"]:
        raise ConfigError(
            f"config error at 'fsdp.num_processes': {config['num_processes']} processes on "
            f"{config['num_machines']} machine(s) but {gpus} GPU(s) per machine are visible; lower it or use auto"
        )
    # Accelerate's own config class writes the file: a key it does not know fails here, and what
    # it adds is its defaults (enable_cpu_affinity: false)
    from accelerate.commands.config.config_args import ClusterConfig

    with atomic_file(path) as tmp:
        ClusterConfig(**config).to_yaml_file(tmp)
    return config
