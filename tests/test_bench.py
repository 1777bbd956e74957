"""Smoke tests of the benchmark scripts: argument parsing, the reference script's flags, and the
same-budget batch picking. Nothing here is timed, and no training runs."""

import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))

import autobatch  # noqa: E402
import gpu_acceptance  # noqa: E402
import throughput  # noqa: E402

import benchlib  # noqa: E402

SCRIPTS = [
    "throughput", "autobatch", "sharding_memory", "snakemake_overhead", "estimator_accuracy", "gpu_mfu", "attention_micro", "profile_step",
    "gpu_acceptance", "load_memory",
]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_bench_script_answers_help(script):
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{script}.py"), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout


def test_throughput_refuses_an_unknown_path():
    with pytest.raises(SystemExit):
        throughput.parse_args(["--paths", "ours,nonsense"])
    assert throughput.parse_args(["--paths", "ours,reference"]).paths == ["ours", "reference"]


def bench_settings(tmp_path, **training):
    config = benchlib.run_config(tmp_path / "model", tmp_path / "data", 100, 512, 8, 10, training=training)
    return benchlib.settings_of(config)


def test_the_reference_gets_the_recipes_flags_for_the_same_settings(tmp_path):
    pytest.importorskip("trl")
    import reference_train
    from transformers import HfArgumentParser
    from trl import SFTConfig

    settings = bench_settings(tmp_path, gradient_accumulation_steps=4, gradient_checkpointing=True)
    fx = {"model_files": tmp_path / "model", "recipe_data": tmp_path / "data"}
    args = benchlib.reference_args(fx, settings, tmp_path / "run", tmp_path / "timer.json", attn="sdpa")
    assert Path(args[0]).name == "reference_train.py"
    parser = HfArgumentParser(
        (reference_train.ModelArguments, reference_train.DataTrainingArguments, SFTConfig, reference_train.BenchArguments)
    )
    model, data, training, bench = parser.parse_args_into_dataclasses([str(a) for a in args[1:]])
    assert (model.lora_r, model.lora_alpha, model.lora_dropout) == (8, 16, 0.1)
    assert model.lora_target_modules == "all-linear" and model.use_peft_lora and not model.use_4bit_quantization
    assert model.chat_template_format == "chatml"
    assert training.packing and training.dataset_text_field == "content" and training.max_length == 512
    assert training.per_device_train_batch_size == 8 and training.gradient_accumulation_steps == 4
    assert training.gradient_checkpointing and not model.use_reentrant
    assert training.max_steps == 10 and training.seed == 100
    assert bench.attn_implementation == "sdpa" and not bench.final_save
    assert data.dataset_name == str(tmp_path / "data")


def test_ours_arguments_reach_shardtune_train_unchanged(tmp_path):
    fx = {"prepared": tmp_path / "prepared", "model": tmp_path / "model"}
    args = [str(a) for a in benchlib.ours_args(tmp_path / "s.json", fx, tmp_path / "run", tmp_path / "t.json", fix="flattened-batches")]
    assert Path(args[0]).name == "_ours.py"
    rest = args[args.index("--") + 1 :]
    assert rest[:2] == ["--settings", str(tmp_path / "s.json")]
    assert "--done" in rest and "--fix" in args[: args.index("--")]


TINY = LlamaConfig(
    hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, vocab_size=512
)


def test_pick_setting_takes_the_largest_batch_that_fits_without_checkpointing(tmp_path):
    from shardtune.plan.memory import estimate
    from shardtune.plan.shape import model_shape

    recipe = bench_settings(tmp_path, gradient_accumulation_steps=4, gradient_checkpointing=True)
    shape = model_shape(TINY, recipe["lora"])
    budget = estimate(shape, recipe, 2)["device_gib"]
    picked = autobatch.pick_setting(shape, recipe, 2, budget)
    assert picked["estimate_gib"] <= budget
    assert picked["per_device_train_batch_size"] * picked["gradient_accumulation_steps"] == 32
    if not picked["gradient_checkpointing"]:  # then the next larger divisor must not fit without it
        larger = picked["per_device_train_batch_size"] * 2
        if larger <= 32:
            trial = autobatch.with_training(
                recipe, per_device_train_batch_size=larger, gradient_accumulation_steps=32 // larger, gradient_checkpointing=False
            )
            assert estimate(shape, trial, 2)["device_gib"] > budget


def test_pick_setting_uses_checkpointing_only_when_nothing_fits_without_it(tmp_path):
    from shardtune.plan.memory import estimate
    from shardtune.plan.shape import model_shape

    recipe = bench_settings(tmp_path)
    shape = model_shape(TINY, recipe["lora"])
    roomy = autobatch.pick_setting(shape, recipe, 2, 1000.0)
    assert roomy["per_device_train_batch_size"] == 8 and not roomy["gradient_checkpointing"]
    one = autobatch.with_training(recipe, per_device_train_batch_size=1, gradient_accumulation_steps=8)
    without = estimate(shape, one, 2)["device_gib"]
    tight = autobatch.pick_setting(shape, recipe, 2, without * 0.999)
    assert tight is None or tight["gradient_checkpointing"]
    assert autobatch.pick_setting(shape, recipe, 2, 0.01) is None


def test_throughput_counts_only_steps_after_warmup():
    records = [{"steps": [{"t": 1.0, "tokens": 100}, {"t": 3.0, "tokens": 300}, {"t": 5.0, "tokens": 500}]}]
    result = benchlib.throughput(records, warmup=1)
    assert result["tokens_per_s"] == pytest.approx(100.0) and result["steps"] == 2
    with pytest.raises(ValueError):
        benchlib.throughput(records, warmup=3)


