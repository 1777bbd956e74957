from shardtune.io import job

with job(snakemake.log[0]) as log:
    import torch

    from shardtune.launch import accelerate_config

    # On SLURM the training launch (shardtune.launch) sets the process and machine counts
    # from the allocation it really gets; this is the plan for the node writing the file.
    config = accelerate_config.write(snakemake.params.settings, snakemake.output[0], torch.cuda.device_count())
    log(f"wrote {snakemake.output[0]}: {config['num_processes']} processes, use_cpu={config['use_cpu']}")
