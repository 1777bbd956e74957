"""Where the time of one training micro-step goes: torch.profiler over forward + backward of a
bench model with LoRA (r 8, all-linear), on one thread, for a batch of packed rows laid out
flattened (as the reference, and shardtune before per-row batches) or per row (shardtune on sdpa/eager).

    python bench/profile_step.py                        # small model, 2 x 512 tokens, flattened
    python bench/profile_step.py --layout per-row
"""

import argparse

import torch

import benchlib as bl


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", choices=sorted(bl.MODEL_SPECS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--conv-len", type=int, default=64, help="tokens per packed conversation")
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--layout", default="flattened", choices=["flattened", "per-row"])
    p.add_argument("--rows", type=int, default=12, help="operators to list")
    p.add_argument("--work", default=bl.DEFAULT_WORK)
    args = p.parse_args(argv)
    from peft import LoraConfig, get_peft_model
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    path = bl.build_model_dir(bl.Path(args.work) / "models" / args.model, args.model)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=args.attn, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    rows, length = (1, args.batch * args.seq) if args.layout == "flattened" else (args.batch, args.seq)
    ids = torch.randint(3, 500, (rows, length))
    positions = (torch.arange(length) % args.conv_len).expand(rows, length)

    def step():
        model(input_ids=ids, position_ids=positions, labels=ids, use_cache=False).loss.backward()

    step()  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    attention = sum(e.self_cpu_time_total for e in events if "attention" in e.key or e.key in ("aten::softmax", "aten::_softmax", "aten::_softmax_backward_data"))
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::bmm", "aten::addmm"))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"{args.model}, {args.layout} {args.batch} x {args.seq}, {args.attn}, LoRA: step {total / 1e6:.2f} s CPU; "
          f"matmuls {100 * matmul / total:.0f}%, attention kernels {100 * attention / total:.0f}%")


if __name__ == "__main__":
    main()
