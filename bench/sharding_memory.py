"""Figure 3: peak memory per rank with FSDP full sharding against no sharding, for a model
whose weights dominate memory (LoRA on a ~0.75B-parameter fp32 base, short sequences, batch 1).

Runs (2 CPU ranks each, same model, data, batch and LoRA):
- ours: shardtune's training path, FSDP2 FULL_SHARD (the default);
- ours-malloc-trim: ours + a proposed fix, freed heap memory returned after wrapping;
- ours-no-shard-setting: shardtune with fsdp.sharding_strategy NO_SHARD (under FSDP2 the
  config only turns off resharding after forward: the weights stay sharded);
- reference-fsdp: the recipe's train.py under the same FSDP2 launch config;
- reference-ddp: the recipe's train.py as plain multi-process data parallel (MULTI_CPU):
  every rank holds the whole model, i.e. no sharding.

Peak memory is the resident set per rank (ru_maxrss): over the whole process (what
done.json's peak_memory_gib_per_rank reports: it includes loading the model) and over training
only (the count restarted when training starts, Linux clear_refs).

    python bench/sharding_memory.py                 # the figure in BENCHMARKS.md
    python bench/sharding_memory.py --model tiny --steps 2 --max-seq-len 128   # smoke test
"""

import argparse
import shutil
from pathlib import Path

import benchlib as bl

PATHS = ["ours", "ours-malloc-trim", "ours-no-shard-setting", "reference-fsdp", "reference-ddp"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deep", choices=sorted(bl.MODEL_SPECS))
    p.add_argument("--max-seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (Adam state exists after the first)")
    p.add_argument("--conversations", type=int, default=2000)
    p.add_argument("--paths", default="ours,reference-ddp,reference-fsdp", help=f"comma-separated, from: {', '.join(PATHS)}")
    p.add_argument("--work", type=Path, default=bl.DEFAULT_WORK)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.paths = args.paths.split(",")
    unknown = [x for x in args.paths if x not in PATHS]
    if unknown:
        p.error(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    work = args.work
    fx = bl.fixtures(work, args.model, args.conversations, args.max_seq_len)
    config = bl.run_config(fx["model"], fx["dataset"], args.conversations, args.max_seq_len, args.batch, args.steps)
    settings = bl.settings_of(config)
    no_shard = bl.settings_of(bl.run_config(
        fx["model"], fx["dataset"], args.conversations, args.max_seq_len, args.batch, args.steps,
        fsdp={"sharding_strategy": "NO_SHARD"},
    ))
    tag = f"sharding-{args.model}"
    rows = []
    for path in args.paths:
        run_dir = work / tag / path
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        timer = run_dir / "timer.json"
        chosen = no_shard if path == "ours-no-shard-setting" else settings
        settings_json = run_dir / "train_settings.json"
        bl.write_json(settings_json, chosen)
        if path == "reference-ddp":
            accelerate_yaml = bl.write_ddp_yaml(run_dir / "accelerate.yaml")
        else:
            accelerate_yaml = bl.write_accelerate_yaml(chosen, run_dir / "accelerate.yaml")
        if path.startswith("ours"):
            fix = "malloc-trim" if path == "ours-malloc-trim" else None
            launch = bl.ours_args(settings_json, fx, run_dir, timer, fix=fix, reset_peak=True)
        else:
            launch = bl.reference_args(fx, settings, run_dir, timer, reset_peak=True)
        load = bl.load_average()
        wall = bl.launch(accelerate_yaml, launch, run_dir / "log.txt")
        if path.startswith("ours"):
            bl.record_run(run_dir, settings_json, fx)
        records = bl.read_timer(timer, 2)
        row = {
            "path": path,
            "load_before": load,
            "wall_s": wall,
            "process_peak_gib": max(max(r["peak_before_train_gib"], r["peak_train_gib"]) for r in records),
            "train_peak_gib": max(r["peak_train_gib"] for r in records) if all(r["peak_reset"] for r in records) else None,
            "per_rank": [{k: r[k] for k in ("rank", "peak_before_train_gib", "peak_train_gib", "peak_reset")} for r in records],
        }
        rows.append(row)
        print(f"{path:22s} process peak {row['process_peak_gib']:.2f} GiB/rank, training peak "
              f"{row['train_peak_gib'] or float('nan'):.2f} GiB/rank, wall {wall:.0f} s, load {load}", flush=True)

    base = next((r for r in rows if r["path"] == "reference-ddp"), None)
    if base:
        for row in rows:
            row["process_ratio"] = row["process_peak_gib"] / base["process_peak_gib"]
            if row["train_peak_gib"] and base["train_peak_gib"]:
                row["train_ratio"] = row["train_peak_gib"] / base["train_peak_gib"]
    from shardtune.memory import model_shape

    shape = model_shape(str(fx["model_files"]), settings["lora"])
    out = args.out or work / f"{tag}.json"
    bl.write_json(out, {"args": vars(args), "machine": bl.machine(), "shape": shape, "rows": rows})
    print()
    print(f"{bl.machine()}; model {args.model} ({shape['params'] / 1e6:.0f}M parameters, fp32 "
          f"{shape['params'] * 4 / 2**30:.2f} GiB), LoRA r8 all-linear, batch {args.batch}, max_seq_len {args.max_seq_len}")
    print(bl.table(rows, [
        ("path", "run", None),
        ("process_peak_gib", "process peak GiB/rank", "{:.2f}"),
        ("process_ratio", "vs no sharding", "{:.2f}x"),
        ("train_peak_gib", "training peak GiB/rank", "{:.2f}"),
        ("train_ratio", "vs no sharding", "{:.2f}x"),
    ]))
    print(f"results: {out}")
    return rows


if __name__ == "__main__":
    main()
