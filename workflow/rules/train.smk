localrules:
    write_train_settings,


# What training depends on, as a file: changing any of it reruns training (and what
# follows); changing evaluation or publishing settings does not.
rule write_train_settings:
    output:
        "results/{run}/train_settings.json",
    log:
        "logs/write_train_settings/{run}.log",
    conda:
        "../../envs/train.yaml"
    params:
        settings=settings_of(
            "model", "data", "lora", "quantization", "fsdp", "training"
        ),
    script:
        "../scripts/write_train_settings.py"


# Checkpoints live in results/{run}/train/ but only done.json is the rule's output, so
# Snakemake never deletes them: a rerun after a kill resumes from the last complete one.
rule fsdp_train:
    input:
        unpack(run_inputs),
        accelerate="results/{run}/accelerate.yaml",
        memory="results/{run}/memory.json",
        settings="results/{run}/train_settings.json",
    output:
        "results/{run}/train/done.json",
    log:
        "logs/fsdp_train/{run}.log",
    benchmark:
        "benchmarks/fsdp_train/{run}.tsv"
    conda:
        "../../envs/train.yaml"
    threads: 2
    resources:
        **job_resources("fsdp_train"),
    params:
        train_dir=subpath(output[0], parent=True),
        hub=every_save_settings,
    script:
        "../scripts/fsdp_train.py"
