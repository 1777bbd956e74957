from shardtune.io import job

with job(snakemake.log[0], name=snakemake.rule) as log:
    from shardtune.data.prepare import prepare

    settings = {"data": {**snakemake.params.settings, "num_proc": snakemake.threads}}
    prepare(snakemake.input.dataset, snakemake.input.model, settings, snakemake.output[0], log=log, console=log.console)
