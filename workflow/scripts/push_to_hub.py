from pathlib import Path

from shardtune.io import job

with job(snakemake.log[0]) as log:
    from shardtune.publish.hub import publish

    i = snakemake.input
    publish(
        snakemake.params.settings,
        run=snakemake.wildcards.run,
        adapter_dir=i.adapter,
        metrics=i.metrics,
        train_done=i.done,
        merged_dir=i.get("merged"),
        plots=list(i.plots) if "plots" in i.keys() else None,
        run_info=i.get("info"),
        out_dir=Path(snakemake.output.record).parent,
        log=log,
    )
