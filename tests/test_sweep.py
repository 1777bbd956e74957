"""A sweep of two runs as one DAG: shared data preparation and base model, a training per run,
one summary. The runs also cover what the default run does not: a chat format whose tokens
are added (resized embeddings), lora.modules_to_save, the best checkpoint, and merging."""

import csv
import json

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from shardtune.config import resolve_runs
from shardtune.export.convert import convert
from shardtune.inputs.modeling import load_base_model

from conftest import copy_workflow, default_config, jobs_in_dry_run, snakemake

RUNS = {
    "r4": {"lora": {"r": 4}, "convert": {"checkpoint": "best"}},
    "r8": {
        "lora": {"r": 8, "modules_to_save": ["embed_tokens", "lm_head"]},
        "merge": {"enabled": True, "dtype": "float32"},
    },
}


def sweep_config():
    config = default_config()
    config["runs"] = RUNS
    config["dataset"]["builtin"] = {"conversations": 400}
    config["data"].update(chat_template_format="zephyr", max_seq_len=256)  # zephyr's role tokens get added
    config["training"].update(
        max_steps=8,
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        logging_steps=2,
        per_device_train_batch_size=4,
        save_total_limit=None,
    )
    config["evaluate"] = {"per_task": 4, "samples": 3}
    return config


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    workdir = copy_workflow(tmp_path_factory.mktemp("sweep"), sweep_config())
    result = snakemake(workdir, "--cores", "2")
    return workdir, jobs_in_dry_run(result.stdout)


def read_json(path):
    return json.loads(path.read_text())


def probe_logits(model, probe):
    with torch.no_grad():
        return model(input_ids=probe["input_ids"], position_ids=probe["position_ids"], use_cache=False).logits


def test_sweep_shares_data_and_base_model_and_trains_each_run(sweep):
    workdir, jobs = sweep
    assert jobs["fetch_dataset"] == jobs["fetch_model"] == jobs["prepare_data"] == 1
    assert jobs["fsdp_train"] == jobs["convert_checkpoint"] == jobs["evaluate_run"] == 2
    assert jobs["merge_adapter"] == 1 and jobs["summarize"] == 1
    assert len(list((workdir / "resources/prepared").iterdir())) == 1
    for run in RUNS:
        done = read_json(workdir / f"results/{run}/train/done.json")
        assert done["global_step"] == 8 and done["distributed_type"] == "DistributedType.FSDP"
        assert read_json(workdir / f"results/{run}/adapter/adapter_config.json")["r"] == RUNS[run]["lora"]["r"]


