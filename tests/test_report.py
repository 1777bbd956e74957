"""`snakemake --report report.html` on the default run: one self-contained file with the rule
graph, the summary, and per run the overview page (metrics, task accuracy, generation samples,
settings, versions), the training plots and the raw tables."""

import base64
import json
import re

import pytest

from conftest import snakemake

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(demo_run):
    snakemake(demo_run, "--report", "report.html")
    text = (demo_run / "report.html").read_text()
    files = {}
    for mime, name, data in re.findall(r"data:([\w/+.-]+);charset=[^;]*;filename=([^;]+);base64,([A-Za-z0-9+/=]+)", text):
        files[name] = (mime, base64.b64decode(data))
    return text, files


def test_report_embeds_plots_tables_and_pages(report):
    _, files = report
    for name in ("summary.png", "loss.png", "learning_rate.png", "throughput.png"):
        mime, data = files[name]
        assert mime == "image/png" and data.startswith(PNG), name
    for name in ("summary.tsv", "metrics.tsv", "accuracy.tsv"):
        assert files[name][0] == "text/tab-separated-values"
    assert files["summary.tsv"][1].decode().startswith("run\t")
    assert files["metrics.tsv"][1].decode().startswith("model\teval_loss\tperplexity\ttokens")
    assert json.loads(files["run_info.json"][1])["versions"]["transformers"]
    assert b'"tuned"' in files["samples.jsonl"][1]


def test_run_overview_shows_metrics_samples_settings_and_versions(report, demo_run):
    _, files = report
    mime, page = files["overview.html"]
    page = page.decode()
    assert mime == "text/html"
    for heading in ("Metrics", "Task accuracy", "Generation samples", "Software versions", "Resolved settings"):
        assert f"<h2>{heading}</h2>" in page, heading
    first = json.loads((demo_run / "results/demo/eval/samples.jsonl").read_text().splitlines()[0])
    assert first["prompt"][-1]["content"].replace("'", "&#x27;") in page
    assert "learning_rate: 0.002" in page  # the resolved config, as YAML
    assert "addition" in page and "uppercase" in page  # task families
    summary = files["summary.html"][1].decode()
    assert "<td>demo</td>" in summary


def test_report_has_the_rule_graph_and_categories(report):
    text, _ = report
    for rule in ("fsdp_train", "convert_checkpoint", "evaluate_run", "summarize", "run_overview"):
        assert f'"{rule}"' in text, rule
    for category in ("Summary", "Runs"):
        assert f'"{category}"' in text
    assert "shardtune fine-tuned each configured run" in text  # the workflow description
