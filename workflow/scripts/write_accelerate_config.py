from shardtune.io import job

with job(snakemake.log[0]) as log:
    import torch

    from shardtune import accelerate_config

    config = accelerate_config.write(snakemake.params.settings, snakemake.output[0], torch.cuda.device_count())
    log(f"wrote {snakemake.output[0]}: {config['num_processes']} processes, use_cpu={config['use_cpu']}")
