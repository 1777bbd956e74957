"""Benchmark of the data stage against the recipe's own path, on the same raw data and tokenizer.

Ours: shardtune.data.prepare_split (render + check, tokenize, masks/labels, BFD packing).
Recipe: render each conversation with the chat template into a `content` column
(PEFT examples/sft utils.py: batched map of apply_chat_template), then TRL SFTTrainer's own
dataset preparation with packing=True (SFTTrainer._prepare_dataset, the code its constructor runs).

Both run in one process (ours forks its workers from it) on the same in-memory Arrow data set,
interleaved, datasets caching off. Peak memory is the highest RSS above the level before each
call plus the private memory (USS) of worker processes, sampled every 5 ms (workers every 0.5 s).

    python bench/bench_data.py                      # 10k conversations, ~16M tokens, max_len 2048
    python bench/bench_data.py --conversations 2000 --repeats 1   # a quick look
"""

import argparse
import datetime
import os
import platform
import random
import statistics
import tempfile
import threading
import time

import datasets
import psutil

SYLLABLES = "ka lo mi ne ru sa ti vo ze pa do ghi bre stu qua ny xo fla wen tor mel rix".split()
PUNCT = [".", ",", "?", "!", ";", ":"]


def synthetic_conversations(n, seed=0, words_per_conversation=312):
    """Two-role chats of made-up words and numbers: about 1.6k tokens each with the built-in
    512-token byte-level BPE (like the data of the reference figures in facts.md)."""
    rng = random.Random(seed)

    def sentence(k):
        words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(k)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        return " ".join(words) + rng.choice(PUNCT)

    rows = []
    for _ in range(n):
        goal = rng.randint(words_per_conversation // 3, words_per_conversation * 5 // 3)
        messages, total = [], 0
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": sentence(12)})
        while total < goal:
            for role in ("user", "assistant"):
                k = rng.randint(10, 120)
                messages.append({"role": role, "content": " ".join(sentence(max(3, k // 4)) for _ in range(4))})
                total += k
        rows.append({"messages": messages})
    return rows


class PeakRSS:
    """Highest memory of this process above its level at the start, while inside, plus the
    memory private to its worker processes (USS: pages they share with this process are not
    counted twice), sampled every `interval` s; the workers every 100th sample only (reading a
    worker's USS costs about 5 ms of CPU, which would slow the path measured)."""

    def __init__(self, interval=0.005):
        self.proc, self.interval = psutil.Process(), interval

    def __enter__(self):
        self.base = self.peak = self.proc.memory_info().rss
        self.workers_peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _children_uss(self):
        total = 0
        for child in self.proc.children(recursive=True):
            try:
                total += child.memory_full_info().uss
            except psutil.Error:  # gone meanwhile
                pass
        return total

    def _watch(self):
        children, tick = 0, 0
        while not self.stop.is_set():
            if tick % 100 == 0:
                children = self._children_uss()
                self.workers_peak = max(self.workers_peak, children)
            tick += 1
            self.peak = max(self.peak, self.proc.memory_info().rss + children)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.mib = (self.peak - self.base) / 2**20
        self.workers_mib = self.workers_peak / 2**20


def cpu_seconds():
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_ours(raw, tokenizer, cfg, num_proc):
    from shardtune.data.prepare import SplitReport, prepare_split

    packed, stats, _ = prepare_split(
        raw, "train", cfg, tokenizer, report=SplitReport("train", "bench", {}), num_proc=num_proc, log=lambda *a: None
    )
    return packed, stats


def make_recipe_trainer(tokenizer, max_len, workdir):
    """An SFTTrainer set up like the recipe (text field `content`, packing) around a tiny model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=max_len)
    )
    args = SFTConfig(
        output_dir=workdir, max_length=max_len, packing=True, dataset_text_field="content",
        report_to=[], use_cpu=True, disable_tqdm=True,
    )
    tiny = datasets.Dataset.from_dict({"content": ["hello"]})
    return SFTTrainer(model=model, args=args, train_dataset=tiny, processing_class=tokenizer), args


def run_recipe(raw, tokenizer, trainer, args):
    def preprocess(samples):  # PEFT examples/sft utils.py create_datasets
        return {"content": [tokenizer.apply_chat_template(c, tokenize=False) for c in samples["messages"]]}

    t0 = time.perf_counter()
    rendered = raw.map(preprocess, batched=True, remove_columns=raw.column_names)
    t1 = time.perf_counter()
    packed = trainer._prepare_dataset(rendered, tokenizer, args, packing=True, formatting_func=None, dataset_name="train")
    return packed, t1 - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=10000)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=512)
    args = parser.parse_args(argv)
    load_start = os.getloadavg()

    # The fast tokenizer's thread pool size is fixed when it is first used: set it first.
    os.environ.setdefault("RAYON_NUM_THREADS", str(args.num_proc))
    from datasets.utils.logging import disable_progress_bar

    from shardtune.data.tokenize import load_tokenizer  # noqa: F401  (the same module the workflow uses)
    from shardtune.inputs.builtin_model import build_tokenizer

    datasets.disable_caching()
    disable_progress_bar()
    tokenizer = build_tokenizer(args.vocab_size, 0)
    t = time.perf_counter()
    raw = datasets.Dataset.from_list(synthetic_conversations(args.conversations))
    print(f"generated {len(raw)} conversations in {time.perf_counter() - t:.1f} s")
    base = {
        "format": "auto", "columns": {}, "chat_template_format": "chatml", "max_seq_len": args.max_seq_len,
        "packing": True, "too_long": "truncate", "on_bad_row": "error",
        "add_special_tokens": False, "append_concat_token": False,
    }
    variants = {
        "ours (full-text loss, as the recipe)": {**base, "assistant_only_loss": False},
        "ours (assistant-only loss)": {**base, "assistant_only_loss": True},
    }
    with tempfile.TemporaryDirectory() as workdir:
        trainer, sft_args = make_recipe_trainer(tokenizer, args.max_seq_len, workdir)
        # Warm-up on a slice (template compilation, imports, worker start-up), not measured.
        warm = raw.select(range(min(500, len(raw))))
        for cfg in variants.values():
            run_ours(warm, tokenizer, cfg, args.num_proc)
        run_recipe(warm, tokenizer, trainer, sft_args)
        texts = [tokenizer.apply_chat_template(m, tokenize=False) for m in raw["messages"]]
        floor = []
        times = {name: [] for name in [*variants, "recipe (render + SFTTrainer)"]}
        memory = {name: 0.0 for name in times}
        cpu = {name: [] for name in times}
        tokens = None
        render_times = []
        for rep in range(args.repeats):
            order = list(variants) + ["recipe (render + SFTTrainer)"]
            if rep % 2:
                order.reverse()
            # The tokenizer's own work on the rendered texts, nothing else: what both paths pay.
            start = cpu_seconds()
            for begin in range(0, len(texts), 1024):
                tokenizer.backend_tokenizer.encode_batch_fast(texts[begin : begin + 1024], add_special_tokens=False)
            floor.append(cpu_seconds() - start)
            for name in order:
                with PeakRSS() as peak:
                    start, start_cpu = time.perf_counter(), cpu_seconds()
                    if name in variants:
                        packed, stats = run_ours(raw, tokenizer, variants[name], args.num_proc)
                        tokens = stats["tokens"]
                        extra = f"{stats['rows']} rows, efficiency {stats['packing_efficiency']:.4f}"
                    else:
                        packed, render_s = run_recipe(raw, tokenizer, trainer, sft_args)
                        render_times.append(render_s)
                        extra = f"{len(packed)} rows (render {render_s:.2f} s)"
                    elapsed = time.perf_counter() - start
                    used = cpu_seconds() - start_cpu
                del packed
                times[name].append(elapsed)
                cpu[name].append(used)
                memory[name] = max(memory[name], peak.mib)
                print(f"[{rep}] {name}: {elapsed:.2f} s (cpu {used:.2f} s), peak +{peak.mib:.0f} MiB "
                      f"(workers {peak.workers_mib:.0f} MiB), load {os.getloadavg()[0]:.1f}, {extra}", flush=True)

    ref = statistics.median(times["recipe (render + SFTTrainer)"])
    ref_cpu = statistics.median(cpu["recipe (render + SFTTrainer)"])
    machine = platform.processor() or platform.machine()
    print()
    print(f"date: {datetime.date.today()}  machine: {os.cpu_count()}-core CPU ({machine}), "
          f"load average (1/5/15 min) at start {'/'.join(f'{x:.1f}' for x in load_start)}, "
          f"at end {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"data: {args.conversations} synthetic two-role conversations, {tokens} tokens "
          f"(built-in {args.vocab_size}-token byte-level BPE), chatml, max_seq_len {args.max_seq_len}, packing")
    print(f"{'path':40} {'median s':>9} {'conv/s':>9} {'tokens/s':>11} {'peak MiB':>9} {'speed-up':>9} "
          f"{'cpu s':>7} {'cpu ratio':>9}")
    for name, values in times.items():
        med, med_cpu = statistics.median(values), statistics.median(cpu[name])
        print(f"{name:40} {med:9.2f} {args.conversations / med:9.0f} {tokens / med:11.0f} "
              f"{memory[name]:9.0f} {ref / med:8.2f}x {med_cpu:7.2f} {ref_cpu / med_cpu:8.2f}x")
    print(f"tokenizer alone (encode_batch_fast of the rendered texts): {statistics.median(floor):.2f} cpu s; "
          f"the recipe's cpu time is {ref_cpu / statistics.median(floor):.2f}x that")
    recipe = times["recipe (render + SFTTrainer)"]
    for name in variants:
        pairs = [r / o for r, o in zip(recipe, times[name])]
        print(f"{name}: speed-up per repeat {', '.join(f'{p:.2f}x' for p in pairs)}; "
              f"best-of-{args.repeats} {min(recipe) / min(times[name]):.2f}x")
    print(f"process peak RSS (getrusage): {__import__('resource').getrusage(__import__('resource').RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
