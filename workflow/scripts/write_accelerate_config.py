from shardtune.io import job

with job(snakemake.log[0]) as log:
    from shardtune.launch import accelerate_config

    # The file describes the planned run: the GPUs the training job asks for
    # (resources.fsdp_train), else those visible here. The training launch (shardtune.launch)
    # sets the machine-dependent keys again from the allocation it really gets.
    planned = snakemake.params.gpus_planned
    gpus = planned or accelerate_config.visible_gpus()
    config = accelerate_config.write(snakemake.params.settings, snakemake.output[0], gpus, planned=bool(planned))
    log(f"wrote {snakemake.output[0]}: {config['num_processes']} processes, use_cpu={config['use_cpu']}")
