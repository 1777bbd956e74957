from shardtune.io import job

with job(snakemake.log[0]) as log:
    from shardtune.plan.preflight import preflight

    i = snakemake.input
    preflight(
        i.model,
        i.accelerate,
        snakemake.params.settings,
        snakemake.output[0],
        log=log,
        gpus_planned=snakemake.params.gpus_planned,
    )
