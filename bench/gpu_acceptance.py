"""GPU acceptance (needs NVIDIA GPUs; about 5-8 minutes on one H100/H200): the two 70B presets
with only the model, the data set size, the step count and publishing overridden, each under
FSDP1 (the presets' own) and FSDP2, trained and converted by the workflow itself on all
visible GPUs. Nothing is downloaded: the model is the built-in one at TinyLlama-1.1B's shape
(random weights, the built-in 512-token vocabulary), the data set the built-in one.

Four runs in one DAG (`snakemake --cores all results/<run>/adapter ...`):

- lora-fsdp1, lora-fsdp2: configs/llama2-70b-lora-fsdp.yaml (LoRA, bf16 mixed precision,
  weights loaded in fp32, sync_module_states + cpu_ram_efficient_loading);
- qlora-fsdp1, qlora-fsdp2: configs/llama2-70b-qlora-fsdp.yaml (4-bit nested nf4 stored in
  bf16, the Trainer's bf16, parameter offload);

attention `auto` (flash_attention_2 where flash-attn is installed, else sdpa). Reported per
run: tokens/s over the whole training (first step included; TRL's `num_tokens`, padding not
counted) on all GPUs and per GPU, MFU against the card's measured bf16 matmul ceiling (model
FLOPs as bench/gpu_mfu.py counts them; QLoRA's dequantization is not counted), each rank's
peak allocated and reserved GPU memory beside the pre-flight estimate, and the conversion
check (max abs logit difference of the converted adapter against the trained model, and the
tolerance it must meet). A run that fails is reported with its log's error line; the others
still run (`--keep-going`).

    python bench/gpu_acceptance.py                # on a GPU machine
    python bench/gpu_acceptance.py --plan         # anywhere: the runs' config, validated; runs nothing
    python bench/gpu_acceptance.py --cpu-smoke    # the same four runs with the tiny model on 2 CPU ranks
"""

import argparse
import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

import benchlib as bl
from gpu_mfu import flops_per_token, matmul_ceiling

WORKFLOW_FILES = ["Snakefile", "config.yaml", "workflow", "src", "profiles", "configs", "envs"]
PRESETS = {"lora": "llama2-70b-lora-fsdp", "qlora": "llama2-70b-qlora-fsdp"}
SPEC_1B = {k: v for k, v in bl.MODEL_SPECS["llama-1b"].items() if k != "config_vocab"}
TINY = bl.MODEL_SPECS["tiny"]
# FSDP2 has no forward prefetch; everything else of the preset stays
FSDP2 = {"version": 2, "forward_prefetch": False}


def preset(name):
    sections = yaml.safe_load((bl.REPO / "configs" / f"{name}.yaml").read_text())
    sections.pop("runs")
    return sections


def acceptance_config(gpus, spec, conversations, max_seq_len, batch, accumulation, steps):
    """The workflow config of the four runs: each preset scaled to `spec`, once per FSDP version."""
    from shardtune.config import deep_merge

    scale = {
        "model": {"source": "builtin", "attn_implementation": "auto", "builtin": spec},
        "dataset": {"source": "builtin", "builtin": {"conversations": conversations}},
        "data": {"max_seq_len": max_seq_len},
        "fsdp": {"num_processes": gpus or 2},  # CPU ranks for --cpu-smoke
        "training": {
            "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": accumulation,
            "max_steps": steps,
            "save_steps": steps,
            "eval_strategy": "no",
            "logging_steps": 1,
        },
        "hub": {"push": False},
        "resources": {"fsdp_train": {"gpu": gpus}},
    }
    base = yaml.safe_load((bl.REPO / "config.yaml").read_text())
    base["evaluate"] = {**base.get("evaluate", {}), "per_task": 0, "samples": 1}
    runs = {}
    for kind, name in PRESETS.items():
        scaled = deep_merge(preset(name), scale)
        runs[f"{kind}-fsdp1"] = scaled
        runs[f"{kind}-fsdp2"] = deep_merge(scaled, {"fsdp": FSDP2})
    base["runs"] = runs
    return base


