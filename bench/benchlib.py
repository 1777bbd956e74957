"""Shared pieces of the benchmark scripts: fixtures (model, data, settings), training runs
started with `accelerate launch`, a step timer, peak memory, and small result tables.

Nothing here is timed itself; the scripts in bench/ call these helpers and print ratios.
"""

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
DEFAULT_WORK = REPO / "build" / "bench"  # build/ is git-ignored

# Llama-shaped models built like the workflow's built-in one (builtin_model.build_model).
MODEL_SPECS = {
    # the default run's model, for smoke tests of the bench scripts
    "tiny": dict(hidden_size=128, intermediate_size=352, num_layers=2, num_heads=4, num_kv_heads=2),
    # ~25M parameters: compute dominates at max_seq_len 512
    "small": dict(hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8, num_kv_heads=4),
    # ~0.75B parameters (3 GiB in fp32) in 64 narrow decoder layers: the weights dominate memory (the memory
    # benchmark); FSDP shards them layer by layer
    "deep": dict(hidden_size=1024, intermediate_size=2816, num_layers=64, num_heads=8, num_kv_heads=4),
    # TinyLlama-1.1B's shape (bench/gpu_mfu.py)
    "llama-1b": dict(
        hidden_size=2048, intermediate_size=5632, num_layers=22, num_heads=32, num_kv_heads=4, config_vocab=32000
    ),
}
BASE_SPEC = dict(vocab_size=512, max_position_embeddings=2048, seed=0)


# --- environment ---------------------------------------------------------------------------


def machine():
    """A one-line description of where the figures come from."""
    import torch

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU ({cpu}, {os.cpu_count()} cores), torch {torch.__version__}, {platform.system()}"


