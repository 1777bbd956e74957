"""Checks of a base model before compute is spent: its files load (config, tokenizer, complete
weights), and the run's settings fit it (LoRA targets that exist, a sequence length it
supports). Each failure is one line naming the file or the key."""

import json
import struct
from pathlib import Path

from shardtune.errors import UserError


class ModelError(UserError):
    """A model directory, or a setting that does not fit the model; the message names which."""


def _safetensors_problem(path):
    """Why a .safetensors file cannot be complete, or None: its header says where every tensor
    ends, so a cut-off download or copy shows without reading the weights."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors header"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"its header claims {header_len} bytes, the file has {size}"
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not valid JSON (not a safetensors file?)"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        return f"truncated: {size} bytes, its tensors need {8 + header_len + end}"
    return None


def check_weights(model_dir):
    """Every weight file a model directory needs is there and complete."""
    model_dir = Path(model_dir)
    index = next(iter(sorted(model_dir.glob("*.safetensors.index.json"))), None)
    if index is not None:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [name for name in files if not (model_dir / name).is_file()]
        if missing:
            raise ModelError(f"model.source: {model_dir}: {index.name} lists {missing[0]}, which is missing ({len(missing)} of {len(files)} shards)")
        paths = [model_dir / name for name in files]
    else:
        paths = sorted(model_dir.glob("*.safetensors"))
    if not paths and not list(model_dir.glob("pytorch_model*.bin")):
        raise ModelError(f"model.source: {model_dir} has no weights (*.safetensors or pytorch_model*.bin)")
    for path in paths:
        problem = _safetensors_problem(path)
        if problem:
            raise ModelError(f"model.source: {path}: {problem}")


def check_model_dir(model_dir):
    """The config, tokenizer and weights of a model directory load, before any job uses them."""
    from transformers import AutoConfig, AutoTokenizer

    model_dir = Path(model_dir)
    try:
        AutoConfig.from_pretrained(model_dir)
    except Exception as err:  # ValueError, OSError, JSONDecodeError: name the file either way
        raise ModelError(f"model.source: {model_dir / 'config.json'}: {_first_line(err)}") from None
    try:
        AutoTokenizer.from_pretrained(model_dir)
    except Exception as err:
        raise ModelError(
            f"model.source: {model_dir} has no tokenizer transformers can load "
            f"(tokenizer.json, tokenizer_config.json, tokenizer.model): {_first_line(err)}"
        ) from None
    check_weights(model_dir)


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _text_config(config):
    return getattr(config, "text_config", None) or config


def check_settings(model_dir, settings):
    """The run's LoRA targets and sequence length against the model, built on the meta device."""
    import torch
    from accelerate import init_empty_weights
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    limit = getattr(_text_config(config), "max_position_embeddings", None)
    length = settings["data"]["max_seq_len"]
    if limit and length > limit:
        raise ModelError(f"config error at 'data.max_seq_len': {length} is more than the model's max_position_embeddings ({limit})")

    targets = settings["lora"]["target_modules"]
    if targets == "all-linear":
        return
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    names = [name for name, _ in model.named_modules() if name]
    for target in targets:
        matched = [n for n in names if check_target_module_exists(LoraConfig(target_modules=[target]), n)]
        if not matched:
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise ModelError(
                f"config error at 'lora.target_modules': {target!r} matches no module of the model "
                f"(its linear layers: {', '.join(linear)})"
            )
