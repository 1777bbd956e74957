# Before a GPU-hour is spent: estimate per-device and CPU memory and refuse a run that
# cannot fit the declared memory (unless memory.force). Resolves the training settings that
# are `auto` (batch size, gradient checkpointing) into memory.json, which training reads.
rule estimate_memory:
    input:
        model=run_model,
        accelerate="results/{run}/accelerate.yaml",
    output:
        "results/{run}/memory.json",
    log:
        "logs/estimate_memory/{run}.log",
    conda:
        "../../envs/train.yaml"
    params:
        settings=settings_of(
            "model", "data", "lora", "quantization", "fsdp", "training", "memory"
        ),
        gpus_planned=planned_gpus,
    script:
        "../scripts/estimate_memory.py"
