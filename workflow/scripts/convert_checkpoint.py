from shardtune.io import job

with job(snakemake.log[0]) as log:
    from shardtune.export.convert import convert

    i = snakemake.input
    convert(i.done, i.model, i.data, snakemake.params.settings, snakemake.output[0], log=log)
