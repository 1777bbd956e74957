"""Figure 5 (needs one NVIDIA GPU): tokens/s and model FLOPs utilisation (MFU) of LoRA training
of a ~1.1B-parameter Llama-shaped model in bf16 on one GPU, shardtune against the recipe,
against the measured bf16 matmul ceiling of the card.

- ceiling: the best of a few large bf16 matmuls (--matmul-size, default 8192), TFLOP/s;
- model FLOPs per token of LoRA training: 4 x frozen matmul weights (forward + input
  gradient; lm_head included, embeddings excluded) + 6 x LoRA weights + 12 x layers x
  hidden x max_seq_len (attention scores and values, forward and backward);
- MFU = tokens/s x FLOPs per token / ceiling.

Both paths run under the same Accelerate config (FSDP2, 1 process, bf16 mixed precision, as
the recipe: weights loaded in fp32), the same packed data, batch and LoRA; attention is
flash_attention_2 when flash-attn is installed, else sdpa, for both. Runs are interleaved.

    python bench/gpu_mfu.py                         # on a GPU machine
    python bench/gpu_mfu.py --plan                  # anywhere: shape, FLOPs per token, commands
"""

import argparse
import importlib.util
import shutil
from pathlib import Path

import benchlib as bl

SPEC_1B = bl.MODEL_SPECS["llama-1b"]  # TinyLlama-1.1B's shape


def flops_per_token(shape, max_seq_len):
    """Model FLOPs of one trained token under LoRA (see the module docstring)."""
    frozen = shape["linear_params"] + shape["hidden"] * shape["vocab"]  # + lm_head
    return 4 * frozen + 6 * shape["lora_params"] + 12 * shape["layers"] * shape["hidden"] * max_seq_len


def matmul_ceiling(size, repeats=20):
    """Best bf16 matmul throughput of this GPU, TFLOP/s."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    best = 0.0
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ b
        end.record()
        torch.cuda.synchronize()
        best = max(best, 10 * 2 * size**3 / (start.elapsed_time(end) / 1000) / 1e12)
    return best


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4, help="per-device batch size (packed rows)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run, warm-up included")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--conversations", type=int, default=20000)
    p.add_argument("--matmul-size", type=int, default=8192)
    p.add_argument("--plan", action="store_true", help="print shape, FLOPs per token and the runs; run nothing")
    p.add_argument("--work", type=Path, default=bl.DEFAULT_WORK)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    import torch
    from transformers import LlamaConfig

    from shardtune.plan.shape import model_shape

    spec = {**bl.BASE_SPEC, **SPEC_1B}
    config = LlamaConfig(
        vocab_size=spec["config_vocab"], hidden_size=spec["hidden_size"], intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_layers"], num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_kv_heads"],
        tie_word_embeddings=False,
    )
    lora = {"r": 8, "target_modules": "all-linear"}
    shape = model_shape(config, lora)
    per_token = flops_per_token(shape, args.max_seq_len)
    attn = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    print(f"model: {shape['params'] / 1e9:.2f}B parameters, LoRA {shape['lora_params'] / 1e6:.1f}M; "
          f"{per_token / 1e9:.2f} GFLOP per trained token at max_seq_len {args.max_seq_len}; attention {attn}")
    if args.plan:
        print(f"runs: ours and reference, interleaved x{args.repeats}, batch {args.batch}, {args.steps} steps "
              f"({args.warmup} warm-up), FSDP2 1 process, bf16 mixed precision, weights in fp32")
        return {"shape": shape, "flops_per_token": per_token}
    if not torch.cuda.is_available():
        raise SystemExit("no GPU visible: this figure needs one (use --plan to see what would run)")

    ceiling = matmul_ceiling(args.matmul_size)
    print(f"{torch.cuda.get_device_name(0)}: bf16 matmul ceiling {ceiling:.0f} TFLOP/s", flush=True)
    work = args.work
    fx = bl.fixtures(work, "llama-1b", args.conversations, args.max_seq_len)
    settings = bl.settings_of(bl.run_config(
        fx["model"], fx["dataset"], args.conversations, args.max_seq_len, args.batch, args.steps,
        model={"attn_implementation": attn}, fsdp={"mixed_precision": "bf16", "num_processes": 1},
    ))
    tag = "gpu-mfu"
    settings_json = work / tag / "train_settings.json"
    bl.write_json(settings_json, settings)
    from shardtune.launch.accelerate_config import write

    accelerate_yaml = work / tag / "accelerate.yaml"
    write(settings, str(accelerate_yaml), gpus=1)

    runs = []
    for round_ in range(args.repeats):
        for path in (["ours", "reference"] if round_ % 2 == 0 else ["reference", "ours"]):
            run_dir = work / tag / f"{path}-{round_}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            timer = run_dir / "timer.json"
            if path == "ours":
                launch = bl.ours_args(settings_json, fx, run_dir, timer)
            else:
                launch = bl.reference_args(fx, settings, run_dir, timer, attn=attn)
                launch = [a for a in launch if not a.startswith("--bf16")] + ["--bf16=True"]
            bl.launch(accelerate_yaml, launch, run_dir / "log.txt")
            result = {"path": path, "round": round_, **bl.throughput(bl.read_timer(timer, 1), args.warmup)}
            result["tflops"] = result["tokens_per_s"] * per_token / 1e12
            result["mfu"] = result["tflops"] / ceiling
            runs.append(result)
            print(f"{path:10s} round {round_}: {result['tokens_per_s']:.0f} tokens/s, {result['tflops']:.0f} TFLOP/s, "
                  f"MFU {100 * result['mfu']:.1f}%", flush=True)
    summary = {
        p: {k: bl.geomean(r[k] for r in runs if r["path"] == p) for k in ("tokens_per_s", "tflops", "mfu")}
        for p in ("ours", "reference")
    }
    out = args.out or work / f"{tag}.json"
    bl.write_json(out, {"args": vars(args), "machine": bl.machine(), "ceiling_tflops": ceiling, "shape": shape,
                        "flops_per_token": per_token, "runs": runs, "summary": summary})
    for p, s in summary.items():
        print(f"{p}: {s['tokens_per_s']:.0f} tokens/s, MFU {100 * s['mfu']:.1f}% of {ceiling:.0f} TFLOP/s")
    print(f"ours / reference: {summary['ours']['tokens_per_s'] / summary['reference']['tokens_per_s']:.2f}x; results: {out}")
    return summary


if __name__ == "__main__":
    main()
