"""Pre-flight memory estimate of a run: per-device and CPU memory, before a GPU-hour is spent.

Counts come from the real model built on the meta device (no weights are read), so every
architecture transformers knows is covered. The byte accounting follows what FSDP does:
FULL_SHARD keeps 1/W of the base weights and of the LoRA weights, grads and Adam states per
rank, gathers one decoder layer at a time (two with prefetch), and CPU offload moves the
shards to host memory. Activations follow the usual transformer accounting (Korthikanti et
al., 2022) with gradient checkpointing keeping one hidden state per layer. The caching
allocator's overhead is a fixed factor calibrated on the source guide's 70B figures; see
BENCHMARKS.md for how close the estimate comes.
"""


import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

GIB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1}
ALLOCATOR_OVERHEAD = 1.2  # reserved / allocated of PyTorch's caching allocator under FSDP
CONTEXT_GIB = 1.0  # CUDA context, NCCL buffers, kernels


def _is_target(name, module, lora):
    if not isinstance(module, torch.nn.Linear):
        return False
    if lora["target_modules"] == "all-linear":
        return not name.endswith("lm_head")
    return name.split(".")[-1] in lora["target_modules"]


def model_shape(model_dir_or_config, lora):
    """Parameter counts that drive memory, from the model built on the meta device."""
    config = (
        model_dir_or_config
        if not isinstance(model_dir_or_config, str)
        else AutoConfig.from_pretrained(model_dir_or_config)
    )
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    layers = next(m for m in model.modules() if isinstance(m, torch.nn.ModuleList))
    linear = lora_params = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            linear += module.weight.numel()
        if _is_target(name, module, lora):
            lora_params += lora["r"] * (module.in_features + module.out_features)
    text = getattr(config, "text_config", config)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "linear_params": linear,  # what 4-bit quantization packs
        "layer_params": sum(p.numel() for p in layers[0].parameters()),
        "lora_params": lora_params,
        "layers": len(layers),
        "hidden": text.hidden_size,
        "intermediate": getattr(text, "intermediate_size", 4 * text.hidden_size),
        "vocab": text.vocab_size,
    }


