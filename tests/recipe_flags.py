"""The source recipe's launch flags (PEFT examples/sft train.py) as seen from a run's
settings: the map that proves every flag has a home in the config, and lets a user read
a shardtune config in the recipe's terms."""


def _hub_id(source):
    return source[3:] if source.startswith("hf:") else source


def recipe_flags(run, s):
    """{flag: value} of `train.py` for run `run` with settings `s` (values as Python types)."""
    t, d, m, q, lora, hub = s["training"], s["data"], s["model"], s["quantization"], s["lora"], s["hub"]
    mixed = s["fsdp"]["mixed_precision"]
    flags = {
        "seed": t["seed"],
        "model_name_or_path": _hub_id(m["source"]),
        "dataset_name": _hub_id(s["dataset"]["source"]),
        "chat_template_format": d["chat_template_format"],
        "add_special_tokens": d.get("add_special_tokens", False),
        "append_concat_token": d.get("append_concat_token", False),
        "splits": ",".join(s["dataset"]["splits"]),
        "max_seq_len": d["max_seq_len"],
        "num_train_epochs": t["num_train_epochs"],
        "logging_steps": t["logging_steps"],
        "log_level": t["log_level"],
        "logging_strategy": "steps",  # shardtune always logs by steps
        "evaluation_strategy": t["eval_strategy"],
        "save_strategy": t["save_strategy"],
        "push_to_hub": hub["push"],
        "hub_private_repo": hub["private"],
        "hub_strategy": hub.get("strategy", "end"),
        "bf16": mixed == "bf16" if t["bf16"] is None else t["bf16"],
        "packing": d["packing"],
        "learning_rate": t["learning_rate"],
        "lr_scheduler_type": t["lr_scheduler_type"],
        "weight_decay": t["weight_decay"],
        "warmup_ratio": t["warmup_ratio"],
        "max_grad_norm": t["max_grad_norm"],
        "output_dir": run,  # results/{run}/
        "per_device_train_batch_size": t["per_device_train_batch_size"],
        "per_device_eval_batch_size": t["per_device_eval_batch_size"],
        "gradient_accumulation_steps": t["gradient_accumulation_steps"],
        "gradient_checkpointing": t["gradient_checkpointing"],
        "use_reentrant": t["use_reentrant"],
        # The recipe renders `messages` into a text column named `content` before
        # tokenizing; shardtune renders and tokenizes in one step, so the name is internal.
        "dataset_text_field": "content",
        "use_flash_attn": m["attn_implementation"] == "flash_attention_2",
        "use_peft_lora": True,
        "lora_r": lora["r"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "lora_target_modules": lora["target_modules"],
        "use_4bit_quantization": q["load_in_4bit"],
    }
    if q["load_in_4bit"]:
        flags |= {
            "use_nested_quant": q["use_nested_quant"],
            "bnb_4bit_compute_dtype": q["bnb_4bit_compute_dtype"],
            "bnb_4bit_quant_storage_dtype": q["bnb_4bit_quant_storage_dtype"],
        }
    return flags