def test_gpu_flops_per_token_counts_forward_and_input_gradient():
    import gpu_mfu

    from shardtune.plan.shape import model_shape

    shape = model_shape(TINY, {"r": 8, "target_modules": "all-linear"})
    flops = gpu_mfu.flops_per_token(shape, 512)
    assert flops > 4 * shape["linear_params"]
    assert flops < 6 * shape["params"] + 12 * shape["layers"] * shape["hidden"] * 512


def test_every_variant_of_ours_names_a_known_fix_or_allocator(tmp_path):
    import sharding_memory

    import _ours

    fx = {"prepared": tmp_path, "model": tmp_path, "model_files": tmp_path, "recipe_data": tmp_path}
    settings = bench_settings(tmp_path)
    for path in throughput.PATHS:
        launch, (allocator, env) = throughput.launch_args(path, fx, tmp_path / "s.json", settings, tmp_path, tmp_path / "t.json")
        args = [str(a) for a in launch]
        fixes = [args[i + 1] for i, a in enumerate(args) if a == "--fix"]
        assert all(f in _ours.FIXES for f in fixes), (path, fixes)
        variant = path[len("ours-") :]
        assert bool(fixes) == (path.startswith("ours-") and variant not in benchlib.ALLOCATOR_VARIANTS), path
        if not path.startswith("ours") or variant.startswith("mmap"):  # the recipe and the glibc fixes: glibc
            assert (allocator, env) == ("system", {"LD_PRELOAD": ""}), path
    for path in sharding_memory.PATHS:
        if path.startswith("ours-") and path != "ours-no-shard-setting":
            assert path[len("ours-") :] in {**_ours.FIXES, **benchlib.ALLOCATOR_VARIANTS}, path


def test_bench_runs_ours_with_the_allocator_the_launcher_picks(tmp_path, monkeypatch):
    from shardtune.launch import allocator

    monkeypatch.setattr(allocator, "find_library", lambda name, env: f"/opt/lib{name}.so")
    settings = bench_settings(tmp_path)
    assert benchlib.allocator_env(settings)[0] == "tcmalloc"  # auto, CPU ranks
    assert benchlib.allocator_env(settings, "glibc") == ("system", {"LD_PRELOAD": ""})
    name, env = benchlib.allocator_env(settings, "jemalloc-10s")
    assert name == "jemalloc" and env["LD_PRELOAD"] == "/opt/libjemalloc.so" and "dirty_decay_ms:10000" in env["MALLOC_CONF"]


def test_the_no_sharding_baseline_asks_the_reference_for_plain_data_parallel(tmp_path):
    settings = bench_settings(tmp_path)
    fx = {"model_files": tmp_path, "recipe_data": tmp_path}
    assert "--bench_ddp=True" in benchlib.reference_args(fx, settings, tmp_path, tmp_path / "t.json", ddp=True)
    assert "--bench_ddp=True" not in benchlib.reference_args(fx, settings, tmp_path, tmp_path / "t.json")


def test_gpu_acceptance_runs_both_presets_under_both_fsdp_versions_changing_only_the_scale():
    """The plan (validated like a workflow config): each preset at TinyLlama-1.1B's shape, once
    under its own FSDP1 and once under FSDP2, everything else the preset's own."""
    import yaml

    settings = gpu_acceptance.main(["--plan"])["settings"]
    assert sorted(settings) == ["lora-fsdp1", "lora-fsdp2", "qlora-fsdp1", "qlora-fsdp2"]
    for run, s in settings.items():
        kind, version = run.split("-fsdp")
        preset = yaml.safe_load((REPO / f"configs/{gpu_acceptance.PRESETS[kind]}.yaml").read_text())
        assert s["fsdp"]["version"] == int(version)
        assert s["quantization"] == {**s["quantization"], **preset["quantization"]}
        for key in ("sharding_strategy", "offload_params", "sync_module_states", "cpu_ram_efficient_loading", "mixed_precision"):
            assert s["fsdp"][key] == preset["fsdp"][key], (run, key)
        for key in ("bf16", "gradient_checkpointing", "use_reentrant", "learning_rate", "lr_scheduler_type"):
            assert s["training"][key] == preset["training"].get(key, s["training"][key]), (run, key)
        assert s["model"]["builtin"]["hidden_size"] == 2048 and s["model"]["builtin"]["num_layers"] == 22
        assert s["fsdp"]["num_processes"] == s["resources"]["fsdp_train"]["gpu"] == 8  # no GPU here: the plan's 8
        assert s["model"]["attn_implementation"] == "auto" and not s["hub"]["push"]


def test_ranks_built_on_the_meta_device_train_what_reading_the_checkpoint_trains(tmp_path):
    """FSDP2 with cpu_ram_efficient_loading on 2 CPU ranks: rank 1 builds the model without
    reading it and gets rank 0's weights; the run equals one where every rank reads the
    checkpoint (training loss, and the probe logits after training)."""
    import load_memory

    results = load_memory.main(["--model", "tiny", "--steps", "2", "--work", str(tmp_path)])
    assert [r["how"] for r in results["ours"]["after_load"]] == ["read from disk", "on the meta device"]
    assert [r["how"] for r in results["every-rank-reads"]["after_load"]] == ["read from disk", "read from disk"]
    assert results["ours"]["train_loss"] == results["every-rank-reads"]["train_loss"] > 0
