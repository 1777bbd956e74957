"""The reference: the source recipe's training path (PEFT examples/sft train.py + utils.py,
launched by run_peft_fsdp.sh), restated for the benchmarks.

What it does, as the recipe does:
- arguments: model/LoRA/quantization flags, data flags, and every SFTConfig field
  (HfArgumentParser), so run_peft_fsdp.sh's flags work as they are (`--max_length` is the
  newer name of `--max_seq_len`, `--eval_strategy` of `--evaluation_strategy`);
- tokenizer: the ChatML special tokens (pad <pad>, bos <s>, eos <|im_end|>, and the role
  markers) added, the recipe's ChatML template set, embeddings resized (pad_to_multiple_of=8);
- data: each split's `messages` rendered with the chat template to a `content` column;
  TRL's SFTTrainer tokenizes and packs it (`packing`, `dataset_text_field`);
- model: AutoModelForCausalLM in fp32 (the quant storage dtype for 4-bit), attention
  flash_attention_2 with --use_flash_attn, else eager; LoRA from the lora_* flags;
- `model.config.use_cache = not gradient_checkpointing`, `use_reentrant` for checkpointing;
- SFTTrainer + LoRA; Accelerate wraps it with FSDP from the launch config; trainer.train().

Differences, all outside the timed training steps unless stated:
- On a machine without GPUs, `keep_fsdp_on_cpu()` is called first (facts: Accelerate would
  otherwise silently drop FSDP on CPU).
- The final FULL_STATE_DICT save_model() is skipped unless --final_save True: under FSDP2 it
  crashes in PEFT's save_pretrained (the recipe's own script too).
- The data set is read from local directories (load_from_disk(<dataset_name>/<split>), the
  recipe's own fallback) without first asking the hub; nothing can be downloaded here.
- Bench-only flags: --bench_timer (step times, see benchlib.step_timer), --bench_reset_peak,
  --bench_ddp (no FSDP: the no-sharding baseline),
  --attn_implementation (overrides the flash/eager choice, e.g. sdpa to match our kernel).
"""

import os
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

# bench-only: --bench_ddp True trains without FSDP (plain multi-process data parallel, every
# rank holding the whole model) under the same launch config: the "no sharding" baseline
BENCH_DDP = any(a in ("--bench_ddp", "--bench_ddp=True") for a in sys.argv)

if not torch.cuda.is_available() and not BENCH_DDP:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))
    from shardtune.launch.cpu_fsdp import keep_fsdp_on_cpu

    keep_fsdp_on_cpu()  # before anything creates Accelerate's state

from datasets import DatasetDict, load_dataset, load_from_disk  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, HfArgumentParser, set_seed  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

# The recipe's templates and special tokens (utils.py).
CHATML_TEMPLATE = (
    "{% for message in messages %}\n"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% if loop.last and add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}{% endfor %}"
)
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)
SPECIAL_TOKENS = {
    "chatml": dict(
        pad="<pad>",
        bos="<s>",
        eos="<|im_end|>",
        extra=["<|im_start|>user", "<|im_start|>assistant", "<|im_start|>system", "<|im_end|>", "<s>", "<pad>"],
        template=CHATML_TEMPLATE,
    ),
    "zephyr": dict(
        pad="<pad>",
        bos="<s>",
        eos="</s>",
        extra=["<|user|>", "<|assistant|>", "<|system|>", "</s>", "<s>", "<pad>"],
        template=ZEPHYR_TEMPLATE,
    ),
}


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "model directory or hub id"})
    chat_template_format: str = field(default="none", metadata={"help": "chatml|zephyr|none"})
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.1)
    lora_r: int = field(default=64)
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,down_proj,up_proj,gate_proj",
        metadata={"help": "comma-separated module names, or all-linear"},
    )
    use_nested_quant: bool = field(default=False)
    bnb_4bit_compute_dtype: str = field(default="float16")
    bnb_4bit_quant_storage_dtype: str = field(default="uint8")
    bnb_4bit_quant_type: str = field(default="nf4")
    use_flash_attn: bool = field(default=False)
    use_peft_lora: bool = field(default=False)
    use_8bit_quantization: bool = field(default=False)
    use_4bit_quantization: bool = field(default=False)
    use_reentrant: bool = field(default=False)


@dataclass
class DataTrainingArguments:
    dataset_name: str = field(default="timdettmers/openassistant-guanaco")
    append_concat_token: bool = field(default=False)
    add_special_tokens: bool = field(default=False)
    splits: str = field(default="train,test")


@dataclass
class BenchArguments:
    final_save: bool = field(default=False, metadata={"help": "the recipe's FULL_STATE_DICT save (crashes under FSDP2)"})
    attn_implementation: Optional[str] = field(default=None, metadata={"help": "override the flash/eager choice"})
    bench_timer: Optional[str] = field(default=None, metadata={"help": "write step times here (benchlib.step_timer)"})
    bench_reset_peak: bool = field(default=False, metadata={"help": "count peak RSS from the start of training"})
    bench_ddp: bool = field(default=False, metadata={"help": "no FSDP: plain data parallel under the same launch"})


