"""Pieces of the training entry point that need no launch."""

import pytest
import torch

from shardtune.config import resolve_runs
from shardtune.errors import UserError
from shardtune.inputs.modeling import load_dtype
from shardtune.plan.attention import compute_dtype_name, decide, load_dtype_name
from shardtune.train.entry import lora_config, sft_config


@pytest.mark.parametrize("requested", ["auto", "sdpa", "eager", "flash_attention_2"])
@pytest.mark.parametrize("compute", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("has_flash", [True, False])
@pytest.mark.parametrize("has_gpu", [True, False])
def test_attention_is_decided_with_the_compute_dtype(requested, compute, has_flash, has_gpu):
    """flash-attn only on a GPU, installed, in bf16/fp16; every other case says why not."""
    runs = has_flash and has_gpu and compute != "float32"
    missing = []
    if not has_flash:
        missing.append("flash-attn is not installed")
    if not has_gpu:
        missing.append("no GPU visible")
    if compute == "float32":
        missing.append("the run computes in float32 (flash-attn needs bfloat16 or float16)")
    if requested == "flash_attention_2" and not runs:
        with pytest.raises(UserError, match="flash_attention_2 cannot run here: " + "; ".join(missing).replace("(", r"\(").replace(")", r"\)")):
            decide(requested, compute, has_flash, has_gpu)
        return
    attn, why = decide(requested, compute, has_flash, has_gpu)
    if requested != "auto":
        assert (attn, why) == (requested, "set in model.attn_implementation")
    elif runs:
        assert attn == "flash_attention_2" and compute in why
    else:
        assert (attn, why) == ("sdpa", "; ".join(missing))


@pytest.mark.parametrize(
    "overrides, load, compute",
    [
        ({}, "float32", "float32"),  # the default: fp32 weights, no mixed precision
        ({"fsdp": {"mixed_precision": "bf16"}}, "float32", "bfloat16"),
        ({"fsdp": {"mixed_precision": "bf16"}, "training": {"bf16": False}}, "float32", "float32"),
        ({"training": {"bf16": True}}, "float32", "bfloat16"),
        ({"fsdp": {"mixed_precision": "fp16"}}, "float32", "float16"),
        ({"model": {"dtype": "bfloat16"}}, "bfloat16", "bfloat16"),
        ({"quantization": {"load_in_4bit": True}}, "bfloat16", "bfloat16"),  # quant storage
        ({"quantization": {"load_in_4bit": True, "bnb_4bit_quant_storage_dtype": "float32"}}, "float32", "float32"),
    ],
)
def test_load_and_compute_dtypes_follow_the_settings(overrides, load, compute):
    s = resolve_runs(overrides)["demo"]
    assert (load_dtype_name(s), compute_dtype_name(s)) == (load, compute)
    assert load_dtype(s) is getattr(torch, load)


def test_the_default_config_on_a_gpu_with_flash_attn_keeps_sdpa():
    """fp32 weights without mixed precision: flash-attn would reject them at the first step."""
    s = resolve_runs({})["demo"]
    assert decide("auto", compute_dtype_name(s), has_flash=True, has_gpu=True)[0] == "sdpa"
    bf16 = resolve_runs({"fsdp": {"mixed_precision": "bf16"}})["demo"]
    assert decide("auto", compute_dtype_name(bf16), has_flash=True, has_gpu=True)[0] == "flash_attention_2"


def test_asking_for_flash_attention_in_float32_is_refused_at_validation():
    with pytest.raises(UserError, match=r"'runs\.demo\.model\.attn_implementation': flash_attention_2 needs bf16 or fp16"):
        resolve_runs({"model": {"attn_implementation": "flash_attention_2"}})
    resolve_runs({"model": {"attn_implementation": "flash_attention_2"}, "training": {"bf16": True}})


def test_qlora_loads_in_the_quant_storage_dtype():
    s = resolve_runs({"quantization": {"load_in_4bit": True, "bnb_4bit_quant_storage_dtype": "bfloat16"}})["demo"]
    assert load_dtype(s) is torch.bfloat16
    assert load_dtype(resolve_runs({})["demo"]) is torch.float32


def test_settings_map_to_trainer_and_lora_arguments(tmp_path):
    s = resolve_runs(
        {
            "training": {"learning_rate": 3e-4, "gradient_accumulation_steps": 4, "use_reentrant": True, "warmup_ratio": 0.1},
            "lora": {"r": 16, "alpha": 32, "use_dora": True, "modules_to_save": ["lm_head"]},
            "fsdp": {"mixed_precision": "bf16"},
        }
    )["demo"]
    args = sft_config(s, tmp_path)
    assert args.learning_rate == 3e-4 and args.gradient_accumulation_steps == 4
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": True}
    assert args.warmup_steps == 0.1 and args.bf16 is True
    assert args.dataset_kwargs == {"skip_prepare_dataset": True}
    # packed rows are flattened padding-free only for the varlen flash kernel
    assert not args.padding_free and not args.packing
    assert sft_config(s, tmp_path, "flash_attention_2").padding_free
    lora = lora_config(s["lora"])
    assert (lora.r, lora.lora_alpha, lora.use_dora, lora.modules_to_save) == (16, 32, True, ["lm_head"])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_stay_rows_and_apart(attn):
    """On sdpa/eager a batch of packed rows stays [batch, L]: each packed sequence gets the
    logits it gets alone, and the loss equals that of TRL's flattened padding-free batch (same
    tokens carry loss); a row whose positions do not restart leaks, so the check can fail."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from shardtune.train.collate import PackedRowsCollator

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn,
    )
    model = LlamaForCausalLM(config).eval()
    first, second, third = (torch.randint(3, 500, (n,)) for n in (7, 5, 3))
    rows = [
        {"input_ids": torch.cat([first, second]).tolist(), "seq_lengths": [7, 5]},
        {"input_ids": third.tolist(), "seq_lengths": [3]},
    ]
    for row in rows:
        row["labels"] = list(row["input_ids"])
    batch = PackedRowsCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (2, 12) and "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[*range(7), *range(5)], [*range(3), *range(9)]]
    assert (batch["labels"][:, 0] == -100).all() and batch["labels"][0, 7] == -100
    assert (batch["labels"][1, 3:] == -100).all()
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        alone = model(input_ids=second[None], use_cache=False).logits
        leaky = model(input_ids=batch["input_ids"][:1], use_cache=False).logits
        flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
        flat_loss = model(**flat, use_cache=False).loss
    assert torch.allclose(out.logits[0, 7:], alone[0], atol=1e-5)
    assert not torch.allclose(leaky[0, 7:], alone[0], atol=1e-3)
    assert torch.allclose(out.loss, flat_loss, atol=1e-5)


def test_peak_memory_reports_reserved_and_allocated_on_a_gpu(monkeypatch):
    """On a GPU done.json gets both peaks (their ratio is the caching allocator's reserve that
    the pre-flight estimate assumes); on CPU the resident set and no allocated figure."""
    from shardtune.train.entry import peak_memory_gib

    cpu_peak, cpu_allocated = peak_memory_gib()
    assert cpu_peak > 0.1 and cpu_allocated is None
    # On CPU it is this process's real resident peak: in a fresh process started from this one
    # (whose own resident set is larger after the tests before), touching 2 GiB raises it by that.
    import subprocess
    import sys

    code = (
        "import torch; from shardtune.train.entry import peak_memory_gib; before = peak_memory_gib()[0];"
        "block = torch.ones(2**29); print(peak_memory_gib()[0] - before)"  # 2 GiB of float32, every page written
    )
    grown = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()[-1])
    assert 1.8 < grown < 2.2, grown
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: 30 * 2**30)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: 20 * 2**30)
    assert peak_memory_gib() == (30.0, 20.0)


def test_flash_attention_batches_are_flattened_with_every_conversation_starting_at_position_0():
    """What the varlen flash kernel gets (its only input about boundaries is the position ids):
    TRL's padding-free collator, which training uses for flash_attention_2, flattens prepared
    rows into one sequence whose positions restart at every packed conversation, with the same
    tokens, positions and labels as the per-row collator of sdpa/eager, concatenated."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from shardtune.train.collate import PackedRowsCollator

    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [5, 6, 7, 8, 9], "seq_lengths": [3, 2]},
        {"input_ids": [10, 11, 12], "labels": [-100, 11, 12], "seq_lengths": [3]},
    ]
    flat = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11, 12]] and "attention_mask" not in flat
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    per_row = PackedRowsCollator(pad_token_id=0)(rows)
    real = per_row["input_ids"] != 0
    assert flat["position_ids"][0].tolist() == per_row["position_ids"][real].tolist()
    assert flat["labels"][0].tolist() == per_row["labels"][real].tolist() == [-100, 6, 7, -100, 9, -100, 11, 12]


