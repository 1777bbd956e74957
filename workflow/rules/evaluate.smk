rule evaluate_run:
    input:
        unpack(run_inputs),
        adapter="results/{run}/adapter",
    output:
        metrics="results/{run}/eval/metrics.json",
        table="results/{run}/eval/metrics.tsv",
    log:
        "logs/evaluate_run/{run}.log",
    benchmark:
        "benchmarks/evaluate_run/{run}.tsv"
    conda:
        "../../envs/evaluate.yaml"
    params:
        settings=settings_of("model", "quantization", "data", "evaluate"),
    script:
        "../scripts/evaluate_run.py"


rule summarize:
    input:
        run_outputs("evaluate"),
    output:
        "results/summary.tsv",
    log:
        "logs/summarize.log",
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/summarize.py"
