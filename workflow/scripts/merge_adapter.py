from shardtune.io import job

with job(snakemake.log[0]) as log:
    import torch

    from shardtune.export.merge import merge

    torch.set_num_threads(snakemake.threads)
    i = snakemake.input
    merge(i.adapter, i.model, i.done, snakemake.params.settings, snakemake.output[0], log=log)
