"""Evaluation of the base and the tuned model: eval loss and perplexity on the prepared test
split; exact-match accuracy of greedy generations per task family and side-by-side samples on
the raw test conversations; optional lm-evaluation-harness tasks on the tuned model.

"base" is the tuned model with its adapter disabled: the model training started from,
including the (resized) embeddings training saw."""

import contextlib
import json
import math
import time
from collections import Counter
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from shardtune.errors import UserError
from shardtune.evaluate.generation import exact_match, generate, split_conversation
from shardtune.inputs.modeling import load_base_model
from shardtune.io import write_json, write_text

MODELS = ("base", "tuned")


@torch.no_grad()
def eval_loss(model, rows, collator, batch_size, device):
    """Token-weighted mean next-token loss over every label that is not -100."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        inputs = {k: batch[k].to(device) for k in ("input_ids", "position_ids", "attention_mask") if k in batch}
        logits = model(**inputs, use_cache=False).logits.float()
        labels = batch["labels"].to(device)[:, 1:]
        total += F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
        ).item()
        count += int((labels != -100).sum())
    mean = total / count
    return {"eval_loss": mean, "perplexity": math.exp(mean), "tokens": count}


def pick_conversations(test, per_task, samples):
    """Indices of the raw test conversations to generate for: the first `per_task` of each task
    family (when the data set has a `task` column) and the first `samples` overall."""
    sample_ids = list(range(min(samples, len(test))))
    by_task = {}
    if per_task and "task" in test.column_names:
        for i, task in enumerate(test["task"]):
            chosen = by_task.setdefault(task, [])
            if len(chosen) < per_task:
                chosen.append(i)
    return sample_ids, by_task


def conversation_reader(test, data_settings):
    """A function from a raw test row to its messages, read as data preparation reads them
    (data.format, data.columns); None for a row preparation would drop. None instead of a
    function for plain-text data sets, which have no turns to answer."""
    from shardtune.data.formats import CONVERTERS, json_text_columns, parse_json_text, resolve_format

    fmt, fields = resolve_format(test.column_names, data_settings, "the test split")
    if fmt == "text":
        return None
    json_columns = json_text_columns(test.features, fmt, fields)

    def messages(row):
        values = {}
        for field, column in fields.items():
            values[field], reason = row[column], None
            if column in json_columns and isinstance(row[column], str):  # e.g. from CSV
                values[field], reason = parse_json_text(row[column], column)
            if reason:
                return None
        return CONVERTERS[fmt](values, fields)[0]

    return messages


def generations(model, tokenizer, test, indices, settings, log):
    """{index: {prompt, reference, task, base, tuned}} for the test conversations `indices`."""
    e = settings["evaluate"]
    start = time.perf_counter()
    read = conversation_reader(test, settings["data"])
    if read is None:
        log("the data set is plain text: no conversations to generate answers for")
        return {}
    rows = {}
    for i in indices:
        messages = read(test[i])
        split = split_conversation(messages) if messages else None
        if split:
            rows[i] = {"prompt": split[0], "reference": split[1], "task": test[i].get("task")}
    prompts = [r["prompt"] for r in rows.values()]
    for name in MODELS:
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            out = generate(
                model,
                tokenizer,
                prompts,
                max_new_tokens=e["max_new_tokens"],
                batch_size=e["generation_batch_size"],
                seed=e["seed"],
            )
        for row, text in zip(rows.values(), out):
            row[name] = text
        log(f"{name}: generated {len(out)} completions ({time.perf_counter() - start:.0f} s)")
    return rows


def task_accuracy(rows, by_task):
    """Exact-match accuracy per task and model, beside what tells learning from luck: the
    accuracy of the best constant answer (the most common reference) and how many distinct
    answers each model gave."""
    table = {}
    for task, indices in sorted(by_task.items()):
        scored = [rows[i] for i in indices if i in rows]
        n = max(1, len(scored))
        references = Counter(r["reference"].strip() for r in scored)
        table[task] = (
            {"n": len(scored)}
            | {name: sum(exact_match(r[name], r["reference"]) for r in scored) / n for name in MODELS}
            | {"constant_answer": max(references.values(), default=0) / n}
            | {f"{name}_distinct": len({r[name].strip() for r in scored}) for name in MODELS}
        )
    return table


def run_lm_eval(model, tokenizer, settings, log):
    """lm-evaluation-harness tasks on the tuned model (an in-memory PEFT model, so that the
    base is loaded exactly as everywhere else); custom tasks come from evaluate.lm_eval_include."""
    e = settings["evaluate"]
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            "evaluate.lm_eval_tasks is set but lm-eval is not installed: pip install 'shardtune[lm-eval]'"
        ) from None
    include = e["lm_eval_include"]
    if include and not Path(include).is_dir():
        raise UserError(f"evaluate.lm_eval_include: {include} is not a directory")
    manager = TaskManager(include_path=include)
    unknown = [t for t in e["lm_eval_tasks"] if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"evaluate.lm_eval_tasks: unknown task(s) {', '.join(unknown)} (include path: {include})")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=e["batch_size"])
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=e["lm_eval_tasks"],
        task_manager=manager,
        limit=e["lm_eval_limit"],
        log_samples=False,
        random_seed=e["seed"],
        numpy_random_seed=e["seed"],
        torch_random_seed=e["seed"],
        fewshot_random_seed=e["seed"],
    )
    results = json.loads(json.dumps(out["results"], default=str))
    log(f"lm-eval: {results}")
    return {"version": lm_eval.__version__, "tasks": e["lm_eval_tasks"], "results": results}


def _write_tsv(path, header, rows):
    path = Path(path)
    write_text(path, "\n".join(["\t".join(header)] + ["\t".join(map(str, r)) for r in rows]) + "\n")


def _write_jsonl(path, rows):
    path = Path(path)
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def evaluate(model_dir, data_dir, dataset_dir, adapter_dir, settings, out_dir, log=print):
    out_dir = Path(out_dir)
    e = settings["evaluate"]
    test = datasets.load_from_disk(str(Path(data_dir) / "data"))["test"]
    raw_test = datasets.load_from_disk(str(Path(dataset_dir) / "data"))["test"]
    tokenizer = AutoTokenizer.from_pretrained(Path(data_dir) / "tokenizer")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    collator = DataCollatorForLanguageModeling(
        pad_token_id=tokenizer.pad_token_id, padding_free=settings["data"]["packing"]
    )
    start = time.perf_counter()
    base = load_base_model(model_dir, settings, len(tokenizer)).to(device)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()

    metrics = {}
    for name in MODELS:
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            metrics[name] = eval_loss(model, test, collator, e["batch_size"], device)
        log(f"{name}: {metrics[name]} ({time.perf_counter() - start:.0f} s)")

    sample_ids, by_task = pick_conversations(raw_test, e["per_task"], e["samples"])
    wanted = sorted(set(sample_ids).union(*by_task.values()))
    rows = generations(model, tokenizer, raw_test, wanted, settings, log) if wanted else {}
    accuracy = task_accuracy(rows, by_task)
    scored = [rows[i] for ids in by_task.values() for i in ids if i in rows]
    for name in MODELS:
        metrics[name]["accuracy"] = (
            sum(exact_match(r[name], r["reference"]) for r in scored) / len(scored) if scored else None
        )
    metrics["task_accuracy"] = accuracy
    metrics["generation"] = {k: e[k] for k in ("per_task", "samples", "max_new_tokens", "seed")} | {
        "decoding": "greedy",
        "prompts": len(rows),
    }
    if e["lm_eval_tasks"]:
        metrics["lm_eval"] = run_lm_eval(model, tokenizer, settings, log)

    out_dir.mkdir(parents=True, exist_ok=True)
    _write_tsv(
        out_dir / "metrics.tsv",
        ["model", "eval_loss", "perplexity", "tokens"],
        [(n, f"{metrics[n]['eval_loss']:.6f}", f"{metrics[n]['perplexity']:.4f}", metrics[n]["tokens"]) for n in MODELS],
    )
    acc_rows = [
        (t, a["n"], f"{a['base']:.4f}", f"{a['tuned']:.4f}", f"{a['constant_answer']:.4f}", a["base_distinct"], a["tuned_distinct"])
        for t, a in accuracy.items()
    ]
    if scored:
        overall = metrics["overall_accuracy"] = {
            "constant_answer": sum(a["constant_answer"] * a["n"] for a in accuracy.values()) / len(scored),
            **{f"{n}_distinct": len({r[n].strip() for r in scored}) for n in MODELS},
        }
        acc_rows.append(
            ("all", len(scored), f"{metrics['base']['accuracy']:.4f}", f"{metrics['tuned']['accuracy']:.4f}")
            + (f"{overall['constant_answer']:.4f}", overall["base_distinct"], overall["tuned_distinct"])
        )
    header = ["task", "n", "base", "tuned", "constant_answer", "base_distinct", "tuned_distinct"]
    _write_tsv(out_dir / "accuracy.tsv", header, acc_rows)
    _write_jsonl(
        out_dir / "samples.jsonl",
        [
            {"index": i, **rows[i], **{f"{n}_correct": exact_match(rows[i][n], rows[i]["reference"]) for n in MODELS}}
            for i in sample_ids
            if i in rows
        ],
    )
    write_json(out_dir / "metrics.json", metrics)
    return metrics
