"""The pre-flight memory estimate, against the source guide's 70B figures, and the refusal
of a run that cannot fit."""

from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig

from shardtune.config import ConfigError, deep_merge, resolve_runs
from shardtune.plan.fit import check_fits
from shardtune.plan.memory import (
    CONTEXT_GIB,
    CPU_ALLOCATOR_RETENTION,
    CPU_RANK_LIBRARIES_GIB,
    CUDA_TRANSIENT_RESERVE,
    GIB,
    PERSISTENT_TERMS,
    _attention_scores,
    _layer_saved_parts,
    _pow2ceil,
    estimate,
)
from shardtune.plan.shape import model_shape

REPO = Path(__file__).resolve().parents[1]
LLAMA2_70B = LlamaConfig(
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=80,
    num_attention_heads=64,
    num_key_value_heads=8,
    vocab_size=32000,
)


def preset(name, **overrides):
    config = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    (settings,) = resolve_runs(deep_merge(config, overrides)).values()
    return settings


def test_llama2_70b_parameter_count_is_right():
    shape = model_shape(LLAMA2_70B, {"target_modules": "all-linear", "r": 8})
    assert 68.9e9 < shape["params"] < 69.1e9  # Llama-2-70B: 68.98B parameters
    assert shape["layers"] == 80


@pytest.mark.parametrize(
    "name, overrides, world, what, low, high",
    [
        # guide: 72-80 GB per GPU for LoRA on 8x H100
        ("llama2-70b-lora-fsdp", {}, 8, "device_gib", 72, 80),
        # guide: ~107 GB of CPU RAM for QLoRA on 2 GPUs with CPU offload
        ("llama2-70b-qlora-fsdp", {}, 2, "cpu_gib", 107, 107),
        # guide: 35.6 GB per GPU for QLoRA on 2 GPUs without CPU offload
        ("llama2-70b-qlora-fsdp", {"fsdp": {"offload_params": False}}, 2, "device_gib", 35.6, 35.6),
        # guide: 19.6 GB per GPU for QLoRA on 2 GPUs with CPU offload
        ("llama2-70b-qlora-fsdp", {}, 2, "device_gib", 19.6, 19.6),
    ],
)
def test_estimate_stays_within_15_percent_of_the_guides_figures(name, overrides, world, what, low, high):
    """A calibration guard, not a validation: the GPU caching allocator's reserve factor
    (CUDA_TRANSIENT_RESERVE) was fitted to these same figures, so this only keeps a change of
    the estimate from drifting away from them. The independent checks are the CPU runs
    measured below (test_activation_peaks_match_a_measured_forward_and_backward) and, on a GPU,
    bench/gpu_mfu.py, whose done.json records the reserved and allocated peaks per rank."""
    settings = preset(name, **overrides)
    report = estimate(model_shape(LLAMA2_70B, settings["lora"]), settings, world)
    assert low * 0.85 <= report[what] <= high * 1.15, (report[what], report["device_breakdown_gib"], report["cpu_breakdown_gib"])


def test_base_weights_are_counted_in_the_dtype_they_load_in():
    auto = preset("llama2-70b-lora-fsdp")  # model.dtype auto: float32 unless QLoRA
    bf16 = preset("llama2-70b-lora-fsdp", model={"dtype": "bfloat16"})
    shape = model_shape(LLAMA2_70B, auto["lora"])
    fp32_shard = estimate(shape, auto, 8)["device_breakdown_gib"]["base_weights"]
    assert fp32_shard == pytest.approx(shape["params"] * 4 / 8 / GIB)
    assert estimate(shape, bf16, 8)["device_breakdown_gib"]["base_weights"] == pytest.approx(fp32_shard / 2)
    # mixed precision gathers layers in bf16 whatever the stored dtype
    gathered = estimate(shape, auto, 8)["device_breakdown_gib"]["gathered_layers"]
    assert gathered == pytest.approx(estimate(shape, bf16, 8)["device_breakdown_gib"]["gathered_layers"], rel=0.15)


