from pathlib import Path

from shardtune.io import job

with job(snakemake.log[0]):
    from shardtune.report.plots import training_plots

    log_csv = Path(snakemake.input.done).parent / "log.csv"
    outputs = {Path(path).name: path for path in snakemake.output}
    training_plots(log_csv, outputs, snakemake.wildcards.run)