def validate(config):
    from shardtune.config import resolve_runs

    return resolve_runs(copy.deepcopy(config))


def copy_workflow(dest, config):
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = bl.REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"), dirs_exist_ok=True)
        elif src.exists():
            shutil.copy(src, dest / name)
    (dest / "config.yaml").write_text(yaml.safe_dump(config))


def run_workflow(workdir, runs, env, timeout):
    targets = [f"results/{run}/adapter" for run in runs]
    command = [str(bl.BIN / "snakemake"), "--cores", "all", "--keep-going", *targets]
    started = time.monotonic()
    with open(workdir / "snakemake.out", "w") as out:
        proc = subprocess.run(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, time.monotonic() - started


def read(path):
    return json.loads(path.read_text()) if path.exists() else None


def error_line(log):
    from shardtune.launch.launcher import error_line as first_error

    return first_error(log.read_text(errors="replace")) if log.exists() else None


def result_of(workdir, run, settings, per_token, ceiling):
    """One run's figures from the files the workflow wrote."""
    done = read(workdir / f"results/{run}/train/done.json")
    row = {"run": run, "fsdp_version": settings["fsdp"]["version"], "load_in_4bit": settings["quantization"]["load_in_4bit"]}
    if done is None:
        row["error"] = error_line(workdir / f"logs/fsdp_train/{run}.log") or "training failed: see the log"
        return row
    import pandas as pd

    log = pd.read_csv(workdir / f"results/{run}/train/log.csv")
    tokens = float(log["tokens_seen"].dropna().iloc[-1]) if "tokens_seen" in log else None  # TRL's num_tokens
    seconds = done["metrics"]["train_runtime"]
    ranks = done["num_processes"]
    memory = read(workdir / f"results/{run}/memory.json")
    row.update(
        attn_implementation=done["attn_implementation"],
        mixed_precision=done["mixed_precision"],
        ranks=ranks,
        steps=done["global_step"],
        train_seconds=seconds,
        tokens=tokens,
        tokens_per_s=tokens / seconds if tokens else None,
        tokens_per_s_per_rank=tokens / seconds / ranks if tokens else None,
        peak_reserved_gib_per_rank=done["peak_memory_gib_per_rank"],
        peak_allocated_gib_per_rank=done["peak_allocated_gib_per_rank"],
        estimate_device_gib=memory["device_gib"],
        estimate_allocated_gib=memory.get("device_allocated_gib"),
        fsdp_as_run={k: done["fsdp"].get(k) for k in ("version", "sharding_strategy", "cpu_offload", "sync_module_states", "cpu_ram_efficient_loading")},
    )
    if ceiling and row["tokens_per_s_per_rank"]:
        row["mfu"] = row["tokens_per_s_per_rank"] * per_token / (ceiling * 1e12)
    conversion = read(workdir / f"results/{run}/adapter/conversion.json")
    if conversion is None:
        row["error"] = error_line(workdir / f"logs/convert_checkpoint/{run}.log") or "conversion failed: see the log"
    else:
        row.update(conversion_diff=conversion["max_abs_logit_diff"], conversion_tolerance=conversion["tolerance"])
    return row


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def markdown(rows, card, ceiling):
    lines = [
        f"{card}; bf16 matmul ceiling {fmt(ceiling, '.0f')} TFLOP/s",
        "",
        "| run | attention | tokens/s (all GPUs) | tokens/s per GPU | MFU | peak allocated / reserved per rank (GiB) | estimate (GiB) | conversion diff / tolerance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['run']} | failed: {r['error']} | | | | | | |")
            continue
        allocated = "/".join(fmt(x, ".1f") for x in r["peak_allocated_gib_per_rank"])
        reserved = "/".join(fmt(x, ".1f") for x in r["peak_reserved_gib_per_rank"])
        conv = f"{fmt(r.get('conversion_diff'), '.3g')} / {fmt(r.get('conversion_tolerance'), '.3g')}" if "conversion_diff" in r else f"failed: {r['error']}"
        mfu = fmt(100 * r["mfu"], ".1f") + "%" if r.get("mfu") else "-"
        lines.append(
            f"| {r['run']} | {r['attn_implementation']} | {fmt(r['tokens_per_s'], '.0f')} | {fmt(r['tokens_per_s_per_rank'], '.0f')} | "
            f"{mfu} | {allocated} / {reserved} | {fmt(r['estimate_device_gib'], '.1f')} | {conv} |"
        )
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", action="store_true", help="write and validate the runs' config; run nothing")
    p.add_argument("--cpu-smoke", action="store_true", help="the tiny model on 2 CPU ranks: checks this script, not a GPU")
    p.add_argument("--conversations", type=int, default=3000)
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8, help="per-device batch (the presets' 8)")
    p.add_argument("--accumulation", type=int, default=1, help="gradient accumulation (the presets' 4 and 2 need more data)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--timeout", type=int, default=1500, help="seconds for the whole workflow")
    p.add_argument("--work", type=Path, default=bl.DEFAULT_WORK / "gpu-acceptance")
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import os

    import torch

    from shardtune.plan.shape import model_shape

    if args.cpu_smoke:
        gpus, spec = 0, TINY
        args.conversations, args.max_seq_len, args.batch, args.steps = min(args.conversations, 64), 128, 2, 2
    else:
        gpus, spec = torch.cuda.device_count() or (8 if args.plan else 0), SPEC_1B
        if not gpus:
            raise SystemExit("no GPU visible: this script needs one (--plan shows what would run, --cpu-smoke checks it on CPU)")
    config = acceptance_config(gpus, spec, args.conversations, args.max_seq_len, args.batch, args.accumulation, args.steps)
    settings = validate(config)
    from transformers import LlamaConfig

    shape = model_shape(
        LlamaConfig(
            vocab_size=512, hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
            num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"],
            num_key_value_heads=spec["num_kv_heads"], tie_word_embeddings=False,
        ),
        {"r": 8, "target_modules": "all-linear"},
    )
    per_token = flops_per_token(shape, args.max_seq_len)
    print(f"model: {shape['params'] / 1e6:.1f}M parameters, {per_token / 1e9:.2f} GFLOP per trained token; "
          f"runs: {', '.join(settings)} on {gpus or 'CPU'} {'GPU(s)' if gpus else 'ranks'}", flush=True)
    if args.plan:
        print(yaml.safe_dump(config, sort_keys=False))
        return {"config": config, "settings": settings}

    ceiling = matmul_ceiling(args.matmul_size) if gpus else None
    card = torch.cuda.get_device_name(0) if gpus else bl.machine()
    if ceiling:
        print(f"{card} x{gpus}: bf16 matmul ceiling {ceiling:.0f} TFLOP/s", flush=True)
    shutil.rmtree(args.work, ignore_errors=True)
    copy_workflow(args.work, config)
    env = dict(os.environ)
    if not gpus:
        env["SHARDTUNE_ALLOW_CPU_TRAINING"] = "1"
    code, seconds = run_workflow(args.work, list(settings), env, args.timeout)
    rows = [result_of(args.work, run, s, per_token, ceiling) for run, s in settings.items()]
    table = markdown(rows, f"{card} x{gpus}" if gpus else card, ceiling)
    out = args.out or args.work.with_suffix(".json")
    bl.write_json(out, {"args": {k: str(v) for k, v in vars(args).items()}, "machine": card, "gpus": gpus,
                        "ceiling_tflops": ceiling, "shape": shape, "flops_per_token": per_token,
                        "workflow_seconds": seconds, "workflow_exit": code, "runs": rows})
    print(table)
    print(f"workflow: exit {code} after {seconds:.0f} s; results: {out}; log: {args.work / 'snakemake.out'}")
    failed = [r["run"] for r in rows if "error" in r]
    if code or failed:
        raise SystemExit(f"failed: {', '.join(failed) or 'the workflow'}")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