def test_eager_attention_keeps_probabilities_per_row():
    """rows x heads x L^2: the fp32 softmax output and its bf16 copy are kept; in backward the
    probabilities' bf16 gradient, its fp32 cast and softmax's input gradient join them. A
    flattened batch would score (rows x L)^2 per head, rows times more."""
    sdpa = preset("llama2-70b-lora-fsdp", model={"attn_implementation": "sdpa"})
    eager = preset("llama2-70b-lora-fsdp", model={"attn_implementation": "eager"})
    shape = model_shape(LLAMA2_70B, sdpa["lora"])
    rows, length, heads = 8, 2048, 64
    scores = rows * heads * length**2
    assert _attention_scores(shape, eager, 2, rows, length) == (scores * (4 + 2), scores * (2 + 4 + 4))
    assert _attention_scores(shape, eager, 2, 1, rows * length)[0] == rows * scores * 6
    assert _attention_scores(shape, sdpa, 2, rows, length) == (rows * length**2 * 2, 0)  # sdpa's additive mask
    with_probs = estimate(shape, eager, 8)
    assert with_probs["device_gib"] > estimate(shape, sdpa, 8)["device_gib"] + scores * 6 * 1.2 / GIB
    flat = estimate(shape, eager, 8, flattened=True)["device_breakdown_gib"]["layer_working_set"]
    assert flat > 5 * with_probs["device_breakdown_gib"]["layer_working_set"]  # rows x the probabilities
    # without checkpointing every layer keeps them
    no_ckpt = preset("llama2-70b-lora-fsdp", model={"attn_implementation": "eager"}, training={"gradient_checkpointing": False})
    no_ckpt_sdpa = preset("llama2-70b-lora-fsdp", model={"attn_implementation": "sdpa"}, training={"gradient_checkpointing": False})
    kept = estimate(shape, no_ckpt, 8)["device_breakdown_gib"]["activations"] - estimate(shape, no_ckpt_sdpa, 8)["device_breakdown_gib"]["activations"]
    # per layer as above; the shared mask: eager's in bf16 against sdpa's bool
    assert kept == pytest.approx((80 * (scores * 6 - rows * length**2 * 2) + rows * length**2 * (2 - 1)) / GIB, rel=0.01)


def tiny_lora_model(attn):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LlamaConfig(
        hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, attn_implementation=attn,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    lora = {"r": 8, "target_modules": "all-linear"}
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"))
    return config, lora, peft


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mixed", [False, True])
def test_the_per_layer_activation_count_matches_what_autograd_keeps(attn, mixed, monkeypatch):
    """Bytes saved for backward by one decoder layer of a LoRA model on CPU (per-row [batch, L]
    packed rows; float32, or bf16 weights and autocast with float32 adapters as in bf16 mixed
    precision), counted with saved-tensor hooks, against the estimate's count."""
    import contextlib

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config, lora, model = tiny_lora_model(attn)
    if mixed:
        model = model.to(torch.bfloat16)
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    model.train()
    rows, length = 2, 512
    ids = torch.randint(0, 128, (rows, length))
    positions = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)]).repeat(rows, 1)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_by(layers):
        seen = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in params:
                seen[storage.data_ptr()] = storage.nbytes()
            return t

        model.base_model.model.model.layers = full[:layers]
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mixed else contextlib.nullcontext()
        with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, position_ids=positions, labels=ids)
        return sum(seen.values())

    full = model.base_model.model.model.layers
    measured = saved_by(2) - saved_by(1)
    model.base_model.model.model.layers = full
    settings = preset("llama2-70b-lora-fsdp", model={"attn_implementation": attn}, training={"bf16": mixed}, fsdp={"mixed_precision": "bf16" if mixed else "no"})
    shape, act = model_shape(config, lora), 2 if mixed else 4
    counted = length * rows * sum(_layer_saved_parts(shape, settings, act, cuda=False))
    counted += _attention_scores(shape, settings, act, rows, length)[0]
    # the count is deterministic for given library versions; leaving out eager's probabilities
    # would put it 18% low, sdpa's per-layer mask 6%
    assert counted == pytest.approx(measured, rel=0.05), (counted, measured)


