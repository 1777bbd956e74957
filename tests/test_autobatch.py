"""`training.per_device_train_batch_size: auto` and `training.gradient_checkpointing: auto`:
accepted by the config, resolved by the pre-flight memory step into memory.json, and used by
training, the run record and the model card. No training runs here."""

import json

import pytest
import yaml
from transformers import LlamaConfig

from shardtune.config import ConfigError, resolve_runs
from shardtune.plan import autobatch
from shardtune.plan.memory import estimate
from shardtune.plan.preflight import preflight
from shardtune.plan.shape import model_shape

TINY = LlamaConfig(
    hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=512
)
WORLD = 2


def settings_of(training=None, memory=None, fsdp=None):
    run = {"training": training or {}, "memory": memory or {}, "fsdp": fsdp or {}}
    return resolve_runs({"runs": {"a": run}})["a"]


def auto(rows=8, checkpointing="auto", **memory):
    return settings_of(
        {"per_device_train_batch_size": "auto", "per_device_effective_batch_size": rows, "gradient_checkpointing": checkpointing},
        memory,
    )


@pytest.fixture(scope="module")
def shape():
    return model_shape(TINY, settings_of()["lora"])


def gib(shape, settings, batch, checkpointing, rows=8):
    values = {
        "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": rows // batch,
        "gradient_checkpointing": checkpointing,
    }
    return estimate(shape, autobatch.with_resolved(settings, values), WORLD)["device_gib"]


# --- config -------------------------------------------------------------------------------------


def test_the_config_accepts_auto_for_the_batch_size_and_checkpointing():
    s = auto(rows=32)
    assert s["training"]["per_device_train_batch_size"] == "auto"
    assert s["training"]["gradient_checkpointing"] == "auto"
    assert settings_of()["training"]["per_device_effective_batch_size"] is None  # unused without auto


@pytest.mark.parametrize(
    "training, key",
    [
        ({"per_device_train_batch_size": "big"}, "training.per_device_train_batch_size"),
        ({"per_device_train_batch_size": 0}, "training.per_device_train_batch_size"),
        ({"gradient_checkpointing": "sometimes"}, "training.gradient_checkpointing"),
        ({"per_device_train_batch_size": "auto"}, "training.per_device_effective_batch_size"),
        ({"per_device_train_batch_size": "auto", "per_device_effective_batch_size": 0}, "training.per_device_effective_batch_size"),
        ({"per_device_train_batch_size": 4, "per_device_effective_batch_size": 16}, "training.per_device_effective_batch_size"),
    ],
)
def test_bad_auto_settings_are_refused_in_one_line_naming_the_key(training, key):
    with pytest.raises(ConfigError, match=f"^config error at 'runs.a.{key}'") as err:
        settings_of(training)
    assert "\n" not in str(err.value)


def test_an_effective_batch_that_matches_an_explicit_batch_is_accepted():
    s = settings_of({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "per_device_effective_batch_size": 8})
    assert autobatch.rows_per_step(s["training"]) == 8


# --- picking ------------------------------------------------------------------------------------


def test_auto_picks_the_largest_batch_that_fits_and_keeps_the_effective_batch(shape):
    s = auto(rows=8)
    budget = (gib(shape, s, 4, False) + gib(shape, s, 8, False)) / 2
    picked = autobatch.pick_setting(shape, s, WORLD, budget)
    assert (picked["per_device_train_batch_size"], picked["gradient_accumulation_steps"]) == (4, 2)
    assert picked["gradient_checkpointing"] is False and picked["estimate_gib"] <= budget


def test_only_divisors_of_the_effective_batch_are_tried(shape):
    s = auto(rows=12)
    sizes = [c["per_device_train_batch_size"] for c in autobatch.candidates(s) if not c["gradient_checkpointing"]]
    assert sizes == [12, 6, 4, 3, 2, 1]
    assert all(c["per_device_train_batch_size"] * c["gradient_accumulation_steps"] == 12 for c in autobatch.candidates(s))


def test_checkpointing_is_turned_on_only_when_no_batch_fits_without_it(shape):
    s = auto(rows=8)
    roomy = autobatch.pick_setting(shape, s, WORLD, 1000.0)
    assert roomy["per_device_train_batch_size"] == 8 and roomy["gradient_checkpointing"] is False
    # below batch 1 without checkpointing, but above batch 1 with it
    tight = (gib(shape, s, 1, True) + gib(shape, s, 1, False)) / 2
    assert gib(shape, s, 1, True) < gib(shape, s, 1, False)
    picked = autobatch.pick_setting(shape, s, WORLD, tight)
    assert picked["gradient_checkpointing"] is True
    assert picked["per_device_train_batch_size"] * picked["gradient_accumulation_steps"] == 8


