"""The generated Accelerate config."""


import pytest
import yaml

from shardtune.config import ConfigError, resolve_runs
from shardtune.launch import accelerate_config


def settings(**fsdp):
    return resolve_runs({"fsdp": fsdp})["demo"]


def test_auto_processes_is_one_per_gpu_or_two_ranks_on_cpu():
    assert accelerate_config.build(settings(), gpus=4)["num_processes"] == 4
    cpu = accelerate_config.build(settings(), gpus=0)
    assert cpu["num_processes"] == 2 and cpu["use_cpu"] is True
    assert cpu["distributed_type"] == "FSDP" and cpu["fsdp_config"]["fsdp_version"] == 2


def test_fsdp2_expresses_sharding_strategy_as_reshard_after_forward():
    assert accelerate_config.build(settings(sharding_strategy="SHARD_GRAD_OP"), gpus=2)["fsdp_config"][
        "fsdp_reshard_after_forward"
    ] is False


def test_multi_node_settings_reach_the_file():
    config = accelerate_config.build(
        settings(num_machines=2, machine_rank=1, main_process_ip="node001", main_process_port=29500, rdzv_backend="c10d"),
        gpus=8,
    )
    assert config["num_processes"] == 16 and config["num_machines"] == 2 and config["machine_rank"] == 1
    assert config["main_process_ip"] == "node001" and config["main_process_port"] == 29500
    assert config["rdzv_backend"] == "c10d"


def test_more_processes_than_gpus_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="fsdp.num_processes"):
        accelerate_config.write(settings(num_processes=8), tmp_path / "a.yaml", gpus=4)
    assert not (tmp_path / "a.yaml").exists()


def test_a_planned_multi_node_job_is_not_held_to_one_machine(tmp_path):
    # one GPU per node on two nodes (resources.fsdp_train), fsdp.num_machines left at 1: the
    # launcher sets the machine count from the allocation, validation checked gpu x nodes
    config = accelerate_config.write(settings(num_processes=2), tmp_path / "a.yaml", gpus=1, planned=True)
    assert config["num_processes"] == 2 and not config["use_cpu"]
    assert (tmp_path / "a.yaml").exists()


def test_accelerate_accepts_the_file(tmp_path):
    path = tmp_path / "accelerate.yaml"
    accelerate_config.write(settings(), path, gpus=0)
    loaded = yaml.safe_load(path.read_text())
    from accelerate.commands.config.config_args import load_config_from_file

    parsed = load_config_from_file(str(path))
    assert str(parsed.distributed_type).endswith("FSDP") and parsed.num_processes == loaded["num_processes"]
    assert parsed.fsdp_config["fsdp_version"] == 2


def test_the_file_is_the_config_plus_only_accelerates_defaults(tmp_path):
    """Written by Accelerate's ClusterConfig: every key of ours as we set it, and nothing else
    but the defaults Accelerate adds itself."""
    path = tmp_path / "accelerate.yaml"
    ours = accelerate_config.write(settings(), path, gpus=0)
    written = yaml.safe_load(path.read_text())
    assert {k: written[k] for k in ours} == ours
    assert set(written) - set(ours) == {"enable_cpu_affinity"} and written["enable_cpu_affinity"] is False
