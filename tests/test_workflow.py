"""The default workflow end to end, through the snakemake command line."""

import json

import pytest
import torch
import yaml
from peft import AutoPeftModelForCausalLM, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from shardtune.inputs.sources import model_path
from shardtune.train.checkpoints import MARKER, checkpoints

from conftest import copy_workflow, default_config, jobs_in_dry_run, snakemake


def read_json(path):
    return json.loads(path.read_text())


def test_training_really_sharded_with_fsdp_on_two_ranks(demo_run):
    train = demo_run / "results/demo/train"
    done = read_json(train / "done.json")
    assert done["distributed_type"] == "DistributedType.FSDP"
    assert done["num_processes"] == 2 and done["fsdp_version"] == 2
    log = (demo_run / "logs/fsdp_train/demo.log").read_text()
    assert "distributed type: DistributedType.FSDP, processes: 2, fsdp: True" in log
    saved = checkpoints(train)
    assert saved, "no checkpoint written"
    for checkpoint in saved:
        assert (checkpoint / MARKER).is_file()
        for part in ("pytorch_model_fsdp_0", "optimizer_0"):
            shards = sorted(p.name for p in (checkpoint / part).glob("*.distcp"))
            # one shard file per rank: plain data parallel would write a single state dict
            assert shards == ["__0_0.distcp", "__1_0.distcp"], (checkpoint, part, shards)
    assert done["checkpoint"] == f"checkpoint-{done['global_step']}"
    # each rank's peak: the resident set on CPU ranks (libraries alone are ~0.5 GiB); the GPU's
    # allocated peak is only recorded on GPUs
    assert len(done["peak_memory_gib_per_rank"]) == 2 and min(done["peak_memory_gib_per_rank"]) > 0.4
    assert done["peak_allocated_gib_per_rank"] == [None, None]


def test_adapter_loads_with_peft_and_reproduces_trained_logits(demo_run):
    adapter = demo_run / "results/demo/adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    probe = load_file(str(demo_run / "results/demo/train/probe.safetensors"))
    base_path = model_path(next((demo_run / "resources/models").glob("*/source.json")).parent)
    inputs = {"input_ids": probe["input_ids"], "position_ids": probe["position_ids"], "use_cache": False}
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
        tuned_logits = PeftModel.from_pretrained(base, adapter).eval()(**inputs).logits
    assert (tuned_logits - probe["logits"]).abs().max() <= 1e-5
    # the comparison can fail: the untuned base model is far from the trained logits
    assert (base_logits - probe["logits"]).abs().max() > 1e-2

    auto = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (auto(**inputs).logits - probe["logits"]).abs().max() <= 1e-5


def test_tuned_model_has_lower_eval_loss_than_base(demo_run):
    metrics = read_json(demo_run / "results/demo/eval/metrics.json")
    assert metrics["tuned"]["eval_loss"] < metrics["base"]["eval_loss"]
    assert metrics["tuned"]["perplexity"] < metrics["base"]["perplexity"]
    table = (demo_run / "results/demo/eval/metrics.tsv").read_text().splitlines()
    assert table[0].split("\t") == ["model", "eval_loss", "perplexity", "tokens"] and len(table) == 3
    summary = (demo_run / "results/summary.tsv").read_text().splitlines()
    assert summary[1].startswith("demo\t")


def test_training_log_has_losses_that_fall(demo_run):
    import csv

    rows = [r for r in csv.DictReader((demo_run / "results/demo/train/log.csv").open()) if r["loss"]]
    assert len(rows) >= 3
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert all(float(r["tokens_per_second"]) > 0 for r in rows[1:])
    assert list((demo_run / "results/demo/train/tensorboard").glob("events.out.tfevents.*"))


def test_rerun_has_nothing_to_do(demo_run):
    result = snakemake(demo_run, "-n", "--cores", "2")
    assert "Nothing to be done" in result.stdout, result.stdout[-3000:]


def test_changing_a_training_setting_reruns_training_but_not_data(demo_run, tmp_path):
    config = default_config(demo_run)
    config["runs"]["demo"]["training"]["learning_rate"] = 1.0e-3
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    jobs = jobs_in_dry_run(snakemake(demo_run, "-n", "--cores", "2", "--configfile", str(changed)).stdout)
    assert {"fsdp_train", "convert_checkpoint", "evaluate_run", "summarize"} <= set(jobs)
    assert not {"prepare_data", "fetch_dataset", "fetch_model", "write_accelerate_config"} & set(jobs)


def test_changing_a_data_setting_reruns_data_preparation(demo_run, tmp_path):
    config = default_config(demo_run)
    config["data"]["max_seq_len"] = 256
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(config))
    jobs = jobs_in_dry_run(snakemake(demo_run, "-n", "--cores", "2", "--configfile", str(changed)).stdout)
    assert {"prepare_data", "fsdp_train"} <= set(jobs)
    assert not {"fetch_dataset", "fetch_model"} & set(jobs)


@pytest.mark.parametrize(
    "override, key",
    [
        ({"lora": {"r": "eight"}}, "lora.r"),
        ({"training": {"learning_rte": 1e-4}}, "training.learning_rte"),
        ({"runs": {"demo": {"fsdp": {"version": 3}}}}, "runs.demo.fsdp.version"),
        ({"quantization": {"load_in_8bit": True}}, "runs.demo.quantization.load_in_8bit"),
    ],
)
def test_bad_config_stops_before_any_job_naming_the_key(tmp_path, override, key):
    from shardtune.config import deep_merge

    workdir = copy_workflow(tmp_path / "wf", deep_merge(default_config(), override))
    result = snakemake(workdir, "--cores", "2", check=False)
    assert result.returncode != 0
    assert f"config error at '{key}'" in result.stdout, result.stdout[-2000:]
    assert not (workdir / "results").exists() and not (workdir / "resources").exists()


def test_the_logs_carry_no_library_noise(demo_run):
    """Warnings that say nothing to a user (deprecations inside TRL/PEFT, bitsandbytes' kernel
    download) are silenced at the source; what matters is said on the console."""
    for log in (demo_run / "logs").rglob("*.log"):
        text = log.read_text()
        for noise in ("FutureWarning", "DeprecationWarning", "kernels-community"):
            assert noise not in text, f"{log.relative_to(demo_run)}: {noise}"
