"""Figure 3: peak memory per rank with FSDP full sharding against no sharding, for a model
whose weights dominate memory (LoRA on a ~0.75B-parameter fp32 base, short sequences, batch 1).

Runs (2 CPU ranks each, same model, data, batch and LoRA):
- ours: shardtune's training path, FSDP2 FULL_SHARD (the default), with the C allocator
  shardtune.launch picks (training.allocator: auto = tcmalloc on CPU ranks where installed);
- ours-glibc, ours-jemalloc, ours-tcmalloc, ...: ours with that allocator (LD_PRELOAD) and
  settings (benchlib.ALLOCATOR_VARIANTS); the glibc fixes below run on glibc;
- ours-mmap-threshold: ours + a proposed fix, a fixed glibc mmap threshold so that the memory
  of the full weights, freed once FSDP has sharded them, goes back to the system;
- ours-mmap-threshold-while-loading: the same while loading and wrapping, glibc's ceiling
  (32 MiB) from train begin (the training steps then allocate as they do today);
- ours-mmap-threshold-4m: a fixed 4 MiB threshold (weight matrices mapped, most activations
  from the heap);
- ours-release-weight-pages: ours + a proposed fix, the pages of the memory-mapped weights
  file dropped from the rank once each module is sharded (madvise), so that wrapping does not
  hold them and the shards together;
- ours-malloc-trim: ours + malloc_trim(0) at train begin (does not give that memory back);
- ours-no-shard-setting: shardtune with fsdp.sharding_strategy NO_SHARD (under FSDP2 it only
  turned off resharding after forward; the config now refuses it, and the run is skipped);
- reference-fsdp: the recipe's train.py under the same FSDP2 launch config;
- reference-ddp: the recipe's train.py as plain multi-process data parallel (same launch, FSDP
  shim not applied, so Accelerate runs MULTI_CPU data parallel): every rank holds the whole
  model, i.e. no sharding.

Peak memory is the resident set per rank (ru_maxrss): over the whole process (what
done.json's peak_memory_gib_per_rank reports: it includes loading the model) and over training
only (the count restarted when training starts, Linux clear_refs). transformers maps the
safetensors file and leaves frozen weights file-backed until something writes them, and two
ranks mapping the same file share those pages: RSS counts them in each rank, the
proportional set size (PSS, highest at a step end) counts them once over the ranks, so both
are reported, with the step-end RSS split into anonymous and file-backed memory.

    python bench/sharding_memory.py                 # the figure in BENCHMARKS.md
    python bench/sharding_memory.py --model tiny --steps 2 --max-seq-len 128   # smoke test
"""

import argparse
import shutil
from pathlib import Path

import benchlib as bl

PATHS = ["ours", *(f"ours-{v}" for v in bl.ALLOCATOR_VARIANTS), "ours-mmap-threshold", "ours-mmap-threshold-while-loading", "ours-mmap-threshold-4m", "ours-malloc-trim", "ours-release-weight-pages", "ours-no-shard-setting", "reference-fsdp", "reference-ddp"]


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
    tag = f"sharding-{args.model}"
    rows = []
    for path in args.paths:
        chosen = settings
        if path == "ours-no-shard-setting":
            from shardtune.config import ConfigError

            try:
                chosen = bl.settings_of(bl.run_config(
                    fx["model"], fx["dataset"], args.conversations, args.max_seq_len, args.batch, args.steps,
                    fsdp={"sharding_strategy": "NO_SHARD"},
                ))
            except ConfigError as err:  # the workflow refuses it now
                print(f"{path:22s} skipped: {err}", flush=True)
                continue
        run_dir = work / tag / path
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        timer = run_dir / "timer.json"
        settings_json = run_dir / "train_settings.json"
        bl.write_json(settings_json, chosen)
        accelerate_yaml = bl.write_accelerate_yaml(chosen, run_dir / "accelerate.yaml")
        env = None
        if path.startswith("ours"):
            variant = path[len("ours-"):] if path.startswith("ours-") else None
            fix = variant if variant not in bl.ALLOCATOR_VARIANTS and variant != "no-shard-setting" else None
            # ours runs with the allocator shardtune.launch picks, unless the path names one
            if fix and fix != "release-weight-pages":  # the glibc fixes run on glibc
                variant = "glibc"
            allocator, env = bl.allocator_env(chosen, variant if variant in bl.ALLOCATOR_VARIANTS else None)
            launch = bl.ours_args(settings_json, fx, run_dir, timer, fix=fix, reset_peak=True)
        else:
            allocator, env = "system", {"LD_PRELOAD": ""}
            launch = bl.reference_args(fx, settings, run_dir, timer, reset_peak=True, ddp=path == "reference-ddp")
        load = bl.load_average()
        # the recipe's data-parallel run sometimes aborts while exiting, after training
        finished = bl.timer_files(timer, 2) if path == "reference-ddp" else ()
        wall = bl.launch(accelerate_yaml, launch, run_dir / "log.txt", finished=finished, env=env)
        bl.record_run(run_dir, settings_json, fx, path)
        records = bl.read_timer(timer, 2)
        row = {
            "path": path,
            "allocator": allocator,
            "allocator_loaded": sorted({r.get("allocator") for r in records}, key=str),
            "malloc_env": {k: v for k, v in env.items() if v},
            "load_before": load,
            "wall_s": wall,
            "process_peak_gib": max(max(r["peak_before_train_gib"], r["peak_train_gib"]) for r in records),
            "train_peak_gib": max(r["peak_train_gib"] for r in records) if all(r["peak_reset"] for r in records) else None,
            # physical share: file-backed (mmap'd) weights shared by the ranks count once in all
            "pss_gib": max(max(step.get("pss_gib", 0) for step in r["steps"]) for r in records) or None,
            "anon_gib": max(max(step.get("rss_anon_gib", 0) for step in r["steps"]) for r in records) or None,
            "file_gib": max(max(step.get("rss_file_gib", 0) for step in r["steps"]) for r in records) or None,
            "per_rank": [{k: r[k] for k in ("rank", "peak_before_train_gib", "peak_train_gib", "peak_reset")} for r in records],
        }
        rows.append(row)
        print(f"{path:22s} [{'/'.join(map(str, row['allocator_loaded']))}] process peak {row['process_peak_gib']:.2f} GiB/rank, training peak "
              f"{row['train_peak_gib'] or float('nan'):.2f} GiB/rank, wall {wall:.0f} s, load {load}", flush=True)

    base = next((r for r in rows if r["path"] == "reference-ddp"), None)
    if base:
        for row in rows:
            row["process_ratio"] = row["process_peak_gib"] / base["process_peak_gib"]
            if row["train_peak_gib"] and base["train_peak_gib"]:
                row["train_ratio"] = row["train_peak_gib"] / base["train_peak_gib"]
            if row["pss_gib"] and base["pss_gib"]:
                row["pss_ratio"] = row["pss_gib"] / base["pss_gib"]
    from shardtune.plan.shape import model_shape

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
        ("anon_gib", "of it anonymous GiB", "{:.2f}"),
        ("file_gib", "of it file-backed GiB", "{:.2f}"),
        ("pss_gib", "PSS GiB/rank", "{:.2f}"),
        ("pss_ratio", "vs no sharding", "{:.2f}x"),
    ]))
    print(f"results: {out}")
    return rows


if __name__ == "__main__":
    main()
