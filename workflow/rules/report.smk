# What `snakemake --report report.html` shows besides the DAG: per run an overview page
# (metrics, task accuracy, generation samples, settings, versions) and training curves.
report: "../report/workflow.rst"


rule plot_training:
    input:
        done="results/{run}/train/done.json",
    output:
        report(
            "results/{run}/eval/loss.png",
            caption="../report/loss.rst",
            category="Runs",
            subcategory="{run}",
            labels={"run": "{run}", "result": "loss"},
        ),
        report(
            "results/{run}/eval/learning_rate.png",
            caption="../report/learning_rate.rst",
            category="Runs",
            subcategory="{run}",
            labels={"run": "{run}", "result": "learning rate"},
        ),
        report(
            "results/{run}/eval/throughput.png",
            caption="../report/throughput.rst",
            category="Runs",
            subcategory="{run}",
            labels={"run": "{run}", "result": "throughput"},
        ),
    log:
        "logs/plot_training/{run}.log",
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/plot_training.py"


rule write_run_info:
    input:
        unpack(run_inputs),
        done="results/{run}/train/done.json",
        adapter="results/{run}/adapter",
    output:
        report(
            "results/{run}/eval/run_info.json",
            caption="../report/run_info.rst",
            category="Runs",
            subcategory="{run}",
            labels={"run": "{run}", "result": "settings and versions (JSON)"},
        ),
    log:
        "logs/write_run_info/{run}.log",
    conda:
        "../../envs/evaluate.yaml"
    params:
        settings=settings_of(*stconfig.SECTIONS),
    script:
        "../scripts/write_run_info.py"


rule run_overview:
    input:
        metrics="results/{run}/eval/metrics.json",
        accuracy="results/{run}/eval/accuracy.tsv",
        samples="results/{run}/eval/samples.jsonl",
        info="results/{run}/eval/run_info.json",
    output:
        report(
            "results/{run}/eval/overview.html",
            caption="../report/run_overview.rst",
            category="Runs",
            subcategory="{run}",
            labels={"run": "{run}", "result": "overview"},
        ),
    log:
        "logs/run_overview/{run}.log",
    conda:
        "../../envs/evaluate.yaml"
    script:
        "../scripts/run_overview.py"
