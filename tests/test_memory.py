"""The pre-flight memory estimate, against the source guide's 70B figures, and the refusal
of a run that cannot fit."""

from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig

from shardtune.config import ConfigError, deep_merge, resolve_runs
from shardtune.memory import check_fits, estimate, model_shape

REPO = Path(__file__).resolve().parents[1]
LLAMA2_70B = LlamaConfig(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=32000,
)


def preset(name, **overrides):
    config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    (settings,) = resolve_runs(deep_merge(config, overrides)).values()
    return settings


def test_llama2_70b_parameter_count_is_right():
    shape = model_shape(LLAMA2_70B, {"target_modules": "all-linear", "r": 8})
    assert 68.9e9 < shape["params"] < 69.1e9  # Llama-2-70B: 68.98B parameters
    assert shape["layers"] == 80


@pytest.mark.parametrize(
    "name, overrides, world, low, high",
    [
        # guide: 72-80 GB per GPU for LoRA on 8x H100
        ("llama2-70b-lora-fsdp", {}, 8, 72, 80),
        # guide: 35.6 GB per GPU for QLoRA on 2 GPUs without CPU offload
        ("llama2-70b-qlora-fsdp", {"fsdp": {"offload_params": False}}, 2, 35.6, 35.6),
    ],
)
def test_estimate_matches_the_guides_figures_within_15_percent(name, overrides, world, low, high):
    settings = preset(name, **overrides)
    report = estimate(model_shape(LLAMA2_70B, settings["lora"]), settings, world)
    assert low * 0.85 <= report["device_gib"] <= high * 1.15, report["device_breakdown_gib"]


def test_offload_moves_weights_and_optimizer_state_to_cpu():
    on = preset("llama2-70b-qlora-fsdp")
    off = preset("llama2-70b-qlora-fsdp", fsdp={"offload_params": False})
    shape = model_shape(LLAMA2_70B, on["lora"])
    with_offload, without = estimate(shape, on, 2), estimate(shape, off, 2)
    assert with_offload["device_breakdown_gib"]["base_weights"] == 0
    assert with_offload["device_gib"] < without["device_gib"] - 15
    assert with_offload["cpu_breakdown_gib"]["offloaded"] > 30


def test_checkpointing_and_smaller_batches_lower_the_estimate():
    base = preset("llama2-70b-lora-fsdp")
    shape = model_shape(LLAMA2_70B, base["lora"])
    no_ckpt = preset("llama2-70b-lora-fsdp", training={"gradient_checkpointing": False})
    small = preset("llama2-70b-lora-fsdp", training={"per_device_train_batch_size": 2})
    assert estimate(shape, no_ckpt, 8)["device_gib"] > estimate(shape, base, 8)["device_gib"]
    assert estimate(shape, small, 8)["device_gib"] < estimate(shape, base, 8)["device_gib"]


def test_a_run_that_cannot_fit_is_refused_unless_forced():
    settings = preset("llama2-70b-lora-fsdp")
    report = estimate(model_shape(LLAMA2_70B, settings["lora"]), settings, 8)
    with pytest.raises(ConfigError, match="memory.force"):
        check_fits(report, device_gib=40, cpu_gib=None, force=False)
    assert check_fits(report, device_gib=40, cpu_gib=None, force=True)
    assert check_fits(report, device_gib=80, cpu_gib=None, force=False) == []
