from shardtune.io import job

with job(snakemake.log[0]):
    from shardtune.summary import summarize

    summarize(snakemake.input, snakemake.output[0])
