"""One table across runs (results/summary.tsv), its comparison plot and an HTML view for
the report. Settings that differ between runs become columns, so a sweep reads at a glance."""

import json
import statistics
from pathlib import Path

import pandas as pd

from shardtune.io import atomic_file, read_json
from shardtune.report.pages import write_table_page
from shardtune.report.plots import read_log, summary_plot


def flatten(settings, prefix=""):
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, list) else value
    return flat


def run_row(run_dir):
    run_dir = Path(run_dir)
    metrics = read_json(run_dir / "eval" / "metrics.json")
    info = read_json(run_dir / "eval" / "run_info.json")
    training = info["training"]
    log = read_log(run_dir / "train" / "log.csv")
    rates = log["tokens_per_second"].dropna().tolist() if "tokens_per_second" in log else []
    row = {
        "run": run_dir.name,
        "global_step": training.get("global_step"),
        "adapter_step": (info.get("conversion") or {}).get("global_step"),
        "train_loss": training.get("train_loss"),
        "train_seconds": (training.get("metrics") or {}).get("train_runtime"),
        "tokens_per_second": statistics.median(rates) if rates else None,
    }
    for model in ("base", "tuned"):
        row[f"{model}_eval_loss"] = metrics[model]["eval_loss"]
        row[f"{model}_perplexity"] = metrics[model]["perplexity"]
    row["loss_delta"] = row["tuned_eval_loss"] - row["base_eval_loss"]
    for model in ("base", "tuned"):
        row[f"{model}_accuracy"] = metrics[model].get("accuracy")
    for task, result in (metrics.get("lm_eval") or {}).get("results", {}).items():
        for key, value in result.items():
            if isinstance(value, (int, float)) and "stderr" not in key and key != "sample_len":
                row[f"lm_eval.{task}.{key.split(',')[0]}"] = value
    return row, flatten(info["settings"])


def summarize(run_dirs, out_tsv, out_png, out_html):
    rows, settings = zip(*(run_row(d) for d in run_dirs))
    keys = sorted(set().union(*settings))
    varying = [k for k in keys if len({json.dumps(s.get(k), sort_keys=True) for s in settings}) > 1]
    table = pd.DataFrame([{"run": r["run"], **{k: s.get(k) for k in varying}, **r} for r, s in zip(rows, settings)])
    table = table.sort_values("run").reset_index(drop=True)
    with atomic_file(out_tsv) as tmp:
        table.to_csv(tmp, sep="\t", index=False, float_format="%.6f")
    summary_plot(table, {Path(d).name: Path(d) / "train" / "log.csv" for d in run_dirs}, out_png)
    write_table_page(
        out_html,
        "Runs compared",
        table,
        note=(
            f"{len(table)} run(s). Settings that differ between runs: {', '.join(varying) or 'none'}. "
            "base = the tuned model with its adapter disabled; accuracy = exact match of greedy generations."
        ),
    )
    return table
