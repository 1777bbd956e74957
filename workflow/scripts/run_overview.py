from shardtune.io import job

with job(snakemake.log[0]):
    from shardtune.report.pages import write_run_page

    i = snakemake.input
    write_run_page(snakemake.output[0], snakemake.wildcards.run, i.metrics, i.accuracy, i.samples, i.info)
