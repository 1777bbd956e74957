"""The model card (README.md) published with an adapter: hub metadata, how to load it, the
training settings, evaluation metrics, plots and software versions.

Built only from the run's settings and result files: the hub section (endpoint, token
handling) never appears in it.
"""

import yaml
from huggingface_hub import ModelCardData

from shardtune.plan.autobatch import with_resolved
from shardtune.report.runinfo import versions as software_versions  # the card reports what the run record does


def hub_id(source):
    """`org/name` for an `hf:org/name` source, else None (built-in or local)."""
    return source[3:] if isinstance(source, str) and source.startswith("hf:") else None


def base_model_id(settings):
    return settings["hub"]["base_model"] or hub_id(settings["model"]["source"])


def dataset_ids(settings):
    ids = [hub_id(settings.get("dataset", {}).get("source")), *settings["hub"]["datasets"]]
    return list(dict.fromkeys(i for i in ids if i))


def metadata_of(settings):
    """The card's YAML front matter (the hub indexes these keys)."""
    lora, quant = settings["lora"], settings["quantization"]
    tags = ["peft", "dora" if lora["use_dora"] else "lora", "sft", "fsdp", "shardtune"]
    if quant["load_in_4bit"]:
        tags.insert(2, "qlora")
    meta = {}
    if base_model_id(settings):
        meta["base_model"] = base_model_id(settings)
    meta["library_name"] = "peft"
    meta["pipeline_tag"] = "text-generation"
    if settings["hub"]["license"]:
        meta["license"] = settings["hub"]["license"]
    if dataset_ids(settings):
        meta["datasets"] = dataset_ids(settings)
    meta["tags"] = list(dict.fromkeys(tags + list(settings["hub"]["tags"])))
    return meta


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _code(text, lang="python"):
    return f"```{lang}\n{text.strip()}\n```"


def _loading(repo_id, base, private, include_merged):
    parts = []
    if private:
        parts.append(
            "The repository is private: log in first (`hf auth login`) or set `HF_TOKEN` to a token with read access."
        )
    parts.append(_code(f"""
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")
tokenizer = AutoTokenizer.from_pretrained("{repo_id}")
"""))
    base_ref = f'"{base}")' if base else '"path/to/base-model")  # the base model this adapter was trained on'
    parts.append("Or on an explicitly loaded base model:")
    parts.append(_code(f"""
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained({base_ref}
model = PeftModel.from_pretrained(base, "{repo_id}")
"""))
    parts.append(
        "The tokenizer in this repository carries the chat template used in training; if it has more tokens "
        "than the base model's, resize the base model's embeddings to `len(tokenizer)` before loading the adapter."
    )
    if include_merged:
        parts.append("A merged copy (base weights with the adapter folded in) is in `merged/`:")
        parts.append(_code(f"""
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo_id}", subfolder="merged")
"""))
    return "\n\n".join(parts)


