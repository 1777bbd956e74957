from shardtune.io import job, write_json

with job(snakemake.log[0]):
    write_json(snakemake.output[0], snakemake.params.settings)