def test_a_fixed_checkpointing_setting_is_kept(shape):
    s = auto(rows=8, checkpointing=False)
    tight = (gib(shape, s, 1, True) + gib(shape, s, 1, False)) / 2
    assert autobatch.pick_setting(shape, s, WORLD, tight) is None
    on = autobatch.pick_setting(shape, auto(rows=8, checkpointing=True), WORLD, 1000.0)
    assert on["gradient_checkpointing"] is True and on["per_device_train_batch_size"] == 8


def test_checkpointing_auto_with_a_fixed_batch_keeps_the_batch(shape):
    s = settings_of({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "gradient_checkpointing": "auto"})
    between = (gib(shape, s, 4, True, rows=12) + gib(shape, s, 4, False, rows=12)) / 2
    picked = autobatch.pick_setting(shape, s, WORLD, between)
    assert (picked["per_device_train_batch_size"], picked["gradient_accumulation_steps"], picked["gradient_checkpointing"]) == (4, 3, True)


def test_fsdp_activation_checkpointing_is_not_doubled(shape):
    s = settings_of(
        {"per_device_train_batch_size": "auto", "per_device_effective_batch_size": 4, "gradient_checkpointing": "auto"},
        fsdp={"activation_checkpointing": True},
    )
    assert {c["gradient_checkpointing"] for c in autobatch.candidates(s)} == {False}


# --- budget -------------------------------------------------------------------------------------


class FakeCuda:
    def current_device(self):
        return 0

    def get_device_properties(self, index):
        return type("Props", (), {"total_memory": 24 * 1024**3, "name": "Fake GPU"})()


def test_the_budget_is_the_declared_size_then_the_gpu_then_cpu_memory_per_rank():
    assert autobatch.device_budget({"device_gib": 40, "cpu_gib": 100}, 8, cuda=FakeCuda()) == (40, "memory.device_gib")
    gib_, source = autobatch.device_budget({"device_gib": None, "cpu_gib": None}, 8, cuda=FakeCuda())
    assert gib_ == pytest.approx(24) and "Fake GPU" in source
    gib_, source = autobatch.device_budget({"device_gib": None, "cpu_gib": 16}, 4, num_machines=2, cuda=False)
    assert gib_ == 8 and "2 rank(s) per machine" in source


@pytest.mark.parametrize("gpus_planned", [0, 4])
def test_no_budget_is_a_config_error_naming_memory_device_gib(shape, gpus_planned):
    with pytest.raises(ConfigError, match="^config error at 'memory.device_gib'"):
        autobatch.resolve(shape, auto(rows=8), WORLD, gpus_planned=gpus_planned, log=lambda *a: None, cuda=False)
    # a GPU run whose GPUs this step cannot see does not fall back to CPU memory
    if gpus_planned:
        with pytest.raises(ConfigError, match="memory.device_gib"):
            autobatch.resolve(shape, auto(rows=8, cpu_gib=64), WORLD, gpus_planned=gpus_planned, log=lambda *a: None, cuda=False)


