# Checkpoints live in results/{run}/train/ but only done.json is the rule's output, so
# Snakemake never deletes them: a rerun after a kill resumes from the last complete one.
rule fsdp_train:
    input:
        unpack(run_inputs),
        accelerate="results/{run}/accelerate.yaml",
    output:
        "results/{run}/train/done.json",
    log:
        "logs/fsdp_train/{run}.log",
    benchmark:
        "benchmarks/fsdp_train/{run}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 2
    params:
        settings=train_settings_json,
        train_dir=subpath(output[0], parent=True),
    shell:
        "accelerate launch --config_file {input.accelerate} -m shardtune.train"
        " --settings {params.settings:q} --data {input.data} --model {input.model}"
        " --output {params.train_dir} --done {output} > {log} 2>&1"
