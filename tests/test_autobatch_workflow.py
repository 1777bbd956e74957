"""`per_device_train_batch_size: auto` through the workflow: estimate_memory resolves it, training
runs with the resolved batch (2 optimizer steps of the built-in model on 2 CPU ranks), and a
rerun has nothing to do."""

import copy
import json

import pytest

from shardtune.config import resolve_runs
from shardtune.inputs.builtin_model import build_model
from shardtune.plan.autobatch import with_resolved
from shardtune.plan.memory import estimate
from shardtune.plan.shape import model_shape
from shardtune.train.checkpoints import checkpoints

from conftest import copy_workflow, default_config, snakemake

AUTO = {
    "training": {
        "per_device_train_batch_size": "auto",
        "per_device_effective_batch_size": 8,
        "gradient_checkpointing": "auto",
        "learning_rate": 2.0e-3,
        "max_steps": 2,
        "save_steps": 2,
        "eval_strategy": "no",
    },
}


@pytest.fixture(scope="module")
def auto_run(tmp_path_factory):
    config = default_config()
    config["runs"] = {"auto": copy.deepcopy(AUTO)}
    # a budget between the estimates of batch 4 and batch 8 (without checkpointing) for the
    # built-in model on 2 ranks, so that auto must pick batch 4 x accumulation 2
    settings = resolve_runs(config)["auto"]
    model_dir = tmp_path_factory.mktemp("builtin-model")
    build_model(model_dir, settings["model"]["builtin"])
    shape = model_shape(str(model_dir), settings["lora"])
    estimates = {
        batch: estimate(shape, with_resolved(settings, {"per_device_train_batch_size": batch, "gradient_checkpointing": False}), 2)[
            "device_gib"
        ]
        for batch in (4, 8)
    }
    config["runs"]["auto"]["memory"] = {"device_gib": round((estimates[4] + estimates[8]) / 2, 4)}
    workdir = copy_workflow(tmp_path_factory.mktemp("autobatch"), config)
    snakemake(workdir, "--cores", "2", "results/auto/train/done.json")
    return workdir


def test_estimate_memory_resolves_auto_and_training_uses_it(auto_run):
    memory = json.loads((auto_run / "results/auto/memory.json").read_text())
    resolved = memory["resolved"]
    assert (resolved["per_device_train_batch_size"], resolved["gradient_accumulation_steps"]) == (4, 2)
    assert resolved["gradient_checkpointing"] is False and resolved["budget_from"] == "memory.device_gib"
    assert "resolved: per_device_train_batch_size 4, gradient_accumulation_steps 2" in (
        auto_run / "logs/estimate_memory/auto.log"
    ).read_text()
    assert "training batch: batch 4 x accumulation 2, gradient checkpointing false (auto:" in (
        auto_run / "logs/fsdp_train/auto.log"
    ).read_text()

    done = json.loads((auto_run / "results/auto/train/done.json").read_text())
    assert done["resolved"] == resolved and done["global_step"] == 2
    (checkpoint,) = checkpoints(auto_run / "results/auto/train")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state["train_batch_size"] == 4
    # 2 optimizer steps x 2 ranks x 2 micro-batches of 4 rows of at most 512 tokens: more than one
    # micro-batch per step could hold, so the accumulation of 2 was used too
    assert 2 * 2 * 4 * 512 < state["num_input_tokens_seen"] <= 2 * 2 * 2 * 4 * 512


def test_a_resolved_run_has_nothing_to_do_on_rerun(auto_run):
    result = snakemake(auto_run, "-n", "--cores", "2", "results/auto/train/done.json")
    assert "Nothing to be done" in result.stdout, result.stdout[-3000:]
