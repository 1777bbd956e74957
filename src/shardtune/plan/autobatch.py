"""`training.per_device_train_batch_size: auto` and `training.gradient_checkpointing: auto`.

Resolved before training by the pre-flight memory step (memory.preflight), which has the model
shape, the settings and the world size: the largest per-device batch that fits the per-device
budget by the memory estimate (memory.estimate), without gradient checkpointing where any batch
fits without it. The rows per device per optimizer step (the effective batch, per-device batch x
gradient accumulation) stay what the config says: with a batch of `auto` they are
`training.per_device_effective_batch_size`, and the accumulation is that divided by the batch,
so only divisors of it are tried.

The chosen values go into memory.json under "resolved"; training reads them from there (and
includes them in the fingerprint that guards resuming), and the run record, the model card and
the summary report them.
"""

from shardtune.config import ConfigError

# No torch at import: the model card and the run record (envs without torch) use with_resolved.
AUTO = "auto"
GIB = 1024**3
KEYS = ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing")


def auto_keys(training):
    """The training keys set to `auto`, as config paths."""
    return [f"training.{k}" for k in ("per_device_train_batch_size", "gradient_checkpointing") if training[k] == AUTO]


def rows_per_step(training):
    """Rows per device per optimizer step (per-device batch x gradient accumulation)."""
    if training["per_device_train_batch_size"] == AUTO:
        return training["per_device_effective_batch_size"]
    return training["per_device_train_batch_size"] * training["gradient_accumulation_steps"]


def with_resolved(settings, resolved):
    """`settings` with the training keys replaced by `resolved` ones (a memory.json or done.json
    "resolved" entry; None leaves them as they are)."""
    if not resolved:
        return settings
    return {**settings, "training": {**settings["training"], **{k: resolved[k] for k in KEYS if k in resolved}}}


def candidates(settings):
    """(batch, accumulation, checkpointing) in the order they are tried: without gradient
    checkpointing first (when it is auto), then from the largest batch down (when it is auto)."""
    t, f = settings["training"], settings["fsdp"]
    per_step = rows_per_step(t)
    if t["per_device_train_batch_size"] == AUTO:
        sizes = [b for b in range(per_step, 0, -1) if per_step % b == 0]
    else:
        sizes = [t["per_device_train_batch_size"]]
    if t["gradient_checkpointing"] != AUTO:
        modes = (t["gradient_checkpointing"],)
    elif f["activation_checkpointing"]:
        modes = (False,)  # FSDP's activation checkpointing recomputes already; the estimate counts it
    else:
        modes = (False, True)
    for checkpointing in modes:
        for batch in sizes:
            yield {
                "per_device_train_batch_size": batch,
                "gradient_accumulation_steps": per_step // batch,
                "gradient_checkpointing": checkpointing,
            }


def pick_setting(shape, settings, world_size, budget_gib, tried=None, gpus_planned=0):
    """The first of `candidates(settings)` whose estimate fits `budget_gib` per device.

    Returns the training values with estimate_gib and budget_gib, or None when nothing fits
    (not even batch 1 with checkpointing). Every estimate made is appended to `tried` (a list)
    when given.
    """
    from shardtune.plan.memory import estimate

    for values in candidates(settings):
        gib = estimate(shape, with_resolved(settings, values), world_size, gpus_planned)["device_gib"]
        if tried is not None:
            tried.append({**values, "estimate_gib": gib})
        if gib <= budget_gib:
            return {**values, "estimate_gib": gib, "budget_gib": budget_gib}
    return None