def test_summary_has_a_row_per_run_with_the_swept_settings(sweep):
    workdir, _ = sweep
    rows = list(csv.DictReader((workdir / "results/summary.tsv").open(), delimiter="\t"))
    assert [r["run"] for r in rows] == ["r4", "r8"]
    assert [r["lora.r"] for r in rows] == ["4", "8"]
    assert "training.max_steps" not in rows[0]  # the same in both runs
    for row in rows:
        metrics = read_json(workdir / f"results/{row['run']}/eval/metrics.json")
        assert float(row["tuned_eval_loss"]) == pytest.approx(metrics["tuned"]["eval_loss"], abs=1e-6)
        assert float(row["tuned_eval_loss"]) < float(row["base_eval_loss"])
        assert int(row["global_step"]) == 8
    assert (workdir / "results/summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_added_tokens_and_modules_to_save_reach_the_adapter_under_peft_names(sweep):
    workdir, _ = sweep
    adapter = workdir / "results/r8/adapter"
    stats = read_json(next((workdir / "resources/prepared").glob("*/stats.json")))
    assert stats["added_tokens"] == ["<|system|>", "<|user|>", "<|assistant|>"]
    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        rows = f.get_tensor("base_model.model.model.embed_tokens.modules_to_save.weight").shape[0]
    assert {
        "base_model.model.model.embed_tokens.modules_to_save.weight",
        "base_model.model.lm_head.modules_to_save.weight",
    } <= keys
    assert not any(".default." in k for k in keys)
    assert read_json(adapter / "adapter_config.json")["modules_to_save"] == ["embed_tokens", "lm_head"]
    base_vocab = read_json(next((workdir / "resources/models").glob("*/files/config.json")))["vocab_size"]
    assert rows == -(-(base_vocab + 3) // 8) * 8  # resized with pad_to_multiple_of=8
    assert len(AutoTokenizer.from_pretrained(adapter)) == rows  # so AutoPeftModel resizes to fit


@pytest.mark.parametrize("run", ["r4", "r8"])
def test_adapters_with_resized_embeddings_load_both_ways_and_reproduce_the_trained_logits(sweep, run):
    workdir, _ = sweep
    adapter = workdir / f"results/{run}/adapter"
    probe = load_file(str(workdir / f"results/{run}/train/probe.safetensors"))
    auto = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval()
    assert (probe_logits(auto, probe) - probe["logits"]).abs().max() <= 1e-5
    settings = resolve_runs(sweep_config())[run]
    model_dir = next((workdir / "resources/models").iterdir())
    base = load_base_model(model_dir, settings, len(AutoTokenizer.from_pretrained(adapter)))
    peft = PeftModel.from_pretrained(base, adapter).eval()
    assert (probe_logits(peft, probe) - probe["logits"]).abs().max() <= 1e-5


def test_best_checkpoint_has_the_lowest_eval_loss(sweep):
    workdir, _ = sweep
    train = workdir / "results/r4/train"
    history = read_json(train / "checkpoint-8/trainer_state.json")["log_history"]
    losses = {e["step"]: e["eval_loss"] for e in history if "eval_loss" in e}
    assert sorted(losses) == [4, 8]
    best = min(losses, key=losses.get)
    conversion = read_json(workdir / "results/r4/adapter/conversion.json")
    assert conversion["selected"] == "best" and conversion["checkpoint"] == f"checkpoint-{best}"
    assert conversion["eval_loss"] == pytest.approx(losses[best])


def test_an_earlier_checkpoint_converts_and_is_verified_against_its_own_state(sweep, tmp_path):
    workdir, _ = sweep
    settings = resolve_runs(sweep_config())["r4"]
    settings["convert"]["checkpoint"] = 4
    out = tmp_path / "adapter-4"
    convert(
        workdir / "results/r4/train/done.json",
        next((workdir / "resources/models").iterdir()),
        next((workdir / "resources/prepared").iterdir()),
        settings,
        out,
    )
    conversion = read_json(out / "conversion.json")
    assert conversion["checkpoint"] == "checkpoint-4" and conversion["global_step"] == 4
    assert conversion["verified_against"] == "checkpoint 4 restored as for resuming"
    assert conversion["max_abs_logit_diff"] <= 1e-5
    probe = load_file(str(workdir / "results/r4/train/probe.safetensors"))
    model = AutoPeftModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    # an earlier state of training: not the final model
    assert (probe_logits(model, probe) - probe["logits"]).abs().max() > 1e-3


def test_merged_model_is_a_plain_model_with_the_adapters_logits(sweep):
    workdir, _ = sweep
    merged = workdir / "results/r8/merged"
    assert not (workdir / "results/r4/merged").exists()  # merge.enabled is per run
    record = read_json(merged / "merge.json")
    assert record["dtype"] == "float32" and record["max_abs_diff_vs_adapter"] <= record["tolerance"]
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert model.dtype == torch.float32
    assert not any("lora" in n or "modules_to_save" in n for n, _ in model.named_parameters())
    probe = load_file(str(workdir / "results/r8/train/probe.safetensors"))
    adapter = AutoPeftModelForCausalLM.from_pretrained(workdir / "results/r8/adapter", dtype=torch.float32).eval()
    assert (probe_logits(model, probe) - probe_logits(adapter, probe)).abs().max() <= 1e-4
    assert AutoTokenizer.from_pretrained(merged).get_vocab() == AutoTokenizer.from_pretrained(
        workdir / "results/r8/adapter"
    ).get_vocab()
