"""The two 70B presets, scaled down (model, data size, length, process count, batch sizes,
publishing and the job's GPUs overridden, nothing else), train for real on 2 CPU ranks through
the workflow with their own FSDP1 settings and precision; DoRA too. Their plans, unscaled,
render the guide's Accelerate configs and ask the cluster for the guide's GPUs."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from shardtune.config import deep_merge
from shardtune.export.convert import adapter_state
from shardtune.train.checkpoints import MARKER, checkpoints

from conftest import REPO, copy_run, copy_workflow, default_config, snakemake

RECIPE = Path(__file__).parent / "recipe"
SCALE = {
    "model": {"source": "builtin", "attn_implementation": "auto"},
    "dataset": {"source": "builtin", "builtin": {"conversations": 64}},
    "data": {"max_seq_len": 128},
    "fsdp": {"num_processes": 2},
    "training": {
        "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "num_train_epochs": 2,
        "learning_rate": 2.0e-3,  # a random tiny model needs a larger step than 1e-4
    },
    "hub": {"push": False},
    "resources": {"fsdp_train": {"gpu": 0}},  # CPU ranks
}
SHORT = {"max_steps": 4, "save_steps": 2, "eval_strategy": "no", "per_device_train_batch_size": 2}
PRESETS = {"lora": "llama2-70b-lora-fsdp", "qlora": "llama2-70b-qlora-fsdp"}


def preset_sections(name):
    sections = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    sections.pop("runs")
    return sections


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    config = default_config()
    config["runs"] = {
        **{kind: deep_merge(preset_sections(name), SCALE) for kind, name in PRESETS.items()},
        # the presets unscaled, only to render their plans (no token here: publishing off)
        **{f"{kind}-plan": deep_merge(preset_sections(name), {"hub": {"push": False}}) for kind, name in PRESETS.items()},
        "dora": {"lora": {"use_dora": True, "target_modules": ["q_proj", "v_proj"]}, "training": SHORT},
    }
    workdir = copy_workflow(tmp_path_factory.mktemp("variants"), config)
    targets = [f"results/{run}/adapter" for run in ("lora", "qlora", "dora")]
    snakemake(workdir, "--cores", "2", *targets, *(f"results/{k}-plan/accelerate.yaml" for k in PRESETS))
    return workdir


def done(workdir, run):
    return json.loads((workdir / f"results/{run}/train/done.json").read_text())


@pytest.mark.parametrize("run", ["lora", "qlora"])
def test_a_scaled_preset_trains_with_its_own_fsdp1_settings(variants, run):
    preset = preset_sections(PRESETS[run])
    ran = done(variants, run)["fsdp"]
    assert (ran["version"], ran["sharding_strategy"], ran["backward_prefetch"]) == (1, "FULL_SHARD", "BACKWARD_PRE")
    assert (ran["forward_prefetch"], ran["use_orig_params"], ran["state_dict_type"]) == (False, False, "SHARDED_STATE_DICT")
    # bf16 autocast: the LoRA preset's Accelerate mixed precision; for QLoRA (mixed precision
    # "no" in the file) the Trainer's bf16, as the guide's --bf16 True
    assert preset["training"]["bf16"] and ran["mixed_precision"] == "bf16"
    # PEFT's wrap policy: a unit per decoder layer and one per trainable LoRA matrix
    # (2 layers x 7 linears x A and B)
    assert ran["wrapped_units"]["LlamaDecoderLayer"] == 2 and ran["wrapped_units"]["Linear"] == 28
    assert ran["gradient_checkpointing"] == {"use_reentrant": preset["training"]["use_reentrant"]}
    # what only GPUs can run is replaced on CPU ranks, and the log says so
    log = (variants / f"logs/fsdp_train/{run}.log").read_text()
    assert not ran["sync_module_states"] and not ran["cpu_ram_efficient_loading"]
    assert "fsdp_sync_module_states and fsdp_cpu_ram_efficient_loading off on CPU ranks" in log
    assert ran["cpu_offload"] is False
    assert ("fsdp_offload_params off on CPU ranks" in log) is preset["fsdp"]["offload_params"]


@pytest.mark.parametrize("run", ["lora", "qlora"])
def test_a_scaled_preset_evaluates_and_saves_each_epoch_once_on_both_ranks(variants, run):
    train = variants / f"results/{run}/train"
    saved = checkpoints(train)
    assert [c.name for c in saved] == ["checkpoint-4", "checkpoint-8"]
    for checkpoint in saved:
        assert (checkpoint / MARKER).exists()
        assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    state = json.loads((saved[-1] / "trainer_state.json").read_text())
    assert [e["epoch"] for e in state["log_history"] if "eval_loss" in e] == [1.0, 2.0]


@pytest.mark.parametrize("run", ["lora", "qlora"])
def test_a_scaled_presets_adapter_loads_with_stock_peft_and_reproduces_training(variants, run):
    conversion = json.loads((variants / f"results/{run}/adapter/conversion.json").read_text())
    assert conversion["tensors"] == 28 and conversion["max_abs_logit_diff"] <= conversion["tolerance"]
    (model_dir,) = (variants / "resources/models").iterdir()
    base = AutoModelForCausalLM.from_pretrained(model_dir / "files")
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    before = base(ids).logits
    tuned = PeftModel.from_pretrained(base, variants / f"results/{run}/adapter")
    assert (tuned(ids).logits - before).abs().max() > 1e-3  # the adapter changes the model


def test_qlora_preset_loaded_the_base_in_4_bits_stored_in_bf16(variants):
    log = (variants / "logs/fsdp_train/qlora.log").read_text()
    # searched, not split into lines: the other rank writes to the same log
    quantized = re.search(r"base model: \d+ parameters in torch\.bfloat16, 4-bit linear layers: (\d+)", log)
    assert quantized and int(quantized[1]) == 2 * 7  # every linear of the 2 decoder layers
    settings = json.loads((variants / "results/qlora/train_settings.json").read_text())
    assert settings["quantization"]["use_nested_quant"] and settings["quantization"]["bnb_4bit_quant_type"] == "nf4"


def test_a_killed_fsdp1_bf16_run_resumes_from_its_epoch_checkpoint_exactly(variants, tmp_path):
    """As if killed while writing the last checkpoint: the same command resumes from the
    epoch-1 checkpoint and ends with the uninterrupted run's adapter."""
    workdir = copy_run(variants, tmp_path / "wf")
    train = workdir / "results/lora/train"
    (train / "done.json").unlink()
    (train / "checkpoint-8" / MARKER).unlink()
    snakemake(workdir, "--cores", "2", "results/lora/train/done.json")
    resumed = done(workdir, "lora")
    assert resumed["resumed_from"] == "checkpoint-4" and resumed["global_step"] == 8
    ours = adapter_state(train / "checkpoint-8")
    theirs = adapter_state(variants / "results/lora/train/checkpoint-8")
    assert ours.keys() == theirs.keys() and len(ours) == 28
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) == 0