def test_the_csv_log_comes_from_the_trainers_log_history(tmp_path):
    """Rows for logging steps and evaluations (not the end-of-training summary); tokens/s over
    each interval from the Trainer's own counters, none across a resume's restarted clock."""
    import csv

    from shardtune.train.entry import write_log_csv

    history = [
        {"step": 5, "epoch": 0.25, "loss": 6.1, "learning_rate": 2e-3, "grad_norm": 0.8, "num_input_tokens_seen": 4000, "train_runtime": 2.0},
        {"step": 10, "epoch": 0.5, "loss": 5.8, "learning_rate": 1e-3, "grad_norm": 0.4, "num_input_tokens_seen": 8000, "train_runtime": 3.0},
        {"step": 10, "epoch": 0.5, "eval_loss": 5.7, "num_input_tokens_seen": 8000, "eval_runtime": 0.5},
        # resumed from checkpoint-10: the Trainer's clock restarts, its token count does not
        {"step": 15, "epoch": 0.75, "loss": 5.6, "learning_rate": 5e-4, "grad_norm": 0.3, "num_input_tokens_seen": 12000, "train_runtime": 1.0},
        {"step": 20, "epoch": 1.0, "loss": 5.5, "learning_rate": 1e-4, "grad_norm": 0.3, "num_input_tokens_seen": 16000, "train_runtime": 3.0},
        {"step": 20, "train_runtime": 3.1, "train_loss": 5.7, "train_samples_per_second": 9.0},
    ]
    write_log_csv(history, tmp_path / "log.csv")
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert [(r["step"], r["loss"], r["eval_loss"]) for r in rows] == [
        ("5", "6.1", ""), ("10", "5.8", ""), ("10", "", "5.7"), ("15", "5.6", ""), ("20", "5.5", "")
    ]
    assert [r["tokens_per_second"] for r in rows] == ["2000.0", "4000.0", "", "", "2000.0"]
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]


@pytest.mark.parametrize("strategy, saved", [("epoch", [4, 8]), ("no", [8]), ("steps", [3, 6, 8])])
def test_each_checkpoint_is_written_once_and_the_last_step_always(tmp_path, strategy, saved):
    """A real Trainer on a tiny model: with epoch saving the last step ends an epoch, and it
    must not be written a second time into a checkpoint already marked complete."""
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from shardtune.train.checkpoints import MARKER, MarkCompleteCheckpoints, SaveAtEnd

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    rows = [{"input_ids": torch.arange(8) % 32, "labels": torch.arange(8) % 32} for _ in range(8)]
    args = TrainingArguments(
        tmp_path, per_device_train_batch_size=2, num_train_epochs=2, save_strategy=strategy, save_steps=3,
        report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[MarkCompleteCheckpoints(), SaveAtEnd()])
    written, save = [], trainer._save_checkpoint

    def recording(*a, **k):
        path = tmp_path / f"checkpoint-{trainer.state.global_step}"
        assert not (path / MARKER).exists(), f"{path.name} written again after it was marked complete"
        written.append(trainer.state.global_step)
        return save(*a, **k)

    trainer._save_checkpoint = recording
    trainer.train()
    assert written == saved
