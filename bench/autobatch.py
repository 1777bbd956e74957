"""Figure 2: throughput at the same memory budget.

`pick_setting()` is what `training.per_device_train_batch_size: auto` with
`training.gradient_checkpointing: auto` chooses (shardtune.plan.autobatch, resolved by the workflow's
estimate_memory step): the largest per-device batch size that fits a per-device budget by
shardtune's pre-flight estimate (memory.estimate), gradient checkpointing only when no batch
size fits without it, and the rows per optimizer step (per-device batch x gradient
accumulation) of the run's settings kept, so both runs see the same tokens per optimizer step.

The benchmark runs the reference at the recipe's structure scaled down (batch 8 per device,
gradient accumulation 4, gradient checkpointing, use_reentrant false) and shardtune at the
setting picked for the same budget; by default the budget is the estimate for the recipe's
settings, i.e. exactly what the reference is planned to need. Measured peak RSS per rank is
reported for both, so the budget can be checked against what really happened.

    python bench/autobatch.py                       # the figure in BENCHMARKS.md
    python bench/autobatch.py --pick-only           # show the choice, run nothing
    python bench/autobatch.py --model tiny --steps 2 --warmup 1 --repeats 1   # smoke test
"""

import argparse
import copy
import shutil
from pathlib import Path

import benchlib as bl


def with_training(settings, **training):
    out = copy.deepcopy(settings)
    out["training"].update(training)
    return out


def as_auto(settings):
    """`settings` with the batch size and gradient checkpointing left to `auto`, keeping their
    rows per optimizer step (per-device batch x gradient accumulation)."""
    t = settings["training"]
    return with_training(
        settings,
        per_device_train_batch_size="auto",
        gradient_checkpointing="auto",
        per_device_effective_batch_size=t["per_device_train_batch_size"] * t["gradient_accumulation_steps"],
    )


