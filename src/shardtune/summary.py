"""One table across runs: results/summary.tsv."""

from pathlib import Path

import pandas as pd

from .io import read_json


def summarize(metric_files, out_path):
    rows = []
    for path in map(Path, metric_files):
        metrics = read_json(path)
        run = path.parent.parent.name  # results/{run}/eval/metrics.json
        row = {"run": run}
        for model in ("base", "tuned"):
            row[f"{model}_eval_loss"] = metrics[model]["eval_loss"]
            row[f"{model}_perplexity"] = metrics[model]["perplexity"]
        row["loss_delta"] = row["tuned_eval_loss"] - row["base_eval_loss"]
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("run")
    tmp = Path(f"{out_path}.tmp")
    table.to_csv(tmp, sep="\t", index=False, float_format="%.6f")
    tmp.replace(out_path)
    return table
