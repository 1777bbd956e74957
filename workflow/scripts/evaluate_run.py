from pathlib import Path

from shardtune.io import job

with job(snakemake.log[0]) as log:
    import torch

    from shardtune.evaluate.evaluation import evaluate

    torch.set_num_threads(snakemake.threads)
    i = snakemake.input
    out_dir = Path(snakemake.output.metrics).parent
    evaluate(i.model, i.data, i.dataset, i.adapter, snakemake.params.settings, out_dir, log=log)