def estimate(shape, settings, world_size):
    """Per-device and CPU bytes for one training process of `world_size`."""
    q, f, t, d = settings["quantization"], settings["fsdp"], settings["training"], settings["data"]
    mixed = f["mixed_precision"] if t["bf16"] is None else ("bf16" if t["bf16"] else f["mixed_precision"])
    compute = 2 if mixed in ("bf16", "fp16") or q["load_in_4bit"] else 4
    storage = BYTES[q["bnb_4bit_quant_storage_dtype"]] if q["load_in_4bit"] else compute
    if settings["model"]["dtype"] != "auto" and not q["load_in_4bit"]:
        storage = BYTES[settings["model"]["dtype"]]
    shard = 1 if f["sharding_strategy"] == "NO_SHARD" else world_size

    if q["load_in_4bit"]:
        # nf4 packs 2 weights a byte; absmax per 64 weights (fp32, or 8-bit + fp32 per 256 nested)
        per_weight = 0.5 + (1 / 64 + 4 / (64 * 256) if q["use_nested_quant"] else 4 / 64)
        base = shape["linear_params"] * per_weight + (shape["params"] - shape["linear_params"]) * storage
        layer = shape["layer_params"] * per_weight
    else:
        base = shape["params"] * storage
        layer = shape["layer_params"] * storage
    lora_states = shape["lora_params"] * (4 + 4 + 8)  # fp32 weights, grads, Adam moments

    tokens = t["per_device_train_batch_size"] * d["max_seq_len"]
    h, inter, layers = shape["hidden"], shape["intermediate"], shape["layers"]
    # one layer's forward working set: attention (q, k, v, output, o-proj, norms) and MLP
    # (gate, up, activation, product), plus the LoRA dropout copy of each target's input
    layer_acts = tokens * (10 * h + 4 * inter + 6 * h + inter) * compute
    if t["gradient_checkpointing"] or f["activation_checkpointing"]:
        activations = layers * tokens * h * compute + 2 * layer_acts
    else:
        activations = layers * layer_acts
    logits = tokens * shape["vocab"] * (compute + 4 + 4)  # logits, fp32 upcast, its gradient

    device = {
        "base_weights": 0 if f["offload_params"] else base / shard,
        "gathered_layers": 2 * layer,  # the unit in use and the one prefetched
        "lora_states": 0 if f["offload_params"] else lora_states / shard,
        "activations": activations,
        "logits": logits,
    }
    allocated = sum(device.values())
    device_total = allocated * ALLOCATOR_OVERHEAD + CONTEXT_GIB * GIB
    per_machine = max(1, world_size // f["num_machines"])
    cpu = {
        "offloaded": (base + lora_states) / f["num_machines"] if f["offload_params"] else 0,
        # every process holds the libraries; with cpu_ram_efficient_loading only rank 0
        # reads the weights, otherwise each rank materialises the full model once.
        "loading": base * (1 if f["cpu_ram_efficient_loading"] else per_machine),
        "processes": per_machine * 2 * GIB,
    }
    return {
        "world_size": world_size,
        "device_gib": device_total / GIB,
        "device_breakdown_gib": {k: v / GIB for k, v in device.items()},
        "cpu_gib": sum(cpu.values()) / GIB,
        "cpu_breakdown_gib": {k: v / GIB for k, v in cpu.items()},
        "shape": shape,
    }


def check_fits(report, device_gib, cpu_gib, force):
    """Refuse a run that cannot fit the declared memory, unless forced."""
    from .config import ConfigError

    problems = []
    if device_gib and report["device_gib"] > device_gib:
        problems.append(f"needs ~{report['device_gib']:.1f} GiB per device, {device_gib} GiB declared")
    if cpu_gib and report["cpu_gib"] > cpu_gib:
        problems.append(f"needs ~{report['cpu_gib']:.1f} GiB of CPU memory, {cpu_gib} GiB declared")
    if problems and not force:
        raise ConfigError(
            "config error at 'memory': the run will not fit: "
            + "; ".join(problems)
            + " (lower the batch size, enable gradient_checkpointing or fsdp.offload_params, add devices, "
            "or set memory.force: true)"
        )
    return problems


def format_report(report):
    lines = [f"memory estimate for {report['world_size']} process(es):"]
    lines.append(f"  per device: {report['device_gib']:.2f} GiB")
    lines += [f"    {k}: {v:.2f} GiB" for k, v in report["device_breakdown_gib"].items()]
    lines.append(f"  CPU: {report['cpu_gib']:.2f} GiB")
    lines += [f"    {k}: {v:.2f} GiB" for k, v in report["cpu_breakdown_gib"].items()]
    return "\n".join(lines)


def preflight(model_dir, accelerate_yaml, settings, out_json, log=print, gpus_planned=0):
    """Resolve `auto` batch settings (shardtune.autobatch), estimate for the run's world size,
    check it against the declared memory (or the budget `auto` planned for), write it.
    `gpus_planned`: GPUs per node the training job asks for (resources.fsdp_train)."""
    import yaml

    from .autobatch import resolve, with_resolved
    from .io import write_json
    from .sources import model_path

    world_size = yaml.safe_load(open(accelerate_yaml))["num_processes"]
    if gpus_planned:  # the training job's GPUs, not those of the node that wrote accelerate.yaml
        from .accelerate_config import resolve_num_processes

        world_size = resolve_num_processes(settings["fsdp"], gpus_planned)
    shape = model_shape(model_path(model_dir), settings["lora"])
    resolved = resolve(shape, settings, world_size, gpus_planned, log=log)
    report = estimate(shape, with_resolved(settings, resolved), world_size)
    log(format_report(report))
    m = settings["memory"]
    device_gib = resolved["budget_gib"] if resolved["auto"] else m["device_gib"]
    report["declared"] = {**m, "forced_past": check_fits(report, device_gib, m["cpu_gib"], m["force"])}
    report["resolved"] = resolved
    write_json(out_json, report)
    return report