# Allocator variants of our path (bench paths "ours-<variant>"): training.allocator, and
# settings on top of what shardtune.launch.allocator gives the training processes.
ALLOCATOR_VARIANTS = {
    "glibc": ("system", {}),  # the C library's malloc (what ours ran with before training.allocator)
    "jemalloc": ("jemalloc", {}),  # jemalloc with shardtune's settings (allocator.SETTINGS)
    "jemalloc-defaults": ("jemalloc", {"MALLOC_CONF": ""}),  # jemalloc's own defaults
    "jemalloc-nodecay": ("jemalloc", {"MALLOC_CONF": "background_thread:true,dirty_decay_ms:0,muzzy_decay_ms:0"}),
    "jemalloc-nopurge": ("jemalloc", {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),  # keeps freed pages
    "jemalloc-10s": ("jemalloc", {"MALLOC_CONF": "background_thread:true,dirty_decay_ms:10000,muzzy_decay_ms:0"}),
    "jemalloc-1arena-nopurge": ("jemalloc", {"MALLOC_CONF": "narenas:1,dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
    "jemalloc-1arena": ("jemalloc", {"MALLOC_CONF": "narenas:1,background_thread:true,dirty_decay_ms:10000,muzzy_decay_ms:0"}),
    "glibc-arena1": ("system", {"MALLOC_ARENA_MAX": "1"}),
    "tcmalloc": ("tcmalloc", {}),
    "tcmalloc-aggressive": ("tcmalloc", {"TCMALLOC_AGGRESSIVE_DECOMMIT": "true"}),
}


def allocator_env(settings, variant=None):
    """(allocator, environment) of the training processes as shardtune.launch sets them for
    `settings` (training.allocator), or for an allocator variant of ALLOCATOR_VARIANTS."""
    from shardtune.launch.allocator import select

    requested, extra = ALLOCATOR_VARIANTS[variant] if variant else (settings["training"].get("allocator", "auto"), {})
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    import torch

    name, updates, _ = select(requested, clean, gpus=torch.cuda.device_count())
    # an empty LD_PRELOAD overrides one inherited from the caller's environment
    return name, {"LD_PRELOAD": "", **updates, **(extra if name == requested else {})}


def load_average():
    """The 1-minute load average (other users share the machine: report it with each figure)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


# --- peak memory ---------------------------------------------------------------------------


def _status_kib(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def peak_rss_gib():
    """This process's peak resident set (ru_maxrss, KiB on Linux) in GiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def memory_now_gib():
    """Current resident set split into anonymous and file-backed (mmap'd weights) memory, and
    the proportional set size (pages shared with other processes counted by share), GiB."""
    out = {}
    for field, key in (("RssAnon", "rss_anon_gib"), ("RssFile", "rss_file_gib")):
        kib = _status_kib(field)
        if kib is not None:
            out[key] = kib / 2**20
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["pss_gib"] = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return out


def loaded_allocator():
    from shardtune.launch.allocator import loaded

    return loaded()


def minor_faults():
    """Minor page faults of this process so far (pages mapped in and zeroed on first touch)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def system_seconds():
    """Kernel CPU time of this process so far (page faults, madvise, munmap among it)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def cpu_seconds():
    """User + system CPU time of this process so far (all its threads)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reset_peak_rss():
    """Restart the peak-RSS count from the current RSS (Linux: clear_refs 5); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- step timer ----------------------------------------------------------------------------


def step_timer(path, reset_peak=False):
    """A TrainerCallback recording, per optimizer step, the wall clock and the tokens seen
    (the Trainer's num_input_tokens_seen, summed over ranks), and the peak RSS of each rank.

    Each rank writes `path` with `.rank{N}` before the suffix. With `reset_peak` the peak count
    restarts when training starts, so the training peak is seen apart from the loading peak."""
    import torch
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.record = {
                "rank": args.process_index,
                "world_size": args.world_size,
                "threads": torch.get_num_threads(),
                "peak_before_train_gib": peak_rss_gib(),
                "allocator": loaded_allocator(),
                "peak_reset": bool(reset_peak and reset_peak_rss()),
                "cpu_s_at_train_begin": cpu_seconds(),
                "steps": [],
            }
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.record["steps"].append(
                {
                    "step": state.global_step,
                    "t": time.perf_counter() - self.t0,
                    "tokens": state.num_input_tokens_seen,
                    "peak_gib": peak_rss_gib(),
                    "cpu_s": cpu_seconds(),
                    "minor_faults": minor_faults(),
                    "sys_s": system_seconds(),
                    **memory_now_gib(),
                }
            )

        def on_train_end(self, args, state, control, **kwargs):
            self.record["peak_train_gib"] = peak_rss_gib()
            out = Path(path)
            out = out.with_name(f"{out.stem}.rank{args.process_index}{out.suffix}")
            out.write_text(json.dumps(self.record, indent=1))

    return StepTimer()


def timer_files(path, world_size):
    path = Path(path)
    return [path.with_name(f"{path.stem}.rank{r}{path.suffix}") for r in range(world_size)]


def read_timer(path, world_size):
    """The per-rank records of a run timed with step_timer."""
    path = Path(path)
    return [json.loads(path.with_name(f"{path.stem}.rank{r}{path.suffix}").read_text()) for r in range(world_size)]


def throughput(records, warmup):
    """Tokens/s over the optimizer steps after the first `warmup` ones (rank 0's clock; tokens
    are summed over ranks by the Trainer), plus seconds per step."""
    steps = records[0]["steps"]
    if len(steps) <= warmup:
        raise ValueError(f"only {len(steps)} steps recorded, need more than warmup={warmup}")
    first, last = (steps[warmup - 1] if warmup else {"t": 0.0, "tokens": 0}), steps[-1]
    seconds = last["t"] - first["t"]
    tokens = last["tokens"] - first["tokens"]
    result = {}
    if all("cpu_s" in r["steps"][-1] for r in records):
        # CPU seconds spent by all ranks: less sensitive than wall time to other users' load
        cpu = sum(
            r["steps"][-1]["cpu_s"] - (r["steps"][warmup - 1]["cpu_s"] if warmup else r["cpu_s_at_train_begin"])
            for r in records
        )
        result["tokens_per_cpu_s"] = tokens / cpu
    timed = steps[max(warmup - 1, 0):]
    rates = sorted((b["tokens"] - a["tokens"]) / (b["t"] - a["t"]) for a, b in zip(timed, timed[1:]))
    if rates:  # the median step: robust to another user's burst hitting a step or two
        result["tokens_per_s_median_step"] = rates[len(rates) // 2] if len(rates) % 2 else sum(rates[len(rates) // 2 - 1 : len(rates) // 2 + 1]) / 2
    return {
        **result,
        "tokens_per_s": tokens / seconds,
        "s_per_step": seconds / (len(steps) - warmup),
        "tokens": tokens,
        "steps": len(steps) - warmup,
    }


# --- fixtures ------------------------------------------------------------------------------


def build_model_dir(out_dir, name):
    """A Llama-shaped model + the built-in tokenizer in `out_dir` (skipped if there), built by
    builtin_model.build_model from MODEL_SPECS[name]."""
    from shardtune.inputs.builtin_model import build_model

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    build_model(tmp, {**BASE_SPEC, **MODEL_SPECS[name]})
    tmp.rename(out_dir)
    return out_dir


def run_config(model_dir, dataset_dir, conversations, max_seq_len, batch, steps, **overrides):
    """A shardtune config (as config.yaml would hold it) for one bench run."""
    from shardtune.config import deep_merge

    config = {
        "runs": {"bench": {}},
        "dataset": {"source": "builtin", "builtin": {"conversations": conversations}},
        "model": {"source": str(model_dir)},
        "data": {"max_seq_len": max_seq_len, "packing": True},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1, "target_modules": "all-linear"},
        "fsdp": {"version": 2, "num_processes": 2},
        "training": {
            "per_device_train_batch_size": batch,
            "max_steps": steps,
            "logging_steps": 5,
            "eval_strategy": "no",
            "save_steps": 10_000,
            "seed": 100,
        },
    }
    return deep_merge(config, overrides)


def settings_of(config):
    from shardtune.config import resolve_runs

    (settings,) = resolve_runs(config).values()
    return settings


def fixtures(work, model_name, conversations, max_seq_len):
    """Model, fetched data set, prepared data set and the recipe-style data set (one
    directory per split with a `messages` column), all built once under `work`."""
    import datasets

    from shardtune.data.prepare import prepare
    from shardtune.inputs.sources import fetch_dataset, fetch_model

    work = Path(work)
    model_files = build_model_dir(work / "models" / model_name, model_name)
    model_dir = work / "fetched" / model_name
    if not model_dir.exists():
        fetch_model({"source": str(model_files), "revision": None}, model_dir)
    settings = settings_of(run_config(model_files, None, conversations, max_seq_len, 1, 1))
    dataset_dir = work / "datasets" / f"builtin-{conversations}"
    if not dataset_dir.exists():
        fetch_dataset(settings["dataset"], dataset_dir)
    prepared = work / "prepared" / f"{model_name}-{conversations}-{max_seq_len}"
    if not prepared.exists():
        prepare(dataset_dir, model_dir, {"data": settings["data"]}, prepared, log=lambda *a: None)
    recipe_data = work / "recipe-data" / f"builtin-{conversations}"
    if not recipe_data.exists():
        raw = datasets.load_from_disk(str(dataset_dir / "data"))
        for split in ("train", "test"):
            raw[split].select_columns(["messages"]).save_to_disk(str(recipe_data / split))
    return {"model_files": model_files, "model": model_dir, "dataset": dataset_dir, "prepared": prepared, "recipe_data": recipe_data}


def write_accelerate_yaml(settings, path):
    from shardtune.launch.accelerate_config import write

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write(settings, str(path), gpus=0)
    return path


# --- runs ----------------------------------------------------------------------------------


def launch(accelerate_yaml, script_and_args, log_path, timeout=1800, module=False, env=None, finished=()):
    """`accelerate launch --config_file X [-m] script args`; returns wall seconds. Raises with
    the log's tail if the run fails, unless every file in `finished` exists (the run trained
    to the end and failed while exiting: then it says so and carries on)."""
    cmd = [str(BIN / "accelerate"), "launch", "--config_file", str(accelerate_yaml)]
    cmd += ["-m"] if module else []
    cmd += [str(a) for a in script_and_args]
    run_env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCH), str(REPO / "src"), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        **(env or {}),
    }
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=run_env, timeout=timeout)
    seconds = time.perf_counter() - start
    if done.returncode != 0 and finished and all(Path(f).is_file() for f in finished):
        print(f"warning: exit status {done.returncode} after training finished (see {log_path})", flush=True)
    elif done.returncode != 0:
        tail = Path(log_path).read_text()[-4000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}), log {log_path}:\n{tail}")
    return seconds


