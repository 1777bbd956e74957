# Tiny jobs: not worth a cluster job each.
localrules:
    write_accelerate_config,


rule write_accelerate_config:
    output:
        "results/{run}/accelerate.yaml",
    log:
        "logs/write_accelerate_config/{run}.log",
    conda:
        "../../envs/train.yaml"
    params:
        settings=settings_of("fsdp"),
        gpus_planned=planned_gpus,
    script:
        "../scripts/write_accelerate_config.py"
