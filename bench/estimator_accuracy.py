"""The pre-flight memory estimate (shardtune.plan.memory) against what was measured.

1. CPU runs here: every shardtune run the other bench scripts made under --work (each leaves
   done.json, with peak_memory_gib_per_rank, and run.json naming its settings and model) is
   compared with estimate(model_shape(...), settings, world_size): device_gib (what
   memory.json reports and checks) against the measured peak RSS per rank.
2. The source guide's Llama-2-70B figures, from the presets in configs/ (no run): LoRA on
   8x80GB, 72-80 GB per GPU; QLoRA on 2 GPUs, 19.6 GB per GPU + ~107 GB CPU RAM with CPU
   offload, 35.6 GB per GPU without.

Errors are (estimate - measured) / measured. The guide says GB; its figures are read as GiB
(as tests/test_memory.py does); reading them as 10^9 bytes would make every estimate 7.4%
further above them.

    python bench/estimator_accuracy.py              # after the other bench scripts
    python bench/estimator_accuracy.py --guide-only
"""

import argparse
import json
from pathlib import Path

import benchlib as bl

GUIDE = [
    # (case, preset, overrides, world size, what, low GB, high GB)
    ("LoRA 70B, 8 GPUs", "llama2-70b-lora-fsdp", {}, 8, "device_gib", 72.0, 80.0),
    ("QLoRA 70B, 2 GPUs, CPU offload", "llama2-70b-qlora-fsdp", {}, 2, "device_gib", 19.6, 19.6),
    ("QLoRA 70B, 2 GPUs, CPU offload: CPU RAM", "llama2-70b-qlora-fsdp", {}, 2, "cpu_gib", 107.0, 107.0),
    ("QLoRA 70B, 2 GPUs, no offload", "llama2-70b-qlora-fsdp", {"fsdp": {"offload_params": False}}, 2, "device_gib", 35.6, 35.6),
]


def llama2_70b():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
    )


def error_pct(estimate, low, high):
    """0 inside [low, high], else the relative distance to the nearer end, in percent."""
    if low <= estimate <= high:
        return 0.0
    target = low if estimate < low else high
    return 100 * (estimate - target) / target


def guide_rows():
    import yaml

    from shardtune.config import deep_merge, resolve_runs
    from shardtune.plan.memory import estimate
    from shardtune.plan.shape import model_shape

    rows = []
    for case, preset, overrides, world, what, low, high in GUIDE:
        config = yaml.safe_load((bl.REPO / "configs" / f"{preset}.yaml").read_text())
        # publishing does not change memory
        config = deep_merge(config, {"hub": {"push": False, "repo_id": None}})
        (settings,) = resolve_runs(deep_merge(config, overrides)).values()
        report = estimate(model_shape(llama2_70b(), settings["lora"]), settings, world)
        value = report[what]
        rows.append({
            "case": case,
            "guide": f"{low:g}" if low == high else f"{low:g}-{high:g}",
            "estimate": value,
            "error_pct": error_pct(value, low, high),
            "error_pct_if_1e9": error_pct(value * 2**30 / 1e9, low, high),
            "breakdown": report["device_breakdown_gib" if what == "device_gib" else "cpu_breakdown_gib"],
        })
    return rows