def ours_args(settings_json, fx, out_dir, timer, memory_json=None, fix=None, reset_peak=False):
    """Arguments for bench/_ours.py: shardtune.train's own arguments behind the bench hooks."""
    args = [BENCH / "_ours.py", "--timer", timer]
    for one in [fix] if isinstance(fix, str) else fix or []:
        args += ["--fix", one]
    args += ["--reset-peak"] if reset_peak else []
    args += ["--", "--settings", settings_json, "--data", fx["prepared"], "--model", fx["model"]]
    args += ["--output", Path(out_dir) / "train", "--done", Path(out_dir) / "done.json"]
    args += ["--memory", memory_json] if memory_json else []
    return args


def record_run(run_dir, settings_json, fx, path="ours"):
    """run.json in a run's directory: what estimator_accuracy.py needs."""
    write_json(
        Path(run_dir) / "run.json", {"settings": str(settings_json), "model_files": str(fx["model_files"]), "path": path}
    )


def recipe_flags(fx, settings, out_dir):
    """The recipe's run_peft_fsdp.sh flags, with this run's model, data, length, batch and
    steps (the bench's scale), for bench/reference_train.py."""
    t, d, lora = settings["training"], settings["data"], settings["lora"]
    flags = {
        "seed": t["seed"],
        "model_name_or_path": fx["model_files"],
        "dataset_name": fx["recipe_data"],
        "chat_template_format": "chatml",
        "add_special_tokens": False,
        "append_concat_token": False,
        "splits": "train,test",
        "max_length": d["max_seq_len"],
        "num_train_epochs": 1,
        "max_steps": t["max_steps"],
        "logging_steps": t["logging_steps"],
        "log_level": "info",
        "logging_strategy": "steps",
        "eval_strategy": "no",  # recipe: epoch (evaluation is not part of the timed steps)
        "save_strategy": "no",  # recipe: epoch (a full-state-dict save; crashes under FSDP2)
        "bf16": False,  # recipe: True (mixed precision); fp32 on CPU, as ours
        "packing": True,
        "learning_rate": t["learning_rate"],
        "lr_scheduler_type": t["lr_scheduler_type"],
        "weight_decay": t["weight_decay"],
        # recipe: --warmup_ratio 0.0; transformers 5 takes a ratio below 1 in warmup_steps
        "warmup_steps": t["warmup_steps"] or t["warmup_ratio"],
        "max_grad_norm": t["max_grad_norm"],
        "output_dir": Path(out_dir) / "train",
        "per_device_train_batch_size": t["per_device_train_batch_size"],
        "per_device_eval_batch_size": t["per_device_eval_batch_size"],
        "gradient_accumulation_steps": t["gradient_accumulation_steps"],
        "gradient_checkpointing": t["gradient_checkpointing"],
        "use_reentrant": t["use_reentrant"],
        "dataset_text_field": "content",
        "use_flash_attn": False,  # recipe: True; flash-attn needs a GPU (the script then uses eager)
        "use_peft_lora": True,
        "lora_r": lora["r"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": lora["dropout"],
        "lora_target_modules": "all-linear",
        "use_4bit_quantization": False,
        "report_to": "none",
    }
    import torch

    if not torch.cuda.is_available():
        flags["use_cpu"] = True  # a TrainingArguments flag: without it the ranks run apart on CPU
    return [f"--{k}={v}" for k, v in flags.items()]


def reference_args(fx, settings, out_dir, timer, attn=None, reset_peak=False, ddp=False):
    args = [BENCH / "reference_train.py", *recipe_flags(fx, settings, out_dir), f"--bench_timer={timer}"]
    args += ["--bench_ddp=True"] if ddp else []
    args += [f"--attn_implementation={attn}"] if attn else []
    args += ["--bench_reset_peak=True"] if reset_peak else []
    return args


def write_json(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, default=str))


def table(rows, columns):
    """A Markdown table of `rows` (dicts) with `columns` [(key, header, format)]."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("" if value is None else (fmt.format(value) if fmt else str(value)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def geomean(values):
    import math

    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))
