from shardtune.io import job

with job(snakemake.log[0]) as log:
    import torch

    from shardtune import accelerate_config

    # The machines the training job asks for (resources.fsdp_train), not the GPUs of
    # whichever node writes this file; the launch checks them against the allocation.
    settings, machines = snakemake.params.settings, snakemake.params.machines
    if machines["nodes"] > 1:
        settings["fsdp"]["num_machines"] = machines["nodes"]
    gpus = machines["gpus_per_node"] or torch.cuda.device_count()
    config = accelerate_config.write(settings, snakemake.output[0], gpus)
    log(f"wrote {snakemake.output[0]}: {config['num_processes']} processes, use_cpu={config['use_cpu']}")
