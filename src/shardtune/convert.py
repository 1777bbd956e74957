"""Sharded FSDP checkpoint -> PEFT adapter directory, proven to load and to reproduce the
trained model's logits."""

import shutil
import tempfile
from pathlib import Path

import torch
from accelerate.utils import merge_fsdp_weights
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from .errors import UserError
from .io import atomic_dir, read_json, write_json
from .modeling import load_base_model
from .sources import model_path

# How close the reloaded adapter's logits must be to the trained model's, by the mixed
# precision training ran under (bf16/fp16 compute rounds differently from an fp32 reload).
TOLERANCE = {"no": 1e-5, "bf16": 5e-2, "fp16": 1e-2}


class ConversionError(UserError):
    pass


def adapter_state(checkpoint):
    """The LoRA weights of a sharded checkpoint, with PEFT's key names."""
    with tempfile.TemporaryDirectory() as tmp:
        merge_fsdp_weights(str(Path(checkpoint) / "pytorch_model_fsdp_0"), tmp, safe_serialization=True)
        state = load_file(str(Path(tmp) / "model.safetensors"))
    # PEFT saves adapter weights without the adapter name ("default").
    return {key.replace(".default.", "."): tensor.contiguous() for key, tensor in state.items()}


def probe_difference(model_dir, adapter_dir, settings, probe_file, vocab_size):
    probe = load_file(str(probe_file))
    base = load_base_model(model_dir, settings, vocab_size)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=probe["input_ids"], position_ids=probe["position_ids"], use_cache=False).logits
    return float((logits.float() - probe["logits"]).abs().max())


def convert(train_done, model_dir, data_dir, settings, out_dir, log=print):
    done = read_json(train_done)
    train_dir = Path(train_done).parent
    checkpoint = Path(done["checkpoint"])
    log(f"converting {checkpoint} (step {done['global_step']})")
    state = adapter_state(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(Path(data_dir) / "tokenizer")
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        shutil.copy(train_dir / "adapter_config" / "adapter_config.json", tmp / "adapter_config.json")
        config = read_json(tmp / "adapter_config.json")
        source = settings["model"]["source"]
        config["base_model_name_or_path"] = source[3:] if source.startswith("hf:") else model_path(model_dir)
        config["revision"] = settings["model"]["revision"]
        write_json(tmp / "adapter_config.json", config)
        tokenizer.save_pretrained(tmp)
        diff = probe_difference(model_dir, tmp, settings, train_dir / "probe.safetensors", len(tokenizer))
        tolerance = TOLERANCE[done["mixed_precision"]]
        log(f"max abs logit difference vs the trained model: {diff:.3g} (tolerance {tolerance:g})")
        if not diff <= tolerance:
            raise ConversionError(
                f"the converted adapter does not reproduce the trained model: max abs logit diff {diff:.3g} > {tolerance:g}"
            )
        write_json(
            tmp / "conversion.json",
            {
                "checkpoint": str(checkpoint),
                "global_step": done["global_step"],
                "tensors": len(state),
                "max_abs_logit_diff": diff,
                "tolerance": tolerance,
            },
        )
