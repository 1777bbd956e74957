"""Attention alone, forward + backward, on one CPU thread: the kernels and layouts the
training paths use for a batch of packed rows, interleaved and repeated (median of --repeats).

- flattened (what TRL's padding-free collator feeds both paths today): the batch is one
  sequence of batch x L tokens, with a block-diagonal causal mask built from position ids;
  computed with sdpa (ours) and with eager attention (the recipe without flash-attn);
- per-row (shardtune on sdpa and eager): [batch, L] rows, a block-diagonal mask per row, sdpa and eager.

Each packed row holds conversations of --conv-len tokens. Shapes follow bench's small model
(8 heads of 64, 4 KV heads) unless told otherwise.

    python bench/attention_micro.py
    python bench/attention_micro.py --batch 8 --seq 512
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def block_causal_mask(rows, length, conv_len):
    """[rows, 1, length, length] bool: causal within each conversation of conv_len tokens."""
    idx = torch.arange(length)
    seq = idx // conv_len
    mask = (seq[:, None] == seq[None, :]) & (idx[:, None] >= idx[None, :])
    return mask.expand(rows, 1, length, length)


def eager(q, k, v, mask):
    scores = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def sdpa(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def case(fn, rows, length, heads, kv_heads, dim, conv_len):
    def run():
        q = torch.randn(rows, heads, length, dim, requires_grad=True)
        k = torch.randn(rows, kv_heads, length, dim, requires_grad=True)
        v = torch.randn(rows, kv_heads, length, dim, requires_grad=True)
        mask = block_causal_mask(rows, length, conv_len)
        rep = heads // kv_heads
        kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # as transformers' repeat_kv
        start = time.perf_counter()
        fn(q, kk, vv, mask).sum().backward()
        return time.perf_counter() - start

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2, help="packed rows per device")
    p.add_argument("--seq", type=int, default=512, help="max_seq_len (tokens per packed row)")
    p.add_argument("--conv-len", type=int, default=64, help="tokens per packed conversation")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one per rank in the bench runs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (args.heads, args.kv_heads, args.head_dim, args.conv_len)
    cases = {
        "flattened sdpa (ours today)": case(sdpa, 1, args.batch * args.seq, *shape),
        "flattened eager (recipe)": case(eager, 1, args.batch * args.seq, *shape),
        "per-row sdpa (shardtune)": case(sdpa, args.batch, args.seq, *shape),
        "per-row eager": case(eager, args.batch, args.seq, *shape),
    }
    times = {name: [] for name in cases}
    for name, run in cases.items():  # warm-up
        run()
    for _ in range(args.repeats):
        for name, run in cases.items():
            times[name].append(run())
    base = statistics.median(times["flattened sdpa (ours today)"])
    print(f"attention fwd+bwd per layer, batch {args.batch} x {args.seq}, {args.heads} heads of {args.head_dim}, "
          f"{args.threads} thread(s), median of {args.repeats}:")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"  {name:28s} {1000 * median:8.1f} ms  ({base / median:.2f}x the speed of ours today)")
    return {name: statistics.median(v) for name, v in times.items()}


if __name__ == "__main__":
    main()
