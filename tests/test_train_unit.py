"""Pieces of the training entry point that need no launch."""

import pytest
import torch

from shardtune.config import resolve_runs
from shardtune.modeling import load_dtype
from shardtune.train import attention_implementation, lora_config, sft_config


def test_attention_falls_back_to_sdpa_and_says_why():
    attn, why = attention_implementation("auto")
    if not torch.cuda.is_available():
        assert (attn, why) == ("sdpa", "no GPU visible")
        with pytest.raises(SystemExit, match="flash_attention_2 needs flash-attn and a GPU"):
            attention_implementation("flash_attention_2")
    assert attention_implementation("eager") == ("eager", "set in model.attn_implementation")


def test_qlora_loads_in_the_quant_storage_dtype():
    s = resolve_runs({"quantization": {"load_in_4bit": True, "bnb_4bit_quant_storage_dtype": "bfloat16"}})["demo"]
    assert load_dtype(s) is torch.bfloat16
    assert load_dtype(resolve_runs({})["demo"]) is torch.float32


def test_settings_map_to_trainer_and_lora_arguments(tmp_path):
    s = resolve_runs(
        {
            "training": {"learning_rate": 3e-4, "gradient_accumulation_steps": 4, "use_reentrant": True, "warmup_ratio": 0.1},
            "lora": {"r": 16, "alpha": 32, "use_dora": True, "modules_to_save": ["lm_head"]},
            "fsdp": {"mixed_precision": "bf16"},
        }
    )["demo"]
    args = sft_config(s, tmp_path)
    assert args.learning_rate == 3e-4 and args.gradient_accumulation_steps == 4
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": True}
    assert args.warmup_steps == 0.1 and args.bf16 is True
    assert args.padding_free and args.dataset_kwargs == {"skip_prepare_dataset": True}
    lora = lora_config(s["lora"])
    assert (lora.r, lora.lora_alpha, lora.use_dora, lora.modules_to_save) == (16, 32, True, ["lm_head"])
