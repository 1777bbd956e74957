from shardtune.io import job

with job(snakemake.log[0], name=snakemake.rule) as log:
    from shardtune.launch.launcher import run

    i, r = snakemake.input, snakemake.resources
    run(
        [
            *("--config-file", i.accelerate, "--nodes", str(r.nodes)),
            *("--gpus-per-node", str(r.gpus_per_node), "--cpus-per-task", str(r.cpus_per_task)),
            *("--", "-m", "shardtune.train", "--settings", i.settings, "--data", i.data),
            *("--model", i.model, "--output", snakemake.params.train_dir),
            *("--done", snakemake.output[0], "--memory", i.memory, "--hub", snakemake.params.hub),
        ],
        snakemake.log[0],
        console=log.console,
    )
