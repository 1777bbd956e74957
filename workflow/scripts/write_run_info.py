from shardtune.io import job

with job(snakemake.log[0]):
    from shardtune.report.runinfo import write_run_info

    i = snakemake.input
    settings = snakemake.params.settings
    write_run_info(snakemake.wildcards.run, settings, i.done, i.adapter, i.model, i.data, snakemake.output[0])