@pytest.mark.parametrize("kind, guide, gpus, cpus, mem_mb", [("lora", "fsdp_config.yaml", 8, 64, 512000), ("qlora", "fsdp_config_qlora.yaml", 2, 16, 128000)])
def test_an_unscaled_preset_renders_the_guides_config_and_asks_for_its_gpus(variants, kind, guide, gpus, cpus, mem_mb):
    # rendered here, on a machine without GPUs: the plan, not this machine
    written = yaml.safe_load((variants / f"results/{kind}-plan/accelerate.yaml").read_text())
    theirs = yaml.safe_load((RECIPE / guide).read_text())
    assert written == {**theirs, "enable_cpu_affinity": False}  # Accelerate's own default, added by its writer
    dry = snakemake(variants, "-n", f"results/{kind}-plan/train/done.json").stdout
    request = re.search(r"rule fsdp_train:.*?resources: ([^\n]+)", dry, re.S)[1]
    assert f"gpus_per_node={gpus}, gpu={gpus}, cpus_per_task={cpus}" in request and f"mem_mb={mem_mb}" in request


def test_dora_trains_sharded_and_converts_to_a_reproducing_adapter(variants):
    assert done(variants, "dora")["global_step"] == 4
    for checkpoint in checkpoints(variants / "results/dora/train"):
        assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    conversion = json.loads((variants / "results/dora/adapter/conversion.json").read_text())
    assert conversion["max_abs_logit_diff"] <= conversion["tolerance"]
    adapter_config = json.loads((variants / "results/dora/adapter/adapter_config.json").read_text())
    assert adapter_config["use_dora"] is True and sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]
