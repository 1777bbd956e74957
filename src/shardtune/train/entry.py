"""Training entry point, started by `accelerate launch -m shardtune.train`.

Maps the run's settings to TRL's SFTTrainer + a PEFT LoraConfig; Accelerate wraps the model
with FSDP from the generated config file. Training writes sharded checkpoints only: a
separate step turns the last one into an adapter (a full-state-dict save under FSDP2 is
what crashes in the recipe).
"""

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from shardtune.launch.cpu_fsdp import keep_fsdp_on_cpu
from shardtune.train.peft_fsdp1 import fix_peft_under_fsdp1

keep_fsdp_on_cpu()  # before anything creates Accelerate's state
fix_peft_under_fsdp1()  # else FSDP1 checkpoints save and resume an empty adapter

import datasets  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from shardtune.errors import UserError  # noqa: E402
from shardtune.inputs.modeling import load_base_model, packed_position_ids  # noqa: E402
from shardtune.io import atomic_file, read_json, write_json  # noqa: E402
from shardtune.launch import allocator  # noqa: E402
from shardtune.plan.attention import attention_implementation  # noqa: E402
from shardtune.plan.autobatch import apply_resolved, describe  # noqa: E402
from shardtune.plan.fit import check_fits, format_report, over_budget_warnings  # noqa: E402
from shardtune.publish.every_save import every_save_callback  # noqa: E402
from shardtune.report.runinfo import versions  # noqa: E402
from shardtune.train.checkpoints import (  # noqa: E402
    MarkCompleteCheckpoints,
    SaveAtEnd,
    latest_complete,
    remove_incomplete,
    restore_fsdp1_optimizer,
)
from shardtune.train.collate import PackedRowsCollator, flattens_batches  # noqa: E402
from shardtune.train.fsdp_report import effective_fsdp  # noqa: E402


def lora_config(lora):
    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        bias=lora["bias"],
        use_dora=lora["use_dora"],
        modules_to_save=lora["modules_to_save"],
        task_type="CAUSAL_LM",
    )


def sft_config(settings, output_dir, attn="sdpa"):
    t, f, d = settings["training"], settings["fsdp"], settings["data"]
    flatten = d["packing"] and flattens_batches(attn)
    return SFTConfig(
        output_dir=str(output_dir),
        seed=t["seed"],
        data_seed=t["data_seed"] if t["data_seed"] is not None else t["seed"],
        learning_rate=t["learning_rate"],
        lr_scheduler_type=t["lr_scheduler_type"],
        weight_decay=t["weight_decay"],
        # transformers 5 takes a ratio as a float below 1 in warmup_steps
        warmup_steps=t["warmup_steps"] or t["warmup_ratio"],
        max_grad_norm=t["max_grad_norm"],
        num_train_epochs=t["num_train_epochs"],
        max_steps=t["max_steps"],
        per_device_train_batch_size=t["per_device_train_batch_size"],
        per_device_eval_batch_size=t["per_device_eval_batch_size"],
        gradient_accumulation_steps=t["gradient_accumulation_steps"],
        gradient_checkpointing=t["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": t["use_reentrant"]},
        optim=t["optim"],
        logging_steps=t["logging_steps"],
        logging_strategy="steps",
        log_level=t["log_level"],
        eval_strategy=t["eval_strategy"],
        eval_steps=t["eval_steps"],
        save_strategy=t["save_strategy"],
        save_steps=t["save_steps"],
        save_total_limit=t["save_total_limit"],
        dataloader_num_workers=t["dataloader_num_workers"],
        bf16=f["mixed_precision"] == "bf16" if t["bf16"] is None else t["bf16"],
        fp16=f["mixed_precision"] == "fp16" if t["fp16"] is None else t["fp16"],
        # Rows are already tokenized and packed by the prepare step. For flash attention TRL's
        # collator flattens a batch into one padding-free sequence; otherwise the trainer gets
        # PackedRowsCollator (see collate.py).
        max_length=d["max_seq_len"],
        packing=flatten,
        padding_free=flatten,
        dataset_kwargs={"skip_prepare_dataset": True},
        include_num_input_tokens_seen="non_padding",
        report_to=["tensorboard"],
        disable_tqdm=not sys.stderr.isatty(),
        push_to_hub=False,
        use_cpu=not torch.cuda.is_available(),
    )


