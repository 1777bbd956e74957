import os
import sys
from pathlib import Path

# The workflow's logic is the shardtune package in src/; jobs import it from there too.
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
os.environ.update(
    PYTHONPATH=os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))
)

from snakemake.exceptions import WorkflowError
from shardtune import config as stconfig


def check_yaml(path):
    try:
        stconfig.read_yaml(path)
    except stconfig.ConfigError as err:
        raise WorkflowError(str(err)) from None


def validated_runs(config):
    try:
        files = ["config.yaml", *workflow.overwrite_configfiles]
        runs = stconfig.resolve_runs(stconfig.layered(config, files))
        stconfig.check_local_sources(runs)
        return runs
    except stconfig.ConfigError as err:
        raise WorkflowError(str(err)) from None


def print_outcome():
    """After a successful run: per run, base -> tuned metrics and where the results are."""
    from shardtune.report.outcome import summary

    text = summary(RUNS)
    if text and not workflow.dryrun:
        print(text, file=sys.stderr)


def _by_key(key_of, section):
    return {key_of(s): s[section] for s in RUNS.values()}


def dataset_spec(wildcards):
    return _by_key(stconfig.dataset_key, "dataset")[wildcards.dataset]


def dataset_source_file(wildcards):
    """A local data file as input, so that editing it fetches it again (its key is its path)."""
    source = dataset_spec(wildcards)["source"]
    return [source] if Path(source).is_file() else []


def model_spec(wildcards):
    return _by_key(stconfig.model_key, "model")[wildcards.model]


def prepared_settings(wildcards):
    return _by_key(stconfig.prepared_key, "data")[wildcards.prepared]


def prepared_inputs(wildcards):
    """Fetched data set and model behind a prepared-data key."""
    run = next(
        s for s in RUNS.values() if stconfig.prepared_key(s) == wildcards.prepared
    )
    return {
        "dataset": f"resources/datasets/{stconfig.dataset_key(run)}",
        "model": f"resources/models/{stconfig.model_key(run)}",
    }


def run_model(wildcards):
    return f"resources/models/{stconfig.model_key(RUNS[wildcards.run])}"


def run_inputs(wildcards):
    """Model and prepared data of a run."""
    s = RUNS[wildcards.run]
    return {
        "model": f"resources/models/{stconfig.model_key(s)}",
        "data": f"resources/prepared/{stconfig.prepared_key(s)}",
    }


def settings_of(*sections):
    """A params function giving a run's settings restricted to `sections`, so that a change
    elsewhere in the config does not rerun the rule."""

    def settings(wildcards):
        return {name: RUNS[wildcards.run][name] for name in sections}

    return settings


def run_outputs(stage):
    files = {
        "data": [
            f"resources/prepared/{stconfig.prepared_key(s)}" for s in RUNS.values()
        ],
        "train": [f"results/{run}/train/done.json" for run in RUNS],
        "convert": [f"results/{run}/adapter" for run in RUNS],
        "evaluate": [f"results/{run}/eval/metrics.json" for run in RUNS],
    }
    return sorted(set(files[stage]))


def hub_runs():
    """Runs with hub.push: true, each with its own repo_id (else a config error), and a token
    to publish with, checked before any job starts (not in the jobs: compute nodes may lack it).
    """
    try:
        pushed = stconfig.pushed_runs(RUNS)
        if workflow.is_main_process:
            stconfig.check_hub_token(pushed)
        return pushed
    except stconfig.ConfigError as err:
        raise WorkflowError(str(err)) from None


def hub_outputs():
    return [f"results/{run}/hub/upload.json" for run in hub_runs()]


def hub_inputs(wildcards):
    """What push_to_hub publishes: adapter, metrics, training record, and the merged model
    when hub.include_merged is set."""
    run = wildcards.run
    files = {
        "adapter": f"results/{run}/adapter",
        "metrics": f"results/{run}/eval/metrics.json",
        "done": f"results/{run}/train/done.json",
    }
    if RUNS[run]["hub"]["include_merged"]:
        files["merged"] = f"results/{run}/merged"
    # Plots and the run record (software versions), where the workflow makes them.
    if rules.has("plot_training"):
        files["plots"] = [
            str(path).format(run=run) for path in rules.plot_training.output
        ]
    if rules.has("write_run_info"):
        files["info"] = str(rules.write_run_info.output[0]).format(run=run)
    return files


def job_resources(rule):
    """Resources of `rule` from each run's `resources.<rule>` (see shardtune.launch.resources), one
    function per resource so that every run's job asks for its own."""
    from shardtune.launch import resources as stlaunch

    for name, s in RUNS.items():
        try:
            stlaunch.check_resources(
                s["resources"][rule], s["fsdp"], f"runs.{name}.resources.{rule}"
            )
        except stlaunch.LaunchError as err:
            raise WorkflowError(str(err)) from None

    def resource(key):
        def value(wildcards, threads):
            settings = RUNS[wildcards.run]["resources"][rule]
            return stlaunch.job_resources(settings, threads)[key]

        return value

    example = next(iter(RUNS.values()))["resources"][rule]
    return {key: resource(key) for key in stlaunch.job_resources(example, 1)}


def planned_gpus(wildcards):
    """GPUs per node the run's training job asks for (0: CPU ranks or a local run), so that
    estimate_memory knows a GPU run it cannot see a GPU of (auto batch settings)."""
    from shardtune.launch import resources as stlaunch

    return stlaunch.gpus_per_node(RUNS[wildcards.run]["resources"]["fsdp_train"])


def every_save_settings(wildcards):
    """For fsdp_train (hub.strategy: every_save): the run's hub and dataset settings as JSON,
    else "null", so that other publishing settings leave the training command alone."""
    import json

    s = RUNS[wildcards.run]
    if not (s["hub"]["push"] and s["hub"]["strategy"] == "every_save"):
        return "null"
    return json.dumps({"hub": s["hub"], "dataset": s["dataset"]})


def eval_inputs(wildcards):
    """run_inputs plus the fetched data set: its raw test conversations are what the
    evaluation generates answers for."""
    s = RUNS[wildcards.run]
    return run_inputs(wildcards) | {
        "dataset": f"resources/datasets/{stconfig.dataset_key(s)}"
    }


def each_run(pattern, merged_only=False):
    """`pattern` with {run} filled in for every run (with merge.enabled, if merged_only)."""
    return [
        pattern.format(run=run)
        for run, s in sorted(RUNS.items())
        if s["merge"]["enabled"] or not merged_only
    ]


def report_outputs():
    """Everything the report shows besides the summary: per-run pages and figures."""
    return [
        path
        for name in ("overview.html", "loss.png", "learning_rate.png", "throughput.png")
        for path in each_run(f"results/{{run}}/eval/{name}")
    ]
