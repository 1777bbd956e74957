# Optional (merge.enabled, target `merge`): a separate process on the converted adapter,
# outside FSDP, where merging is unsupported.
rule merge_adapter:
    input:
        model=run_model,
        adapter="results/{run}/adapter",
        done="results/{run}/train/done.json",
    output:
        directory("results/{run}/merged"),
    log:
        "logs/merge_adapter/{run}.log",
    benchmark:
        "benchmarks/merge_adapter/{run}.tsv"
    conda:
        "../../envs/evaluate.yaml"
    threads: 2
    params:
        settings=settings_of("model", "quantization", "merge"),
    script:
        "../scripts/merge_adapter.py"