def cpu_rows(work):
    from shardtune.plan.memory import CPU_RANK_LIBRARIES_GIB, estimate
    from shardtune.plan.shape import model_shape

    rows = []
    for record in sorted(Path(work).rglob("run.json")):
        run = json.loads(record.read_text())
        done = record.parent / "done.json"
        records = [json.loads(p.read_text()) for p in sorted(record.parent.glob("timer.rank*.json"))]
        if done.is_file():  # a shardtune run: done.json's peak_memory_gib_per_rank
            peaks = json.loads(done.read_text())["peak_memory_gib_per_rank"]
            measured = max(peaks)
            if records and all(r["peak_reset"] for r in records):  # done.json then holds the training peak only
                measured = max(max(r["peak_before_train_gib"], r["peak_train_gib"]) for r in records)
        elif records:  # a reference run: the same ru_maxrss, from the step timer
            measured = max(max(r["peak_before_train_gib"], r["peak_train_gib"]) for r in records)
            peaks = [None] * len(records)
        else:
            continue
        settings = json.loads(Path(run["settings"]).read_text())
        # the C allocator the run's ranks had (done.json or the step timer say; runs from before
        # training.allocator had glibc's)
        allocator = json.loads(done.read_text()).get("allocator") if done.is_file() else None
        allocator = allocator or next((r["allocator"] for r in records if r.get("allocator")), None) or "system"
        settings = {**settings, "training": {**settings["training"], "allocator": allocator}}
        if run.get("path", "ours").startswith("reference"):
            # the estimate of the same settings; the recipe's attention is eager (no flash-attn here)
            attn = "sdpa" if run["path"].endswith("sdpa") else "eager"
            settings = {**settings, "model": {**settings["model"], "attn_implementation": attn}}
        if "ddp" in run.get("path", ""):
            settings = {**settings, "fsdp": {**settings["fsdp"], "sharding_strategy": "NO_SHARD"}}
        reference = run.get("path", "ours").startswith("reference")
        # the recipe's script batches through TRL's padding-free collator: one flattened sequence
        # of batch x L tokens, whatever the attention (shardtune keeps [batch, L] rows for sdpa/eager)
        report = estimate(model_shape(run["model_files"], settings["lora"]), settings, len(peaks), flattened=reference or None)
        variant = run.get("path", "ours")
        # runs with a fixed 128 KiB mmap threshold return freed memory at once: their RSS follows
        # the live memory, compared with the estimate before the C allocator's retention
        live = "mmap-threshold" in variant and "4m" not in variant and "while-loading" not in variant
        estimated = report["device_allocated_gib"] + CPU_RANK_LIBRARIES_GIB if live else report["device_gib"]
        t = settings["training"]
        rows.append({
            "run": str(record.parent.relative_to(work)),
            "path": run.get("path", "ours"),
            "attention": settings["model"]["attn_implementation"],
            "allocator": allocator,
            "model": Path(run["model_files"]).name,
            "batch": t["per_device_train_batch_size"],
            "checkpointing": t["gradient_checkpointing"],
            "sharding": settings["fsdp"]["sharding_strategy"],
            "measured": measured,
            "compared_with": "live (RSS follows live memory)" if live else "device_gib",
            "estimate": estimated,
            "error_pct": 100 * (estimated - measured) / measured,
            "breakdown": report["device_breakdown_gib"],
        })
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=bl.DEFAULT_WORK, help="where the other bench scripts ran")
    p.add_argument("--guide-only", action="store_true")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    result = {"guide": guide_rows()}
    print("The guide's Llama-2-70B figures (GB read as GiB):")
    print(bl.table(result["guide"], [("case", "case", None), ("guide", "guide GB", None), ("estimate", "estimate GiB", "{:.1f}"), ("error_pct", "error", "{:+.1f}%"),
        ("error_pct_if_1e9", "error if GB = 10^9 B", "{:+.1f}%"),
    ]))
    if not args.guide_only:
        result["cpu"] = cpu_rows(args.work)
        print()
        print(f"CPU runs under {args.work}: estimate device_gib against measured peak RSS per rank ({bl.machine()}):")
        print(bl.table(result["cpu"], [
            ("run", "run", None), ("attention", "attention", None), ("allocator", "allocator", None), ("model", "model", None), ("batch", "batch", None), ("checkpointing", "ckpt", None),
            ("measured", "measured GiB", "{:.2f}"), ("estimate", "estimate GiB", "{:.2f}"), ("compared_with", "estimate", None), ("error_pct", "error", "{:+.0f}%"),
        ]))
    out = args.out or args.work / "estimator_accuracy.json"
    bl.write_json(out, result)
    print(f"results: {out}")
    return result


if __name__ == "__main__":
    main()