def _training(settings, done):
    d, lora, q, f, t = (settings[k] for k in ("data", "lora", "quantization", "fsdp", "training"))
    auto = (done.get("resolved") or {}).get("auto") or []
    ds = settings.get("dataset")
    rows = []
    if ds:
        rows += [
            ("data set", f"`{ds['source']}`" + (f" @ `{ds['revision']}`" if ds["revision"] else "")),
            ("splits", ", ".join(ds["splits"])),
        ]
    rows += [
        ("chat template", d["chat_template_format"]),
        ("max sequence length", d["max_seq_len"]),
        ("packing", d["packing"]),
        ("loss on assistant tokens only", d["assistant_only_loss"]),
        ("LoRA r / alpha / dropout", f"{lora['r']} / {lora['alpha']} / {lora['dropout']}"),
        (
            "LoRA target modules",
            lora["target_modules"] if isinstance(lora["target_modules"], str) else ", ".join(lora["target_modules"]),
        ),
        ("DoRA", lora["use_dora"]),
        ("4-bit quantization (QLoRA)", q["load_in_4bit"]),
    ]
    if q["load_in_4bit"]:
        rows += [
            ("4-bit quant type / nested", f"{q['bnb_4bit_quant_type']} / {q['use_nested_quant']}"),
            ("4-bit compute / storage dtype", f"{q['bnb_4bit_compute_dtype']} / {q['bnb_4bit_quant_storage_dtype']}"),
        ]
    rows += [
        ("FSDP version / sharding", f"{done.get('fsdp_version', f['version'])} / {f['sharding_strategy']}"),
        ("processes", done.get("num_processes", f["num_processes"])),
        ("CPU offload", f["offload_params"]),
        ("mixed precision", f["mixed_precision"]),
        ("learning rate / scheduler", f"{t['learning_rate']} / {t['lr_scheduler_type']}"),
        ("epochs / max steps", f"{t['num_train_epochs']} / {t['max_steps']}"),
        (
            "batch size per device × accumulation",
            f"{t['per_device_train_batch_size']} × {t['gradient_accumulation_steps']}"
            + (" (auto)" if "training.per_device_train_batch_size" in auto else ""),
        ),
        ("gradient checkpointing", str(t["gradient_checkpointing"]) + (" (auto)" if "training.gradient_checkpointing" in auto else "")),
        (
            "weight decay / warmup ratio / max grad norm",
            f"{t['weight_decay']} / {t['warmup_ratio']} / {t['max_grad_norm']}",
        ),
        ("optimizer", t["optim"]),
        ("seed", t["seed"]),
    ]
    if "global_step" in done:
        rows.append(("steps trained", done["global_step"]))
    if done.get("train_loss") is not None:
        rows.append(("final train loss", f"{done['train_loss']:.4f}"))
    return _table(["setting", "value"], rows)


def _evaluation(metrics, conversion, plots):
    parts = []
    if metrics:
        rows = [
            (name, f"{m['eval_loss']:.4f}", f"{m['perplexity']:.3f}", m["tokens"])
            for name, m in metrics.items()
            if isinstance(m, dict) and "eval_loss" in m
        ]
        parts.append("On the held-out test split (next-token loss on the trained tokens):")
        parts.append(_table(["model", "eval loss", "perplexity", "tokens"], rows))
    else:
        parts.append("Not evaluated yet.")
    if conversion:
        parts.append(
            "The adapter was converted from the sharded FSDP checkpoint of step "
            f"{conversion.get('global_step')} and reproduces the trained model's logits "
            f"(max abs difference {conversion.get('max_abs_logit_diff', float('nan')):.3g})."
        )
    for path_in_repo in plots:
        parts.append(f"![{path_in_repo.rsplit('/', 1)[-1]}]({path_in_repo})")
    return "\n\n".join(parts)


def render(
    *,
    run,
    settings,
    repo_id,
    metrics=None,
    done=None,
    conversion=None,
    versions=None,
    plots=(),
    include_merged=False,
    status=None,
):
    """The README.md text. `status` is a note on top (e.g. a checkpoint pushed while training)."""
    done = done or {}
    settings = with_resolved(settings, done.get("resolved"))  # `auto` batch settings as training used them
    base = base_model_id(settings)
    front = ModelCardData(**metadata_of(settings)).to_yaml() + "\n"  # the hub's own metadata writer
    method = "QLoRA" if settings["quantization"]["load_in_4bit"] else "LoRA"
    intro = (
        f"A {method} adapter for [`{base}`](https://huggingface.co/{base})" if base else f"A {method} adapter"
    ) + f", fine-tuned under FSDP with shardtune (run `{run}`)."
    if not base:
        intro += (
            f" The base model (`{settings['model']['source']}`) is not on the hub: load the adapter onto the "
            "same base model, built or fetched the same way."
        )
    settings_public = {k: v for k, v in settings.items() if k != "hub"}
    sections = [
        f"---\n{front}---",
        f"# {repo_id.split('/')[-1]}",
        *([f"> {status}"] if status else []),
        intro,
        "## How to load\n\n" + _loading(repo_id, base, settings["hub"]["private"], include_merged),
        "## Training\n\n" + _training(settings, done),
        "<details><summary>All run settings</summary>\n\n"
        + _code(yaml.safe_dump(settings_public, sort_keys=True), "yaml")
        + "\n\n</details>",
        "## Evaluation\n\n" + _evaluation(metrics, conversion, plots),
        "## Software\n\n" + _table(["package", "version"], sorted((versions or software_versions()).items())),
    ]
    return "\n\n".join(sections) + "\n"
