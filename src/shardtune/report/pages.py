"""Self-contained HTML pages for `snakemake --report`, which shows HTML and images inline but
offers tables only as downloads: a run's overview (metrics, task accuracy, generation samples,
resolved settings, software versions) and the table across runs."""

import html
import json
from pathlib import Path

import pandas as pd
import yaml

from shardtune.io import write_text

STYLE = """
body { font-family: sans-serif; font-size: 14px; margin: 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.text { font-family: monospace; white-space: pre-wrap; max-width: 28em; word-break: break-all; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; }
.ok { color: #1a7f37; } .no { color: #b42318; }
"""


def _page(title, body):
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def _table(frame):
    return frame.to_html(index=False, border=0, float_format=lambda v: f"{v:.4f}", na_rep="")


def write_table_page(path, title, frame, note=""):
    write_text(path, _page(title, (f"<p>{html.escape(note)}</p>" if note else "") + _table(frame)))


def _prompt_text(messages):
    return "\n".join(f"[{m['role']}] {m['content']}" for m in messages)


def _samples_table(samples):
    head = "<tr><th>#</th><th>task</th><th>prompt</th><th>reference</th><th>base</th><th>tuned</th></tr>"
    rows = []
    for s in samples:
        cells = [str(s["index"]), html.escape(str(s.get("task") or "")), _prompt_text(s["prompt"]), s["reference"]]
        cells = [f"<td>{cells[0]}</td><td>{cells[1]}</td>"] + [
            f"<td class='text'>{html.escape(c)}</td>" for c in cells[2:]
        ]
        for model in ("base", "tuned"):
            mark = "<span class='ok'>&#10003;</span>" if s[f"{model}_correct"] else "<span class='no'>&#10007;</span>"
            cells.append(f"<td class='text'>{mark} {html.escape(s[model])}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def write_run_page(path, run, metrics_json, accuracy_tsv, samples_jsonl, run_info_json):
    metrics = json.loads(Path(metrics_json).read_text())
    info = json.loads(Path(run_info_json).read_text())
    samples = [json.loads(line) for line in Path(samples_jsonl).read_text().splitlines() if line.strip()]
    accuracy = pd.read_csv(accuracy_tsv, sep="\t")
    conversion, training = info.get("conversion") or {}, info["training"]
    gen = metrics.get("generation", {})
    parts = [
        "<h2>Metrics</h2>",
        "<p>Test split of the prepared data; base = the tuned model with its adapter disabled.</p>",
        _table(
            pd.DataFrame(
                [{"model": m, **{k: metrics[m].get(k) for k in ("eval_loss", "perplexity", "tokens", "accuracy")}}
                 for m in ("base", "tuned")]
            )
        ),
        "<h2>Task accuracy</h2>",
        f"<p>Exact match of greedy generations (at most {gen.get('max_new_tokens')} new tokens) on the first "
        f"{gen.get('per_task')} test conversations of each task family. <code>constant_answer</code> is what "
        "always giving the most common reference answer scores, and <code>*_distinct</code> counts the "
        "different answers a model gave: a tuned accuracy no higher than the constant answer, from few "
        "distinct answers, is a model that learned one answer, not the task.</p>",
        _table(accuracy) if len(accuracy) else "<p>Not available: the data set has no <code>task</code> column.</p>",
    ]
    if metrics.get("lm_eval"):
        lm = metrics["lm_eval"]
        parts += [
            f"<h2>lm-evaluation-harness {html.escape(lm['version'])}</h2>",
            _table(pd.DataFrame([{"task": t, **r} for t, r in lm["results"].items()])),
        ]
    parts += [
        "<h2>Generation samples</h2>",
        f"<p>The first {len(samples)} test conversations, greedy, seed {gen.get('seed')}.</p>",
        _samples_table(samples),
        "<h2>Training and conversion</h2>",
        _table(
            pd.DataFrame(
                [
                    {"item": "optimizer steps", "value": training.get("global_step")},
                    {"item": "train loss", "value": training.get("train_loss")},
                    {"item": "distributed", "value": f"{training.get('distributed_type')} x {training.get('num_processes')}"},
                    {"item": "adapter from", "value": f"{conversion.get('checkpoint')} ({conversion.get('why')})"},
                    {"item": "verified against", "value": conversion.get("verified_against")},
                    {"item": "max abs logit diff", "value": conversion.get("max_abs_logit_diff")},
                ]
            ).astype(str)
        ),
        "<h2>Software versions</h2>",
        _table(pd.DataFrame([{"package": k, "version": v or "not installed"} for k, v in info["versions"].items()])),
        "<h2>Resolved settings</h2>",
        f"<pre>{html.escape(yaml.safe_dump(info['settings'], sort_keys=False))}</pre>",
    ]
    write_text(path, _page(f"Run {run}", "".join(parts)))
