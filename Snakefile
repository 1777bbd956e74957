from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"


# A YAML error in the default file: Snakemake's own message names no line.
check_yaml("config.yaml")


configfile: "config.yaml"


# Schema validation with defaults, per-run merging and cross-field checks: a bad value
# stops here, naming its key, before any job starts.
RUNS = validated_runs(config)


include: "workflow/rules/fetch.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/accelerate.smk"
include: "workflow/rules/memory.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/convert.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/merge.smk"
include: "workflow/rules/report.smk"
include: "workflow/rules/hub.smk"


onsuccess:
    print_outcome()


rule all:
    default_target: True
    input:
        "results/summary.tsv",
        report_outputs(),
        each_run("results/{run}/merged", merged_only=True),


rule data:
    input:
        run_outputs("data"),


rule train:
    input:
        run_outputs("train"),


rule convert:
    input:
        run_outputs("convert"),


rule evaluate:
    input:
        run_outputs("evaluate"),


rule merge:
    input:
        each_run("results/{run}/merged", merged_only=True),


rule upload:
    input:
        hub_outputs(),