def device_budget(memory, world_size, num_machines=1, gpus_planned=0, cuda=None):
    """Per-device GiB to plan for and where it comes from: memory.device_gib, else the visible
    GPU's total memory, else (a CPU run) memory.cpu_gib divided by the ranks per machine."""
    if memory["device_gib"] is not None:
        return memory["device_gib"], "memory.device_gib"
    if cuda is None:
        import torch

        cuda = torch.cuda if torch.cuda.is_available() else False
    if cuda:
        props = cuda.get_device_properties(cuda.current_device())
        return props.total_memory / GIB, f"the visible GPU's total memory ({props.name})"
    if gpus_planned:
        raise ConfigError(
            "config error at 'memory.device_gib': auto batch settings need the memory per GPU, and no GPU is "
            "visible to this step (the run trains on GPUs by resources.fsdp_train); set memory.device_gib"
        )
    if memory["cpu_gib"] is not None:
        ranks = max(1, world_size // max(1, num_machines))
        return memory["cpu_gib"] / ranks, f"memory.cpu_gib / {ranks} rank(s) per machine"
    raise ConfigError(
        "config error at 'memory.device_gib': auto batch settings need a memory budget per device and no GPU "
        "is visible; set memory.device_gib (or memory.cpu_gib for a CPU-only run)"
    )


def resolve(shape, settings, world_size, gpus_planned=0, log=print, cuda=None):
    """The training values to use, as memory.json's "resolved" entry.

    Without `auto` they are the config's. With `auto`, the first candidate that fits the
    budget (budget_gib, budget_from); when none fits, the smallest one with "fits": false, which
    memory.preflight refuses like any run that does not fit, unless memory.force.
    """
    t, m = settings["training"], settings["memory"]
    auto = auto_keys(t)
    if not auto:
        return {**{k: t[k] for k in KEYS}, "auto": []}
    budget, source = device_budget(m, world_size, settings["fsdp"]["num_machines"], gpus_planned, cuda=cuda)
    tried = []
    picked = pick_setting(shape, settings, world_size, budget, tried, gpus_planned)
    log(f"{' and '.join(auto)}: auto, budget {budget:.2f} GiB per device ({source}), {rows_per_step(t)} rows per device per optimizer step")
    if t["per_device_train_batch_size"] == AUTO and t["gradient_accumulation_steps"] != 1:
        log(f"  gradient_accumulation_steps {t['gradient_accumulation_steps']} of the config is replaced by the one chosen below")
    for trial in tried:
        log(
            f"  batch {trial['per_device_train_batch_size']} x accumulation {trial['gradient_accumulation_steps']}, "
            f"gradient checkpointing {str(trial['gradient_checkpointing']).lower()}: ~{trial['estimate_gib']:.2f} GiB"
            + (" (fits)" if picked and trial["estimate_gib"] <= budget else "")
        )
    fits = picked is not None
    if not fits:  # the smallest setting; memory.preflight refuses it unless memory.force
        picked = {**tried[-1], "budget_gib": budget}
        log("  nothing fits the budget")
    resolved = {k: picked[k] for k in KEYS}
    resolved |= {"auto": auto, "budget_gib": budget, "budget_from": source, "estimate_gib": picked["estimate_gib"], "fits": fits}
    log(
        "resolved: per_device_train_batch_size {per_device_train_batch_size}, gradient_accumulation_steps "
        "{gradient_accumulation_steps}, gradient_checkpointing {gradient_checkpointing}".format(**resolved)
    )
    return resolved


def describe(resolved):
    """One line for logs: the values training uses and which were chosen automatically."""
    if not resolved:
        return ""
    text = (
        f"batch {resolved['per_device_train_batch_size']} x accumulation {resolved['gradient_accumulation_steps']}, "
        f"gradient checkpointing {str(resolved['gradient_checkpointing']).lower()}"
    )
    if resolved.get("auto"):
        text += f" (auto: {', '.join(resolved['auto'])}; budget {resolved['budget_gib']:.2f} GiB from {resolved['budget_from']})"
    return text


def apply_resolved(settings, resolved):
    """The settings training runs with: `settings` with memory.json's "resolved" values. Refuses
    settings still `auto` when there is nothing resolved (no pre-flight memory.json)."""
    settings = with_resolved(settings, resolved)
    if auto_keys(settings["training"]):
        raise ConfigError(
            f"config error at '{auto_keys(settings['training'])[0]}': auto is resolved by the pre-flight memory "
            "step; pass its memory.json to training (--memory)"
        )
    return settings