def load_splits(data_args):
    raw = DatasetDict()
    for split in data_args.splits.split(","):
        local = os.path.join(data_args.dataset_name, split)
        dataset = load_from_disk(local) if os.path.isdir(local) else load_dataset(data_args.dataset_name, split=split)
        if "train" in split:
            raw["train"] = dataset
        elif "test" in split:
            raw["test"] = dataset
        else:
            raise ValueError(f"split {split} is neither a train nor a test split")
    return raw


def create_datasets(tokenizer, data_args, apply_chat_template):
    raw = load_splits(data_args)
    if apply_chat_template:

        def render(batch):
            return {"content": [tokenizer.apply_chat_template(c, tokenize=False) for c in batch["messages"]]}

        raw = raw.map(render, batched=True, remove_columns=raw["train"].column_names)
    print(f"train rows: {len(raw['train'])}, test rows: {len(raw['test'])}")
    return raw["train"], raw["test"]


def create_and_prepare_model(args, bench):
    bnb_config, storage = None, None
    if args.use_4bit_quantization:
        storage = getattr(torch, args.bnb_4bit_quant_storage_dtype)
        bnb_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=args.bnb_4bit_quant_type,
            bnb_4bit_compute_dtype=getattr(torch, args.bnb_4bit_compute_dtype),
            bnb_4bit_use_double_quant=args.use_nested_quant,
            bnb_4bit_quant_storage=storage,
        )
    elif args.use_8bit_quantization:
        bnb_config = BitsAndBytesConfig(load_in_8bit=True)
    attn = bench.attn_implementation or ("flash_attention_2" if args.use_flash_attn else "eager")
    model = AutoModelForCausalLM.from_pretrained(
        args.model_name_or_path,
        quantization_config=bnb_config,
        attn_implementation=attn,
        dtype=storage if storage is not None and storage.is_floating_point else torch.float32,
    )
    peft_config = None
    if args.use_peft_lora:
        targets = args.lora_target_modules
        peft_config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            bias="none",
            task_type="CAUSAL_LM",
            target_modules=targets if targets == "all-linear" else targets.split(","),
        )
    special = SPECIAL_TOKENS.get(args.chat_template_format)
    if special:
        tokenizer = AutoTokenizer.from_pretrained(
            args.model_name_or_path,
            pad_token=special["pad"],
            bos_token=special["bos"],
            eos_token=special["eos"],
            additional_special_tokens=special["extra"],
        )
        tokenizer.chat_template = special["template"]
        fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        # mean_resizing=False for a quantized model under FSDP (its embeddings may be on meta)
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8, mean_resizing=not (bnb_config and fsdp))
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)
        tokenizer.pad_token = tokenizer.eos_token
    return model, peft_config, tokenizer


def main(model_args, data_args, training_args, bench):
    set_seed(training_args.seed)
    model, peft_config, tokenizer = create_and_prepare_model(model_args, bench)
    model.config.use_cache = not training_args.gradient_checkpointing
    if training_args.gradient_checkpointing:
        training_args.gradient_checkpointing_kwargs = {"use_reentrant": model_args.use_reentrant}
    training_args.dataset_kwargs = {
        "append_concat_token": data_args.append_concat_token,
        "add_special_tokens": data_args.add_special_tokens,
    }
    train_dataset, eval_dataset = create_datasets(tokenizer, data_args, model_args.chat_template_format != "none")
    callbacks = []
    if bench.bench_timer:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from benchlib import step_timer

        callbacks.append(step_timer(bench.bench_timer, bench.bench_reset_peak))
        # count tokens as ours does (one all-gather per micro-batch in both)
        training_args.include_num_input_tokens_seen = "non_padding"
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        callbacks=callbacks,
    )
    trainer.accelerator.print(f"distributed type: {trainer.accelerator.distributed_type}, fsdp: {trainer.is_fsdp_enabled}")
    if bench.bench_ddp:
        if trainer.is_fsdp_enabled or trainer.accelerator.num_processes < 2:
            raise SystemExit("--bench_ddp: expected plain data parallel over several processes")
    elif os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not trainer.is_fsdp_enabled:
        raise SystemExit("the launch config asks for FSDP but it is not active: not a fair comparison")
    if hasattr(trainer.model, "print_trainable_parameters"):
        trainer.model.print_trainable_parameters()
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if bench.final_save:
        if trainer.is_fsdp_enabled:
            trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model()


if __name__ == "__main__":
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, SFTConfig, BenchArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        parsed = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
    else:
        parsed = parser.parse_args_into_dataclasses()
    main(*parsed)
