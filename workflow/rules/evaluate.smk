rule evaluate_run:
    input:
        unpack(run_inputs),
        adapter="results/{run}/adapter",
    output:
        metrics="results/{run}/eval/metrics.json",
        table="results/{run}/eval/metrics.tsv",
    params:
        settings=settings_of("model", "quantization", "data", "evaluate"),
    log:
        "logs/evaluate_run/{run}.log",
    benchmark:
        "benchmarks/evaluate_run/{run}.tsv"
    script:
        "../scripts/evaluate_run.py"


rule summarize:
    input:
        run_outputs("evaluate"),
    output:
        "results/summary.tsv",
    log:
        "logs/summarize.log",
    script:
        "../scripts/summarize.py"
