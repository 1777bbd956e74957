"""Figure 1: training throughput (non-pad tokens/s) of shardtune's training path against the
recipe's, at identical settings: same model, data, batch, LoRA, FSDP2 on 2 CPU ranks.

Runs are interleaved (ours, reference, ours, reference, ...) so that a change in the load of
a shared machine hits both; each run times a fixed number of optimizer steps after warm-up.

    python bench/throughput.py                      # the figure in BENCHMARKS.md
    python bench/throughput.py --model tiny --steps 4 --warmup 1 --repeats 1   # smoke test
"""

import argparse
import shutil
from pathlib import Path

import benchlib as bl

PATHS = {
    # name: (label, how to build the launch arguments)
    "ours": "shardtune (accelerate launch -m shardtune.train)",
    "ours-flattened": "shardtune with batches flattened padding-free (before per-row batches)",
    "ours-mmap-threshold": "shardtune + fixed glibc mmap threshold",
    "ours-mmap-threshold-while-loading": "shardtune + fixed mmap threshold while loading",
    "ours-mmap-threshold-4m": "shardtune + fixed 4 MiB mmap threshold",
    **{f"ours-{v}": f"shardtune with allocator variant {v} (benchlib.ALLOCATOR_VARIANTS)" for v in bl.ALLOCATOR_VARIANTS},
    "reference": "recipe train.py (eager attention: no flash-attn without a GPU)",
    "reference-sdpa": "recipe train.py with sdpa attention (ours' kernel)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(bl.MODEL_SPECS), help="model shape (benchlib.MODEL_SPECS)")
    p.add_argument("--batch", type=int, default=2, help="per-device batch size (packed rows)")
    p.add_argument("--accumulation", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps not timed")
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    p.add_argument("--conversations", type=int, default=10000, help="built-in data set size")
    p.add_argument(
        "--paths", default="ours,reference,reference-sdpa", help=f"comma-separated, from: {', '.join(PATHS)}"
    )
    p.add_argument("--work", type=Path, default=bl.DEFAULT_WORK)
    p.add_argument("--tag", help="run directory under --work (default: throughput-<model>-b<batch>)")
    p.add_argument("--out", type=Path, help="results JSON (default: <work>/<tag>.json)")
    args = p.parse_args(argv)
    args.paths = args.paths.split(",")
    unknown = [x for x in args.paths if x not in PATHS]
    if unknown:
        p.error(f"unknown path(s) {unknown}; choose from {', '.join(PATHS)}")
    return args


def launch_args(path, fx, settings_json, settings, run_dir, timer):
    """A run's launch arguments and (allocator, environment): ours with the allocator that
    shardtune.launch picks, or the variant the path names; the glibc fixes and the recipe on
    glibc."""
    if path.startswith("ours"):
        variant = path[len("ours-"):] if path != "ours" else None
        if variant in bl.ALLOCATOR_VARIANTS:
            return bl.ours_args(settings_json, fx, run_dir, timer), bl.allocator_env(settings, variant)
        fix = {"ours-flattened": "flattened-batches"}.get(path, variant)
        allocator = bl.allocator_env(settings, "glibc" if fix and fix.startswith("mmap") else None)
        return bl.ours_args(settings_json, fx, run_dir, timer, fix=fix), allocator
    attn = "sdpa" if path == "reference-sdpa" else None
    return bl.reference_args(fx, settings, run_dir, timer, attn=attn), ("system", {"LD_PRELOAD": ""})


def main(argv=None):
    args = parse_args(argv)
    work = args.work
    fx = bl.fixtures(work, args.model, args.conversations, args.max_seq_len)
    config = bl.run_config(
        fx["model"], fx["dataset"], args.conversations, args.max_seq_len, args.batch, args.steps,
        training={"gradient_accumulation_steps": args.accumulation},
    )
    settings = bl.settings_of(config)
    tag = args.tag or f"throughput-{args.model}-b{args.batch}"
    settings_json = work / tag / "train_settings.json"
    bl.write_json(settings_json, settings)
    accelerate_yaml = bl.write_accelerate_yaml(settings, work / tag / "accelerate.yaml")

    runs = []
    for round_ in range(args.repeats):
        order = args.paths if round_ % 2 == 0 else args.paths[::-1]
        for path in order:
            run_dir = work / tag / f"{path}-{round_}"
            timer = run_dir / "timer.json"
            shutil.rmtree(run_dir, ignore_errors=True)  # never resume an earlier run's checkpoint
            run_dir.mkdir(parents=True)
            load = bl.load_average()
            launch, (allocator, env) = launch_args(path, fx, settings_json, settings, run_dir, timer)
            wall = bl.launch(accelerate_yaml, launch, run_dir / "log.txt", env=env)
            bl.record_run(run_dir, settings_json, fx, path)
            records = bl.read_timer(timer, 2)
            result = {"path": path, "round": round_, "load_before": load, "wall_s": wall, **bl.throughput(records, args.warmup)}
            result["threads"] = records[0]["threads"]
            result["allocator"] = allocator
            result["allocator_loaded"] = sorted({r.get("allocator") for r in records}, key=str)
            runs.append(result)
            print(f"{path:15s} round {round_} [{'/'.join(map(str, result['allocator_loaded']))}]: {result['tokens_per_s']:8.0f} tokens/s, "
                  f"{result.get('tokens_per_cpu_s', float('nan')):6.0f} tokens/CPU-s, "
                  f"{result['s_per_step']:.2f} s/step, wall {wall:.0f} s, load {load}", flush=True)

    metrics = [m for m in ("tokens_per_s", "tokens_per_s_median_step", "tokens_per_cpu_s") if all(m in r for r in runs)]
    summary = {
        path: {m: bl.geomean(r[m] for r in runs if r["path"] == path) for m in metrics + ["wall_s"]} for path in args.paths
    }
    base = "ours" if "ours" in args.paths else args.paths[0]
    ratios = []
    for path in args.paths:
        if path == base:
            continue
        pairs = list(zip([r for r in runs if r["path"] == base], [r for r in runs if r["path"] == path]))
        for m in metrics:
            per_round = [a[m] / b[m] for a, b in pairs]
            ratios.append({"pair": f"{base} / {path}", "metric": m, "per_round": per_round, "geomean": bl.geomean(per_round)})
    out = args.out or work / f"{tag}.json"
    bl.write_json(out, {"args": vars(args), "machine": bl.machine(), "settings": settings, "runs": runs, "summary": summary, "ratios": ratios})

    print()
    print(f"{bl.machine()}; model {args.model}, batch {args.batch}/device x 2 ranks, max_seq_len {args.max_seq_len}, "
          f"{args.steps - args.warmup} timed steps after {args.warmup}")
    print(bl.table([{"path": p, "label": PATHS[p], **s} for p, s in summary.items()], [
        ("path", "path", None), ("label", "what", None), ("tokens_per_s", "tokens/s", "{:.0f}"),
        ("tokens_per_s_median_step", "tokens/s (median step)", "{:.0f}"), ("tokens_per_cpu_s", "tokens per CPU-s", "{:.0f}"), ("wall_s", "wall s (launch to exit)", "{:.0f}"),
    ]))
    for r in ratios:
        print(f"{r['pair']} ({r['metric']}): {r['geomean']:.2f}x (per round: {', '.join(f'{x:.2f}' for x in r['per_round'])})")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