def pick_setting(shape, settings, world_size, budget_gib):
    """What `training.per_device_train_batch_size: auto` and `gradient_checkpointing: auto` pick
    for `settings` at `budget_gib` per device: shardtune.plan.autobatch.pick_setting on as_auto(settings).

    Returns a dict with per_device_train_batch_size, gradient_accumulation_steps,
    gradient_checkpointing, estimate_gib and budget_gib, or None when nothing fits (not even
    batch 1 with checkpointing).
    """
    from shardtune.plan import autobatch

    return autobatch.pick_setting(shape, as_auto(settings), world_size, budget_gib)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(bl.MODEL_SPECS))
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--recipe-batch", type=int, default=8, help="the reference's per-device batch (recipe: 8)")
    p.add_argument(
        "--recipe-accumulation", type=int, default=4,
        help="the reference's gradient accumulation (recipe: 4; BENCHMARKS.md uses 1 to keep a run short)",
    )
    p.add_argument("--budget-gib", type=float, help="per-device budget; default: the estimate for the recipe's settings")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    p.add_argument("--conversations", type=int, default=10000)
    p.add_argument("--pick-only", action="store_true", help="print the picked setting and stop")
    p.add_argument("--work", type=Path, default=bl.DEFAULT_WORK)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from shardtune.plan.memory import estimate
    from shardtune.plan.shape import model_shape

    work = args.work
    fx = bl.fixtures(work, args.model, args.conversations, args.max_seq_len)
    recipe = bl.settings_of(
        bl.run_config(
            fx["model"], fx["dataset"], args.conversations, args.max_seq_len, args.recipe_batch, args.steps,
            training={"gradient_accumulation_steps": args.recipe_accumulation, "gradient_checkpointing": True, "use_reentrant": False},
        )
    )
    shape = model_shape(str(fx["model_files"]), recipe["lora"])
    recipe_gib = estimate(shape, recipe, 2)["device_gib"]
    budget = args.budget_gib or recipe_gib
    picked = pick_setting(shape, recipe, 2, budget)
    print(f"budget {budget:.2f} GiB per device (recipe settings estimate {recipe_gib:.2f} GiB); picked: {picked}")
    if args.pick_only or picked is None:
        return picked
    ours = with_training(recipe, **{k: picked[k] for k in ("per_device_train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing")})

    tag = f"autobatch-{args.model}"
    ours_json = work / tag / "ours_settings.json"
    bl.write_json(ours_json, ours)
    recipe_json = work / tag / "recipe_settings.json"
    bl.write_json(recipe_json, recipe)
    memory_json = work / tag / "memory.json"
    bl.write_json(memory_json, {**estimate(shape, ours, 2), "declared": {"device_gib": budget, "cpu_gib": None, "force": False}})
    accelerate_yaml = bl.write_accelerate_yaml(ours, work / tag / "accelerate.yaml")  # same FSDP keys for both

    runs = []
    for round_ in range(args.repeats):
        order = ["ours", "reference"] if round_ % 2 == 0 else ["reference", "ours"]
        for path in order:
            run_dir = work / tag / f"{path}-{round_}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            timer = run_dir / "timer.json"
            # each with the C allocator its launcher gives it: shardtune's training.allocator
            # (what the estimate planned for), the recipe's plain accelerate launch glibc
            if path == "ours":
                launch = bl.ours_args(ours_json, fx, run_dir, timer, memory_json=memory_json)
                allocator, env = bl.allocator_env(ours)
            else:
                launch = bl.reference_args(fx, recipe, run_dir, timer)
                allocator, env = "system", {"LD_PRELOAD": ""}
            load = bl.load_average()
            wall = bl.launch(accelerate_yaml, launch, run_dir / "log.txt", env=env)
            bl.record_run(run_dir, ours_json if path == "ours" else recipe_json, fx, path)
            records = bl.read_timer(timer, 2)
            result = {
                "path": path,
                "allocator": allocator,
                "round": round_,
                "load_before": load,
                "wall_s": wall,
                "peak_gib_per_rank": [r["steps"][-1]["peak_gib"] for r in records],
                **bl.throughput(records, args.warmup),
            }
            runs.append(result)
            print(f"{path:10s} round {round_} [{allocator}]: {result['tokens_per_s']:7.0f} tokens/s, "
                  f"{result['tokens_per_cpu_s']:5.0f} tokens/CPU-s, {result['s_per_step']:.1f} s/step, "
                  f"peak {max(result['peak_gib_per_rank']):.2f} GiB/rank, load {load}", flush=True)

    def of(path):
        return [r for r in runs if r["path"] == path]

    per_round = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(of("ours"), of("reference"))]
    per_round_cpu = [a["tokens_per_cpu_s"] / b["tokens_per_cpu_s"] for a, b in zip(of("ours"), of("reference"))]
    summary = {
        "ratio_cpu_per_round": per_round_cpu,
        "ratio_cpu": bl.geomean(per_round_cpu),
        "budget_gib": budget,
        "recipe_estimate_gib": recipe_gib,
        "picked": picked,
        "ratio_per_round": per_round,
        "ratio": bl.geomean(per_round),
        "tokens_per_s": {p: bl.geomean(r["tokens_per_s"] for r in of(p)) for p in ("ours", "reference")},
        "tokens_per_cpu_s": {p: bl.geomean(r["tokens_per_cpu_s"] for r in of(p)) for p in ("ours", "reference")},
        "peak_gib_per_rank": {p: max(max(r["peak_gib_per_rank"]) for r in of(p)) for p in ("ours", "reference")},
    }
    out = args.out or work / f"{tag}.json"
    bl.write_json(out, {"args": vars(args), "machine": bl.machine(), "runs": runs, "summary": summary, "ours": ours, "recipe": recipe})
    print()
    print(f"{bl.machine()}; model {args.model}, max_seq_len {args.max_seq_len}, {args.steps - args.warmup} timed optimizer steps")
    print(f"reference: batch {args.recipe_batch} x accumulation {args.recipe_accumulation}, gradient checkpointing, eager attention")
    print(f"ours: batch {picked['per_device_train_batch_size']} x accumulation {picked['gradient_accumulation_steps']}, "
          f"gradient checkpointing {picked['gradient_checkpointing']} (estimate {picked['estimate_gib']:.2f} of {budget:.2f} GiB)")
    print(f"tokens/s ours {summary['tokens_per_s']['ours']:.0f}, reference {summary['tokens_per_s']['reference']:.0f}: "
          f"{summary['ratio']:.2f}x (per round: {', '.join(f'{x:.2f}' for x in per_round)})")
    print(f"tokens per CPU-second ours {summary['tokens_per_cpu_s']['ours']:.0f}, reference "
          f"{summary['tokens_per_cpu_s']['reference']:.0f}: {summary['ratio_cpu']:.2f}x "
          f"(per round: {', '.join(f'{x:.2f}' for x in per_round_cpu)})")
    print(f"measured peak RSS per rank: ours {summary['peak_gib_per_rank']['ours']:.2f} GiB, "
          f"reference {summary['peak_gib_per_rank']['reference']:.2f} GiB")
    print(f"results: {out}")
    return summary


if __name__ == "__main__":
    main()
