"""Evaluation: eval loss and perplexity of the base and the tuned model on the test split."""

import math
from pathlib import Path

import datasets
import torch
import torch.nn.functional as F
from peft import PeftModel
from transformers import AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from .io import write_json
from .modeling import load_base_model


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


def evaluate(model_dir, data_dir, adapter_dir, settings, out_dir, log=print):
    out_dir = Path(out_dir)
    test = datasets.load_from_disk(str(Path(data_dir) / "data"))["test"]
    tokenizer = AutoTokenizer.from_pretrained(Path(data_dir) / "tokenizer")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    collator = DataCollatorForLanguageModeling(
        pad_token_id=tokenizer.pad_token_id, padding_free=settings["data"]["packing"]
    )
    batch_size = settings["evaluate"]["batch_size"]
    base = load_base_model(model_dir, settings, len(tokenizer)).to(device)
    metrics = {"base": eval_loss(base, test, collator, batch_size, device)}
    log(f"base:  {metrics['base']}")
    tuned = PeftModel.from_pretrained(base, adapter_dir)
    metrics["tuned"] = eval_loss(tuned, test, collator, batch_size, device)
    log(f"tuned: {metrics['tuned']}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = ["model\teval_loss\tperplexity\ttokens"] + [
        f"{name}\t{m['eval_loss']:.6f}\t{m['perplexity']:.4f}\t{m['tokens']}" for name, m in metrics.items()
    ]
    tsv = out_dir / "metrics.tsv"
    tsv.with_suffix(".tsv.tmp").write_text("\n".join(rows) + "\n")
    tsv.with_suffix(".tsv.tmp").replace(tsv)
    write_json(out_dir / "metrics.json", metrics)
    return metrics
