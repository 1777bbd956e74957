rule evaluate_run:
    input:
        unpack(eval_inputs),
        adapter="results/{run}/adapter",
    output:
        metrics="results/{run}/eval/metrics.json",
        table=report(
            "results/{run}/eval/metrics.tsv",
            caption="../report/metrics.rst",
            category="Runs",
            subcategory="{run}",
            labels={"run": "{run}", "result": "metrics (TSV)"},
        ),
        accuracy=report(
            "results/{run}/eval/accuracy.tsv",
            caption="../report/accuracy.rst",
            category="Runs",
            subcategory="{run}",
            labels={"run": "{run}", "result": "task accuracy (TSV)"},
        ),
        samples=report(
            "results/{run}/eval/samples.jsonl",
            caption="../report/samples.rst",
            category="Runs",
            subcategory="{run}",
            labels={"run": "{run}", "result": "generation samples (JSONL)"},
        ),
    log:
        "logs/evaluate_run/{run}.log",
    benchmark:
        "benchmarks/evaluate_run/{run}.tsv"
    conda:
        "../../envs/evaluate.yaml"
    threads: 2
    params:
        settings=settings_of("model", "quantization", "data", "evaluate"),
    script:
        "../scripts/evaluate_run.py"


rule summarize:
    input:
        metrics=each_run("results/{run}/eval/metrics.json"),
        info=each_run("results/{run}/eval/run_info.json"),
    output:
        table=report(
            "results/summary.tsv",
            caption="../report/summary_table.rst",
            category="Summary",
            labels={"result": "table (TSV)"},
        ),
        plot=report(
            "results/summary.png",
            caption="../report/summary_plot.rst",
            category="Summary",
            labels={"result": "comparison plot"},
        ),
        page=report(
            "results/summary.html",
            caption="../report/summary_page.rst",
            category="Summary",
            labels={"result": "table"},
        ),
    log:
        "logs/summarize.log",
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/summarize.py"
