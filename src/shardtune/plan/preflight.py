"""The estimate_memory step: model and settings checked, `auto` batch settings resolved, the
memory estimate checked against the budget and written to memory.json."""

from shardtune.plan.fit import check_fits, format_report, over_budget_warnings
from shardtune.plan.memory import estimate
from shardtune.plan.shape import model_shape


def preflight(model_dir, accelerate_yaml, settings, out_json, log=print, gpus_planned=0):
    """Resolve `auto` batch settings (shardtune.plan.autobatch), estimate for the run's world size,
    check it against the declared memory (or the budget `auto` planned for), write it.
    `gpus_planned`: GPUs per node the training job asks for (resources.fsdp_train)."""
    import yaml

    from shardtune.inputs.model_check import check_settings
    from shardtune.inputs.sources import model_path
    from shardtune.io import write_json
    from shardtune.plan.autobatch import resolve, with_resolved

    world_size = yaml.safe_load(open(accelerate_yaml))["num_processes"]
    if gpus_planned:  # the training job's GPUs, not those of the node that wrote accelerate.yaml
        from shardtune.launch.accelerate_config import resolve_num_processes

        world_size = resolve_num_processes(settings["fsdp"], gpus_planned)
    check_settings(model_path(model_dir), settings)
    shape = model_shape(model_path(model_dir), settings["lora"])
    resolved = resolve(shape, settings, world_size, gpus_planned, log=log)
    report = estimate(shape, with_resolved(settings, resolved), world_size, gpus_planned)
    log(format_report(report))
    m = settings["memory"]
    device_gib = resolved["budget_gib"] if resolved["auto"] else m["device_gib"]
    over = check_fits(report, device_gib, m["cpu_gib"], m["force"])
    for line in over_budget_warnings(over, m["force"]):
        log(line)
    report["declared"] = {**m, "over_budget": over}
    report["resolved"] = resolved
    write_json(out_json, report)
    return report
