"""Merging an adapter into its base, outside FSDP: a plain full model at the chosen dtype, and
a clear refusal when memory is short. A QLoRA adapter merges into the unquantized base."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardtune.config import resolve_runs
from shardtune.export import merge as stmerge
from shardtune.inputs.builtin_model import build_model
from shardtune.inputs.modeling import load_base_model


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory):
    """A tiny base, a LoRA adapter with non-zero weights, and a probe of the QLoRA model
    (adapter on the 4-bit base), laid out as the workflow lays them out."""
    root = tmp_path_factory.mktemp("qlora_merge")
    settings = resolve_runs(
        {"quantization": {"load_in_4bit": True}, "merge": {"dtype": "bfloat16"}}
    )["demo"]
    model_dir = root / "model"
    build_model(model_dir / "files", {**settings["model"]["builtin"], "num_layers": 1})
    (model_dir / "source.json").write_text(json.dumps({"path": str(model_dir / "files")}))
    tokenizer = AutoTokenizer.from_pretrained(model_dir / "files")

    torch.manual_seed(0)
    base = load_base_model(model_dir, {**settings, "quantization": {"load_in_4bit": False}}, len(tokenizer))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM")
    adapter = root / "adapter"
    get_peft_model(base, lora).save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)

    ids = torch.tensor([tokenizer("What is 12 + 30? 42 apple banana")["input_ids"]])
    positions = torch.arange(ids.shape[1])[None]
    base = load_base_model(model_dir, settings, len(tokenizer))
    trained = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        logits = trained(input_ids=ids, position_ids=positions, use_cache=False).logits.float()
    (root / "train").mkdir()
    save_file({"input_ids": ids, "position_ids": positions, "logits": logits}, str(root / "train/probe.safetensors"))
    (root / "train/done.json").write_text("{}")
    return root, settings


def test_qlora_adapter_merges_into_the_unquantized_base(qlora_run):
    root, settings = qlora_run
    out = root / "merged"
    stmerge.merge(root / "adapter", root / "model", root / "train/done.json", settings, out)

    record = json.loads((out / "merge.json").read_text())
    assert record["base_quantized_in_training"] is True and record["dtype"] == "bfloat16"
    assert record["max_abs_diff_vs_adapter"] <= record["tolerance"]
    # the adapter was trained on 4-bit weights: the merged model differs from that model by
    # the quantization error, which the record shows
    assert record["max_abs_diff_vs_trained"] > record["max_abs_diff_vs_adapter"]

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert merged.dtype == torch.bfloat16
    assert not any("lora" in name for name, _ in merged.named_parameters())

    # the merged weights are the unquantized base plus the LoRA delta, in bf16
    base = AutoModelForCausalLM.from_pretrained(root / "model/files", dtype=torch.float32)
    lora = PeftModel.from_pretrained(base, root / "adapter").merge_and_unload()
    expected = lora.model.layers[0].mlp.down_proj.weight
    got = merged.model.layers[0].mlp.down_proj.weight.float()
    assert torch.allclose(got, expected, atol=1e-2, rtol=1e-2)


def test_merge_refuses_to_start_without_enough_memory(qlora_run, monkeypatch):
    root, settings = qlora_run
    monkeypatch.setattr(stmerge, "available_memory", lambda: 1024**2)
    out = root / "merged-short"
    with pytest.raises(stmerge.MergeError, match=r"not enough memory: merging needs about .* parameters x 2 bytes"):
        stmerge.merge(root / "adapter", root / "model", root / "train/done.json", settings, out)
    assert not out.exists()


def test_memory_estimate_counts_parameters_and_resized_embeddings(qlora_run):
    root, _ = qlora_run
    files = root / "model/files"
    model = AutoModelForCausalLM.from_pretrained(files)
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    assert stmerge.parameter_count(root / "model", vocab) == params
    # three added tokens pad the vocabulary to a multiple of 8, in embeddings and lm_head
    padded = -(-(vocab + 3) // 8) * 8
    extra = (padded - vocab) * model.config.hidden_size * 2
    assert stmerge.parameter_count(root / "model", vocab + 3) == params + extra
    assert stmerge.check_memory(params, "float32", 10 * params * 8) == params * 4 * 2
    assert 0 < stmerge.available_memory()
