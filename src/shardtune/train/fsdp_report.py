"""What FSDP really ran with, read back from Accelerate's plugin and the wrapped model after
`prepare`: a setting that a library dropped or changed shows up here (done.json, the log),
not only as a different memory figure hours later."""

from collections import Counter


def _name(value):
    """An enum, a torch dtype or a plain value as it reads in JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "name", None) or str(value).replace("torch.", "")


def wrapped_units(model):
    """{module class: count} of the FSDP units in `model` (FSDP1 wrappers or FSDP2 modules)."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    units = Counter()
    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            units[type(module.module).__name__] += 1
        elif isinstance(module, FSDPModule):
            units[type(module).__name__.removeprefix("FSDP")] += 1
    return dict(sorted(units.items()))


def param_dtype(model):
    """The dtype FSDP computes in (its mixed precision policy), None for the parameters' own."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for module in model.modules():
        if isinstance(module, FullyShardedDataParallel):
            return _name(module.mixed_precision.param_dtype)
        if isinstance(module, FSDPModule):
            return _name(module._get_fsdp_state()._mp_policy.param_dtype)
    return None


def effective_fsdp(accelerator, model):
    plugin = accelerator.state.fsdp_plugin
    offload = plugin.cpu_offload
    report = {
        "version": plugin.fsdp_version,
        "cpu_offload": bool(getattr(offload, "offload_params", False) or type(offload).__name__ == "CPUOffloadPolicy"),
        "cpu_ram_efficient_loading": plugin.cpu_ram_efficient_loading,
        "activation_checkpointing": plugin.activation_checkpointing,
        "state_dict_type": _name(plugin.state_dict_type),
        "mixed_precision": str(accelerator.mixed_precision),
        "param_dtype": param_dtype(model),
        "wrapped_units": wrapped_units(model),
    }
    if plugin.fsdp_version == 1:
        report |= {
            "sharding_strategy": _name(plugin.sharding_strategy),
            "backward_prefetch": _name(plugin.backward_prefetch),
            "forward_prefetch": plugin.forward_prefetch,
            "use_orig_params": plugin.use_orig_params,
            "sync_module_states": plugin.sync_module_states,
        }
    else:
        report["reshard_after_forward"] = plugin.reshard_after_forward
    return report