def test_without_auto_nothing_is_resolved_and_no_budget_is_needed(shape):
    s = settings_of({"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3})
    resolved = autobatch.resolve(shape, s, WORLD, log=lambda *a: None, cuda=False)
    assert resolved == {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 3, "gradient_checkpointing": False, "auto": []}


# --- the pre-flight step, memory.json, and what training and the records see --------------------


@pytest.fixture
def model_files(tmp_path):
    files = tmp_path / "files"
    TINY.save_pretrained(files)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "source.json").write_text(json.dumps({"path": str(files)}))
    accelerate = tmp_path / "accelerate.yaml"
    accelerate.write_text(yaml.safe_dump({"num_processes": WORLD}))
    return model_dir, accelerate


def test_preflight_writes_the_resolved_values_logs_them_and_training_uses_them(shape, model_files, tmp_path):
    model_dir, accelerate = model_files
    s = auto(rows=8)
    budget = (gib(shape, s, 2, False) + gib(shape, s, 4, False)) / 2
    s = auto(rows=8, device_gib=budget)
    lines = []
    report = preflight(model_dir, accelerate, s, tmp_path / "memory.json", log=lines.append)
    written = json.loads((tmp_path / "memory.json").read_text())
    assert written["resolved"] == report["resolved"]
    resolved = written["resolved"]
    assert (resolved["per_device_train_batch_size"], resolved["gradient_accumulation_steps"]) == (2, 4)
    assert resolved["gradient_checkpointing"] is False and resolved["fits"] is True
    assert resolved["auto"] == ["training.per_device_train_batch_size", "training.gradient_checkpointing"]
    assert resolved["budget_from"] == "memory.device_gib" and resolved["budget_gib"] == budget
    assert written["device_gib"] == pytest.approx(gib(shape, s, 2, False))  # the estimate is for the resolved setting
    assert any("resolved: per_device_train_batch_size 2, gradient_accumulation_steps 4" in line for line in lines)

    # training: what it runs with, and its fingerprint, come from the resolved values
    used = autobatch.apply_resolved(s, resolved)["training"]
    assert (used["per_device_train_batch_size"], used["gradient_accumulation_steps"], used["gradient_checkpointing"]) == (2, 4, False)
    with pytest.raises(ConfigError, match="--memory"):
        autobatch.apply_resolved(s, None)


def test_preflight_refuses_when_nothing_fits_unless_forced(shape, model_files, tmp_path):
    model_dir, accelerate = model_files
    s = auto(rows=8, device_gib=0.01)
    with pytest.raises(ConfigError, match="config error at 'memory': the run will not fit"):
        preflight(model_dir, accelerate, s, tmp_path / "memory.json", log=lambda *a: None)
    assert not (tmp_path / "memory.json").exists()
    forced = auto(rows=8, device_gib=0.01, force=True)
    report = preflight(model_dir, accelerate, forced, tmp_path / "memory.json", log=lambda *a: None)
    resolved = report["resolved"]
    assert resolved["fits"] is False and report["declared"]["over_budget"]
    assert (resolved["per_device_train_batch_size"], resolved["gradient_checkpointing"]) == (1, True)


def test_the_training_fingerprint_includes_the_resolved_batch(shape):
    train = pytest.importorskip("shardtune.train.entry")
    s = auto(rows=8)
    values = lambda batch: {"per_device_train_batch_size": batch, "gradient_accumulation_steps": 8 // batch, "gradient_checkpointing": False}  # noqa: E731
    two = train.fingerprint(autobatch.apply_resolved(s, values(2)), "data")
    four = train.fingerprint(autobatch.apply_resolved(s, values(4)), "data")
    assert two != four
    assert two == train.fingerprint(autobatch.apply_resolved(s, values(2)), "data")
    # the same batch, given as numbers instead of auto: checkpoints stay resumable
    fixed = {**s, "training": {**s["training"], "per_device_effective_batch_size": None}}
    assert two == train.fingerprint(autobatch.apply_resolved(fixed, values(2)), "data")


def test_the_model_card_and_run_record_show_the_resolved_values(tmp_path):
    from shardtune.publish import model_card
    from shardtune.report.runinfo import write_run_info

    s = settings_of(
        {"per_device_train_batch_size": "auto", "per_device_effective_batch_size": 8, "gradient_checkpointing": "auto"}
    )
    s = {**s, "hub": {**s["hub"], "repo_id": "me/demo"}}
    resolved = {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 4,
        "gradient_checkpointing": False,
        "auto": ["training.per_device_train_batch_size", "training.gradient_checkpointing"],
    }
    card = model_card.render(run="a", settings=s, repo_id="me/demo", done={"resolved": resolved}, versions={})
    assert "| batch size per device × accumulation | 2 × 4 (auto) |" in card
    assert "| gradient checkpointing | False (auto) |" in card
    assert "per_device_train_batch_size: auto" not in card

    done = tmp_path / "done.json"
    done.write_text(json.dumps({"resolved": resolved}))
    info = write_run_info("a", s, done, tmp_path / "adapter", tmp_path / "model", tmp_path / "data", tmp_path / "info.json")
    assert info["settings"]["training"]["per_device_train_batch_size"] == 2
    assert info["settings"]["training"]["gradient_accumulation_steps"] == 4
    assert info["training"]["resolved"]["auto"] == resolved["auto"]


def test_a_gpu_run_is_estimated_for_the_gpus_its_training_job_asks_for(model_files, tmp_path):
    model_dir, accelerate = model_files  # written where no GPU is visible: 2 ranks
    s = auto(rows=8, device_gib=40)
    report = preflight(model_dir, accelerate, s, tmp_path / "memory.json", log=lambda *a: None, gpus_planned=4)
    assert report["world_size"] == 4
    # and accounted as GPU ranks (CUDA context and caching allocator), not as this node's CPU ranks
    assert report["on_cuda"] and report["cpu_allocator"] is None
    assert report["device_gib"] > report["device_allocated_gib"] * 1.2
    local = preflight(model_dir, accelerate, s, tmp_path / "memory.json", log=lambda *a: None)
    assert local["world_size"] == WORLD and not local["on_cuda"]
