"""Configuration: defaults, per-run overrides, and settings rejected before any job starts."""

import pytest

from shardtune.config import ConfigError, dataset_key, load_schema, model_key, prepared_key, resolve_runs


def test_defaults_fill_every_section_and_runs_override_them():
    runs = resolve_runs({"runs": {"a": {}, "b": {"lora": {"r": 16}}}, "training": {"learning_rate": 1e-3}})
    assert runs["a"]["lora"] == {
        "r": 8,
        "alpha": 16,
        "dropout": 0.1,
        "target_modules": "all-linear",
        "bias": "none",
        "use_dora": False,
        "modules_to_save": None,
    }
    assert runs["b"]["lora"]["r"] == 16 and runs["b"]["lora"]["alpha"] == 16
    assert runs["a"]["training"]["learning_rate"] == runs["b"]["training"]["learning_rate"] == 1e-3
    assert runs["a"]["fsdp"]["num_processes"] == "auto"


def test_runs_share_data_and_model_keys_unless_their_inputs_differ():
    runs = resolve_runs(
        {"runs": {"a": {}, "b": {"training": {"seed": 1}}, "c": {"data": {"max_seq_len": 256}}}}
    )
    assert prepared_key(runs["a"]) == prepared_key(runs["b"]) != prepared_key(runs["c"])
    assert dataset_key(runs["a"]) == dataset_key(runs["c"]) and model_key(runs["a"]) == model_key(runs["c"])


@pytest.mark.parametrize(
    "config, key",
    [
        ({"lora": {"r": 0}}, "lora.r"),
        ({"lora": {"r": "8"}}, "lora.r"),
        ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules"),
        ({"training": {"learning_rate": 0}}, "training.learning_rate"),
        ({"fsdp": {"num_processes": "many"}}, "fsdp.num_processes"),
        ({"fsdp": {"mixed_precision": "fp8"}}, "fsdp.mixed_precision"),
        ({"unknown_section": {}}, "unknown_section"),
        ({"lora": {"rank": 8}}, "lora.rank"),
        ({"runs": {"a": {"lora": {"rank": 8}}}}, "runs.a.lora.rank"),
        ({"runs": {"bad name!": {}}}, "runs"),
    ],
)
def test_a_bad_value_is_rejected_naming_its_key(config, key):
    with pytest.raises(ConfigError, match=f"config error at '{key}'"):
        resolve_runs(config)


@pytest.mark.parametrize(
    "config, key, hint",
    [
        ({"quantization": {"load_in_8bit": True}}, "quantization.load_in_8bit", "load_in_4bit"),
        ({"fsdp": {"forward_prefetch": True}}, "fsdp.forward_prefetch", "fsdp.version: 1"),
        ({"fsdp": {"sharding_strategy": "NO_SHARD"}}, "fsdp.sharding_strategy", "FULL_SHARD"),
        (
            {"quantization": {"load_in_4bit": True, "bnb_4bit_quant_storage_dtype": "bfloat16"}, "fsdp": {"mixed_precision": "fp16"}},
            "quantization.bnb_4bit_quant_storage_dtype",
            "float32",
        ),
        ({"quantization": {"load_in_4bit": True}, "training": {"optim": "paged_adamw_8bit"}}, "training.optim", "adamw_torch"),
        ({"quantization": {"load_in_4bit": True}, "model": {"dtype": "float32"}}, "model.dtype", "auto"),
        ({"fsdp": {"version": 1, "use_orig_params": True}}, "fsdp.use_orig_params", "false"),
        ({"fsdp": {"version": 1, "cpu_ram_efficient_loading": True}}, "fsdp.sync_module_states", "sync_module_states: true"),
        ({"fsdp": {"num_machines": 2, "main_process_ip": "10.0.0.1", "machine_rank": 2}}, "fsdp.machine_rank", "below"),
        ({"fsdp": {"num_machines": 2}}, "fsdp.main_process_ip", "address"),
        ({"training": {"eval_strategy": "steps"}}, "training.eval_steps", "eval_steps"),
        ({"fsdp": {"sharding_strategy": "HYBRID_SHARD"}}, "fsdp.sharding_strategy", "fsdp.version: 1"),
        (
            {"fsdp": {"activation_checkpointing": True}, "training": {"gradient_checkpointing": True}},
            "fsdp.activation_checkpointing",
            "gradient_checkpointing: false",
        ),
    ],
)
def test_combinations_that_cannot_work_are_rejected_with_what_to_change(config, key, hint):
    with pytest.raises(ConfigError) as err:
        resolve_runs(config)
    assert f"'runs.demo.{key}'" in str(err.value) and hint in str(err.value)


def test_library_choices_in_the_schema_are_the_librarys_own_lists():
    """optim and lr_scheduler_type are checked when the DAG is built (without importing
    transformers), against lists that must be transformers' own."""
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    training = load_schema()["$defs"]["training"]["properties"]
    assert training["optim"]["enum"] == [o.value for o in OptimizerNames]
    assert training["lr_scheduler_type"]["enum"] == [s.value for s in SchedulerType]
