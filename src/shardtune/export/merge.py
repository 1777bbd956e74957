"""Merge a run's adapter into its base model: a full model in safetensors at merge.dtype
(results/{run}/merged/), loadable with AutoModelForCausalLM.from_pretrained.

This runs in its own process on the converted adapter, never under FSDP (merging a sharded
PEFT model is unsupported). It uses PEFT's merge_and_unload.

QLoRA runs: the base is loaded unquantized, in merge.dtype, and the adapter is merged into it.
Merging into the 4-bit model would dequantize, add the LoRA delta and quantize again, so the
delta would be lost in 4-bit rounding and the result would not be a plain model. The original
weights are the best weights there are; the adapter was trained against their 4-bit rounding,
and merge.json records how far the merged model's logits are from the trained (quantized)
model's (`max_abs_diff_vs_trained`), next to the check that merging itself changed nothing.
"""

import gc
import os
from pathlib import Path

import torch
from accelerate import init_empty_weights
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from shardtune.errors import UserError
from shardtune.inputs.modeling import DTYPES, load_base_model
from shardtune.inputs.sources import model_path
from shardtune.io import atomic_dir, write_json

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Merged vs unmerged logits, relative to the largest logit: W + BA rounded to the dtype
# differs from Wx + B(Ax) by about the dtype's epsilon.
TOLERANCE = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 4e-3}


class MergeError(UserError):
    pass


def available_memory():
    """Bytes of RAM this process may still use: MemAvailable, capped by a cgroup v2 limit
    (containers, SLURM jobs)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        available = int(next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemAvailable:"))) * 1024
    except (OSError, StopIteration):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def parameter_count(model_dir, vocab_size):
    """Parameters of the base (embeddings resized to `vocab_size` as training did), counted on
    the meta device without reading weights."""
    config = AutoConfig.from_pretrained(model_path(model_dir))
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
        if vocab_size > model.get_input_embeddings().num_embeddings:
            model.resize_token_embeddings(vocab_size, pad_to_multiple_of=8, mean_resizing=False)
    return sum(p.numel() for p in model.parameters())


def check_memory(parameters, dtype, available):
    """Loading the base and merging needs about two copies of the weights in `dtype`."""
    needed = parameters * BYTES[dtype] * 2
    if needed > available:
        raise MergeError(
            f"merge: not enough memory: merging needs about {needed / GIB:.2f} GiB ({parameters:,} parameters x "
            f"{BYTES[dtype]} bytes ({dtype}) x 2 for load + merge) but only {available / GIB:.2f} GiB of RAM is "
            "available; run merge_adapter on a machine with more memory or choose a smaller merge.dtype"
        )
    return needed


@torch.no_grad()
def _logits(model, probe):
    out = model(input_ids=probe["input_ids"], position_ids=probe["position_ids"], use_cache=False)
    return out.logits.float()


def merge(adapter_dir, model_dir, train_done, settings, out_dir, log=print):
    dtype = settings["merge"]["dtype"]
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    parameters = parameter_count(model_dir, len(tokenizer))
    available = available_memory()
    needed = check_memory(parameters, dtype, available)
    log(f"{parameters:,} parameters in {dtype}: needs ~{needed / GIB:.2f} GiB, {available / GIB:.2f} GiB available")

    quantized = settings["quantization"]["load_in_4bit"]
    unquantized = {
        **settings,
        "model": {**settings["model"], "dtype": dtype},
        "quantization": {**settings["quantization"], "load_in_4bit": False},
    }
    if quantized:
        log(f"QLoRA run: merging into the unquantized base weights in {dtype}")
    base = load_base_model(model_dir, unquantized, len(tokenizer))
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    probe = load_file(str(Path(train_done).parent / "probe.safetensors"))
    unmerged = _logits(model, probe)
    merged = model.merge_and_unload()
    merged.config.use_cache = True  # off only for packed training batches
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del base, model, merged
        gc.collect()
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=DTYPES[dtype]).eval()
        logits = _logits(reloaded, probe)
        diff = float((logits - unmerged).abs().max())
        tolerance = TOLERANCE[dtype] * max(1.0, float(unmerged.abs().max()))
        vs_trained = float((logits - probe["logits"]).abs().max())
        log(f"merged vs adapter logits: max abs diff {diff:.3g} (tolerance {tolerance:.3g}); vs trained {vs_trained:.3g}")
        if not diff <= tolerance:
            raise MergeError(f"the merged model does not reproduce the adapter's logits: {diff:.3g} > {tolerance:.3g}")
        write_json(
            tmp / "merge.json",
            {
                "dtype": dtype,
                "parameters": parameters,
                "memory_needed_bytes": needed,
                "memory_available_bytes": available,
                "base_quantized_in_training": quantized,
                "max_abs_diff_vs_adapter": diff,
                "tolerance": tolerance,
                "max_abs_diff_vs_trained": vs_trained,
            },
        )
