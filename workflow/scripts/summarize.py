from pathlib import Path

from shardtune.io import job

with job(snakemake.log[0]):
    from shardtune.report.summary import summarize

    run_dirs = [Path(path).parent.parent for path in snakemake.input.metrics]  # results/{run}/eval/
    o = snakemake.output
    summarize(run_dirs, o.table, o.plot, o.page)
