"""Choosing the checkpoint to convert, and what the adapter directory holds. (Conversions with
added tokens, modules_to_save, the best and an earlier checkpoint run in test_sweep.py.)"""

import json

import pytest
import torch
from transformers import AutoTokenizer

from shardtune.export.convert import ConversionError, pad_tokenizer, select_checkpoint
from shardtune.inputs.builtin_model import build_tokenizer
from shardtune.train.checkpoints import MARKER


def read_json(path):
    return json.loads(path.read_text())


def fake_train_dir(root, saved, evals, incomplete=()):
    """Checkpoints at `saved` steps (complete unless in `incomplete`), the last complete one with
    a trainer_state.json whose log_history has eval_loss at `evals` ({step: loss})."""
    for step in saved:
        (root / f"checkpoint-{step}").mkdir(parents=True)
        if step not in incomplete:
            (root / f"checkpoint-{step}" / MARKER).write_text(f"{step}\n")
    history = [{"step": s, "loss": 9.0} for s in saved] + [{"step": s, "eval_loss": v} for s, v in evals.items()]
    last = max(s for s in saved if s not in incomplete)
    (root / f"checkpoint-{last}" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    return root


def test_last_best_and_step_choose_among_complete_checkpoints(tmp_path):
    # checkpoint-8 has the lowest eval loss but was interrupted while being written
    train = fake_train_dir(tmp_path, [2, 4, 6, 8], {2: 3.0, 4: 2.5, 6: 2.7, 8: 1.0}, incomplete={8})
    assert select_checkpoint(train, "checkpoint-6", "last")[0] == train / "checkpoint-6"
    path, why = select_checkpoint(train, "checkpoint-6", "best")
    assert path == train / "checkpoint-4" and "2.5 at step 4" in why
    assert select_checkpoint(train, "checkpoint-6", 2)[0] == train / "checkpoint-2"
    with pytest.raises(ConversionError, match=r"no complete checkpoint-8 .*have \[2, 4, 6\]"):
        select_checkpoint(train, "checkpoint-6", 8)


def test_best_needs_an_evaluation_where_a_checkpoint_was_saved(tmp_path):
    train = fake_train_dir(tmp_path, [5, 10], {3: 2.0, 7: 1.5})
    with pytest.raises(ConversionError, match=r"evaluated at steps \[3, 7\], saved at \[5, 10\].*eval_steps equal to save_steps"):
        select_checkpoint(train, "checkpoint-10", "best")


def test_reserved_tokens_pad_the_tokenizer_to_the_embedding_rows_without_changing_tokenization():
    tokenizer = build_tokenizer(512, 0)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>"]})
    text = "<|user|>\nReverse the word 'apple'.<|im_end|>"
    before = tokenizer(text)["input_ids"]
    added = pad_tokenizer(tokenizer, 520)
    assert len(tokenizer) == 520 and len(added) == 5
    assert tokenizer(text)["input_ids"] == before
    ids = tokenizer.convert_tokens_to_ids(added)
    assert tokenizer.decode(ids, skip_special_tokens=True) == ""
    assert pad_tokenizer(tokenizer, 520) == []


def test_adapter_dir_is_complete_and_records_its_checkpoint(demo_run):
    adapter = demo_run / "results/demo/adapter"
    done = read_json(demo_run / "results/demo/train/done.json")
    conversion = read_json(adapter / "conversion.json")
    assert conversion["selected"] == "last" and conversion["checkpoint"] == f"checkpoint-{done['global_step']}"
    assert conversion["verified_against"].startswith("the trained model")
    assert conversion["max_abs_logit_diff"] <= conversion["tolerance"] == 1e-5

    config = read_json(adapter / "adapter_config.json")
    trained = read_json(demo_run / "results/demo/train/adapter_config/adapter_config.json")
    for key in ("r", "lora_alpha", "lora_dropout", "target_modules", "use_dora", "modules_to_save", "peft_type"):
        assert config[key] == trained[key], key
    assert (config["r"], config["lora_alpha"]) == (8, 16)

    prepared = AutoTokenizer.from_pretrained(next((demo_run / "resources/prepared").glob("*/tokenizer")))
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    assert tokenizer.get_vocab() == prepared.get_vocab() and tokenizer.chat_template == prepared.chat_template


def test_a_bf16_runs_adapter_passes_its_proof_and_a_slightly_wrong_one_fails():
    """bf16 training computed the probe under autocast: the reload is compared in bf16 with a
    tolerance from the model's own rounding noise, so the right adapter passes however long
    the run, and an adapter 5% off (an earlier checkpoint's, a mixed-up rank) still fails."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from shardtune.export.convert import compare_logits

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, target_modules="all-linear")).eval()
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)  # a trained adapter
    ids = torch.randint(0, 128, (2, 24))
    probe = {"input_ids": ids, "position_ids": torch.arange(24).repeat(2, 1)}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        probe["logits"] = model(input_ids=ids, position_ids=probe["position_ids"]).logits.float()
    diff, tolerance, noise = compare_logits(model, probe, "bf16")
    assert diff <= tolerance and noise > 0 and tolerance == pytest.approx(3 * noise)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.95)
    wrong, _, _ = compare_logits(model, probe, "bf16")
    assert wrong > tolerance, (wrong, tolerance)
    # in fp32 the old fixed bf16 tolerance (0.05) let this wrong adapter through
    assert compare_logits(model, probe, "no")[0] < 0.05
