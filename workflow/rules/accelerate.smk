rule write_accelerate_config:
    output:
        "results/{run}/accelerate.yaml",
    params:
        settings=settings_of("fsdp"),
    log:
        "logs/write_accelerate_config/{run}.log",
    script:
        "../scripts/write_accelerate_config.py"