LOG_FIELDS = ["step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_second", "tokens_seen"]


def write_log_csv(log_history, path):
    """The training log as CSV, from the Trainer's own log_history (resumed runs included):
    one row per logging step and per evaluation; tokens/s over the interval since the previous
    training entry, from the Trainer's num_input_tokens_seen and train_runtime (None where a
    resume restarted the clock)."""
    rows, last = [], None
    for entry in log_history:
        if "loss" not in entry and "eval_loss" not in entry:
            continue  # the end-of-training summary
        rate = None
        if "train_runtime" in entry:
            now, seen = entry["train_runtime"], entry["num_input_tokens_seen"]
            if last is None:
                rate = seen / now if now > 0 else None
            elif now > last[0] and seen > last[1]:
                rate = (seen - last[1]) / (now - last[0])
            last = (now, seen)
        row = {k: entry.get(k) for k in ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm")}
        rows.append(row | {"tokens_per_second": rate, "tokens_seen": entry.get("num_input_tokens_seen")})
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def fingerprint(settings, data_dir):
    """What a checkpoint depends on: resuming from one with another fingerprint is refused."""
    relevant = {k: settings[k] for k in ("model", "data", "lora", "quantization", "training")}
    # the C allocator changes memory use, not what is computed; the effective batch is the
    # (resolved) batch x accumulation, which are in
    derived = ("allocator", "per_device_effective_batch_size")
    relevant["training"] = {k: v for k, v in settings["training"].items() if k not in derived}
    relevant["fsdp"] = {k: v for k, v in settings["fsdp"].items() if k not in ("machine_rank", "main_process_ip")}
    relevant["data_dir"] = Path(data_dir).name
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()


def check_device_memory(report, log):
    """Print the pre-flight estimate; on a GPU with no declared size, check the real card."""
    log(format_report(report))
    declared = report["declared"]
    if torch.cuda.is_available() and declared["device_gib"] is None:
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / 2**30
        over = check_fits(report, total, None, declared["force"], device_source="on this GPU")
        for line in over_budget_warnings(over, declared["force"]):
            log(line)


def peak_memory_gib():
    """This process's peaks: the GPU's reserved memory (the resident set on CPU), and the GPU
    memory tensors took (None on CPU); the ratio is the caching allocator's reserve, which the
    pre-flight estimate can only assume (shardtune.plan.memory.CUDA_TRANSIENT_RESERVE)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_reserved() / 2**30, torch.cuda.max_memory_allocated() / 2**30
    return resident_peak_gib(), None


def _status_gib(field):
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def resident_gib():
    """This process's resident set now (None without /proc)."""
    return _status_gib("VmRSS")


def resident_peak_gib():
    """This process's peak resident set. VmHWM where /proc has it: getrusage's ru_maxrss survives
    exec, so a rank would report its launcher's resident set at fork if that was larger."""
    peak = _status_gib("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def receives_weights(settings, rank):
    """Whether this rank may build the model without reading it: FSDP will give it rank 0's
    weights (cpu_ram_efficient_loading, as Accelerate set it for this launch: FSDP2 broadcasts
    the full state dict, FSDP1 syncs module states). transformers reads the whole checkpoint on
    every rank even then, which for a 70B model in fp32 is ~257 GiB per rank. 4-bit models
    load for real everywhere: Accelerate broadcasts no quantized weights."""
    from transformers.integrations.fsdp import is_fsdp_enabled  # ACCELERATE_USE_FSDP + FSDP_CPU_RAM_EFFICIENT_LOADING

    return rank != 0 and is_fsdp_enabled() and not settings["quantization"]["load_in_4bit"]


def materialize_trainable(model):
    """Give the meta model's trainable (LoRA) parameters real, uninitialised CPU storage, which
    rank 0's broadcast fills: under FSDP2 the Trainer builds the optimizer before Accelerate
    shards the model and maps its parameters to their shards by storage address, and every
    meta tensor has address 0 (the optimizer would step one LoRA matrix only)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.requires_grad and param.is_meta:
                module.register_parameter(name, torch.nn.Parameter(torch.empty_like(param, device="cpu")))


def probe_batch(test):
    """A fixed input for checking conversion later: the first packed test row."""
    row = test[0]
    ids = torch.tensor(row["input_ids"][:128])[None]
    positions = packed_position_ids(row["seq_lengths"])[: ids.shape[1]][None]
    return ids, positions


class Trainer(SFTTrainer):
    _load_optimizer_and_scheduler = restore_fsdp1_optimizer(SFTTrainer._load_optimizer_and_scheduler)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settings", required=True, help="resolved run settings (JSON file)")
    parser.add_argument("--data", required=True, help="prepared data directory")
    parser.add_argument("--model", required=True, help="fetched model directory")
    parser.add_argument("--output", required=True, help="training directory (checkpoints)")
    parser.add_argument("--done", required=True, help="JSON written when training is complete")
    parser.add_argument("--memory", help="pre-flight memory estimate (JSON) to print and check; its resolved batch settings are used")
    parser.add_argument("--hub", default="null", help="hub settings for pushing checkpoints while training (JSON)")
    args = parser.parse_args(argv)
    report = read_json(args.memory) if args.memory else {}
    # `auto` batch settings as estimate_memory resolved them; part of the fingerprint below
    settings = apply_resolved(read_json(args.settings), report.get("resolved"))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    is_main = state.is_main_process
    log = print if is_main else (lambda *a, **k: None)

    # A checkpoint from other settings must not be resumed; a partial one never is.
    stamp = fingerprint(settings, args.data)
    stamp_file = out / "fingerprint.txt"
    if is_main:
        if stamp_file.exists() and stamp_file.read_text().strip() != stamp:
            log(f"settings changed since the checkpoints in {out} were written: starting afresh")
            for path in out.glob("checkpoint-*"):
                shutil.rmtree(path)
            for stale in ("log.csv", "tensorboard"):
                shutil.rmtree(out / stale, ignore_errors=True) if (out / stale).is_dir() else (out / stale).unlink(
                    missing_ok=True
                )
        remove_incomplete(out, log=log)
        stamp_file.write_text(stamp + "\n")
    state.wait_for_everyone()

    if args.memory:
        check_device_memory(report, log)
        log(f"training batch: {describe(report.get('resolved'))}")

    data = datasets.load_from_disk(str(Path(args.data) / "data"))
    tokenizer = AutoTokenizer.from_pretrained(Path(args.data) / "tokenizer")
    attn, why = attention_implementation(settings)
    log(f"attention: {attn} ({why})")
    log(f"allocator: {allocator.loaded()} (training.allocator: {settings['training'].get('allocator', 'auto')})")
    empty = receives_weights(settings, state.process_index)
    model = load_base_model(args.model, settings, len(tokenizer), attn=attn, empty=empty)
    quantized = sum(type(m).__name__ == "Linear4bit" for m in model.modules())
    log(f"base model: {model.num_parameters()} parameters in {model.dtype}, 4-bit linear layers: {quantized}")
    loaded = "on the meta device (rank 0's weights arrive when FSDP wraps it)" if empty else "read from disk"
    rss, anon = resident_gib(), _status_gib("RssAnon")
    if rss is not None:
        loaded += f"; resident {rss:.2f} GiB ({anon:.2f} GiB anonymous)"
    print(f"[rank{state.process_index}] base model {loaded}", flush=True)

    os.environ["TENSORBOARD_LOGGING_DIR"] = str(out / "tensorboard")
    config = sft_config(settings, out, attn)
    callbacks = [MarkCompleteCheckpoints(), SaveAtEnd()]
    every_save = json.loads(args.hub)
    if every_save:  # hub.strategy: every_save; the Trainer's own push would upload sharded state
        push = every_save_callback({**settings, **every_save}, out, run=out.parent.name, log=log)
        if is_main:
            push.pusher.start()  # token, repo and privacy are checked before training
        callbacks.append(push)  # after MarkCompleteCheckpoints: pushes complete checkpoints only
    trainer = Trainer(
        model=model,
        args=config,
        train_dataset=data["train"],
        eval_dataset=data["test"] if config.eval_strategy != "no" else None,
        processing_class=tokenizer,
        data_collator=None if flattens_batches(attn) else PackedRowsCollator(tokenizer.pad_token_id),
        peft_config=lora_config(settings["lora"]),
        callbacks=callbacks,
    )
    if empty:
        materialize_trainable(trainer.model)
    distributed = str(trainer.accelerator.distributed_type)
    log(f"distributed type: {distributed}, processes: {state.num_processes}, fsdp: {trainer.is_fsdp_enabled}")
    if not trainer.is_fsdp_enabled:
        raise UserError(f"FSDP is not active (distributed type {distributed}): refusing to train unsharded")
    if is_main:
        trainer.model.peft_config["default"].save_pretrained(out / "adapter_config")

    resume = latest_complete(out)
    log(f"resuming from {resume}" if resume else "starting from step 0")
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    ran = effective_fsdp(trainer.accelerator, trainer.model_wrapped)
    ran["gradient_checkpointing"] = bool(getattr(trainer.model, "is_gradient_checkpointing", False)) and (
        trainer.args.gradient_checkpointing_kwargs or {}
    )
    log(f"FSDP as it ran: {json.dumps(ran)}")

    # Logits of the trained model on a fixed input, to prove the converted adapter later.
    ids, positions = probe_batch(data["test"])
    model = trainer.model_wrapped
    model.eval()
    with torch.no_grad():
        logits = model(
            input_ids=ids.to(trainer.args.device), position_ids=positions.to(trainer.args.device), use_cache=False
        ).logits
    peaks = [None] * state.num_processes
    torch.distributed.all_gather_object(peaks, peak_memory_gib())
    last = latest_complete(out)
    if is_main:
        write_log_csv(trainer.state.log_history, out / "log.csv")
        save_file(
            {"input_ids": ids, "position_ids": positions, "logits": logits.float().cpu().contiguous()},
            out / "probe.safetensors",
        )
        write_json(
            args.done,
            {
                "checkpoint": last.name,  # relative to the training directory
                "global_step": trainer.state.global_step,
                "distributed_type": distributed,
                "num_processes": state.num_processes,
                "fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version,
                "mixed_precision": str(trainer.accelerator.mixed_precision),  # effective, not just the file's
                "attn_implementation": attn,
                "allocator": allocator.loaded(),
                "train_loss": result.training_loss,
                "metrics": result.metrics,
                "resumed_from": resume.name if resume else None,
                "peak_memory_gib_per_rank": [peak for peak, _ in peaks],
                "peak_allocated_gib_per_rank": [allocated for _, allocated in peaks],  # GPU only
                "versions": versions(),
                "fingerprint": stamp,
                "resolved": report.get("resolved"),
                "fsdp": ran,  # read back from Accelerate and the wrapped model  # the batch settings used, `auto` ones resolved
            },
        )
    state.wait_for_everyone()
    # Without this, gloo's worker threads can still hold tensors when the interpreter shuts
    # down, and a rank aborts (SIGABRT) after a finished run, failing the job
    state.destroy_process_group()


def cli():
    """`python -m shardtune.train`: a UserError becomes one line the launcher finds in the log
    and shows on the console (launch.launcher.error_line)."""
    try:
        main()
    except UserError as err:
        print(f"ERROR: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
