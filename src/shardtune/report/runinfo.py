"""What produced a run's results: its resolved settings, the training and conversion records,
the base model and data behind it, and the software versions (results/{run}/eval/run_info.json)."""

import importlib.metadata
import platform
from pathlib import Path

from shardtune.io import read_json, write_json
from shardtune.plan.autobatch import with_resolved

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "accelerate",
    "bitsandbytes",
    "datasets",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "snakemake",
    "pandas",
    "matplotlib",
    "lm_eval",
)


def versions():
    """Versions of the packages a run depends on, as installed in this environment."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # optional packages (lm_eval) that are not installed
    return found


def _optional(path):
    return read_json(path) if Path(path).is_file() else None


def write_run_info(run, settings, train_done, adapter_dir, model_dir, data_dir, out_path):
    stats = _optional(Path(data_dir) / "stats.json") or {}
    training = read_json(train_done)
    info = {
        "run": run,
        # `auto` batch settings replaced by the values training used (training["resolved"])
        "settings": with_resolved(settings, training.get("resolved")),
        "training": training,
        "conversion": _optional(Path(adapter_dir) / "conversion.json"),
        "base_model": _optional(Path(model_dir) / "source.json"),
        "data": {
            "prepared": Path(data_dir).name,
            "added_tokens": stats.get("added_tokens"),
            "splits": {
                name: {k: v for k, v in split.items() if k != "length_histogram"}
                for name, split in stats.get("splits", {}).items()
            },
        },
        "platform": platform.platform(),
        "versions": versions(),
    }
    write_json(out_path, info)
    return info
