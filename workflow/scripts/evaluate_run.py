from pathlib import Path

from shardtune.io import job

with job(snakemake.log[0]) as log:
    from shardtune.evaluate import evaluate

    i = snakemake.input
    out_dir = Path(snakemake.output.metrics).parent
    evaluate(i.model, i.data, i.adapter, snakemake.params.settings, out_dir, log=log)
