"""Whether an estimate fits the memory a run declares or sees: refused beyond the estimate's
tolerance unless memory.force, warned within it, and the report printed in the logs."""

# The estimate follows measured peaks and the guide's figures within about 15% either way
# (BENCHMARKS.md), so a run estimated a little above its budget may well fit (the guide's own
# 70B LoRA run is estimated at 85.4 GiB for 80 GB cards): warn up to this margin, refuse beyond.
ESTIMATE_TOLERANCE = 0.15

TRAINING_ADVICE = "lower the batch size, enable gradient_checkpointing or fsdp.offload_params, add devices"

# transformers 5 quantizes onto each rank's GPU (no device_map), so more GPUs do not help here
LOADING_ADVICE = (
    "the 4-bit model loads whole onto each GPU before FSDP shards it, so more GPUs do not help: use GPUs "
    "that hold it, or a smaller model"
)


def check_fits(report, device_gib, cpu_gib, force, device_source="declared"):
    """What the estimate puts over the declared memory (`device_source` says where the device
    figure came from); refuses (unless forced) a run estimated more than ESTIMATE_TOLERANCE above it."""
    from shardtune.config import ConfigError

    over, refuse, advice = [], False, []
    checks = (
        (report["device_gib"], device_gib, "per device", device_source, TRAINING_ADVICE),
        (report.get("device_load_gib", 0), device_gib, "per device while loading", device_source, LOADING_ADVICE),
        (report["cpu_gib"], cpu_gib, "of CPU memory", "declared", TRAINING_ADVICE),
    )
    for need, have, what, source, remedy in checks:
        if have and need > have:
            over.append(f"needs ~{need:.1f} GiB {what}, {have:.1f} GiB {source}")
            if need > have * (1 + ESTIMATE_TOLERANCE):
                refuse = True
                advice += [remedy] if remedy not in advice else []
    if refuse and not force:
        raise ConfigError(
            "config error at 'memory': the run will not fit: "
            + "; ".join(over)
            + f" (more than the estimate's {ESTIMATE_TOLERANCE:.0%} tolerance; "
            + "; ".join(advice)
            + ", or set memory.force: true)"
        )
    return over


def over_budget_warnings(over, force):
    why = "memory.force" if force else f"within the estimate's {ESTIMATE_TOLERANCE:.0%} tolerance"
    return [f"warning ({why}): {problem}" for problem in over]


def format_report(report):
    lines = [f"memory estimate for {report['world_size']} process(es):"]
    lines.append(f"  per device: {report['device_gib']:.2f} GiB")
    phases = ("layer_working_set", "logits")
    lines += [
        f"    {k}: {v:.2f} GiB"
        + (" (not at the peak)" if k in phases and k != report.get("device_peak_phase", k) else "")
        for k, v in report["device_breakdown_gib"].items()
    ]
    if report.get("device_load_gib", 0) > report["device_gib"]:
        lines.append(
            f"  per device while loading: {report['device_load_gib']:.2f} GiB "
            "(the 4-bit model whole on each GPU before FSDP shards it)"
        )
    phase = f" (peak: {report['cpu_peak_phase'].replace('_', ' ')})" if "cpu_peak_phase" in report else ""
    lines.append(f"  CPU: {report['cpu_gib']:.2f} GiB{phase}")
    lines += [f"    {k}: {v:.2f} GiB" for k, v in report["cpu_breakdown_gib"].items()]
    return "\n".join(lines)