def test_cpu_ranks_count_their_libraries_not_a_cuda_context(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    settings = preset("llama2-70b-lora-fsdp", model={"attn_implementation": "sdpa"}, resources={"fsdp_train": {"gpu": 0}})
    shape = model_shape(LLAMA2_70B, settings["lora"])
    report = estimate(shape, settings, 8)
    assert not report["on_cuda"]
    assert report["device_gib"] == pytest.approx(
        report["device_allocated_gib"] * CPU_ALLOCATOR_RETENTION[report["cpu_allocator"]] + CPU_RANK_LIBRARIES_GIB
    )
    # FSDP1 on CPU ranks: the launcher turns cpu_ram_efficient_loading off, every rank reads the
    # whole fp32 model
    assert report["cpu_peak_phase"] == "loading"
    assert report["cpu_breakdown_gib"]["loading"] == pytest.approx(8 * shape["params"] * 4 / 2**30, rel=0.01)
    # under FSDP2 only rank 0 reads it; a CPU rank's memory is host memory: the CPU estimate is
    # the ranks' (their training peak here)
    fsdp2 = estimate(shape, deep_merge(settings, {"fsdp": {"version": 2, "forward_prefetch": False}}), 8)
    assert fsdp2["cpu_breakdown_gib"]["loading"] == pytest.approx(shape["params"] * 4 / 2**30, rel=0.01)
    assert fsdp2["cpu_peak_phase"] == "training"
    assert fsdp2["cpu_gib"] == pytest.approx(8 * fsdp2["device_gib"])
    glibc = estimate(shape, deep_merge(settings, {"training": {"allocator": "system"}}), 8)
    assert glibc["cpu_allocator"] == "system"
    assert glibc["device_gib"] == pytest.approx(glibc["device_allocated_gib"] * 1.65 + CPU_RANK_LIBRARIES_GIB)
    flash = estimate(shape, preset("llama2-70b-lora-fsdp"), 8)  # flash attention: a GPU run
    assert flash["on_cuda"]
    persistent = sum(flash["device_breakdown_gib"][k] for k in PERSISTENT_TERMS)
    transient = flash["device_allocated_gib"] - persistent
    assert persistent > 30 and transient > 30  # fp32 shards; checkpoints and the recomputed layer
    assert flash["device_gib"] == pytest.approx(persistent + transient * CUDA_TRANSIENT_RESERVE + CONTEXT_GIB)


def test_offloaded_shards_and_their_gradient_shards_are_pinned_in_power_of_two_blocks():
    settings = preset("llama2-70b-qlora-fsdp")
    shape = model_shape(LLAMA2_70B, settings["lora"])
    cpu = estimate(shape, settings, 2)["cpu_breakdown_gib"]
    # a decoder layer packs 855.6M weights into 428 MB of bf16: 204 MiB per rank, pinned as 256 MiB;
    # the root unit (embeddings, LM head, norm: 524M bf16 weights) 500 MiB per rank, pinned as 512
    per_rank = 80 * 256 / 1024 + 512 / 1024 + shape["lora_params"] * 2 / 2 / GIB
    assert cpu["offloaded"] == pytest.approx(2 * 2 * per_rank, rel=1e-6)  # 2 ranks x (shard + grad shard)
    assert cpu["unpinned_shards"] == pytest.approx(2 * (80 * 204.0 + 500.0) / 1024, rel=0.01)
    assert _pow2ceil(3) == 4 and _pow2ceil(4) == 4 and _pow2ceil(2**20 + 1) == 2**21
    # FSDP2 pins parameter by parameter and keeps no gradient shards for frozen weights
    fsdp2 = estimate(shape, preset("llama2-70b-qlora-fsdp", fsdp={"version": 2}), 2)["cpu_breakdown_gib"]
    assert fsdp2["unpinned_shards"] == 0
    assert cpu["unpinned_shards"] < fsdp2["offloaded"] < cpu["offloaded"] / 2  # exact < per-parameter rounding < per-unit


def test_qlora_quantization_constants_stay_on_the_gpu_with_offload():
    on = preset("llama2-70b-qlora-fsdp")
    off = preset("llama2-70b-qlora-fsdp", fsdp={"offload_params": False})
    shape = model_shape(LLAMA2_70B, on["lora"])
    with_offload, without = estimate(shape, on, 2), estimate(shape, off, 2)
    constants = shape["linear_params"] * (1 / 64 + 4 / (64 * 256)) / GIB  # nested quantization
    assert with_offload["device_breakdown_gib"]["quant_state"] == pytest.approx(constants)
    assert without["device_breakdown_gib"]["quant_state"] == pytest.approx(constants)
    # the 4-bit weights load whole onto each GPU before FSDP shards them
    assert with_offload["device_load_gib"] > with_offload["device_gib"]


def test_a_4bit_model_that_cannot_load_whole_onto_each_gpu_is_refused():
    """transformers 5 quantizes the whole model onto each rank's GPU before FSDP shards it: the
    guide's 70B QLoRA run (4-bit weights and constants: ~34 GiB) trains in under 24 GiB per GPU
    but cannot load on 24 GB cards. More GPUs do not help, so the message says so."""
    settings = preset("llama2-70b-qlora-fsdp")
    shape = model_shape(LLAMA2_70B, settings["lora"])
    report = estimate(shape, settings, 2)
    packed = (shape["linear_params"] * 0.5 + (shape["params"] - shape["linear_params"]) * 2) / GIB
    constants = report["device_breakdown_gib"]["quant_state"]
    assert report["device_load_gib"] == pytest.approx(packed + constants + CONTEXT_GIB)
    assert report["device_gib"] < 22.35  # a 24 GB card: what training needs fits
    with pytest.raises(ConfigError, match="while loading.*loads whole onto each GPU.*more GPUs do not help") as refused:
        check_fits(report, device_gib=22.35, cpu_gib=None, force=False)
    assert "batch size" not in str(refused.value)  # training fits: no advice about it
    assert check_fits(report, device_gib=22.35, cpu_gib=None, force=True)  # forced: a warning
    assert check_fits(report, device_gib=report["device_load_gib"], cpu_gib=None, force=False) == []
    # on a 40 GB card it loads
    assert check_fits(report, device_gib=37.0, cpu_gib=None, force=False) == []


def test_the_peak_is_the_larger_working_set_not_both():
    """A 70B model peaks in a decoder layer's working set, a narrow model with a huge vocabulary
    in the loss's logits; there, a layer working set that grows but stays below the logits
    leaves the peak all but unchanged (only the layers' own weights and activations add)."""
    settings = preset("llama2-70b-lora-fsdp")
    assert estimate(model_shape(LLAMA2_70B, settings["lora"]), settings, 8)["device_peak_phase"] == "layer_working_set"

    def narrow(intermediate):
        config = LlamaConfig(vocab_size=1_000_000, hidden_size=256, intermediate_size=intermediate,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
        return estimate(model_shape(config, settings["lora"]), settings, 8)

    small, wide = narrow(512), narrow(1024)
    assert small["device_peak_phase"] == wide["device_peak_phase"] == "logits"
    working_set_growth = wide["device_breakdown_gib"]["layer_working_set"] - small["device_breakdown_gib"]["layer_working_set"]
    assert working_set_growth > 0.1
    assert 0 < wide["device_allocated_gib"] - small["device_allocated_gib"] < 0.1 * working_set_growth


def test_offload_moves_weights_and_optimizer_state_to_cpu():
    on = preset("llama2-70b-qlora-fsdp")
    off = preset("llama2-70b-qlora-fsdp", fsdp={"offload_params": False})
    shape = model_shape(LLAMA2_70B, on["lora"])
    with_offload, without = estimate(shape, on, 2), estimate(shape, off, 2)
    assert with_offload["device_breakdown_gib"]["base_weights"] == 0
    assert with_offload["device_gib"] < without["device_gib"] - 15
    assert with_offload["cpu_breakdown_gib"]["offloaded"] > 30


def test_checkpointing_and_smaller_batches_lower_the_estimate():
    base = preset("llama2-70b-lora-fsdp")
    shape = model_shape(LLAMA2_70B, base["lora"])
    no_ckpt = preset("llama2-70b-lora-fsdp", training={"gradient_checkpointing": False})
    small = preset("llama2-70b-lora-fsdp", training={"per_device_train_batch_size": 2})
    assert estimate(shape, no_ckpt, 8)["device_gib"] > estimate(shape, base, 8)["device_gib"]
    assert estimate(shape, small, 8)["device_gib"] < estimate(shape, base, 8)["device_gib"]


def test_a_run_that_cannot_fit_is_refused_unless_forced():
    settings = preset("llama2-70b-lora-fsdp")
    report = estimate(model_shape(LLAMA2_70B, settings["lora"]), settings, 8)
    with pytest.raises(ConfigError, match="memory.force"):
        check_fits(report, device_gib=40, cpu_gib=None, force=False)
    assert check_fits(report, device_gib=40, cpu_gib=None, force=True)
    assert check_fits(report, device_gib=report["device_gib"] + 1, cpu_gib=None, force=False) == []


def test_the_guides_lora_run_is_warned_not_refused_on_an_80gb_card():
    """The estimate is within ~15% of real peaks, so a run estimated just above the card is let
    through with a warning: the guide ran this preset on 8 x 80GB (an H100 80GB reports 79.2 GiB)."""
    from shardtune.plan.fit import ESTIMATE_TOLERANCE, over_budget_warnings

    settings = preset("llama2-70b-lora-fsdp")
    report = estimate(model_shape(LLAMA2_70B, settings["lora"]), settings, 8)
    card = 85_029_158_912 / 2**30
    over = check_fits(report, device_gib=card, cpu_gib=None, force=False)
    if report["device_gib"] > card:
        assert over and "declared" in over[0]
        assert "tolerance" in over_budget_warnings(over, force=False)[0]
    edge = report["device_gib"] / (1 + ESTIMATE_TOLERANCE)
    assert check_fits(report, device_gib=edge * 1.001, cpu_gib=None, force=False)
    with pytest.raises(ConfigError, match="tolerance"):
        check_fits(report, device_gib=edge * 0.999, cpu_gib=None, force=False)


PEAK_SCRIPT = r"""
import json, re, sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

def status(key):
    return int(re.search(rf"{key}:\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

results = {}
for attn, ckpt in json.loads(sys.argv[1]):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=512, attn_implementation=attn)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    ids = torch.randint(0, 512, (2, 512))
    positions = torch.cat([torch.arange(256), torch.arange(256)]).repeat(2, 1)
    model(input_ids=ids[:1, :64], position_ids=positions[:1, :64], labels=ids[:1, :64]).loss.backward()
    model.zero_grad(set_to_none=True)
    open("/proc/self/clear_refs", "w").write("5")
    base = status("VmRSS")
    model(input_ids=ids, position_ids=positions, labels=ids).loss.backward()
    results[f"{attn}-{ckpt}"] = status("VmHWM") - base
    del model
print(json.dumps(results))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak RSS reset")
def test_activation_peaks_match_a_measured_forward_and_backward(monkeypatch):
    """Peak resident memory of one forward and backward of a LoRA Llama (8 layers, 2 x 512
    tokens, float32, CPU) above the idle model, with glibc's mmap threshold at 128 KiB so that
    freed blocks go back at once (RSS follows live memory), against the estimate's activations
    plus its working set: checkpointing keeps one recomputed layer, eager its probabilities."""
    import json
    import os
    import subprocess
    import sys

    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [["sdpa", True], ["eager", True], ["eager", False]]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1", "LD_PRELOAD": ""}
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, json.dumps(cases)], env=env, capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, vocab_size=512)
    for attn, ckpt in cases:
        settings = preset(
            "llama2-70b-lora-fsdp",
            model={"attn_implementation": attn},
            training={"bf16": False, "gradient_checkpointing": ckpt, "per_device_train_batch_size": 2},
            fsdp={"mixed_precision": "no"},
            data={"max_seq_len": 512},
        )
        b = estimate(model_shape(config, settings["lora"]), settings, 1)["device_breakdown_gib"]
        estimated = (b["activations"] + max(b["layer_working_set"], b["logits"])) * GIB
        assert estimated == pytest.approx(measured[f"{attn}-{ckpt}"], rel=0.15), (attn, ckpt, estimated / GIB, measured)


def test_training_refuses_a_4bit_load_the_visible_gpu_cannot_hold_before_loading(monkeypatch):
    """With no memory.device_gib the training job checks the card it sees, before it loads."""
    import torch

    from shardtune.train import entry as train

    settings = preset("llama2-70b-qlora-fsdp")
    report = estimate(model_shape(LLAMA2_70B, settings["lora"]), settings, 2)
    report["declared"] = {"device_gib": None, "cpu_gib": None, "force": False}
    card = type("Props", (), {"total_memory": 24 * 10**9})()  # a 24 GB card: 22.35 GiB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: card)
    logged = []
    with pytest.raises(ConfigError, match=r"needs ~34\.9 GiB per device while loading, 22\.4 GiB on this GPU"):
        train.check_device_memory(report, logged.append)
    assert "per device while loading: 34.87 GiB" in "\n".join(logged)
    card.total_memory = 48 * 10**9
    train.check_device_memory(report, logged.append)  # a 48 GB card holds it
