"""The shape of a model that drives its memory: parameter counts by kind, layers, widths,
the LoRA targets' sizes, from the model built on the meta device (no weights are read)."""

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM


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
    layer_linears = [m for m in layers[0].modules() if isinstance(m, torch.nn.Linear)]
    linear_weights = {id(m.weight) for m in layer_linears}
    in_layers = {id(p) for p in layers.parameters()}
    # inputs of the LoRA targets of one layer: each target drops out its own copy of its input
    targets = [(n, m) for n, m in layers[0].named_modules() if _is_target(n, m, lora)]
    lora_inputs = sum(m.in_features for n, m in targets)
    lora_attention_inputs = sum(m.in_features for n, m in targets if "attn" in n or "attention" in n)
    text = getattr(config, "text_config", config)
    heads = getattr(text, "num_attention_heads", None) or max(1, text.hidden_size // 64)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "linear_params": linear,  # what 4-bit quantization packs
        "layer_params": sum(p.numel() for p in layers[0].parameters()),
        "layer_linear_params": sum(m.weight.numel() for m in layer_linears),
        "layer_largest_linear": max((m.weight.numel() for m in layer_linears), default=0),
        "layer_lora_inputs": lora_inputs,
        "layer_lora_attention_inputs": lora_attention_inputs,  # of targets in the attention block
        # sizes of each parameter (FSDP2 shards and offloads parameter by parameter): of one
        # decoder layer as [numel, whether 4-bit quantization packs it], and outside the layers
        "layer_param_sizes": [[p.numel(), id(p) in linear_weights] for p in layers[0].parameters()],
        "root_param_sizes": [p.numel() for p in model.parameters() if id(p) not in in_layers],
        "lora_params": lora_params,
        "layers": len(layers),
        "hidden": text.hidden_size,
        "intermediate": getattr(text, "intermediate_size", 4 * text.hidden_size),
        "heads": heads,
        "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
        "vocab": text.vocab_size,
    }
