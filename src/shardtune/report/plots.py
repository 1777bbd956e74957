"""Figures for the report: training curves of a run (from train/log.csv) and a comparison of
runs (from the summary table)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from shardtune.io import atomic_file

# What each training figure shows: file name -> (title, y label, [(column, label)]).
TRAINING_FIGURES = {
    "loss.png": ("Loss", "loss", [("loss", "training loss"), ("eval_loss", "eval loss")]),
    "learning_rate.png": ("Learning rate", "learning rate", [("learning_rate", "learning rate")]),
    "throughput.png": ("Throughput", "tokens / s (all ranks)", [("tokens_per_second", "tokens / s")]),
}


def _save(fig, path):
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format=path.suffix.lstrip("."))
    plt.close(fig)


def read_log(log_csv):
    """The training log with one row per (step, kind of entry), numeric columns as floats.
    Throughput counts on training entries only: an evaluation entry's interval includes the
    time spent evaluating."""
    log = pd.read_csv(log_csv).apply(pd.to_numeric, errors="coerce")
    if "tokens_per_second" in log and "loss" in log:
        log.loc[log["loss"].isna(), "tokens_per_second"] = float("nan")
    return log


def training_figure(log, title, ylabel, series, run):
    fig, ax = plt.subplots(figsize=(6, 3.6))
    plotted = False
    for column, label in series:
        points = log[["step", column]].dropna() if column in log else pd.DataFrame()
        if len(points):
            ax.plot(points["step"], points[column], marker="o", markersize=3, label=label)
            plotted = True
    if not plotted:
        ax.text(0.5, 0.5, "nothing logged", ha="center", va="center", transform=ax.transAxes)
    elif len(series) > 1:
        ax.legend()
    ax.set(title=f"{title} - {run}", xlabel="optimizer step", ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig


def training_plots(log_csv, out_paths, run):
    """Write the figures of TRAINING_FIGURES to `out_paths` ({file name: path})."""
    log = read_log(log_csv)
    for name, path in out_paths.items():
        title, ylabel, series = TRAINING_FIGURES[name]
        _save(training_figure(log, title, ylabel, series, run), path)


def summary_plot(table, logs, out_path):
    """Across runs: eval loss and task accuracy of base vs tuned, and the training loss curves.
    `table` is the summary DataFrame; `logs` maps run -> its train/log.csv."""
    has_accuracy = "tuned_accuracy" in table and table["tuned_accuracy"].notna().any()
    panels = 3 if has_accuracy else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    runs = list(table["run"])
    x = range(len(runs))
    width = 0.38
    for ax, metric, label in [(axes[0], "eval_loss", "eval loss (test split)")] + (
        [(axes[1], "accuracy", "exact-match accuracy")] if has_accuracy else []
    ):
        for offset, model in ((-width / 2, "base"), (width / 2, "tuned")):
            ax.bar([i + offset for i in x], table[f"{model}_{metric}"], width, label=model)
        ax.set_xticks(list(x), runs, rotation=30, ha="right")
        ax.set(title=label)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    curves = axes[-1]
    for run in runs:
        log = read_log(logs[run])
        points = log[["step", "loss"]].dropna()
        curves.plot(points["step"], points["loss"], label=run)
    curves.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    curves.legend()
    curves.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, out_path)
