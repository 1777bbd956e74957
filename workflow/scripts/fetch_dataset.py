from shardtune.io import job

with job(snakemake.log[0]):
    from shardtune.inputs.sources import fetch_dataset

    fetch_dataset(snakemake.params.spec, snakemake.output[0])
