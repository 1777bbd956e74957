"""Figure: each rank's memory right after loading the base model, with FSDP2 and
cpu_ram_efficient_loading (the LoRA preset's loading, on 2 CPU ranks).

The model (~0.3B parameters, Llama-shaped) is stored in bf16 and loaded in fp32, as the LoRA
preset loads Llama-2-70B (a bf16 checkpoint, model.dtype auto = fp32): every copy a rank makes
is its own anonymous memory, not shared page cache.

- every-rank-reads: each rank reads the whole checkpoint (transformers 5 does this even with
  cpu_ram_efficient_loading; shardtune did before);
- ours: ranks other than 0 build the model on the meta device and receive rank 0's weights
  when FSDP wraps it (shardtune.train.entry.receives_weights).

Reported per rank: resident and anonymous memory right after loading (the training log's
`base model ...` line), and the whole run's peak resident set (done.json); and whether both
runs trained the same model (training loss and the probe logits: rank 1 must get rank 0's
weights, not uninitialised memory).

    python bench/load_memory.py                    # the figure in BENCHMARKS.md
    python bench/load_memory.py --model tiny       # smoke test
"""

import argparse
import json
import re
import shutil
from pathlib import Path

import benchlib as bl

PATHS = ["every-rank-reads", "ours"]
LOADED = re.compile(r"\[rank(\d+)\] base model (read from disk|on the meta device).*?; resident ([\d.]+) GiB \(([\d.]+) GiB anonymous\)")
bl.MODEL_SPECS.setdefault("load-300m", dict(hidden_size=1024, intermediate_size=2816, num_layers=24, num_heads=8, num_kv_heads=4))


def bf16_model(work, name):
    """The bench model stored in bf16 (a hub checkpoint's dtype), under the name fixtures() uses."""
    import torch
    from transformers import AutoModelForCausalLM

    target = Path(work) / "models" / f"{name}-bf16"
    if not (target / "config.json").is_file():
        fp32 = bl.build_model_dir(Path(work) / "models" / name, name)
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(fp32, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.bin", "*.json.index"))
        AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).save_pretrained(tmp)
        tmp.rename(target)
    return f"{name}-bf16"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="load-300m", choices=sorted(bl.MODEL_SPECS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--work", type=Path, default=bl.DEFAULT_WORK)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from safetensors.torch import load_file

    name = bf16_model(args.work, args.model)
    bl.MODEL_SPECS[name] = bl.MODEL_SPECS[args.model]
    fx = bl.fixtures(args.work, name, 64, 128)
    settings = bl.settings_of(bl.run_config(
        fx["model"], fx["dataset"], 64, 128, 1, args.steps,
        fsdp={"version": 2, "num_processes": 2, "cpu_ram_efficient_loading": True},
    ))
    tag = f"load-memory-{args.model}"
    settings_json = args.work / tag / "train_settings.json"
    bl.write_json(settings_json, settings)
    accelerate_yaml = bl.write_accelerate_yaml(settings, args.work / tag / "accelerate.yaml")
    print(bl.machine(), flush=True)
    results = {}
    for path in PATHS:
        run_dir = args.work / tag / path
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        fix = "every-rank-reads" if path == "every-rank-reads" else None
        launch = bl.ours_args(settings_json, fx, run_dir, run_dir / "timer.json", fix=fix)
        bl.launch(accelerate_yaml, launch, run_dir / "log.txt", finished=[run_dir / "done.json"])
        loaded = {int(r): {"how": how, "resident_gib": float(rss), "anonymous_gib": float(anon)}
                  for r, how, rss, anon in LOADED.findall((run_dir / "log.txt").read_text())}
        done = json.loads((run_dir / "done.json").read_text())
        results[path] = {
            "after_load": [loaded[r] for r in sorted(loaded)],
            "peak_gib_per_rank": done["peak_memory_gib_per_rank"],
            "train_loss": done["train_loss"],
            "probe": run_dir / "train" / "probe.safetensors",
        }
        print(f"{path:17s} after loading: "
              + ", ".join(f"rank {r}: {v['resident_gib']:.2f} GiB ({v['anonymous_gib']:.2f} anonymous, {v['how']})" for r, v in sorted(loaded.items()))
              + f"; peak " + ", ".join(f"{p:.2f}" for p in done["peak_memory_gib_per_rank"]) + " GiB"
              + f"; train loss {done['train_loss']:.6f}", flush=True)
    a, b = (load_file(results[p].pop("probe"))["logits"] for p in PATHS)
    diff = (a - b).abs().max().item()
    same_loss = results["ours"]["train_loss"] == results["every-rank-reads"]["train_loss"]
    ratio = results["ours"]["after_load"][1]["anonymous_gib"] / results["every-rank-reads"]["after_load"][1]["anonymous_gib"]
    print(f"rank 1 anonymous memory after loading, ours / every-rank-reads: {ratio:.3f}; "
          f"same training loss: {same_loss}; probe logits max abs diff: {diff:.3g}")
    out = args.out or args.work / f"{tag}.json"
    bl.write_json(out, {"args": {k: str(v) for k, v in vars(args).items()}, "machine": bl.machine(), "runs": results,
                        "rank1_anonymous_ratio": ratio, "same_train_loss": same_loss, "probe_max_abs_diff": diff})
    print(f"results: {out}")
    if diff or not same_loss:
        raise SystemExit("the two loading paths trained different models")
    return results


if __name__ == "__main__":
    main()
