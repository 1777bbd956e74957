"""QLoRA and DoRA train under FSDP on 2 CPU ranks, and their adapters convert and reload."""

import json
import re

import pytest

from shardtune.train.checkpoints import checkpoints

from conftest import copy_workflow, default_config, snakemake

SHORT = {"max_steps": 4, "save_steps": 2, "eval_strategy": "no", "per_device_train_batch_size": 2}


@pytest.fixture(scope="module")
def variants(tmp_path_factory):
    config = default_config()
    config["runs"] = {
        "qlora": {
            "quantization": {"load_in_4bit": True, "use_nested_quant": True},
            "training": SHORT,
        },
        "dora": {"lora": {"use_dora": True, "target_modules": ["q_proj", "v_proj"]}, "training": SHORT},
    }
    workdir = copy_workflow(tmp_path_factory.mktemp("variants"), config)
    snakemake(workdir, "--cores", "2", "convert")
    return workdir


@pytest.mark.parametrize("run", ["qlora", "dora"])
def test_variant_trains_sharded_and_converts_to_a_reproducing_adapter(variants, run):
    done = json.loads((variants / f"results/{run}/train/done.json").read_text())
    assert done["distributed_type"] == "DistributedType.FSDP" and done["global_step"] == 4
    for checkpoint in checkpoints(variants / f"results/{run}/train"):
        assert sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp")) == [
            "__0_0.distcp",
            "__1_0.distcp",
        ]
    conversion = json.loads((variants / f"results/{run}/adapter/conversion.json").read_text())
    assert conversion["max_abs_logit_diff"] <= conversion["tolerance"]
    adapter_config = json.loads((variants / f"results/{run}/adapter/adapter_config.json").read_text())
    assert adapter_config["use_dora"] is (run == "dora")
    if run == "dora":
        assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]


def test_qlora_loaded_the_base_in_4_bits(variants):
    log = (variants / "logs/fsdp_train/qlora.log").read_text()
    settings = json.loads((variants / "results/qlora/train_settings.json").read_text())
    assert settings["quantization"]["load_in_4bit"] is True
    # searched, not split into lines: the other rank writes to the same log
    quantized = re.search(r"base model: .*4-bit linear layers: (\d+)", log)
    assert quantized and int(quantized[1]) == 2 * 7  # every linear of the 2 decoder layers
