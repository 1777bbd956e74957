"""The few lines a finished workflow prints on the console: per run, what evaluation found
and where the results are. Reads only small JSON files, so the Snakefile can call it."""

import json
from pathlib import Path


def _change(metrics, key, fmt):
    base, tuned = metrics["base"].get(key), metrics["tuned"].get(key)
    return None if base is None or tuned is None else f"{base:{fmt}} -> {tuned:{fmt}}"


def run_lines(run, results="results"):
    """Lines about one run, or [] if it has not been evaluated."""
    path = Path(results) / run / "eval" / "metrics.json"
    if not path.is_file():
        return []
    metrics = json.loads(path.read_text())
    parts = [f"eval loss {_change(metrics, 'eval_loss', '.3f')}"]
    accuracy = _change(metrics, "accuracy", ".2f")
    if accuracy:
        parts.append(f"task accuracy {accuracy}")
        overall = metrics.get("overall_accuracy") or {}
        if "constant_answer" in overall:
            parts.append(
                f"(a constant answer scores {overall['constant_answer']:.2f}; "
                f"the tuned model gave {overall['tuned_distinct']} distinct answers)"
            )
    lines = [f"  {run}: base -> tuned: " + ", ".join(parts[:2]) + (f" {parts[2]}" if len(parts) > 2 else "")]
    lines.append(f"    adapter: {Path(results) / run / 'adapter'}   overview: {Path(results) / run / 'eval' / 'overview.html'}")
    return lines


def summary(runs, results="results"):
    """The closing summary of a workflow run over `runs` (names), as text ('' if nothing was evaluated)."""
    lines = [line for run in sorted(runs) for line in run_lines(run, results)]
    if not lines:
        return ""
    table = Path(results) / "summary.tsv"
    tail = [f"  all runs: {table}" if table.is_file() else None, "  report: snakemake --report report.html"]
    return "\n".join(["shardtune results (base = the model before tuning):", *lines, *filter(None, tail)])
